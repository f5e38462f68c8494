"""``XenDumpCore``: everything a dump-core file says, parsed and validated.

Probing, parsing and mapping are separate steps (as in libkdumpfile's elfdump.c):

- ``probe_xen_core(read, size)`` is the stacker's cheap test: ELF ``ET_CORE`` with a
  ``.note.Xen`` section whose HEADER note carries a known magic; it reads a few KiB;
- ``XenDumpCore(read, size)`` parses the ELF container and notes and validates every
  section extent against the file size;
- ``core.page_map`` (built on first use) loads the pfn table in bulk into run maps.

No Volatility context is needed: ``XenDumpCore.open(path)`` works on a plain file.
"""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from . import ia64 as ia64_mod
from . import notes as xen_notes
from .elfcore import ElfCore, Reader, Section, looks_like_elf_core
from .errors import XenFormatError
from .image import (
    GUEST_HVM_OR_PVH,
    GUEST_PV,
    Buffer,
    FileImage,
    MachineFrameMap,
    RegionMapper,
)
from .pagemap import PageMap, Runs, scaled_column

NOTE_SECTION = ".note.Xen"
PRSTATUS_SECTION = ".xen_prstatus"
SHARED_INFO_SECTION = ".xen_shared_info"
PAGES_SECTION = ".xen_pages"
P2M_SECTION = ".xen_p2m"  # PV: {u64 pfn, u64 gmfn}
PFN_SECTION = ".xen_pfn"  # HVM/PVH/ARM/ia64: u64 pfn
MAPPED_REGS_SECTION = ia64_mod.MAPPED_REGS_SECTION  # ia64 PV: mapped_regs_t per vCPU

# Bounds that no real dump-core comes near; they stop damaged headers from driving work.
MAX_NOTE_SECTION = 1 << 20
MIN_PAGE_SHIFT, MAX_PAGE_SHIFT = 9, 24
MAX_VCPUS = 1 << 16
# x86-64 and arm64 physical addresses have at most 52 bits; anything above is damage.
PHYS_ADDR_BITS = 52

EM_386, EM_X86_64, EM_ARM, EM_AARCH64 = 3, 62, 40, 183
EM_IA_64 = ia64_mod.EM_IA_64


@dataclass(frozen=True)
class Probe:
    """Outcome of ``probe_xen_core``: is this a Xen dump-core, and is it damaged?"""

    is_xen: bool
    problem: str | None = None


# A HEADER note record as libxc writes it: namesz 4, descsz 32, type, "Xen\0".
_HEADER_NOTE_LE = b"\x04\0\0\0\x20\0\0\0\x01\0\0\x02Xen\0"
_HEADER_NOTE_BE = b"\0\0\0\x04\0\0\0\x20\x02\0\0\x01Xen\0"
PROBE_BYTES = 8192


def probe_xen_core(read: Reader, file_size: int) -> Probe:
    """Is the file a Xen dump-core?  Cheap: reads a few KiB (of hostile files, at most the
    parser's own bound on ``.note.Xen``).

    Another ELF core, a raw image or random bytes give ``Probe(False)`` so that the other
    stackers get their turn.  A file that is recognisably Xen (an ``ET_CORE`` with a
    ``.note.Xen`` section, or a Xen HEADER note record near the start) but whose container
    is damaged gives ``Probe(True, problem)``: the caller should say so rather than let
    the file be read as raw memory.
    """
    head = read(0, 64)
    if not looks_like_elf_core(head):
        return Probe(False)
    try:
        elf = ElfCore(read, file_size)
    except XenFormatError as exc:
        window = read(0, min(PROBE_BYTES, file_size))
        if _HEADER_NOTE_LE in window or _HEADER_NOTE_BE in window or _libxc_elf_header(head):
            return Probe(True, str(exc))
        return Probe(False)
    note = elf.sections.get(NOTE_SECTION)
    if note is None:
        if any(section.startswith(".xen_") for section in elf.sections):
            return Probe(True, f"no {NOTE_SECTION} section, yet there are .xen_* sections")
        return Probe(False)
    # The header note comes second in every libxc file, so the first few KiB settle it;
    # only a file with a long run of other notes first needs the parser's full bound.
    for limit in (PROBE_BYTES, MAX_NOTE_SECTION):
        magic = _header_magic(elf, note, limit)
        if magic is not None:
            if magic in xen_notes.KNOWN_MAGICS:
                return Probe(True)
            return Probe(True, f"unknown dump-core magic {magic:#x} in the header note")
        if note.size <= limit:
            break
    return Probe(True, f"{NOTE_SECTION} holds no Xen header note")


