"""The four ``.note.Xen`` notes: NONE, HEADER, XEN_VERSION and FORMAT_VERSION.

Layouts are those of ``xg_core.h``; see dump-core-layout.md §3.  Every note is decoded
from bounded bytes, and an unusable note gives a warning, never an exception, except
the HEADER note, without which the file cannot be mapped at all.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

NOTE_NAME = b"Xen"
XEN_ELFNOTE_DUMPCORE_NONE = 0x2000000
XEN_ELFNOTE_DUMPCORE_HEADER = 0x2000001
XEN_ELFNOTE_DUMPCORE_XEN_VERSION = 0x2000002
XEN_ELFNOTE_DUMPCORE_FORMAT_VERSION = 0x2000003

XC_CORE_MAGIC = 0xF00FEBED  # paravirtualised guest: .xen_p2m
XC_CORE_MAGIC_HVM = 0xF00FEBEE  # auto-translated (HVM, PVH, ARM): .xen_pfn
KNOWN_MAGICS = (XC_CORE_MAGIC, XC_CORE_MAGIC_HVM)
KNOWN_FORMAT_MAJORS = (0,)

EM_386 = 3

NOTE_TYPE_NAMES = {
    XEN_ELFNOTE_DUMPCORE_NONE: "XEN_ELFNOTE_DUMPCORE_NONE",
    XEN_ELFNOTE_DUMPCORE_HEADER: "XEN_ELFNOTE_DUMPCORE_HEADER",
    XEN_ELFNOTE_DUMPCORE_XEN_VERSION: "XEN_ELFNOTE_DUMPCORE_XEN_VERSION",
    XEN_ELFNOTE_DUMPCORE_FORMAT_VERSION: "XEN_ELFNOTE_DUMPCORE_FORMAT_VERSION",
}


@dataclass(frozen=True)
class RawNote:
    """One ELF note record as found in the section (offset is a file offset)."""

    name: bytes
    type: int
    offset: int
    desc: bytes


@dataclass(frozen=True)
class XenHeader:
    """``struct xen_dumpcore_elfnote_header_desc``."""

    magic: int
    nr_vcpus: int
    nr_pages: int
    page_size: int

    @property
    def is_pv(self) -> bool:
        return self.magic == XC_CORE_MAGIC

    @property
    def guest_type(self) -> str:
        return "PV" if self.is_pv else "HVM/PVH"


@dataclass(frozen=True)
class XenVersion:
    """``struct xen_dumpcore_elfnote_xen_version_desc`` (hypervisor facts, of dom0's view)."""

    major: int
    minor: int
    extra: str
    compiler: str
    compile_by: str
    compile_domain: str
    compile_date: str
    capabilities: str
    changeset: str
    virt_start: int
    pagesize: int
    layout: str  # which of the 64-bit, memmoved 32-bit-PV or 32-bit-toolstack layouts


@dataclass(frozen=True)
class FormatVersion:
    major: int
    minor: int

    @property
    def known(self) -> bool:
        return self.major in KNOWN_FORMAT_MAJORS

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}"


@dataclass
class XenNotes:
    """All notes of ``.note.Xen``, decoded, plus the problems met while decoding."""

    raw: list[RawNote] = field(default_factory=list)
    header: XenHeader | None = None
    xen_version: XenVersion | None = None
    format_version: FormatVersion | None = None
    has_none_note: bool = False
    warnings: list[str] = field(default_factory=list)


def iter_notes(data: bytes, base_offset: int, byteorder: str) -> tuple[list[RawNote], str | None]:
    """Split a note section into records (standard Nhdr with 4-byte rounding).

    Returns the records and, if the section ends in a damaged record, a description of it.
    """
    fmt = "<III" if byteorder == "little" else ">III"
    notes: list[RawNote] = []
    pos = 0
    while pos + 12 <= len(data):
        namesz, descsz, note_type = struct.unpack_from(fmt, data, pos)
        name_start = pos + 12
        desc_start = name_start + _align4(namesz)
        desc_end = desc_start + descsz
        if desc_end > len(data):
            return notes, (
                f"note at offset {base_offset + pos:#x} (namesz {namesz}, descsz {descsz}) "
                "runs past the end of .note.Xen"
            )
        name = data[name_start : name_start + namesz].rstrip(b"\0")
        notes.append(RawNote(name, note_type, base_offset + pos, data[desc_start:desc_end]))
        pos = desc_start + _align4(descsz)
    return notes, None


