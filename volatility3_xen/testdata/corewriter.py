"""Writer for Xen ``xc_core`` ELF dump-core files (what ``xl dump-core`` produces).

Used to craft test cores, sparse synthetic cores for benchmarks and sample cores built from a raw
guest image.  The defaults reproduce, byte for byte, the layout libxc writes on a 64-bit x86 dom0
(see ``shared/reference/dump-core-layout.md`` sections 1-5); the knobs on :class:`CoreSpec`
produce the historic and damaged variants a reader must also cope with.

Every core written here carries :data:`GENERATED_MARKER` in the ``xen_version`` changeset field
and :data:`GENERATED_EXTRA` in the extra-version field, so that a generated file can never be passed
off as evidence taken from a real hypervisor.

Memory use is O(table), never O(guest): pages come from a buffer-like raw image and/or a small
dict of explicit pages, everything else stays a sparse hole in the output file.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Literal, Union

import numpy as np

from ..formats.notes import XEN_VERSION_STRINGS
from ..formats.vcpu import LAYOUT_X86_32, LAYOUT_X86_64, encode_vcpu

# --- constants from the Xen headers (values in dump-core-layout.md) -------------------------------

EM_386 = 3
EM_ARM = 40
EM_IA_64 = 50
EM_X86_64 = 62

ELFCLASS32 = 32
ELFCLASS64 = 64

SHT_NULL = 0
SHT_PROGBITS = 1
SHT_STRTAB = 3
SHT_NOTE = 7

XC_CORE_MAGIC = 0xF00FEBED  # paravirtualised (.xen_p2m)
XC_CORE_MAGIC_HVM = 0xF00FEBEE  # auto-translated: HVM, PVH, ARM (.xen_pfn)
INVALID_PFN = 0xFFFF_FFFF_FFFF_FFFF  # XC_CORE_INVALID_PFN / _GMFN: table padding entry

NOTE_NONE = 0x2000000
NOTE_HEADER = 0x2000001
NOTE_XEN_VERSION = 0x2000002
NOTE_FORMAT_VERSION = 0x2000003
STANDARD_NOTES: tuple[int, ...] = (NOTE_NONE, NOTE_HEADER, NOTE_XEN_VERSION, NOTE_FORMAT_VERSION)

SECTION_NOTES = ".note.Xen"
SECTION_PRSTATUS = ".xen_prstatus"
SECTION_SHARED_INFO = ".xen_shared_info"
SECTION_PAGES = ".xen_pages"
SECTION_P2M = ".xen_p2m"
SECTION_PFN = ".xen_pfn"
SECTION_IA64_MAPPED_REGS = ".xen_ia64_mapped_regs"
SECTION_SHSTRTAB = ".shstrtab"

VCPU_CONTEXT_SIZE_X86 = 5168  # sizeof(vcpu_guest_context_any_t) on x86, Xen >= 4.0
VCPU_CONTEXT_SIZE_X86_32 = 2800  # compat layout, stored at the start of a 5168-byte slot
VCPU_CONTEXT_SIZE_ARM = 352
VCPU_CONTEXT_SIZE_IA64 = 22208  # vcpu_guest_context, Xen 3.2-4.2 (arch-ia64.h)
IA64_MAPPED_REGS_SIZE = 4096  # XMAPPEDREGS_SIZE

VGCF_I387_VALID = 1 << 0
VGCF_IN_KERNEL = 1 << 2
VGCF_ONLINE = 1 << 5

# Pfn ranges libxc (Xen >= 3.4) skips when dumping an x86 HVM guest: the VGA hole and the MMIO hole
# below 4 GiB.  Half-open [start, end) ranges.
LIBXC_HVM_HOLES: tuple[tuple[int, int], ...] = ((0xA0, 0xC0), (0xF0000, 0x100000))

GENERATED_MARKER = "volatility3-xen generated test core"
GENERATED_EXTRA = ".gen-vx3"

# xen_version descriptor (64-bit toolstack): the strings of notes.XEN_VERSION_STRINGS, then
# virt_start @1264 and pagesize @1272, total 1280 bytes.  A 32-bit toolstack packs pagesize at 1268.
_XV_DESC_SIZE_64 = 1280
_XV_DESC_SIZE_32 = 1276

XenVersionLayout = Literal["auto", "x86_64", "pv32", "toolstack32"]
Buffer = Union[bytes, bytearray, memoryview, Any]  # anything numpy.frombuffer accepts (e.g. mmap)

_PAGE_CHUNK_BYTES = 8 << 20  # image pages gathered per step while streaming .xen_pages
_TABLE_CHUNK_ENTRIES = 1 << 20  # table entries converted per step while writing the table


@dataclass(frozen=True)
class XenVersion:
    """Fields of the ``XEN_ELFNOTE_DUMPCORE_XEN_VERSION`` descriptor (hypervisor facts, dom0 view).

    ``pagesize`` None means "the core's page size".  Strings must fit their char array.
    """

    major: int = 4
    minor: int = 17
    extra: str = GENERATED_EXTRA
    compiler: str = "gcc (volatility3-xen writer)"
    compile_by: str = "volatility3-xen"
    compile_domain: str = "generated.invalid"
    compile_date: str = "Thu Jan  1 00:00:00 UTC 1970"
    capabilities: str = "xen-3.0-x86_64 hvm-3.0-x86_32 hvm-3.0-x86_32p hvm-3.0-x86_64"
    changeset: str = ""
    virt_start: int = 0xFFFF_8000_0000_0000
    pagesize: int | None = None


@dataclass(frozen=True)
class RawNote:
    """An arbitrary note record, for cores that deviate from what libxc writes."""

    name: bytes
    type: int
    desc: bytes


NoteItem = Union[int, RawNote]


@dataclass
class CoreSpec:
    """Everything that goes into one dump-core file.

    Table arrays are in FILE ORDER (entry i describes page i of ``.xen_pages``); ``INVALID_PFN``
    entries are padding and get zero pages.  Page i's contents: ``pages[i]`` if given, else image
    page ``pfns[i]`` if the image covers it, else zeros (left as a sparse hole).
    """

    kind: Literal["hvm", "pv"]
    pfns: np.ndarray
    gmfns: np.ndarray | None = None  # PV only: machine frame per table entry
    image: Buffer | None = None  # raw guest image, file offset == pfn * page_size
    pages: Mapping[int, bytes] = field(default_factory=dict)  # table index -> page bytes
    page_size: int = 4096
    byteorder: Literal["little", "big"] = "little"
    elf_class: int = ELFCLASS64
    machine: int = EM_X86_64
    vcpus: Sequence[bytes] | None = None  # None: one all-zero slot; each padded to entsize
    vcpu_entsize: int = VCPU_CONTEXT_SIZE_X86
    shared_info: bytes | None = None  # None: no .xen_shared_info section
    xen_version: XenVersion = field(default_factory=XenVersion)
    xen_version_layout: XenVersionLayout = "auto"
    toolstack32: bool | None = None  # None: True iff elf_class == 32
    format_version: tuple[int, int] = (0, 1)
    notes: Sequence[NoteItem] = STANDARD_NOTES  # order and selection of note records
    omit_sections: frozenset[str] = frozenset()  # section names to leave out entirely
    marker: str | None = GENERATED_MARKER  # written into changeset; None: use xen_version's
    nr_pages: int | None = None  # header xch_nr_pages override (damaged cores)
    nr_vcpus: int | None = None  # header xch_nr_vcpus override
    magic: int | None = None  # header xch_magic override
    abiversion: int = 1  # EI_ABIVERSION; libxc writes EV_CURRENT
    # ia64 PV: one mapped_regs_t page per vCPU in .xen_ia64_mapped_regs (None: no section),
    # entries of max(XMAPPEDREGS_SIZE, page size) bytes unless given; libxc wrote that
    # section's header and .xen_shared_info's crossed (see formats/ia64.py), and so does
    # this writer unless ia64_crossed_headers is False.
    ia64_mapped_regs: Sequence[bytes] | None = None
    ia64_mapped_regs_entsize: int | None = None
    ia64_crossed_headers: bool = True


@dataclass(frozen=True)
class SectionLayout:
    name: str
    index: int
    sh_name: int
    sh_type: int
    offset: int
    size: int
    addralign: int
    entsize: int


@dataclass(frozen=True)
class CoreLayout:
    """Where everything lands in the file (from :func:`plan_layout` and :func:`write_core`)."""

    sections: tuple[SectionLayout, ...]  # in section-header order, index 0 is the NULL section
    shstrndx: int
    file_size: int
    #: Where a section's bytes really are when its header says otherwise (ia64's crossed
    #: mapped_regs / shared_info headers).
    data_offsets: Mapping[str, int] = field(default_factory=dict)

    def data_offset(self, name: str) -> int:
        return self.data_offsets.get(name, self.section(name).offset)

    def section(self, name: str) -> SectionLayout:
        for sec in self.sections:
            if sec.name == name:
                return sec
        raise KeyError(name)

    def has(self, name: str) -> bool:
        return any(sec.name == name for sec in self.sections)


# --- table helpers --------------------------------------------------------------------------------


def hvm_table_for_image(
    n_pages: int,
    holes: Sequence[tuple[int, int]] = LIBXC_HVM_HOLES,
    tail_padding: int = 0,
) -> np.ndarray:
    """``.xen_pfn`` entries for pfns ``[0, n_pages)`` minus ``holes``, then ``tail_padding`` x ~0.

    Mirrors libxc: ascending, VGA/MMIO holes skipped, invalid entries only at the end.
    """
    if tail_padding < 0:
        raise ValueError("tail_padding must be >= 0")
    runs: list[tuple[int, int]] = []  # kept [start, end) ranges
    cursor = 0
    for start, end in sorted(holes):
        start, end = min(max(start, cursor), n_pages), min(max(end, cursor), n_pages)
        runs.append((cursor, start))
        cursor = max(cursor, end)
    runs.append((cursor, n_pages))
    # One allocation filled in place, so a 64 GiB guest costs one table's worth of memory.
    kept = sum(end - start for start, end in runs)
    pfns = np.full(kept + tail_padding, INVALID_PFN, dtype=np.uint64)
    pos = 0
    for start, end in runs:
        for lo in range(start, end, _TABLE_CHUNK_ENTRIES):  # chunked: no guest-sized temporary
            hi = min(lo + _TABLE_CHUNK_ENTRIES, end)
            pfns[pos : pos + hi - lo] = np.arange(lo, hi, dtype=np.uint64)
            pos += hi - lo
    return pfns


def pv_table(
    pfns: Sequence[int] | np.ndarray,
    mfns: Sequence[int] | np.ndarray,
    tail_padding: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """``.xen_p2m`` entries (pfn, gmfn arrays) followed by ``tail_padding`` x {~0, ~0}."""
    pfn_arr = np.asarray(pfns, dtype=np.uint64).ravel()
    mfn_arr = np.asarray(mfns, dtype=np.uint64).ravel()
    if pfn_arr.shape != mfn_arr.shape:
        raise ValueError(f"pfns ({pfn_arr.size}) and mfns ({mfn_arr.size}) differ in length")
    return _pad(pfn_arr, tail_padding), _pad(mfn_arr, tail_padding)


def _pad(entries: np.ndarray, count: int) -> np.ndarray:
    if count < 0:
        raise ValueError("tail_padding must be >= 0")
    return np.concatenate([entries, np.full(count, INVALID_PFN, dtype=np.uint64)])


# --- vCPU context helpers -------------------------------------------------------------------------


def vcpu_context_x86_64(
    *,
    cr3: int = 0,
    rip: int = 0,
    rsp: int = 0,
    cr0: int = 0x8005_0033,
    cr4: int = 0x0000_06F0,
    flags: int = VGCF_I387_VALID | VGCF_IN_KERNEL | VGCF_ONLINE,
    fs_base: int = 0,
    gs_base_kernel: int = 0,
    gs_base_user: int = 0,
    byteorder: Literal["little", "big"] = "little",
) -> bytes:
    """A 5168-byte x86_64 ``vcpu_guest_context`` with the fields readers use; the rest is zero.

    (``vcpu.encode_vcpu`` sets any field; this is the short form for test cores.)
    """
    registers = {
        "flags": flags,
        "rip": rip,
        "rsp": rsp,
        "cr0": cr0,
        "cr3": cr3,
        "cr4": cr4,
        "fs_base": fs_base,
        "gs_base_kernel": gs_base_kernel,
        "gs_base_user": gs_base_user,
    }
    return encode_vcpu(LAYOUT_X86_64, byteorder, registers)


def compat_cr3(mfn: int) -> int:
    """``compat_pfn_to_cr3``: how Xen stores a 32-bit PV guest's L3 mfn in ctrlreg[3]."""
    return ((mfn << 12) | (mfn >> 20)) & 0xFFFF_FFFF


