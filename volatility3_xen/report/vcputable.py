"""``xen.vcpus``: one row per stored vCPU context, columns by context layout."""

from __future__ import annotations

from ..formats import vcpu as vcpu_mod
from ..formats.dumpcore import XenDumpCore
from ..formats.vcpu import LAYOUT_ARM, LAYOUT_X86_32, LAYOUT_X86_64, VcpuContext
from .dumpcore import vcpu_layout, vcpus
from .model import (
    COLUMN_DTB_MACHINE,
    COLUMN_DTB_PHYSICAL,
    COLUMN_SLOT,
    KIND_BOOL,
    KIND_HEX,
    KIND_INT,
    KIND_STR,
    Absent,
    Cell,
    Column,
    VcpuTable,
)

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
