"""The ELF container of a dump-core: header and section table, read through pyelftools'
declarative structs and validated against the file size before anything is used.

Xen writes no program headers; everything lives in named sections, so this module only
knows about the ELF header and section headers.  It reads through a ``Reader`` callable so
that it works on a plain file and on a Volatility layer alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from elftools.common.exceptions import ELFError
from elftools.construct import ConstructError
from elftools.elf.enums import ENUM_E_MACHINE, ENUM_SH_TYPE_BASE
from elftools.elf.structs import ELFStructs

from .errors import XenFormatError

#: ``read(offset, length) -> bytes``; may return fewer bytes at the end of the file.
Reader = Callable[[int, int], bytes]

ELF_MAGIC = b"\x7fELF"
ET_CORE = 4
SHT_NOTE = 7
# Largest section-header table / string table we are willing to read: a real dump-core
# has 6-8 sections and a ~72 byte string table.
MAX_SHSTRTAB = 1 << 16

_MACHINE_NAMES = {value: name for name, value in ENUM_E_MACHINE.items() if name != "_default_"}


@dataclass(frozen=True)
class Section:
    """One section header, with its name resolved through ``.shstrtab``."""

    index: int
    name: str
    type: int
    offset: int
    size: int
    entsize: int
    addralign: int

    @property
    def end(self) -> int:
        return self.offset + self.size


@dataclass(frozen=True)
class ElfFacts:
    """What the ELF header says about the file (not about Xen)."""

    elfclass: int  # 32 or 64
    byteorder: str  # "little" or "big"
    e_machine: int
    e_type: int
    e_shoff: int
    e_shnum: int
    e_shstrndx: int
    e_abiversion: int

    @property
    def machine_name(self) -> str:
        return _MACHINE_NAMES.get(self.e_machine, f"EM_{self.e_machine}")

    @property
    def struct_prefix(self) -> str:
        """``struct`` byte-order character for this file."""
        return "<" if self.byteorder == "little" else ">"


def _structs(elfclass: int, little: bool) -> ELFStructs:
    structs = ELFStructs(little_endian=little, elfclass=elfclass)
    structs.create_basic_structs()
    # The advanced structs only change how some enums are decoded; ET_CORE/EM_NONE keeps
    # the section header layout generic.
    structs.create_advanced_structs(ET_CORE, 0, "ELFOSABI_SYSV")
    return structs


def _as_int(value: object, table: dict[str, int]) -> int:
    """pyelftools decodes known enum values to names; turn them back into numbers."""
    if isinstance(value, int):
        return value
    return table[str(value)]


def looks_like_elf_core(head: bytes) -> bool:
    """Cheapest possible test, used by the stacker before anything else is read."""
    return (
        len(head) >= 18
        and head[:4] == ELF_MAGIC
        and head[4] in (1, 2)
        and head[5] in (1, 2)
        and int.from_bytes(head[16:18], "little" if head[5] == 1 else "big") == ET_CORE
    )


class ElfCore:
    """Parses and validates the ELF header and section table of a dump-core."""

    def __init__(self, read: Reader, file_size: int, name: str = "core") -> None:
        self.name = name
        self.file_size = file_size
        self._read = read
        #: problems that still allow the file to be read (shown to the analyst)
        self.warnings: list[str] = []
        head = read(0, 64)
        if head[:4] != ELF_MAGIC:
            raise XenFormatError(name, "not an ELF file (no \\x7fELF magic at offset 0)")
        if len(head) < 6:
            raise XenFormatError(name, f"ELF header is truncated: the file has {len(head)} bytes")
        if head[4] not in (1, 2):
            raise XenFormatError(name, f"unknown ELF class {head[4]} at offset 4")
        if head[5] not in (1, 2):
            raise XenFormatError(name, f"unknown ELF data encoding {head[5]} at offset 5")
        elfclass = 32 if head[4] == 1 else 64
        self.structs = _structs(elfclass, head[5] == 1)
        try:
            ehdr = self.structs.Elf_Ehdr.parse(head)
        except (ConstructError, ELFError):
            raise XenFormatError(
                name,
                f"ELF header is truncated: the file has {len(head)} bytes, the "
                f"{elfclass}-bit header needs {self.structs.Elf_Ehdr.sizeof()}",
            ) from None
        self.facts = ElfFacts(
            elfclass=elfclass,
            byteorder="little" if head[5] == 1 else "big",
            e_machine=_as_int(ehdr.e_machine, ENUM_E_MACHINE),
            e_type=int.from_bytes(head[16:18], "little" if head[5] == 1 else "big"),
            e_shoff=ehdr.e_shoff,
            e_shnum=ehdr.e_shnum,
            e_shstrndx=ehdr.e_shstrndx,
            e_abiversion=head[8],
        )
        if self.facts.e_type != ET_CORE:
            raise XenFormatError(
                name, f"ELF type is {self.facts.e_type}, not ET_CORE (4): not a dump-core"
            )
        self.sections = self._read_sections(ehdr.e_shentsize)
        self._check_overlaps()

    # -- section table ---------------------------------------------------------------------

    def _read_sections(self, shentsize: int) -> dict[str, Section]:
        facts, name = self.facts, self.name
        shdr_struct = self.structs.Elf_Shdr
        if facts.e_shnum == 0:
            raise XenFormatError(name, "ELF file has no section headers (e_shnum = 0)")
        if shentsize < shdr_struct.sizeof():
            raise XenFormatError(name, f"e_shentsize {shentsize} is smaller than a section header")
        table_size = self._table_size = facts.e_shnum * shentsize
        if facts.e_shoff + table_size > self.file_size:
            raise XenFormatError(
                name,
                f"section header table at offset {facts.e_shoff:#x} ({facts.e_shnum} entries) "
                f"runs past the end of the file ({self.file_size:#x})",
            )
        raw = self._read(facts.e_shoff, table_size)
        headers = []
        for index in range(facts.e_shnum):
            try:
                headers.append(shdr_struct.parse(raw[index * shentsize :]))
            except (ConstructError, ELFError) as exc:
                raise XenFormatError(name, f"section header {index} is truncated: {exc}") from None

        names, problem = self._declared_names(headers)
        if problem is not None:
            names = _libxc_names(headers)
            if names is None:
                raise XenFormatError(name, problem)
            self.warnings.append(
                f"{problem}; the section headers match libxc's names exactly, using those"
            )

        sections: dict[str, Section] = {}
        for index, hdr in enumerate(headers):
            if index == 0:
                continue
            section_name = names[index]
            if section_name in sections and not section_name.startswith(_XEN_SECTION_PREFIXES):
                # Not a section this reader uses: the first one stands, and it is harmless.
                self.warnings.append(
                    f"section name {section_name!r} appears twice (indices "
                    f"{sections[section_name].index} and {index}); the second is ignored"
                )
                continue
            if section_name in sections:
                raise XenFormatError(
                    name,
                    f"section {section_name} appears twice (indices "
                    f"{sections[section_name].index} and {index})",
                )
            sections[section_name] = Section(
                index=index,
                name=section_name,
                type=_as_int(hdr.sh_type, ENUM_SH_TYPE_BASE),
                offset=hdr.sh_offset,
                size=hdr.sh_size,
                entsize=hdr.sh_entsize,
                addralign=hdr.sh_addralign,
            )
        return sections

    def _declared_names(self, headers: list) -> tuple[list[str], str | None]:
        """Section names through ``e_shstrndx``, or the reason they cannot be had.

        Problems are returned, not raised, so that a truncated file - ``.shstrtab`` is the
        very last thing libxc writes - can fall back to libxc's fixed names; that fallback
        only accepts headers whose every ``sh_name`` is libxc's, so a damaged name offset
        still ends in this problem being raised.
        """
        facts = self.facts
        if not 0 < facts.e_shstrndx < facts.e_shnum:
            return (
                [],
                f"e_shstrndx {facts.e_shstrndx} does not name a section (e_shnum {facts.e_shnum})",
            )
        strtab_hdr = headers[facts.e_shstrndx]
        strtab_size = min(strtab_hdr.sh_size, MAX_SHSTRTAB)
        offset = strtab_hdr.sh_offset
        if offset > self.file_size or offset + strtab_size > self.file_size:
            return [], (
                f".shstrtab at offset {offset:#x} (size {strtab_size:#x}) lies outside the "
                f"file (size {self.file_size:#x})"
            )
        strtab = self._read(offset, strtab_size)
        names = [""]
        for index, hdr in enumerate(headers[1:], start=1):
            section_name = _c_string(strtab, hdr.sh_name)
            if section_name is None:
                return [], (
                    f"section {index} has name offset {hdr.sh_name} outside .shstrtab "
                    f"({len(strtab)} bytes at {offset:#x})"
                )
            names.append(section_name)
        return names, None

    def _check_extent(self, what: str, offset: int, size: int) -> None:
        if offset > self.file_size or offset + size > self.file_size:
            raise XenFormatError(
                self.name,
                f"{what} at offset {offset:#x} (size {size:#x}) lies outside the file "
                f"(size {self.file_size:#x})",
            )

    def _check_overlaps(self) -> None:
        """Overlapping data sections would make a page and a table entry share bytes:
        refuse rather than map garbage.  ``.shstrtab`` and empty sections are exempt."""
        # The headers count as sections here: a page or note lying over them is forged.
        headers = [
            (0, self.structs.Elf_Ehdr.sizeof(), "ELF header"),
            (self.facts.e_shoff, self.facts.e_shoff + self._table_size, "section header table"),
        ]
        spans = sorted(
            headers
            + [
                (s.offset, s.end, s.name)
                for s in self.sections.values()
                if s.size and s.name != ".shstrtab" and s.name.startswith((".xen", ".note.Xen"))
            ]
        )
        for (_, end_a, name_a), (start_b, _, name_b) in zip(spans, spans[1:]):
            if start_b < end_a:
                raise XenFormatError(
                    self.name, f"{name_a} and {name_b} overlap at offset {start_b:#x}"
                )

    def read_section(self, section: Section, limit: int | None = None) -> bytes:
        """The bytes of a section, bounded by the file (a truncated file gives fewer)."""
        size = section.size if limit is None else min(section.size, limit)
        if section.offset >= self.file_size:
            return b""
        return self._read(section.offset, min(size, self.file_size - section.offset))


# The names libxc gives its sections, in section-header order (dump-core-layout.md section 2);
# ``.xen_shared_info`` is optional and the last one is ``.xen_p2m`` (PV) or ``.xen_pfn``.
_LIBXC_LEAD = (".shstrtab", ".note.Xen", ".xen_prstatus")
_LIBXC_TABLE_BY_ENTSIZE = {16: ".xen_p2m", 8: ".xen_pfn"}
# Names this reader looks up (a duplicate of one of them is ambiguous, hence fatal).
_XEN_SECTION_PREFIXES = (".xen", ".note.Xen", ".shstrtab")


def _libxc_names(headers: list) -> list[str] | None:
    """Rebuild the names of a libxc-written section table whose ``.shstrtab`` is lost.

    libxc's string table is fully determined by which sections exist, so the names are
    accepted only if *every* header's ``sh_name`` is the offset libxc would have given it.
    """
    table = _LIBXC_TABLE_BY_ENTSIZE.get(headers[-1].sh_entsize) if len(headers) > 1 else None
    if table is None:
        return None
    for middle in ((), (".xen_shared_info",)):
        names = [*_LIBXC_LEAD, *middle, ".xen_pages", table]
        if len(names) + 1 != len(headers):
            continue
        strtab = b"\0" + b"".join(n.encode() + b"\0" for n in names)
        if all(
            hdr.sh_name == strtab.index(n.encode() + b"\0") for hdr, n in zip(headers[1:], names)
        ):
            return ["", *names]
    return None


def _c_string(table: bytes, offset: int) -> str | None:
    if offset >= len(table):
        return None
    end = table.find(b"\0", offset)
    if end < 0:
        end = len(table)
    return table[offset:end].decode("ascii", "replace")