def vcpu_context_x86_32(
    *,
    cr3: int = 0,
    eip: int = 0,
    esp: int = 0,
    cr0: int = 0x8005_003B,
    cr4: int = 0x0000_06F0,
    flags: int = VGCF_I387_VALID | VGCF_IN_KERNEL | VGCF_ONLINE,
    byteorder: Literal["little", "big"] = "little",
) -> bytes:
    """A 2800-byte x86_32 (compat) context; ``cr3`` is the raw ctrlreg value (see compat_cr3)."""
    registers = {"flags": flags, "eip": eip, "esp": esp, "cr0": cr0, "cr3": cr3, "cr4": cr4}
    return encode_vcpu(LAYOUT_X86_32, byteorder, registers)


# --- layout ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Elf:
    """Struct formats and sizes for one ELF class + byte order."""

    e: str
    is64: bool

    @property
    def ehdr_size(self) -> int:
        return 64 if self.is64 else 52

    @property
    def shdr_size(self) -> int:
        return 64 if self.is64 else 40

    @property
    def phdr_size(self) -> int:
        return 56 if self.is64 else 32

    def ehdr(self, machine: int, shoff: int, shnum: int, shstrndx: int, abiversion: int) -> bytes:
        ident = b"\x7fELF" + bytes(
            [
                2 if self.is64 else 1,
                1 if self.e == "<" else 2,
                1,  # EI_VERSION
                0,  # EI_OSABI: SYSV
                abiversion,
            ]
        )
        ident = ident.ljust(16, b"\0")
        addr = "Q" if self.is64 else "I"
        fmt = self.e + "HHI" + addr * 3 + "IHHHHHH"
        rest = struct.pack(
            fmt,
            4,  # ET_CORE
            machine,
            1,  # e_version
            0,  # e_entry
            0,  # e_phoff
            shoff,
            0,  # e_flags
            self.ehdr_size,
            self.phdr_size,  # libxc sets e_phentsize although e_phnum == 0
            0,
            self.shdr_size,
            shnum,
            shstrndx,
        )
        return ident + rest

    def shdr(self, sec: SectionLayout) -> bytes:
        if self.is64:
            return struct.pack(
                self.e + "IIQQQQIIQQ",
                *(sec.sh_name, sec.sh_type, 0, 0, sec.offset, sec.size),
                *(0, 0, sec.addralign, sec.entsize),
            )
        return struct.pack(
            self.e + "IIIIIIIIII",
            *(sec.sh_name, sec.sh_type, 0, 0, sec.offset, sec.size),
            *(0, 0, sec.addralign, sec.entsize),
        )