def _header_magic(elf: ElfCore, note: Section, limit: int) -> int | None:
    """``xch_magic`` of the first Xen HEADER note in the first ``limit`` bytes of
    ``.note.Xen`` (the record the parser uses too), or None."""
    data = elf.read_section(note, limit=limit)
    records, _ = xen_notes.iter_notes(data, note.offset, elf.facts.byteorder)
    for record in records:
        if (
            record.name == xen_notes.NOTE_NAME
            and record.type == xen_notes.XEN_ELFNOTE_DUMPCORE_HEADER
            and len(record.desc) >= 8
        ):
            return int.from_bytes(record.desc[:8], elf.facts.byteorder)
    return None


def _libxc_elf_header(head: bytes) -> bool:
    """The ELF header libxc writes (dump-core-layout.md section 1), recognisable even when
    the rest of the file is gone: an ELF64 core without program headers, its 6-8 section
    headers right after the ELF header, ``.shstrtab`` at index 1 and EI_ABIVERSION 1."""
    if len(head) < 64 or head[4] != 2:
        return False
    order = "<" if head[5] == 1 else ">"
    phnum, shentsize, shnum, shstrndx = struct.unpack_from(order + "4H", head, 56)
    (shoff,) = struct.unpack_from(order + "Q", head, 40)
    return (
        head[8] == 1 and phnum == 0 and shoff == 64 and shentsize == 64
        and 6 <= shnum <= 8 and shstrndx == 1
    )  # fmt: skip


@dataclass(frozen=True)
class VcpuArea:
    """Where the vCPU context slots are: ``count`` slots of ``entsize`` bytes."""

    offset: int
    entsize: int
    count: int


