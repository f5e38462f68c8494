"""What a dump-core says, as rows: the data behind ``xen.info`` and ``xen.vcpus``.

The plugins only render what this module returns; every decision about what a field
means lives here, next to the parser, so that scripts get the same answers::

    from volatility3_xen.dumpcore import XenDumpCore
    from volatility3_xen import report

    core = XenDumpCore.open("guest.core")
    for fact in report.core_facts(core):
        print(fact.group, fact.field, fact.text, fact.hint)
    table = report.vcpu_table(core, all_registers=False)
    print([c.name for c in table.columns], table.rows)

No Volatility import: the module works on a bare ``XenDumpCore``.

Versioning (``REPORT_VERSION``, semantic): a new group, fact, or column is a minor
change; renaming or removing one, or changing a value's type, is a major change.
"""

from __future__ import annotations

import datetime
import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

from .formats import vcpu as vcpu_mod
from .formats.dumpcore import XenDumpCore
from .formats.elfcore import Section
from .formats.errors import printable
from .formats.notes import NOTE_TYPE_NAMES
from .formats.sharedinfo import SharedInfo, decode_shared_info
from .formats.vcpu import LAYOUT_ARM, LAYOUT_X86_32, LAYOUT_X86_64, VcpuContext

REPORT_VERSION = (1, 0, 0)

EM_386, EM_X86_64 = 3, 62

# Fact groups, in the order ``core_facts`` emits them.
GROUP_FILE = "file"
GROUP_GUEST = "guest"
GROUP_FORMAT = "format"
GROUP_XEN = "xen"
GROUP_NOTES = "notes"
GROUP_SECTIONS = "sections"
GROUP_TABLE = "table"
GROUP_SHARED_INFO = "shared_info"
GROUP_WARNINGS = "warnings"


class Absent(enum.Enum):
    """Why a cell has no value (plugins map these to Volatility's absent values)."""

    NOT_APPLICABLE = "not applicable"  # the field does not exist for this guest kind
    NOT_FOUND = "not found"  # the value points at something the core does not hold


FactValue = Union[int, str, bool, None]
Cell = Union[int, str, bool, Absent]


@dataclass(frozen=True)
class Fact:
    """One line of ``xen.info``.

    ``value`` is typed (int, str, bool; None when the file lacks it); ``hex`` says an int
    is best read in hex (addresses, magics); ``hint`` is a short note for the analyst:
    where the value comes from, or why it may mislead.
    """

    group: str
    field: str
    value: FactValue
    hint: str = ""
    hex: bool = False

    @property
    def text(self) -> str:
        """The value as ``xen.info`` prints it."""
        value = self.value
        if value is None:
            return "absent"
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, int) and self.hex:
            return f"{value:#x}"
        return printable(str(value))


# -- cached per-core decoding ---------------------------------------------------------------


def vcpus(core: XenDumpCore) -> tuple[VcpuContext, ...]:
    """Every stored vCPU context (decoded once per core, by the core)."""
    return core.vcpu_contexts


def vcpu_layout(core: XenDumpCore) -> str | None:
    """The context layout of this core's ``.xen_prstatus`` slots, or None."""
    return core.vcpu_layout


def decoded_shared_info(core: XenDumpCore, layout: str | None = None) -> SharedInfo | None:
    """``.xen_shared_info`` decoded, or None when absent or not decodable.

    The layout follows the guest's width: for PV it is what ``e_machine`` says (EM_386:
    the compat layout).  An HVM core is always EM_X86_64 whatever the guest runs, so the
    x86_64 layout is only a guess there; pass ``layout`` for a 32-bit HVM guest.  ARM has
    no decoder (None).
    """
    data = core.shared_info
    if data is None:
        return None
    if layout is None:
        machine = core.elf.facts.e_machine
        layout = {EM_X86_64: LAYOUT_X86_64, EM_386: LAYOUT_X86_32}.get(machine)
        if layout is None:
            return None
    return decode_shared_info(data, layout, core.elf.facts.byteorder)


# -- xen.info --------------------------------------------------------------------------------


def section_rows(core: XenDumpCore) -> list[Section]:
    """The file's sections in section-header order."""
    return sorted(core.sections.values(), key=lambda section: section.index)