def _elf_for(spec: CoreSpec) -> _Elf:
    if spec.byteorder not in ("little", "big"):
        raise ValueError(f"byteorder must be 'little' or 'big', not {spec.byteorder!r}")
    if spec.elf_class not in (ELFCLASS32, ELFCLASS64):
        raise ValueError(f"elf_class must be 32 or 64, not {spec.elf_class!r}")
    return _Elf("<" if spec.byteorder == "little" else ">", spec.elf_class == ELFCLASS64)


def _is_toolstack32(spec: CoreSpec) -> bool:
    return spec.elf_class == ELFCLASS32 if spec.toolstack32 is None else spec.toolstack32


def _table_arrays(spec: CoreSpec) -> tuple[np.ndarray, np.ndarray | None]:
    pfns = np.asarray(spec.pfns, dtype=np.uint64).ravel()
    if spec.kind == "pv":
        if spec.gmfns is None:
            raise ValueError("a PV core needs gmfns (one machine frame per table entry)")
        gmfns = np.asarray(spec.gmfns, dtype=np.uint64).ravel()
        if gmfns.shape != pfns.shape:
            raise ValueError(f"pfns ({pfns.size}) and gmfns ({gmfns.size}) differ in length")
        return pfns, gmfns
    if spec.kind == "hvm":
        if spec.gmfns is not None:
            raise ValueError("an HVM core has no gmfns (.xen_pfn holds pfns only)")
        return pfns, None
    raise ValueError(f"kind must be 'hvm' or 'pv', not {spec.kind!r}")