def _align4(value: int) -> int:
    return (value + 3) & ~3


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def decode_notes(data: bytes, base_offset: int, byteorder: str, e_machine: int) -> XenNotes:
    """Decode ``.note.Xen``; unknown or repeated notes are kept raw and reported."""
    records, damage = iter_notes(data, base_offset, byteorder)
    result = XenNotes(raw=records)
    if damage:
        result.warnings.append(damage)
    prefix = "<" if byteorder == "little" else ">"
    for note in records:
        if note.name != NOTE_NAME:
            continue
        if note.type == XEN_ELFNOTE_DUMPCORE_NONE:
            result.has_none_note = True
        elif note.type == XEN_ELFNOTE_DUMPCORE_HEADER and result.header is None:
            if len(note.desc) < 32:
                result.warnings.append(
                    f"header note at offset {note.offset:#x} has {len(note.desc)} bytes, needs 32"
                )
                continue
            result.header = XenHeader(*struct.unpack_from(prefix + "4Q", note.desc))
        elif note.type == XEN_ELFNOTE_DUMPCORE_XEN_VERSION and result.xen_version is None:
            version = decode_xen_version(note.desc, prefix, e_machine)
            if version is None:
                result.warnings.append(
                    f"xen_version note at offset {note.offset:#x} is too short "
                    f"({len(note.desc)} bytes)"
                )
            result.xen_version = version
        elif note.type == XEN_ELFNOTE_DUMPCORE_FORMAT_VERSION and result.format_version is None:
            if len(note.desc) < 8:
                result.warnings.append(f"format_version note at {note.offset:#x} is too short")
                continue
            (value,) = struct.unpack_from(prefix + "Q", note.desc)
            result.format_version = FormatVersion(value >> 32, value & 0xFFFFFFFF)
    if result.format_version is not None and not result.format_version.known:
        result.warnings.append(
            f"unknown dump-core format version {result.format_version} "
            f"(this reader knows major {KNOWN_FORMAT_MAJORS}); reading it as 0.x"
        )
    return result


# xen_version desc: fixed-size strings (name, offset, size), then
# platform_parameters.virt_start and pagesize.  The writer uses the same table.
XEN_VERSION_STRINGS = (
    ("extra", 16, 16),
    ("compiler", 32, 64),
    ("compile_by", 96, 16),
    ("compile_domain", 112, 32),
    ("compile_date", 144, 32),
    ("capabilities", 176, 1024),
    ("changeset", 1200, 64),
)
_VIRT_START = 1264


def decode_xen_version(desc: bytes, prefix: str, e_machine: int) -> XenVersion | None:
    """Decode the xen_version note in whichever of its three layouts it was written.

    - 1280 bytes, 64-bit guest: ``virt_start`` u64 @1264, ``pagesize`` u64 @1272;
    - 1280 bytes, EM_386 (32-bit PV guest, 64-bit toolstack): libxc ``memmove``s pagesize
      4 bytes down to @1268, leaving only the low half of ``virt_start``;
    - 1276 bytes (32-bit toolstack): ``virt_start`` u32 @1264, ``pagesize`` @1268.
    """
    if len(desc) < 1276:
        return None
    major, minor = struct.unpack_from(prefix + "QQ", desc)
    strings = {name: _text(desc[start : start + size]) for name, start, size in XEN_VERSION_STRINGS}
    if len(desc) >= 1280 and e_machine != EM_386:
        virt_start, pagesize = struct.unpack_from(prefix + "QQ", desc, _VIRT_START)
        layout = "64-bit"
    else:
        virt_start, pagesize = struct.unpack_from(prefix + "IQ", desc, _VIRT_START)
        layout = "32-bit PV (pagesize at 1268)" if len(desc) >= 1280 else "32-bit toolstack"
    return XenVersion(
        major=major,
        minor=minor,
        virt_start=virt_start,
        pagesize=pagesize,
        layout=layout,
        **strings,
    )