def core_facts(core: XenDumpCore) -> list[Fact]:
    """Everything ``xen.info`` shows, group by group (see the GROUP_* constants).

    Builds the page map if the core has not yet (one bulk read of the table), so that its
    statistics and warnings are included.
    """
    stats = core.page_map.stats  # first: building it may add warnings
    contexts = vcpus(core)
    facts = [
        *_file_facts(core),
        *_guest_facts(core, contexts),
        *_format_facts(core),
        *_xen_facts(core),
        *_note_facts(core),
        *_section_facts(core),
    ]
    memory = stats.valid * core.page_size
    table = GROUP_TABLE
    facts += [
        Fact(table, "section", core.table.name, "PV: pfn + machine frame" if core.is_pv else ""),
        Fact(table, "entries", stats.entries),
        Fact(table, "valid_pages", stats.valid),
        Fact(table, "padding_entries", stats.padding, "~0 entries: zero pages, no pfn"),
        Fact(table, "duplicate_pfns", stats.duplicates),
        Fact(table, "beyond_address_limit", stats.beyond_limit),
        Fact(table, "sorted", stats.sorted),
        Fact(table, "runs", stats.runs, "contiguous pfn ranges"),
        Fact(table, "lowest_pfn", stats.lowest_pfn, hex=True),
        Fact(table, "highest_pfn", stats.highest_pfn, hex=True),
        Fact(table, "memory", memory, f"{_human_size(memory)} (valid pages x page size)"),
    ]
    facts += _shared_info_facts(core)
    # Last: everything above may have added warnings to the core.
    facts += [Fact(GROUP_WARNINGS, f"warning_{i}", text) for i, text in enumerate(core.warnings)]
    return facts


def _file_facts(core: XenDumpCore) -> list[Fact]:
    elf = core.elf.facts
    return [
        Fact(GROUP_FILE, "name", core.name),
        Fact(GROUP_FILE, "size", core.file_size, _human_size(core.file_size)),
        Fact(GROUP_FILE, "elf_class", f"ELF{elf.elfclass}"),
        Fact(GROUP_FILE, "byte_order", elf.byteorder),
        Fact(GROUP_FILE, "abi_version", elf.e_abiversion),
    ]


def _guest_facts(core: XenDumpCore, contexts: Sequence[VcpuContext]) -> list[Fact]:
    header, elf = core.header, core.elf.facts
    guest = GROUP_GUEST
    stored = len(contexts)
    layout = vcpu_layout(core)
    return [
        Fact(guest, "type", header.guest_type, f"from the header magic {header.magic:#x}"),
        Fact(guest, "magic", header.magic, hex=True),
        Fact(guest, "width", *_guest_width(core)),
        Fact(guest, "machine", f"{elf.machine_name} ({elf.e_machine})", "ELF e_machine"),
        Fact(guest, "page_size", core.page_size),
        Fact(guest, "nr_pages", header.nr_pages, "tot_pages when the dump started"),
        Fact(
            guest,
            "nr_vcpus",
            header.nr_vcpus,
            f"{stored} contexts decoded" if stored != header.nr_vcpus else "contexts stored",
        ),
        Fact(guest, "vcpu_layout", layout, _vcpu_layout_hint(core)),
    ]


def _guest_width(core: XenDumpCore) -> tuple[FactValue, str]:
    machine = core.elf.facts.e_machine
    if core.is_pv and machine in (EM_386, EM_X86_64):
        return f"{32 if machine == EM_386 else 64}-bit", "PV: from e_machine"
    if machine == EM_X86_64:
        return "unknown", "HVM/PVH cores say EM_X86_64 whatever the guest runs"
    return "unknown", "the core does not record it"


def _vcpu_layout_hint(core: XenDumpCore) -> str:
    area = core.vcpu_area
    if area is None:
        return "no .xen_prstatus section"
    return f"{area.count} slot(s) of {area.entsize} bytes"


def _format_facts(core: XenDumpCore) -> list[Fact]:
    version = core.notes.format_version
    if version is None:
        return [Fact(GROUP_FORMAT, "version", None, "no format_version note")]
    return [
        Fact(GROUP_FORMAT, "version", str(version)),
        Fact(GROUP_FORMAT, "known", version.known, "" if version.known else "read as 0.x"),
    ]


def _xen_facts(core: XenDumpCore) -> list[Fact]:
    xv = core.notes.xen_version
    xen = GROUP_XEN
    if xv is None:
        return [Fact(xen, "version", None, "no usable xen_version note")]
    return [
        Fact(xen, "version", f"{xv.major}.{xv.minor}{xv.extra}", "major.minor + extra"),
        Fact(xen, "major", xv.major),
        Fact(xen, "minor", xv.minor),
        Fact(xen, "extra", xv.extra),
        Fact(xen, "compiler", xv.compiler),
        Fact(xen, "compile_by", xv.compile_by),
        Fact(xen, "compile_domain", xv.compile_domain),
        Fact(xen, "compile_date", xv.compile_date),
        Fact(xen, "capabilities", xv.capabilities),
        Fact(xen, "changeset", xv.changeset),
        Fact(xen, "virt_start", xv.virt_start, _virt_start_hint(xv.layout), hex=True),
        Fact(xen, "pagesize", xv.pagesize, "XENVER_pagesize"),
        Fact(xen, "note_layout", xv.layout, "of the xen_version note"),
    ]