def _vcpu_slots(spec: CoreSpec) -> list[bytes]:
    vcpus = [b""] if spec.vcpus is None else list(spec.vcpus)
    slots = []
    for i, ctx in enumerate(vcpus):
        if len(ctx) > spec.vcpu_entsize:
            raise ValueError(f"vCPU {i} context is {len(ctx)} bytes > entsize {spec.vcpu_entsize}")
        slots.append(bytes(ctx).ljust(spec.vcpu_entsize, b"\0"))
    return slots


def _ia64_regs_entsize(spec: CoreSpec) -> int:
    if spec.ia64_mapped_regs_entsize is not None:
        return spec.ia64_mapped_regs_entsize
    return max(IA64_MAPPED_REGS_SIZE, spec.page_size)


def _ia64_regs_blob(spec: CoreSpec) -> bytes:
    entsize = _ia64_regs_entsize(spec)
    pages = list(spec.ia64_mapped_regs or ())
    for i, page in enumerate(pages):
        if len(page) > entsize:
            raise ValueError(f"ia64 mapped_regs {i} is {len(page)} bytes > entsize {entsize}")
    return b"".join(bytes(page).ljust(entsize, b"\0") for page in pages)


def _check_page_size(page_size: int) -> None:
    if page_size < 512 or page_size & (page_size - 1):
        raise ValueError(f"page_size must be a power of two >= 512, not {page_size}")


