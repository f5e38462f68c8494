"""Small Xen dump-cores for the hostile and fuzz tests, their byte-level mutators, and an
independent oracle for what a correct (possibly partial) view must map.

Cores come from ``volatility3_xen.testdata.corewriter`` (libxc's exact layout); every page is
tagged with its table index and pfn, so a page read through the wrong mapping can never look
right.  The
oracle re-reads the table straight from the bytes with ``struct`` (it shares no code with
``pagemap``/``dumpcore``) and applies the documented rules: ``~0`` entries are padding, pfns
at or above 2^(52-shift) are damage, a pfn listed twice keeps its first page, and only pages
wholly inside the file can be mapped.
"""

from __future__ import annotations

import struct
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from volatility3_xen.formats.dumpcore import XenDumpCore
from volatility3_xen.testdata import corewriter as w

INVALID = w.INVALID_PFN
PHYS_ADDR_BITS = 52


def tagged_page(index: int, pfn: int, page_size: int) -> bytes:
    """A page that can only be table entry ``index``'s: index and pfn in every 16 bytes."""
    return struct.pack("<QQ", 0x7A6E_0000_0000_0000 | index, pfn) * (page_size // 16)


@dataclass(frozen=True)
class Core:
    """A core's bytes plus where the writer put everything (offsets into ``data``)."""

    data: bytes
    layout: w.CoreLayout
    spec: w.CoreSpec

    @property
    def e(self) -> str:
        return "<" if self.spec.byteorder == "little" else ">"

    @property
    def is64(self) -> bool:
        return self.spec.elf_class == w.ELFCLASS64

    @property
    def table_name(self) -> str:
        return w.SECTION_P2M if self.spec.kind == "pv" else w.SECTION_PFN

    @property
    def entsize(self) -> int:
        return 16 if self.spec.kind == "pv" else 8

    def section(self, name: str) -> w.SectionLayout:
        return self.layout.section(name)

    def with_data(self, data: bytes | bytearray) -> Core:
        return replace(self, data=bytes(data))


def make_core(
    kind: str = "hvm",
    pfns: list[int] | None = None,
    gmfns: list[int] | None = None,
    **spec_fields: object,
) -> Core:
    """Write a small tagged core (default: 8 pages, pfns 0..7, HVM) and return its bytes."""
    pfns = list(range(8)) if pfns is None else pfns
    page_size = int(spec_fields.get("page_size", 4096))  # type: ignore[arg-type]
    if kind == "pv" and gmfns is None:
        gmfns = [0x1000 + 3 * i if p != INVALID else INVALID for i, p in enumerate(pfns)]
    pages = {i: tagged_page(i, p, page_size) for i, p in enumerate(pfns) if p != INVALID}
    spec = w.CoreSpec(
        kind=kind,  # type: ignore[arg-type]
        pfns=np.array(pfns, dtype=np.uint64),
        gmfns=None if gmfns is None else np.array(gmfns, dtype=np.uint64),
        pages=pages,
        **spec_fields,  # type: ignore[arg-type]
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "core"
        layout = w.write_core(path, spec)
        data = path.read_bytes()
    return Core(data, layout, spec)


def open_bytes(data: bytes, name: str = "hostile") -> XenDumpCore:
    """``XenDumpCore`` over in-memory bytes (short reads at the end, like a file)."""

    def read(offset: int, length: int) -> bytes:
        assert offset >= 0 and length >= 0, (offset, length)
        return data[offset : offset + length]

    return XenDumpCore(read, len(data), name=name)


# --- byte-level mutators ----------------------------------------------------------------------

# Offsets of ELF header fields for (is64): name -> (offset, struct code).
_EHDR = {
    True: {"e_shoff": (40, "Q"), "e_shentsize": (58, "H"), "e_shnum": (60, "H"),
           "e_shstrndx": (62, "H"), "e_machine": (18, "H"), "e_type": (16, "H")},
    False: {"e_shoff": (32, "I"), "e_shentsize": (46, "H"), "e_shnum": (48, "H"),
            "e_shstrndx": (50, "H"), "e_machine": (18, "H"), "e_type": (16, "H")},
}  # fmt: skip
_SHDR = {
    True: {"sh_name": (0, "I"), "sh_type": (4, "I"), "sh_offset": (24, "Q"), "sh_size": (32, "Q"),
           "sh_addralign": (48, "Q"), "sh_entsize": (56, "Q")},
    False: {"sh_name": (0, "I"), "sh_type": (4, "I"), "sh_offset": (16, "I"), "sh_size": (20, "I"),
            "sh_addralign": (32, "I"), "sh_entsize": (36, "I")},
}  # fmt: skip
HEADER_FIELDS = {"magic": 0, "nr_vcpus": 8, "nr_pages": 16, "page_size": 24}


def _put(data: bytearray, offset: int, fmt: str, value: int) -> None:
    size = struct.calcsize(fmt)
    if offset + size > len(data):  # the field was cut off by an earlier truncation
        return
    value &= (1 << (8 * size)) - 1
    struct.pack_into(fmt, data, offset, value)


def set_ehdr(core: Core, field: str, value: int) -> Core:
    data = bytearray(core.data)
    offset, code = _EHDR[core.is64][field]
    _put(data, offset, core.e + code, value)
    return core.with_data(data)


def shdr_offset(core: Core, index: int) -> int:
    return (64 if core.is64 else 52) + index * (64 if core.is64 else 40)


def set_shdr(core: Core, name_or_index: str | int, field: str, value: int) -> Core:
    index = name_or_index if isinstance(name_or_index, int) else core.section(name_or_index).index
    data = bytearray(core.data)
    offset, code = _SHDR[core.is64][field]
    _put(data, shdr_offset(core, index) + offset, core.e + code, value)
    return core.with_data(data)


def get_shdr(core: Core, index: int, field: str) -> int:
    offset, code = _SHDR[core.is64][field]
    return struct.unpack_from(core.e + code, core.data, shdr_offset(core, index) + offset)[0]


def header_desc_offset(core: Core) -> int:
    """File offset of the HEADER note's descriptor (second note, after the empty NONE note)."""
    return core.section(w.SECTION_NOTES).offset + 16 + 16


def set_header(core: Core, field: str, value: int) -> Core:
    data = bytearray(core.data)
    _put(data, header_desc_offset(core) + HEADER_FIELDS[field], core.e + "Q", value)
    return core.with_data(data)


def set_entry(core: Core, index: int, pfn: int, gmfn: int | None = None) -> Core:
    data = bytearray(core.data)
    base = core.section(core.table_name).offset + index * core.entsize
    _put(data, base, core.e + "Q", pfn)
    if gmfn is not None:
        _put(data, base + 8, core.e + "Q", gmfn)
    return core.with_data(data)


def swap_shdrs(core: Core, a: str, b: str) -> Core:
    """Exchange two whole section-header entries (data stays put; names travel with them)."""
    data = bytearray(core.data)
    size = 64 if core.is64 else 40
    oa, ob = shdr_offset(core, core.section(a).index), shdr_offset(core, core.section(b).index)
    data[oa : oa + size], data[ob : ob + size] = data[ob : ob + size], data[oa : oa + size]
    return core.with_data(data)


def table_before_pages(core: Core) -> Core:
    """Move the pfn/p2m table in front of ``.xen_pages`` (legal ELF, not libxc's order), so that
    truncating inside the pages keeps the table readable."""
    table, pages = core.section(core.table_name), core.section(w.SECTION_PAGES)
    page_size = core.spec.page_size
    head = core.data[: pages.offset]
    table_bytes = core.data[table.offset : table.offset + table.size]
    new_table = len(head)
    new_pages = -(-(new_table + len(table_bytes)) // page_size) * page_size
    body = bytearray(head) + table_bytes
    body += bytes(new_pages - len(body))
    body += core.data[pages.offset : pages.offset + pages.size]
    strtab = core.section(w.SECTION_SHSTRTAB)
    new_strtab = len(body)
    body += core.data[strtab.offset : strtab.offset + strtab.size]
    moved = core.with_data(body)
    moved = set_shdr(moved, core.table_name, "sh_offset", new_table)
    moved = set_shdr(moved, w.SECTION_PAGES, "sh_offset", new_pages)
    moved = set_shdr(moved, w.SECTION_SHSTRTAB, "sh_offset", new_strtab)
    sections = tuple(
        replace(
            s,
            offset={core.table_name: new_table, w.SECTION_PAGES: new_pages,
                    w.SECTION_SHSTRTAB: new_strtab}.get(s.name, s.offset),
        )
        for s in core.layout.sections
    )  # fmt: skip
    return replace(moved, layout=replace(core.layout, sections=sections, file_size=len(body)))


# --- the oracle -------------------------------------------------------------------------------


def expected_map(core: Core, data: bytes | None = None, page_size: int | None = None) -> dict:
    """pfn -> page index that a correct reader maps, read from ``data`` at the layout's offsets.

    Only valid when the mutation left section headers and the header note's page size alone.
    """
    data = core.data if data is None else data
    page_size = core.spec.page_size if page_size is None else page_size
    table, pages = core.section(core.table_name), core.section(w.SECTION_PAGES)
    in_file_table = max(0, min(len(data), table.offset + table.size) - table.offset)
    in_file_pages = max(0, min(len(data), pages.offset + pages.size) - pages.offset)
    count = min(
        in_file_table // core.entsize, in_file_pages // page_size, table.size // core.entsize
    )
    limit = 1 << (PHYS_ADDR_BITS - (page_size.bit_length() - 1))
    result: dict[int, int] = {}
    for i in range(count):
        pfn = struct.unpack_from(core.e + "Q", data, table.offset + i * core.entsize)[0]
        gmfn = (
            struct.unpack_from(core.e + "Q", data, table.offset + i * core.entsize + 8)[0]
            if core.entsize == 16
            else 0
        )
        if pfn == INVALID or gmfn == INVALID or pfn >= limit or pfn in result:
            continue
        result[pfn] = i
    return result


def mapped_pages(xcore: XenDumpCore) -> dict[int, int]:
    """pfn -> page index as the parser's page map holds it (every run expanded)."""
    runs = xcore.page_map.pfn_runs
    result: dict[int, int] = {}
    for key, value, count in zip(runs.key, runs.value, runs.count):
        for k in range(count):
            result[key + k] = value + k
    return result


def assert_view_is_sound(xcore: XenDumpCore, data: bytes) -> int:
    """Every page the parser maps is wholly inside the file and holds the bytes of the table
    entry naming its pfn (first occurrence), re-read from ``data`` at the parser's reported
    section offsets.  Returns the number of mapped pages."""
    ps = xcore.page_size
    table = xcore.table
    entsize = xcore.table_entry_size
    prefix = "<" if xcore.elf.facts.byteorder == "little" else ">"
    mapped = mapped_pages(xcore)

    def entry(i: int) -> tuple[int, int]:
        base = table.offset + i * entsize
        pfn = struct.unpack_from(prefix + "Q", data, base)[0]
        gmfn = struct.unpack_from(prefix + "Q", data, base + 8)[0] if entsize == 16 else 0
        return pfn, gmfn

    for pfn, index in mapped.items():
        assert table.offset + (index + 1) * entsize <= len(data), (pfn, index)
        assert entry(index) == (pfn, entry(index)[1]) and INVALID not in entry(index), (pfn, index)
        # first occurrence wins: no earlier usable entry names the same pfn
        assert all(entry(i)[0] != pfn or INVALID in entry(i) for i in range(index)), (pfn, index)
        assert xcore.page_offset(index) + ps <= len(data), (pfn, index)
        assert index < table.size // entsize and (index + 1) * ps <= xcore.pages.size
    return len(mapped)


def rename_sections(core: Core, renames: dict[str, str]) -> Core:
    """Give sections new names: a fresh ``.shstrtab`` is appended at the end of the file and
    every ``sh_name`` (and the string table's header) is pointed into it."""
    names = [s.name for s in core.layout.sections[1:]]
    new_names = [renames.get(n, n) for n in names]
    strtab = b"\0" + b"".join(n.encode() + b"\0" for n in new_names)
    offsets, pos = [], 1
    for n in new_names:
        offsets.append(pos)
        pos += len(n) + 1
    out = core.with_data(core.data + strtab)
    for index, offset in enumerate(offsets, start=1):
        out = set_shdr(out, index, "sh_name", offset)
    out = set_shdr(out, w.SECTION_SHSTRTAB, "sh_offset", len(core.data))
    return set_shdr(out, w.SECTION_SHSTRTAB, "sh_size", len(strtab))


def note_offset(core: Core, number: int) -> int:
    """File offset of note record ``number`` (0 NONE, 1 HEADER, 2 XEN_VERSION, 3 FORMAT)."""
    return core.section(w.SECTION_NOTES).offset + (0, 16, 64, 1360)[number]


def set_note(core: Core, number: int, field: str, value: int) -> Core:
    data = bytearray(core.data)
    _put(data, note_offset(core, number) + {"namesz": 0, "descsz": 4, "type": 8}[field],
         core.e + "I", value)  # fmt: skip
    return core.with_data(data)