def _virt_start_hint(layout: str) -> str:
    hint = "dom0's platform parameter, not the guest's"
    if layout != "64-bit":
        hint += "; low 32 bits only"
    return hint


def _note_facts(core: XenDumpCore) -> list[Fact]:
    facts = []
    for note in core.notes.raw:
        name = NOTE_TYPE_NAMES.get(note.type, f"type {note.type:#x}")
        name = name.replace("XEN_ELFNOTE_DUMPCORE_", "").lower()
        owner = printable(note.name.decode("ascii", "replace"))
        facts.append(
            Fact(
                GROUP_NOTES,
                name if owner == "Xen" else f"{owner} {name}",
                f"offset {note.offset:#x}, {len(note.desc)} bytes",
            )
        )
    return facts


def _section_facts(core: XenDumpCore) -> list[Fact]:
    return [
        Fact(
            GROUP_SECTIONS,
            printable(row.name) or f"[{row.index}]",
            f"offset {row.offset:#x}, size {row.size:#x}, entsize {row.entsize}",
            _human_size(row.size),
        )
        for row in section_rows(core)
    ]


def _shared_info_facts(core: XenDumpCore) -> list[Fact]:
    group = GROUP_SHARED_INFO
    if core.shared_info is None:
        return [Fact(group, "present", False, "HVM/PVH/ARM: only if the guest mapped it")]
    facts = [Fact(group, "present", True, f"{len(core.shared_info)} bytes")]
    if not core.is_pv:
        # A translated guest's width is unknown, so its layout would be a guess; the p2m
        # fields mean nothing for it anyway.
        return facts
    info = decoded_shared_info(core)
    if info is None:
        return facts
    facts += [
        Fact(group, "layout", info.layout),
        Fact(group, "max_pfn", info.max_pfn, "size of the guest's p2m list", hex=True),
        Fact(
            group,
            "pfn_to_mfn_frame_list_list",
            info.pfn_to_mfn_frame_list_list,
            "mfn of the 3-level p2m tree",
            hex=True,
        ),
        Fact(group, "p2m_vaddr", info.p2m_vaddr, "linear p2m list (Xen >= 4.16)", hex=True),
    ]
    if info.p2m_cr3 is not None:
        machine = vcpu_mod.pv_cr3_to_machine_address(info.p2m_cr3, info.layout)
        facts.append(
            Fact(group, "p2m_cr3", info.p2m_cr3, f"machine address {machine:#x}", hex=True)
        )
    facts.append(Fact(group, "p2m_generation", info.p2m_generation))
    seconds = info.wallclock_seconds
    facts.append(Fact(group, "wallclock_sec", seconds, _utc(seconds)))
    return facts


def _utc(seconds: int | None) -> str:
    if seconds is None:
        return ""
    try:
        moment = datetime.datetime.fromtimestamp(seconds, tz=datetime.timezone.utc)
    except (OverflowError, OSError, ValueError):
        return "out of range"
    return f"{moment:%Y-%m-%d %H:%M:%S} UTC at guest system time 0"


def _human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"  # unreachable


# -- xen.vcpus -------------------------------------------------------------------------------

KIND_INT, KIND_HEX, KIND_BOOL, KIND_STR = "int", "hex", "bool", "str"


@dataclass(frozen=True)
class Column:
    """A column of ``vcpu_table``: its title and how its values should be shown."""

    name: str
    kind: str  # KIND_INT, KIND_HEX, KIND_BOOL or KIND_STR


@dataclass(frozen=True)
class VcpuTable:
    """One row per stored ``.xen_prstatus`` slot; the columns depend on the layout.

    ``FileSlot`` k is the k-th context stored in the file, not necessarily vCPU id k:
    Xen stores only initialised vCPUs, packed without gaps.
    """

    layout: str | None
    columns: tuple[Column, ...]
    rows: tuple[tuple[Cell, ...], ...]

    def as_dicts(self) -> list[dict[str, Cell]]:
        names = [column.name for column in self.columns]
        return [dict(zip(names, row)) for row in self.rows]


COLUMN_SLOT = "FileSlot"
COLUMN_DTB_MACHINE = "DTB(M)"
COLUMN_DTB_PHYSICAL = "DTB(P)"