def plan_layout(spec: CoreSpec) -> CoreLayout:
    """Compute section headers (order, offsets, sizes) exactly as libxc lays them out."""
    _check_page_size(spec.page_size)
    elf = _elf_for(spec)
    pfns, _ = _table_arrays(spec)
    n_entries = int(pfns.size)
    ps = spec.page_size
    table_name = SECTION_P2M if spec.kind == "pv" else SECTION_PFN
    table_entsize = 16 if spec.kind == "pv" else 8
    table_align = 4 if (spec.kind == "pv" and _is_toolstack32(spec)) else 8
    unknown = set(spec.omit_sections) - {
        SECTION_SHSTRTAB,
        SECTION_NOTES,
        SECTION_PRSTATUS,
        SECTION_SHARED_INFO,
        SECTION_PAGES,
        SECTION_IA64_MAPPED_REGS,
        table_name,
    }
    if unknown:
        raise ValueError(f"cannot omit unknown section(s) {sorted(unknown)}")

    # (name, sh_type, size, addralign, entsize) in section-header order (xg_core.c 593-741).
    wanted: list[tuple[str, int, int, int, int]] = [
        (SECTION_SHSTRTAB, SHT_STRTAB, 0, 0, 0),  # size fixed below, once names are known
        (SECTION_NOTES, SHT_NOTE, len(_notes_blob(spec)), 0, 0),
        (
            SECTION_PRSTATUS,
            SHT_PROGBITS,
            spec.vcpu_entsize * len(_vcpu_slots(spec)),
            8,
            spec.vcpu_entsize,
        ),
    ]
    if spec.ia64_mapped_regs is not None:  # header after prstatus (xc_core.c, ia64 only)
        regs_entsize = _ia64_regs_entsize(spec)
        regs_size = regs_entsize * len(spec.ia64_mapped_regs)
        wanted.append((SECTION_IA64_MAPPED_REGS, SHT_PROGBITS, regs_size, 8, regs_entsize))
    if spec.shared_info is not None:
        wanted.append((SECTION_SHARED_INFO, SHT_PROGBITS, ps, 8, ps))
    wanted.append((SECTION_PAGES, SHT_PROGBITS, n_entries * ps, ps, ps))
    wanted.append((table_name, SHT_PROGBITS, n_entries * table_entsize, table_align, table_entsize))
    wanted = [w for w in wanted if w[0] not in spec.omit_sections]

    names = [w[0] for w in wanted]
    with_strtab = SECTION_SHSTRTAB in names
    strtab = _shstrtab(names) if with_strtab else b""
    name_offsets = {n: strtab.index(n.encode() + b"\0") for n in names} if with_strtab else {}

    # Data order differs from header order: notes, prstatus, shared info, [ia64 mapped regs],
    # pad, pages, table, strtab.
    shnum = 1 + len(wanted)
    offset = elf.ehdr_size + shnum * elf.shdr_size
    data_offsets: dict[str, int] = {}
    for name in (SECTION_NOTES, SECTION_PRSTATUS, SECTION_SHARED_INFO, SECTION_IA64_MAPPED_REGS):
        if name in names:
            data_offsets[name] = offset
            offset += next(w[2] for w in wanted if w[0] == name)
    header_offsets = dict(data_offsets)
    if spec.ia64_crossed_headers and {SECTION_IA64_MAPPED_REGS, SECTION_SHARED_INFO} <= set(names):
        # libxc: headers regs-then-shared-info from the end of prstatus, data the other way.
        regs_size = next(w[2] for w in wanted if w[0] == SECTION_IA64_MAPPED_REGS)
        header_offsets[SECTION_IA64_MAPPED_REGS] = data_offsets[SECTION_SHARED_INFO]
        header_offsets[SECTION_SHARED_INFO] = data_offsets[SECTION_SHARED_INFO] + regs_size
    if SECTION_PAGES in names:
        offset = -(-offset // ps) * ps
        data_offsets[SECTION_PAGES] = offset
        offset += n_entries * ps
    if table_name in names:
        data_offsets[table_name] = offset
        offset += n_entries * table_entsize
    if with_strtab:
        data_offsets[SECTION_SHSTRTAB] = offset
        offset += len(strtab)
    if not elf.is64 and offset > 0xFFFF_FFFF:
        raise ValueError(f"an ELFCLASS32 core cannot exceed 4 GiB ({offset} bytes needed)")

    sections = [SectionLayout("", 0, 0, SHT_NULL, 0, 0, 0, 0)]
    for index, (name, sh_type, size, align, entsize) in enumerate(wanted, start=1):
        if name == SECTION_SHSTRTAB:
            size = len(strtab)
        sections.append(
            SectionLayout(
                name=name,
                index=index,
                sh_name=name_offsets.get(name, 0),
                sh_type=sh_type,
                offset=header_offsets.get(name, data_offsets.get(name, 0)),
                size=size,
                addralign=align,
                entsize=entsize,
            )
        )
    shstrndx = names.index(SECTION_SHSTRTAB) + 1 if with_strtab else 0
    moved = {n: o for n, o in data_offsets.items() if header_offsets.get(n, o) != o}
    return CoreLayout(tuple(sections), shstrndx, offset, moved)


def _shstrtab(names: Sequence[str]) -> bytes:
    return b"\0" + b"".join(n.encode() + b"\0" for n in names)


# --- notes ----------------------------------------------------------------------------------------


def _note(e: str, name: bytes, note_type: int, desc: bytes) -> bytes:
    name_z = name + b"\0"
    head = struct.pack(e + "III", len(name_z), len(desc), note_type)
    return (
        head
        + name_z.ljust(-(-len(name_z) // 4) * 4, b"\0")
        + desc.ljust(-(-len(desc) // 4) * 4, b"\0")
    )


def _fixed_str(value: str, size: int, what: str) -> bytes:
    raw = value.encode("ascii")
    if len(raw) >= size:
        raise ValueError(f"xen_version {what} {value!r} does not fit char[{size}] with its NUL")
    return raw.ljust(size, b"\0")


def _xen_version_desc(spec: CoreSpec) -> bytes:
    e = "<" if spec.byteorder == "little" else ">"
    xv = spec.xen_version
    layout = spec.xen_version_layout
    if layout == "auto":
        if _is_toolstack32(spec):
            layout = "toolstack32"
        else:
            layout = "pv32" if spec.machine == EM_386 else "x86_64"
    if layout not in ("x86_64", "pv32", "toolstack32"):
        raise ValueError(f"unknown xen_version_layout {layout!r}")
    changeset = xv.changeset if spec.marker is None else spec.marker
    values = {s: getattr(xv, s) for s, _, _ in XEN_VERSION_STRINGS} | {"changeset": changeset}
    pagesize = spec.page_size if xv.pagesize is None else xv.pagesize

    desc = bytearray(_XV_DESC_SIZE_64)
    struct.pack_into(e + "QQ", desc, 0, xv.major, xv.minor)
    for name, off, size in XEN_VERSION_STRINGS:
        desc[off : off + size] = _fixed_str(values[name], size, name)
    if layout == "toolstack32":
        # i386 toolstack: xen_ulong_t virt_start is 4 bytes and the u64 pagesize is 4-aligned.
        struct.pack_into(e + "IQ", desc, 1264, xv.virt_start & 0xFFFF_FFFF, pagesize)
        return bytes(desc[:_XV_DESC_SIZE_32])
    struct.pack_into(e + "QQ", desc, 1264, xv.virt_start, pagesize)
    if layout == "pv32":
        # libxc: memmove(&pagesize - 4 bytes, &pagesize, 8) for guest_width < sizeof(long); the
        # last 4 bytes keep the stale high half of the old pagesize.
        desc[1268:1276] = desc[1272:1280]
    return bytes(desc)


def _notes_blob(spec: CoreSpec) -> bytes:
    e = "<" if spec.byteorder == "little" else ">"
    pfns, _ = _table_arrays(spec)
    n_vcpus = len(_vcpu_slots(spec)) if spec.nr_vcpus is None else spec.nr_vcpus
    n_pages = int(pfns.size) if spec.nr_pages is None else spec.nr_pages
    default_magic = XC_CORE_MAGIC if spec.kind == "pv" else XC_CORE_MAGIC_HVM
    magic = default_magic if spec.magic is None else spec.magic
    major, minor = spec.format_version
    descs = {
        NOTE_NONE: b"",
        NOTE_HEADER: struct.pack(e + "QQQQ", magic, n_vcpus, n_pages, spec.page_size),
        NOTE_XEN_VERSION: _xen_version_desc(spec),
        NOTE_FORMAT_VERSION: struct.pack(e + "Q", (major << 32) | minor),
    }
    out = bytearray()
    for item in spec.notes:
        if isinstance(item, RawNote):
            out += _note(e, item.name, item.type, item.desc)
        elif item in descs:
            out += _note(e, b"Xen", item, descs[item])
        else:
            raise ValueError(f"unknown standard note type {item:#x}; use RawNote")
    return bytes(out)


# --- writing --------------------------------------------------------------------------------------


def open_output(path: str | os.PathLike[str]) -> BinaryIO:
    """``open(path, "wb")`` that refuses to follow a symlink at ``path`` (``O_NOFOLLOW``):
    a link planted where an output is written must not redirect it to another file."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    flags |= getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    return os.fdopen(os.open(path, flags, 0o666), "wb")


def write_core(path: str | os.PathLike[str], spec: CoreSpec) -> CoreLayout:
    """Write ``spec`` to ``path`` (truncating it) and return the layout used.

    The page area is streamed: only nonzero pages are written, the rest is a sparse hole.
    """
    layout = plan_layout(spec)
    elf = _elf_for(spec)
    pfns, gmfns = _table_arrays(spec)
    ps = spec.page_size

    head = bytearray(
        elf.ehdr(
            spec.machine, elf.ehdr_size, len(layout.sections), layout.shstrndx, spec.abiversion
        )
    )
    for sec in layout.sections:
        head += elf.shdr(sec)
    blobs = {SECTION_NOTES: _notes_blob(spec), SECTION_PRSTATUS: b"".join(_vcpu_slots(spec))}
    if spec.shared_info is not None:
        if len(spec.shared_info) > ps:
            raise ValueError(f"shared_info is {len(spec.shared_info)} bytes > page size {ps}")
        blobs[SECTION_SHARED_INFO] = bytes(spec.shared_info).ljust(ps, b"\0")
    if spec.ia64_mapped_regs is not None:
        blobs[SECTION_IA64_MAPPED_REGS] = _ia64_regs_blob(spec)
    for name in (SECTION_NOTES, SECTION_PRSTATUS, SECTION_SHARED_INFO, SECTION_IA64_MAPPED_REGS):
        if layout.has(name):
            offset = layout.data_offset(name)
            assert offset == len(head), (name, offset, len(head))
            head += blobs[name]

    with open_output(path) as out:
        out.write(head)
        if layout.has(SECTION_PAGES):
            pages_offset = layout.section(SECTION_PAGES).offset
            out.write(bytes(pages_offset - len(head)))  # libxc writes the alignment pad as zeros
            _write_pages(out, pages_offset, spec, pfns)
        table_name = SECTION_P2M if spec.kind == "pv" else SECTION_PFN
        if layout.has(table_name):
            out.seek(layout.section(table_name).offset)
            _write_table(out, pfns, gmfns, "<" if spec.byteorder == "little" else ">")
        if layout.has(SECTION_SHSTRTAB):
            sec = layout.section(SECTION_SHSTRTAB)
            out.seek(sec.offset)
            out.write(_shstrtab([s.name for s in layout.sections[1:]]))
        out.truncate(layout.file_size)
    return layout


def _write_table(out: Any, pfns: np.ndarray, gmfns: np.ndarray | None, e: str) -> None:
    dtype = np.dtype(e + "u8")
    for start in range(0, pfns.size, _TABLE_CHUNK_ENTRIES):
        stop = start + _TABLE_CHUNK_ENTRIES
        if gmfns is None:
            out.write(np.ascontiguousarray(pfns[start:stop], dtype=dtype).data)
        else:
            pairs = np.empty((min(stop, pfns.size) - start, 2), dtype=dtype)
            pairs[:, 0] = pfns[start:stop]
            pairs[:, 1] = gmfns[start:stop]
            out.write(pairs.data)


def _write_pages(out: Any, pages_offset: int, spec: CoreSpec, pfns: np.ndarray) -> None:
    ps = spec.page_size
    explicit = dict(spec.pages)
    for index in explicit:
        if not 0 <= index < pfns.size:
            raise ValueError(f"explicit page index {index} outside the table (0..{pfns.size - 1})")
    if spec.image is not None:
        image = np.frombuffer(spec.image, dtype=np.uint8)
        n_full = image.size // ps
        if image.size % ps:
            # A partial last image page is padded with zeros and treated like an explicit page.
            tail = image[n_full * ps :].tobytes()
            for index in np.flatnonzero(pfns == n_full).tolist():
                explicit.setdefault(index, tail)
        explicit_idx = np.fromiter(explicit.keys(), dtype=np.int64, count=len(explicit))
        full_pages = image[: n_full * ps].reshape(n_full, ps)
        for start, rows, data in _image_chunks(full_pages, pfns, explicit_idx, ps):
            _write_page_runs(out, pages_offset, ps, start + rows, data)
    for index, page in explicit.items():
        if len(page) > ps:
            raise ValueError(f"explicit page {index} is {len(page)} bytes > page size {ps}")
        out.seek(pages_offset + index * ps)
        out.write(page)  # shorter pages are zero-filled by the hole/pad around them


def _image_chunks(
    full_pages: np.ndarray, pfns: np.ndarray, explicit_idx: np.ndarray, ps: int
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield (chunk start, table rows within chunk, their nonzero page data) chunk by chunk."""
    chunk = max(1, _PAGE_CHUNK_BYTES // ps)
    n_full = full_pages.shape[0]
    for start in range(0, pfns.size, chunk):
        chunk_pfns = pfns[start : start + chunk]
        rows = np.flatnonzero(chunk_pfns < n_full)  # ~0 padding and pfns beyond the image drop out
        if explicit_idx.size:
            rows = rows[~np.isin(rows + start, explicit_idx)]
        if not rows.size:
            continue
        data = full_pages[chunk_pfns[rows].astype(np.intp)]
        nonzero = data.view(np.uint64).any(axis=1)
        yield start, rows[nonzero], data[nonzero]


def _write_page_runs(
    out: Any, pages_offset: int, ps: int, indices: np.ndarray, data: np.ndarray
) -> None:
    """Write pages at table ``indices`` (ascending), one write per run of consecutive indices."""
    if not indices.size:
        return
    breaks = np.flatnonzero(np.diff(indices) != 1) + 1
    bounds = np.concatenate([[0], breaks, [indices.size]]).tolist()
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        out.seek(pages_offset + int(indices[lo]) * ps)
        out.write(data[lo:hi].data)


# --- convenience ----------------------------------------------------------------------------------


def write_hvm_from_image(
    path: str | os.PathLike[str],
    image: Buffer,
    *,
    page_size: int = 4096,
    holes: Sequence[tuple[int, int]] = LIBXC_HVM_HOLES,
    tail_padding: int = 0,
    **spec_fields: Any,
) -> CoreSpec:
    """HVM core of a raw image (pfn p = image[p*ps:(p+1)*ps]); returns the spec written.

    Extra keyword arguments are :class:`CoreSpec` fields (vcpus, shared_info, ...).
    """
    n_pages = -(-np.frombuffer(image, dtype=np.uint8).size // page_size)
    pfns = hvm_table_for_image(n_pages, holes=holes, tail_padding=tail_padding)
    spec = CoreSpec(kind="hvm", pfns=pfns, image=image, page_size=page_size, **spec_fields)
    write_core(path, spec)
    return spec


def write_pv_from_image(
    path: str | os.PathLike[str],
    image: Buffer,
    mfns: Sequence[int] | np.ndarray,
    *,
    page_size: int = 4096,
    tail_padding: int = 0,
    **spec_fields: Any,
) -> CoreSpec:
    """PV core of a raw image; ``mfns[p]`` is pfn p's machine frame (``INVALID_PFN``: not dumped).

    Entries are written in ascending pfn order like libxc; returns the spec written.
    """
    p2m = np.asarray(mfns, dtype=np.uint64).ravel()
    pfns = np.flatnonzero(p2m != INVALID_PFN).astype(np.uint64)
    table_pfns, table_mfns = pv_table(pfns, p2m[pfns.astype(np.intp)], tail_padding=tail_padding)
    spec = CoreSpec(
        kind="pv",
        pfns=table_pfns,
        gmfns=table_mfns,
        image=image,
        page_size=page_size,
        **spec_fields,
    )
    write_core(path, spec)
    return spec
