"""``xen.vcpus``: one row per stored vCPU context, columns by context layout.

Works on any ``formats.image.GuestMemoryImage``: a dump-core's ``.xen_prstatus`` slots
(x86_64, x86_32, ARM), a PV save image's ``X86_PV_VCPU_BASIC`` contexts (the same
layouts and columns) and an HVM save image's ``struct hvm_hw_cpu`` records
(``hvmcontext``: EFER, every segment's base/limit/attributes, GDTR/IDTR, the SYSENTER and
SYSCALL MSRs, the inactive GS base, TSC, the pending event).
"""

from __future__ import annotations

from ..formats import vcpu as vcpu_mod
from ..formats.dumpcore import XenDumpCore
from ..formats.hvmcontext import HVM_CPU_BASIC
from ..formats.image import GuestMemoryImage
from ..formats.vcpu import LAYOUT_ARM, LAYOUT_HVM_CPU, LAYOUT_X86_32, LAYOUT_X86_64, VcpuContext
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
    LAYOUT_HVM_CPU: tuple(HVM_CPU_BASIC),
}
#: First column of a save image's table: the vCPU id the record names (a dump-core's
#: ``FileSlot`` is a position in the file instead).
COLUMN_VCPU = "VCPU"
_COUNT_REGISTERS = frozenset({"ldt_ents", "gdt_ents"})
_TITLES = {"pc64": "PC", "flags": "VGCF_FLAGS"}
_GDT_FRAMES = "GDT_FRAMES"


def _basic(layout: str) -> tuple[str, ...]:
    """Registers shown without --all: the table above, else the layout's own choice
    (layouts registered by other modules, e.g. ia64)."""
    return _BASIC.get(layout) or tuple(vcpu_mod.register_groups(layout)["basic"])


def _title(register: str) -> str:
    return _TITLES.get(register, register.upper())


def _extra_registers(layout: str) -> list[str]:
    """``--all``: every other decoded field, gdt_frame0..15 folded into one column."""
    shown = set(_basic(layout))
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


def _layout_and_contexts(image: GuestMemoryImage) -> tuple[str | None, tuple[VcpuContext, ...]]:
    if isinstance(image, XenDumpCore):
        layout = vcpu_layout(image)
        return layout, vcpus(image) if layout else ()
    contexts = tuple(image.vcpus())
    return (contexts[0].layout if contexts else None), contexts


def vcpu_table(core: GuestMemoryImage, all_registers: bool = False) -> VcpuTable:
    """The rows of ``xen.vcpus`` for any image (a dump-core, a save image, ...).

    Columns: ``FileSlot`` (dump-cores: the position in the file) or ``VCPU`` (save images:
    the vCPU id the record names), ``Online``, ``InKernel``, the layout's registers
    (``--all``: every decoded field), then the decoded top-level page table:

    - ``DTB(M)``: its machine address (PV dump-cores only: 64-bit ``cr3 = mfn << 12``,
      32-bit the rotated compat encoding undone);
    - ``DTB(P)``: its guest pseudo-physical address, what an OS layer wants as its page
      map offset: HVM/PVH the CR3 base (PCID/flag bits masked; for an HVM save record by
      the paging mode it states), PV dump-cores the machine address translated through
      ``.xen_p2m`` (``NOT_FOUND`` if the guest does not own that frame), PV save images
      the cr3 as stored (the save code already turned it into a pfn; ``NOT_FOUND`` if
      the image holds no such page), ARM the kernel TTBR's base.

    Raises what ``image.vcpus()`` raises for undecodable contexts (``XenFormatError``).
    """
    layout, contexts = _layout_and_contexts(core)
    first = COLUMN_SLOT if isinstance(core, XenDumpCore) else COLUMN_VCPU
    columns = [
        Column(first, KIND_INT),
        Column("Online", KIND_BOOL),
        Column("InKernel", KIND_BOOL),
    ]
    if layout is None:
        return VcpuTable(None, tuple(columns), ())
    registers = list(_basic(layout))
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


def vcpu_rows(core: GuestMemoryImage, all_registers: bool = False) -> list[dict[str, Cell]]:
    """``vcpu_table`` as one ``{column name: value}`` dict per stored slot."""
    return vcpu_table(core, all_registers).as_dicts()


def _vcpu_row(
    core: GuestMemoryImage, context: VcpuContext, registers: list[str]
) -> tuple[Cell, ...]:
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


def _page_table_base(core: GuestMemoryImage, context: VcpuContext) -> tuple[Cell, Cell]:
    kind, address = context.decoded_page_table_base(core.is_pv)
    if kind == vcpu_mod.ADDRESS_NONE:  # ia64: no page-table base register
        return Absent.NOT_APPLICABLE, Absent.NOT_APPLICABLE
    if kind == vcpu_mod.ADDRESS_GUEST_PHYSICAL:
        return Absent.NOT_APPLICABLE, address
    if core.machine_frames is None:
        # A PV save image: the save code rewrote cr3 to hold a pfn, so the "machine"
        # decoding is already the pseudo-physical address.
        stored = core.has_pfn(address >> core.page_shift)
        return Absent.NOT_APPLICABLE, address if stored else Absent.NOT_FOUND
    pseudo = core.machine_to_physical(address)
    return address, Absent.NOT_FOUND if pseudo is None else pseudo