# Registers shown without --all, in order (the first three are ip, sp and flags).
_BASIC: dict[str, tuple[str, ...]] = {
    LAYOUT_X86_64: tuple(
        "rip rsp rflags cs ss ds es fs gs cr0 cr2 cr3 cr4 "
        "fs_base gs_base_kernel gs_base_user".split()
    ),
    LAYOUT_X86_32: tuple("eip esp eflags cs ss ds es fs gs cr0 cr2 cr3 cr4".split()),
    # "sp" is the stack pointer in effect (chosen by mode), not a stored field.
    LAYOUT_ARM: tuple("pc64 sp cpsr sp_el0 sp_el1 elr_el1 sctlr ttbr0 ttbr1 ttbcr".split()),
}
_COUNT_REGISTERS = frozenset({"ldt_ents", "gdt_ents"})
_TITLES = {"pc64": "PC", "flags": "VGCF_FLAGS"}
_GDT_FRAMES = "GDT_FRAMES"


def _title(register: str) -> str:
    return _TITLES.get(register, register.upper())


def _extra_registers(layout: str) -> list[str]:
    """``--all``: every other decoded field, gdt_frame0..15 folded into one column."""
    shown = set(_BASIC[layout])
    extra: list[str] = []
    for name in vcpu_mod.register_groups(layout)["all"]:
        if name in shown:
            continue
        if name.startswith("gdt_frame"):
            if _GDT_FRAMES not in extra:
                extra.append(_GDT_FRAMES)
            continue
        extra.append(name)
    return extra


def vcpu_table(core: XenDumpCore, all_registers: bool = False) -> VcpuTable:
    """The rows of ``xen.vcpus``.

    Columns: ``FileSlot``, ``Online``, ``InKernel``, the layout's registers (``--all``: every
    decoded field), then the decoded top-level page table:

    - ``DTB(M)``: its machine address (PV only: 64-bit ``cr3 = mfn << 12``, 32-bit the
      rotated compat encoding undone);
    - ``DTB(P)``: its guest pseudo-physical address, what an OS layer wants as its page
      map offset: HVM/PVH the CR3 base (PCID/flag bits masked), PV the machine address
      translated through ``.xen_p2m`` (``NOT_FOUND`` if the guest does not own that
      frame), ARM the kernel TTBR's base.
    """
    layout = vcpu_layout(core)
    contexts = vcpus(core) if layout else ()
    columns = [
        Column(COLUMN_SLOT, KIND_INT),
        Column("Online", KIND_BOOL),
        Column("InKernel", KIND_BOOL),
    ]
    if layout is None:
        return VcpuTable(None, tuple(columns), ())
    registers = list(_BASIC[layout])
    if all_registers:
        registers += _extra_registers(layout)
    for name in registers:
        if name == _GDT_FRAMES:
            kind = KIND_STR
        elif name in _COUNT_REGISTERS:
            kind = KIND_INT
        else:
            kind = KIND_HEX
        columns.append(Column(_title(name), kind))
    columns += [Column(COLUMN_DTB_MACHINE, KIND_HEX), Column(COLUMN_DTB_PHYSICAL, KIND_HEX)]
    rows = tuple(_vcpu_row(core, context, registers) for context in contexts)
    return VcpuTable(layout, tuple(columns), rows)


def vcpu_rows(core: XenDumpCore, all_registers: bool = False) -> list[dict[str, Cell]]:
    """``vcpu_table`` as one ``{column name: value}`` dict per stored slot."""
    return vcpu_table(core, all_registers).as_dicts()


def _vcpu_row(core: XenDumpCore, context: VcpuContext, registers: list[str]) -> tuple[Cell, ...]:
    values = context.registers
    row: list[Cell] = [context.slot, context.online, context.in_kernel]
    for name in registers:
        if name == "sp":
            row.append(context.sp)
        elif name == _GDT_FRAMES:
            row.append(_gdt_frames(values))
        else:
            row.append(values[name])
    row += _page_table_base(core, context)
    return tuple(row)


def _gdt_frames(registers: dict[str, int]) -> str:
    """The GDT frame list up to its last nonzero entry, as hex mfns."""
    frames = [registers[f"gdt_frame{i}"] for i in range(16)]
    while frames and not frames[-1]:
        frames.pop()
    return " ".join(f"{frame:#x}" for frame in frames)


def _page_table_base(core: XenDumpCore, context: VcpuContext) -> tuple[Cell, Cell]:
    kind, address = context.decoded_page_table_base(core.is_pv)
    if kind == vcpu_mod.ADDRESS_GUEST_PHYSICAL:
        return Absent.NOT_APPLICABLE, address
    pseudo = core.machine_to_physical(address)
    return address, Absent.NOT_FOUND if pseudo is None else pseudo