class XenDumpCore(FileImage):
    """A parsed Xen dump-core.

    Args:
        read: ``read(offset, length) -> bytes`` on the file (short reads at the end are
            fine).
        file_size: the file's size in bytes; every extent is checked against it.
        name: used in messages (a layer name or a path).

    Raises:
        XenFormatError: the file cannot be mapped; ``str(exc)`` is one line.

    Problems that still allow a correct (possibly partial) view are collected in
    ``warnings`` instead.
    """

    def __init__(
        self,
        read: Reader,
        file_size: int,
        name: str = "core",
        map_region: RegionMapper | None = None,
    ) -> None:
        self.name = name
        self.file_size = file_size
        self._read = read
        self._map_region = map_region
        self.warnings: list[str] = []
        self.elf = ElfCore(read, file_size, name)
        self.sections: dict[str, Section] = self.elf.sections
        self.warnings.extend(self.elf.warnings)

        note_section = self._require(NOTE_SECTION)
        if note_section.offset >= file_size:
            raise XenFormatError(
                name,
                f"{NOTE_SECTION} at offset {note_section.offset:#x} lies beyond the end of the "
                f"file (size {file_size:#x}): truncated file or damaged header",
            )
        note_bytes = self.elf.read_section(note_section, limit=MAX_NOTE_SECTION)
        self.notes = xen_notes.decode_notes(
            note_bytes, note_section.offset, self.elf.facts.byteorder, self.elf.facts.e_machine
        )
        self.warnings.extend(self.notes.warnings)
        if self.notes.header is None:
            cut = (
                f" (the section is cut short: the file ends at {file_size:#x})"
                if note_section.end > file_size
                else ""
            )
            raise XenFormatError(
                name, f"{NOTE_SECTION} at {note_section.offset:#x} has no usable header note{cut}"
            )
        self.header = self.notes.header
        if self.header.magic not in xen_notes.KNOWN_MAGICS:
            raise XenFormatError(
                name, f"unknown dump-core magic {self.header.magic:#x} in the header note"
            )
        self.page_shift = self._page_shift()
        self.page_size = 1 << self.page_shift
        self.pages = self._require(PAGES_SECTION)
        self.table = self._table_section()
        self._check_entry_sizes()
        self._check_sections()
        self.vcpu_area  # noqa: B018 - validated now, so that its warnings are reported with the rest

    # -- validation ------------------------------------------------------------------------

    def _require(self, name: str) -> Section:
        section = self.sections.get(name)
        if section is None:
            raise XenFormatError(self.name, f"no {name} section: not a usable dump-core")
        return section

    def _page_shift(self) -> int:
        size = self.header.page_size
        if size <= 0 or size & (size - 1):
            raise XenFormatError(
                self.name, f"header note page size {size:#x} is not a power of two"
            )
        shift = size.bit_length() - 1
        if not MIN_PAGE_SHIFT <= shift <= MAX_PAGE_SHIFT:
            raise XenFormatError(
                self.name, f"header note page size {size:#x} is outside 512 B .. 16 MiB"
            )
        return shift

    def _table_section(self) -> Section:
        p2m, pfn = self.sections.get(P2M_SECTION), self.sections.get(PFN_SECTION)
        if p2m and pfn:
            raise XenFormatError(
                self.name, f"both {P2M_SECTION} and {PFN_SECTION} are present; cannot choose"
            )
        table = p2m or pfn
        if table is None:
            raise XenFormatError(self.name, f"neither {P2M_SECTION} nor {PFN_SECTION} is present")
        ia64_pv = self.is_ia64 and self.header.is_pv and table.name == PFN_SECTION
        if self.header.is_pv != (table.name == P2M_SECTION) and not ia64_pv:
            # (ia64 PV domains are auto-translated: PV magic with .xen_pfn is what libxc
            # writes for them, see formats/ia64.py.)
            self.warnings.append(
                f"header magic says {self.header.guest_type} but the table is {table.name}; "
                f"following the table"
            )
        return table

    def _check_entry_sizes(self) -> None:
        """``sh_entsize`` of the pages and the table, where set, must agree with the header
        note: a disagreement means one of them is damaged, and guessing would map every
        page at the wrong offset."""
        if self.pages.entsize not in (0, self.page_size):
            raise XenFormatError(
                self.name,
                f"{PAGES_SECTION} entry size {self.pages.entsize:#x} disagrees with the header "
                f"note page size {self.page_size:#x}",
            )
        if self.table.entsize not in (0, self.table_entry_size):
            raise XenFormatError(
                self.name,
                f"{self.table.name} entry size {self.table.entsize} is not {self.table_entry_size}",
            )

    def _check_sections(self) -> None:
        """Warn about shortfalls that still allow a correct partial view."""
        nr_pages, entries = self.header.nr_pages, self.table.size // self.table_entry_size
        if self.table.size % self.table_entry_size:
            self.warnings.append(
                f"{self.table.name} size {self.table.size:#x} is not a multiple of "
                f"{self.table_entry_size}; the partial entry is ignored"
            )
        if entries != nr_pages:
            self.warnings.append(
                f"header promises {nr_pages} pages but {self.table.name} has {entries} entries"
            )
        if self.pages.offset % self.page_size:
            self.warnings.append(
                f"{PAGES_SECTION} at offset {self.pages.offset:#x} is not page aligned"
            )
        promised = self.pages.size >> self.page_shift
        present = self.stored_page_count
        if self.pages.size % self.page_size:
            self.warnings.append(
                f"{PAGES_SECTION} size {self.pages.size:#x} is not a multiple of the page size; "
                "the partial page is ignored"
            )
        if promised < entries:
            self.warnings.append(
                f"{PAGES_SECTION} holds {promised} pages but {self.table.name} has {entries} "
                f"entries; entries from {promised} on are ignored"
            )
        if present < min(promised, entries):
            self.warnings.append(
                f"{PAGES_SECTION} promises {promised} pages but the file ends after {present}; "
                "later pages are unavailable"
            )
        for name in (NOTE_SECTION, PRSTATUS_SECTION, SHARED_INFO_SECTION, MAPPED_REGS_SECTION):
            section = self._placed(name)
            if section is not None and section.end > self.file_size:
                self.warnings.append(
                    f"{name} is truncated: {section.size:#x} bytes at {section.offset:#x}, "
                    f"file ends at {self.file_size:#x}"
                )
        if self.table.end > self.file_size:
            self.warnings.append(
                f"{self.table.name} is truncated: {self.table.size:#x} bytes at "
                f"{self.table.offset:#x}, file ends at {self.file_size:#x}"
            )

    # -- facts -----------------------------------------------------------------------------

    @property
    def is_pv(self) -> bool:
        """Paravirtualised (page tables hold machine frames) - decided by the table kind."""
        return self.table.name == P2M_SECTION

    @property
    def guest_type(self) -> str:
        if self.is_ia64 and self.header.is_pv:
            return GUEST_PV  # ia64 PV: paravirtualised, yet auto-translated (is_pv False)
        return GUEST_PV if self.is_pv else GUEST_HVM_OR_PVH

    @property
    def is_ia64(self) -> bool:
        return self.elf.facts.e_machine == EM_IA_64

    @property
    def guest_width(self) -> int | None:
        """Guest pointer size in bytes, from ``e_machine`` (PV only tells it truly:
        HVM cores are always EM_X86_64, whatever the guest runs)."""
        return {EM_386: 4, EM_X86_64: 8, EM_AARCH64: 8, EM_IA_64: 8}.get(self.elf.facts.e_machine)

    def adopt_page_map(self, page_map: PageMap) -> None:
        """Reuse a page map built earlier from the very same file (see layer.py); its
        warnings belong to this file too."""
        self.__dict__["page_map"] = page_map
        self.warnings.extend(w for w in page_map.warnings if w not in self.warnings)

    @property
    def table_entry_size(self) -> int:
        return 16 if self.table.name == P2M_SECTION else 8

    @property
    def stored_page_count(self) -> int:
        """Pages of ``.xen_pages`` actually present in the file (a truncated copy has fewer)."""
        available = max(0, min(self.pages.end, self.file_size) - self.pages.offset)
        return min(self.pages.size, available) >> self.page_shift

    @property
    def max_pfn(self) -> int:
        return 1 << (PHYS_ADDR_BITS - self.page_shift)

    # -- the page map ----------------------------------------------------------------------

    @cached_property
    def page_map(self) -> PageMap:
        """pfn -> page index runs (and machine frames for PV), built by one bulk read."""
        entsize = self.table_entry_size
        entries = min(self.table.size // entsize, self.stored_page_count)
        readable = max(0, min(self.table.end, self.file_size) - self.table.offset)
        entries = min(entries, readable // entsize)
        raw = self._table_bytes(entries * entsize) if entries else b""
        entries = len(raw) // entsize
        dtype = np.dtype(np.uint64).newbyteorder(
            "<" if self.elf.facts.byteorder == "little" else ">"
        )
        words = np.frombuffer(raw, dtype=dtype, count=entries * entsize // 8)
        if entsize == 16:
            pfns, gmfns = words[0::2], words[1::2]
        else:
            pfns, gmfns = words, None
        # Native byte order for fast comparisons; astype copies only when it must.
        pfns = pfns.astype(np.uint64, copy=False)
        gmfns = gmfns.astype(np.uint64, copy=False) if gmfns is not None else None
        page_map = PageMap(pfns, gmfns, self.max_pfn)
        self.warnings.extend(page_map.warnings)
        if page_map.stats.valid == 0:
            raise XenFormatError(self.name, self._why_no_pages(entries))
        return page_map

    def _table_bytes(self, length: int) -> Buffer:
        """The table, mapped where the file allows it: a read would first copy it into
        fresh memory, whose page faults cost more than building the maps."""
        if self._map_region is not None:
            try:
                return self._map_region(self.table.offset, length)
            except (OSError, ValueError):
                pass  # not mappable (a pipe, a special file): read it instead
        return self._read(self.table.offset, length)

    def _why_no_pages(self, entries: int) -> str:
        """One line on why an empty page map is empty (what the analyst must fix)."""
        if self.pages.offset >= self.file_size or self.stored_page_count == 0:
            return (
                f"{PAGES_SECTION} at offset {self.pages.offset:#x} holds no whole page before "
                f"the end of the file ({self.file_size:#x}): truncated file or damaged header"
            )
        if self.table.offset >= self.file_size:
            return (
                f"{self.table.name} at offset {self.table.offset:#x} lies beyond the end of the "
                f"file ({self.file_size:#x}): no page can be located (truncated file?)"
            )
        return f"{self.table.name} maps no pages (all {entries} entries unusable)"

    def page_offset(self, index: int) -> int:
        """File offset of page ``index`` of ``.xen_pages``."""
        return self.pages.offset + (index << self.page_shift)

    # -- vCPUs and shared info -------------------------------------------------------------

    @cached_property
    def vcpu_area(self) -> VcpuArea | None:
        section = self.sections.get(PRSTATUS_SECTION)
        if section is None:
            return None
        area = self._per_vcpu_area(section)
        entsize, count = area.entsize, area.count
        if entsize <= 0:
            return area
        if count < self.header.nr_vcpus:
            self.warnings.append(
                f"header says {self.header.nr_vcpus} vCPUs but {PRSTATUS_SECTION} holds {count}"
            )
        return area

    def _per_vcpu_area(self, section: Section) -> VcpuArea:
        """A section of one entry per stored vCPU: its entries (``sh_entsize``, else the
        size split over ``nr_vcpus``), as many as the header, the section and the file
        all allow."""
        nr_vcpus = min(self.header.nr_vcpus, MAX_VCPUS)
        entsize = section.entsize or (section.size // nr_vcpus if nr_vcpus else 0)
        if entsize <= 0:
            return VcpuArea(section.offset, 0, 0)
        in_file = max(0, min(section.end, self.file_size) - section.offset)
        count = min(nr_vcpus, section.size // entsize, in_file // entsize)
        return VcpuArea(section.offset, entsize, count)

    def vcpu_slot(self, slot: int) -> bytes:
        """The raw context bytes of file slot ``slot`` (not necessarily vCPU id ``slot``)."""
        area = self.vcpu_area
        if area is None or not 0 <= slot < area.count:
            raise IndexError(f"no vCPU slot {slot}")
        return self._read(area.offset + slot * area.entsize, area.entsize)

    @cached_property
    def vcpu_layout(self) -> str | None:
        """The context layout of the ``.xen_prstatus`` slots (``vcpu.LAYOUT_*``), or None
        when there are none or none is known for this machine and slot size."""
        from . import vcpu

        area = self.vcpu_area
        if area is None or area.count == 0:
            return None
        if self.is_ia64:
            return self._ia64_layout(area)
        layout = vcpu.layout_for(self.elf.facts.e_machine, area.entsize)
        if layout is None:
            self.warnings.append(
                f"no vCPU layout known for {self.elf.facts.machine_name} with "
                f"{area.entsize}-byte slots"
            )
        return layout

    @cached_property
    def vcpu_contexts(self) -> tuple:
        """Decoded contexts of every stored slot, as a tuple (decoded once)."""
        from . import vcpu

        area, layout = self.vcpu_area, self.vcpu_layout
        if area is None or layout is None:
            return ()
        data = self._read(area.offset, area.count * area.entsize)
        if self.is_ia64:
            regs = self.ia64_mapped_regs_area if layout == ia64_mod.LAYOUT_IA64_PV else None
            # Only the mapped_regs_t at the start of each (page-sized) entry is read.
            pages = None
            if regs is not None:
                size = ia64_mod.MAPPED_REGS_SIZE
                pages = [
                    self._read(regs.offset + k * regs.entsize, size) for k in range(regs.count)
                ]
            decoded = ia64_mod.decode_ia64_vcpus(
                data, area.entsize, area.count, pages, self.elf.facts.byteorder
            )
            return tuple(decoded)
        return tuple(
            vcpu.decode_all(data, area.entsize, area.count, layout, self.elf.facts.byteorder)
        )

    def vcpus(self) -> list:
        """Decoded contexts of every stored slot (see ``volatility3_xen.vcpu``); decoded
        once per core."""
        return list(self.vcpu_contexts)

    # -- the model the layers use (image.GuestMemoryImage) ---------------------------------

    format_name = "Xen dump-core"

    @cached_property
    def _page_runs(self) -> Runs:
        runs = self.page_map.pfn_runs
        return Runs(
            runs.key, scaled_column(runs.value, self.page_shift, self.pages.offset), runs.count
        )

    def page_runs(self) -> Runs:
        """pfn -> file offset runs: entry ``i`` of the table names the page at
        ``.xen_pages + i * page_size``."""
        return self._page_runs

    @property
    def machine_frames(self) -> MachineFrameMap | None:
        """The ``.xen_p2m`` table (PV): the page tables hold machine frames."""
        return self.page_map if self.is_pv else None

    def has_pfn(self, pfn: int) -> bool:
        return self.page_map.page_index(pfn) is not None

    @cached_property
    def shared_info(self) -> bytes | None:
        section = self._placed(SHARED_INFO_SECTION)
        if section is None:
            return None
        return self.elf.read_section(section, limit=1 << 16)

    # -- ia64 ------------------------------------------------------------------------------

    @cached_property
    def ia64_extent(self) -> ia64_mod.MappedRegsExtent | None:
        """Where ``.xen_ia64_mapped_regs`` and ``.xen_shared_info`` really are: libxc
        wrote their headers crossed (see ``formats/ia64.py``)."""
        regs = self.sections.get(MAPPED_REGS_SECTION)
        if regs is None or not self.is_ia64:
            return None
        info = self.sections.get(SHARED_INFO_SECTION)
        extent = ia64_mod.mapped_regs_extent(
            (regs.offset, regs.size), None if info is None else (info.offset, info.size)
        )
        return extent  # crossed: normal for libxc's ia64 PV cores, a fact, not a warning

    def _placed(self, name: str) -> Section | None:
        """Section ``name`` where its data really is (ia64's crossed headers undone)."""
        section = self.sections.get(name)
        extent = self.ia64_extent if section is not None else None
        if extent is None or not extent.crossed:
            return section
        if name == MAPPED_REGS_SECTION:
            return dataclasses.replace(section, offset=extent.regs_offset)
        if name == SHARED_INFO_SECTION and extent.shared_info_offset is not None:
            return dataclasses.replace(section, offset=extent.shared_info_offset)
        return section

    @cached_property
    def ia64_mapped_regs_area(self) -> VcpuArea | None:
        """The ``mapped_regs_t`` slots (ia64 PV): one per stored vCPU, bounded by the
        section and the file."""
        section = self._placed(MAPPED_REGS_SECTION)
        if section is None or not self.is_ia64:
            return None
        area = self._per_vcpu_area(section)
        if area.entsize < ia64_mod.MAPPED_REGS_SIZE:
            self.warnings.append(
                f"{MAPPED_REGS_SECTION}: {area.entsize}-byte entries cannot hold a "
                f"{ia64_mod.MAPPED_REGS_SIZE}-byte mapped_regs_t; not decoded"
            )
            return None
        return area

    def _ia64_layout(self, area: VcpuArea) -> str | None:
        if area.entsize != ia64_mod.CONTEXT_SIZE:
            self.warnings.append(
                f"ia64 vCPU slots of {area.entsize} bytes: only the "
                f"{ia64_mod.CONTEXT_SIZE}-byte vcpu_guest_context of Xen 3.2-4.2 "
                f"(arch-ia64.h) is decoded; these are left as raw slots"
            )
            return None
        regs = self.ia64_mapped_regs_area
        if regs is not None and regs.count >= area.count:
            return ia64_mod.LAYOUT_IA64_PV
        if regs is not None:
            self.warnings.append(
                f"{MAPPED_REGS_SECTION} holds {regs.count} entries for {area.count} vCPU "
                "contexts; the contexts are shown without their mapped_regs"
            )
        return ia64_mod.LAYOUT_IA64
