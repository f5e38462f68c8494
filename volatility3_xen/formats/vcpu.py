"""Decoding (and, for tests and sample files, encoding) of the ``vcpu_guest_context`` slots
stored in a dump-core's ``.xen_prstatus`` section.

Each layout is a declarative table of ``(register name, byte offset, struct format)``
taken from Xen's public headers (``xen/include/public/arch-x86/xen-x86_64.h``,
``xen-x86_32.h``, ``arch-x86/xen.h``, ``arch-arm.h``); offsets are absolute within the
context.  A table is compiled once per byte order into a single ``struct.Struct`` with pad
bytes for the parts we do not expose (``fpu_ctxt``, ``trap_ctxt``, alignment holes), so a
slot is decoded by one ``unpack_from`` call.

Facts that shape this module (see dump-core-layout.md section 4):

* x86 slots are 5168 bytes (``vcpu_guest_context_any_t``); a 32-bit PV guest's 2800-byte
  compat context sits at the start of the slot and the tail is undefined.
* File slot *k* is not vcpu id *k*: only initialised vCPUs are stored, packed.
* ``ctrlreg[3]`` means different things for 64-bit PV (machine address), 32-bit PV (a
  32-bit rotated MFN) and HVM/PVH (raw guest CR3 with PCID/flag bits).

This module deliberately imports nothing from Volatility.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import cache
from typing import NamedTuple

# --- VGCF_* flags ------------------------------------------------------------------------
# x86 values from xen/include/public/arch-x86/xen.h.
VCPU_FLAG_I387_VALID = 1 << 0
VCPU_FLAG_IN_KERNEL = 1 << 2  # Set by Xen for PV guests only.
VCPU_FLAG_FAILSAFE_DISABLES_EVENTS = 1 << 3
VCPU_FLAG_SYSCALL_DISABLES_EVENTS = 1 << 4
VCPU_FLAG_ONLINE = 1 << 5
# ARM defines only VGCF_online, and at bit 0 (xen/include/public/arch-arm.h).
VCPU_FLAG_ARM_ONLINE = 1 << 0

# --- ELF machines that select a layout ------------------------------------------------
EM_386 = 3
EM_ARM = 40
EM_X86_64 = 62
EM_AARCH64 = 183

LAYOUT_X86_64 = "x86_64"
LAYOUT_X86_32 = "x86_32"
LAYOUT_ARM = "arm"

#: ``kind`` values returned by :meth:`VcpuContext.decoded_page_table_base`.
ADDRESS_MACHINE = "machine"  # A host machine address (PV): look it up through .xen_p2m.
ADDRESS_GUEST_PHYSICAL = "guest_physical"  # A guest pseudo-physical / IPA address.
ADDRESS_NONE = "none"  # No single page-table base register (ia64: region registers).

_BYTEORDER_PREFIX = {"little": "<", "big": ">"}


class Field(NamedTuple):
    """One exposed register: name, absolute offset in the context, struct format char."""

    name: str
    offset: int
    fmt: str

    @property
    def size(self) -> int:
        return struct.calcsize("<" + self.fmt)


def _fields(base: int, entries: list[tuple[str, int, str]]) -> list[Field]:
    """Fields of an embedded struct, given offsets relative to ``base``."""
    return [Field(name, base + rel, fmt) for name, rel, fmt in entries]


def _array(prefix: str, base: int, count: int, fmt: str) -> list[Field]:
    stride = struct.calcsize("<" + fmt)
    return [Field(f"{prefix}{i}", base + i * stride, fmt) for i in range(count)]


# x86_64 vcpu_guest_context, 5168 bytes.  fpu_ctxt [0, 512) and trap_ctxt [720, 4816)
# are not exposed: neither is a register an analyst reads off a dump.
_X86_64_USER_REGS = 520
_X86_64_FIELDS: list[Field] = [
    Field("flags", 512, "Q"),
    *_fields(
        _X86_64_USER_REGS,
        [
            ("r15", 0, "Q"),
            ("r14", 8, "Q"),
            ("r13", 16, "Q"),
            ("r12", 24, "Q"),
            ("rbp", 32, "Q"),
            ("rbx", 40, "Q"),
            ("r11", 48, "Q"),
            ("r10", 56, "Q"),
            ("r9", 64, "Q"),
            ("r8", 72, "Q"),
            ("rax", 80, "Q"),
            ("rcx", 88, "Q"),
            ("rdx", 96, "Q"),
            ("rsi", 104, "Q"),
            ("rdi", 112, "Q"),
            ("error_code", 120, "I"),
            ("entry_vector", 124, "I"),
            ("rip", 128, "Q"),
            ("cs", 136, "H"),
            ("saved_upcall_mask", 140, "B"),
            ("rflags", 144, "Q"),
            ("rsp", 152, "Q"),
            ("ss", 160, "H"),
            ("es", 168, "H"),
            ("ds", 176, "H"),
            ("fs", 184, "H"),
            ("gs", 192, "H"),
        ],
    ),
    Field("ldt_base", 4816, "Q"),
    Field("ldt_ents", 4824, "Q"),
    *_array("gdt_frame", 4832, 16, "Q"),
    Field("gdt_ents", 4960, "Q"),
    Field("kernel_ss", 4968, "Q"),
    Field("kernel_sp", 4976, "Q"),
    *_array("cr", 4984, 8, "Q"),
    *_array("dr", 5048, 8, "Q"),
    Field("event_callback_eip", 5112, "Q"),
    Field("failsafe_callback_eip", 5120, "Q"),
    Field("syscall_callback_eip", 5128, "Q"),
    Field("vm_assist", 5136, "Q"),
    Field("fs_base", 5144, "Q"),
    Field("gs_base_kernel", 5152, "Q"),
    Field("gs_base_user", 5160, "Q"),
]

# x86_32 (compat) vcpu_guest_context, 2800 bytes; fpu_ctxt [0, 512) and
# trap_ctxt [584, 2632) not exposed.  No fs/gs base fields exist in this layout.
_X86_32_USER_REGS = 516
_X86_32_FIELDS: list[Field] = [
    Field("flags", 512, "I"),
    *_fields(
        _X86_32_USER_REGS,
        [
            ("ebx", 0, "I"),
            ("ecx", 4, "I"),
            ("edx", 8, "I"),
            ("esi", 12, "I"),
            ("edi", 16, "I"),
            ("ebp", 20, "I"),
            ("eax", 24, "I"),
            ("error_code", 28, "H"),
            ("entry_vector", 30, "H"),
            ("eip", 32, "I"),
            ("cs", 36, "H"),
            ("saved_upcall_mask", 38, "B"),
            ("eflags", 40, "I"),
            ("esp", 44, "I"),
            ("ss", 48, "H"),
            ("es", 52, "H"),
            ("ds", 56, "H"),
            ("fs", 60, "H"),
            ("gs", 64, "H"),
        ],
    ),
    Field("ldt_base", 2632, "I"),
    Field("ldt_ents", 2636, "I"),
    *_array("gdt_frame", 2640, 16, "I"),
    Field("gdt_ents", 2704, "I"),
    Field("kernel_ss", 2708, "I"),
    Field("kernel_sp", 2712, "I"),
    *_array("cr", 2716, 8, "I"),
    *_array("dr", 2748, 8, "I"),
    Field("event_callback_cs", 2780, "I"),
    Field("event_callback_eip", 2784, "I"),
    Field("failsafe_callback_cs", 2788, "I"),
    Field("failsafe_callback_eip", 2792, "I"),
    Field("vm_assist", 2796, "I"),
]

# ARM vcpu_guest_context, 352 bytes (Xen >= 4.16, where cpsr/spsr_el1 became 64-bit; the
# same layout serves arm32 and arm64 guests).  Checked against xen/include/public/arch-arm.h
# (struct vcpu_guest_core_regs, struct vcpu_guest_context): uint32_t flags, 4 bytes of
# padding, user_regs at 8 (x0..x30 and pc64 are __DECL_REG unions of a uint64_t and its
# AArch32 uint32_t name; cpsr uint64_t; spsr_el1 a union with the AArch32 uint32_t spsr_svc;
# spsr_fiq/irq/und/abt uint32_t; sp_el0, sp_el1, elr_el1 uint64_t), then uint64_t sctlr,
# ttbcr, ttbr0, ttbr1.  Xen on ARM is little-endian only, where the AArch32 names read as
# the low half of their 64-bit slot.  x0..x30 alias the AArch32 banked registers
# (x13 = sp_usr, x19 = sp_svc, ...), see _ARM32_BANKED_SP.
_ARM_FIELDS: list[Field] = [
    Field("flags", 0, "I"),
    *_array("x", 8, 31, "Q"),
    Field("pc64", 256, "Q"),
    Field("cpsr", 264, "Q"),
    Field("spsr_el1", 272, "Q"),
    Field("spsr_fiq", 280, "I"),
    Field("spsr_irq", 284, "I"),
    Field("spsr_und", 288, "I"),
    Field("spsr_abt", 292, "I"),
    Field("sp_el0", 296, "Q"),
    Field("sp_el1", 304, "Q"),
    Field("elr_el1", 312, "Q"),
    Field("sctlr", 320, "Q"),  # uint64_t since 4.16, like ttbcr/ttbr0/ttbr1 after it
    Field("ttbcr", 328, "Q"),
    Field("ttbr0", 336, "Q"),
    Field("ttbr1", 344, "Q"),
]

_LAYOUT_FIELDS: dict[str, list[Field]] = {
    LAYOUT_X86_64: _X86_64_FIELDS,
    LAYOUT_X86_32: _X86_32_FIELDS,
    LAYOUT_ARM: _ARM_FIELDS,
}

#: Size in bytes of each layout's ``vcpu_guest_context``.
LAYOUT_SIZES: dict[str, int] = {LAYOUT_X86_64: 5168, LAYOUT_X86_32: 2800, LAYOUT_ARM: 352}

_BASIC_REGISTERS: dict[str, list[str]] = {
    LAYOUT_X86_64: (
        "rip rsp rflags cs ss ds es fs gs cr0 cr2 cr3 cr4 fs_base gs_base_kernel gs_base_user"
    ).split(),
    LAYOUT_X86_32: "eip esp eflags cs ss ds es fs gs cr0 cr2 cr3 cr4".split(),
    LAYOUT_ARM: "pc64 cpsr sp_el0 sp_el1 elr_el1 sctlr ttbr0 ttbr1 ttbcr".split(),
}


def _compile(fields: tuple[Field, ...], size: int, prefix: str) -> struct.Struct:
    """One Struct for the whole context.  Tables are kept in ascending offset order (which
    is also the display order); raises if one is out of order, overlaps or overruns."""
    parts: list[str] = []
    cursor = 0
    for field in fields:
        if field.offset < cursor:
            raise AssertionError(f"vcpu layout table out of order or overlapping at {field.name}")
        if field.offset > cursor:
            parts.append(f"{field.offset - cursor}x")
        parts.append(field.fmt)
        cursor = field.offset + field.size
    if cursor > size:
        raise AssertionError("vcpu layout table overruns the context size")
    return struct.Struct(prefix + "".join(parts))


@cache
def _codec(layout: str, byteorder: str) -> tuple[struct.Struct, tuple[str, ...]]:
    """(compiled struct, field names in struct and display order)."""
    fields = layout_fields(layout)
    prefix = _BYTEORDER_PREFIX.get(byteorder)
    if prefix is None:
        raise ValueError(f"unknown byte order {byteorder!r} (expected 'little' or 'big')")
    return _compile(fields, LAYOUT_SIZES[layout], prefix), tuple(f.name for f in fields)


def layout_fields(layout: str) -> tuple[Field, ...]:
    """The declarative table of a layout, in display order."""
    try:
        return tuple(_LAYOUT_FIELDS[layout])
    except KeyError:
        raise ValueError(f"unknown vcpu context layout {layout!r}") from None


def layout_for(e_machine: int, entsize: int) -> str | None:
    """Which context layout a dump-core with this ``e_machine`` / prstatus entsize holds.

    x86 PV encodes the guest width in ``e_machine`` (EM_386 = 32-bit PV); HVM/PVH is always
    EM_X86_64.  ARM writes EM_ARM even for arm64.  Returns None when the slots cannot hold
    the layout (e.g. a pre-4.16 ARM dump with 344-byte contexts, whose cpsr was 32-bit) or
    the machine is unknown; the caller decides how to report that.
    """
    if e_machine == EM_X86_64:
        return LAYOUT_X86_64 if entsize >= LAYOUT_SIZES[LAYOUT_X86_64] else None
    if e_machine == EM_386:
        return LAYOUT_X86_32 if entsize >= LAYOUT_SIZES[LAYOUT_X86_32] else None
    if e_machine in (EM_ARM, EM_AARCH64):
        return LAYOUT_ARM if entsize == LAYOUT_SIZES[LAYOUT_ARM] else None
    return None


def register_groups(layout: str) -> dict[str, list[str]]:
    """Register names to show: ``basic`` (what an analyst looks at first) and ``all``."""
    names = [f.name for f in layout_fields(layout)]
    return {"basic": list(_BASIC_REGISTERS[layout]), "all": names}


# AArch32 mode (cpsr[4:0]) -> the xN slot that holds that mode's banked r13.
# usr/sys x13, fiq x29, irq x17, svc x19, abt x21, und x23 (Xen's __DECL_REG aliases).
_ARM32_BANKED_SP = {
    0x10: "x13", 0x1F: "x13", 0x11: "x29", 0x12: "x17", 0x13: "x19", 0x17: "x21", 0x1B: "x23",
}  # fmt: skip
_ARM_CPSR_AARCH32 = 1 << 4  # PSTATE.nRW: the vCPU was executing in AArch32 state.
_ARM32_TTBCR_EAE = 1 << 31  # TTBCR.EAE: LPAE (long-descriptor) translation.

# x86 CR3 -> top-level table base (Intel SDM vol. 3A, 4.3-4.5, tables 4-3, 4-7, 4-12/13).
_X86_CR4_PAE = 1 << 5
_X86_CR4_LA57 = 1 << 12
_X86_CR4_PCIDE = 1 << 17  # settable only in IA-32e mode (long mode)
_X86_EFER_LMA = 1 << 10
_X86_CR3_LONG_MASK = 0x000F_FFFF_FFFF_F000  # 4/5-level: bits 51:12
_X86_CR3_PAE_MASK = 0xFFFF_FFE0  # PAE: bits 31:5, a 32-byte aligned PDPT
_X86_CR3_32BIT_MASK = 0xFFFF_F000  # 32-bit paging: bits 31:12

#: Paging modes named by :func:`x86_cr3_base`.
PAGING_LONG = "long"  # 4-level (5-level with CR4.LA57)
PAGING_PAE = "pae"
PAGING_32BIT = "32-bit"


def x86_cr3_base(cr3: int, cr4: int, efer: int | None = None) -> tuple[str, int]:
    """(paging mode, top-level table address) of a guest CR3: the one rule every CR3
    that becomes a DTB goes through.

    * Long mode (4- or 5-level) - known from EFER.LMA when the source has EFER, else from
      CR4.PCIDE (settable only in long mode) or a CR3 above 4 GiB (PAE's CR3 is 32 bits):
      bits 51:12.  Dropped: the PCID (11:0) with CR4.PCIDE, else PWT (3), PCD (4) and the
      ignored bits; bit 63 (no-flush, MOV-to-CR3 only) and 62:61 (LAM).
    * PAE (CR4.PAE, not long mode): bits 31:5, the 32-byte aligned PDPT; bits 11:5 are
      part of the address (32-bit Windows processes have PDPTs at 32-byte offsets
      inside a page), only bits 4:0 (PWT, PCD, ignored) are dropped.
    * 32-bit paging (CR4.PAE clear): bits 31:12; PWT/PCD and the ignored bits dropped.

    Without EFER (a dump-core's ``vcpu_guest_context`` has none), a 64-bit guest without
    PCID whose CR3 is below 4 GiB is read as PAE: the same address unless the guest set
    CR3's ignored bits 11:5, which no known OS does.
    """
    if efer is not None:
        long_mode = bool(efer & _X86_EFER_LMA)
    else:
        long_mode = bool(cr4 & _X86_CR4_PCIDE) or cr3 >> 32 != 0
    if long_mode:
        return PAGING_LONG, cr3 & _X86_CR3_LONG_MASK
    if cr4 & _X86_CR4_PAE:
        return PAGING_PAE, cr3 & _X86_CR3_PAE_MASK
    return PAGING_32BIT, cr3 & _X86_CR3_32BIT_MASK


# ARMv8 TTBRn_EL1: ASID in 63:48, BADDR in 47:1, CnP in bit 0 (with FEAT_LPA's 52-bit
# output addresses, PA[51:48] sit in bits 5:2; not handled).  AArch32 LPAE TTBRs have
# the same shape (ASID 55:48, BADDR 39:1), so one mask serves both.
_ARM_TTBR_BASE_MASK = 0x0000_FFFF_FFFF_FFFE


def pv_cr3_to_machine_address(cr3: int, layout: str) -> int:
    """Undo ``xen_pfn_to_cr3`` for a PV guest of this width (also fits
    ``shared_info.arch.p2m_cr3``).

    64-bit: ``cr3 = mfn << 12``.  32-bit (compat): ``cr3 = (u32)(mfn << 12 | mfn >> 20)``,
    a 32-bit rotate so that MFNs >= 2^20 survive; undone with the opposite rotate.
    """
    if layout == LAYOUT_X86_32:
        mfn = ((cr3 >> 12) | (cr3 << 20)) & 0xFFFF_FFFF
    elif layout == LAYOUT_X86_64:
        mfn = cr3 >> 12
    else:
        raise ValueError(f"layout {layout!r} has no PV cr3 encoding")
    return mfn << 12


@dataclass(frozen=True)
class VcpuContext:
    """One decoded ``.xen_prstatus`` slot.

    ``slot`` is the index in the file, not the vCPU id: Xen stores only initialised vCPUs,
    packed.  ``registers`` holds every exposed field of the layout in display order.
    """

    slot: int
    layout: str
    registers: dict[str, int]

    @property
    def flags(self) -> int:
        """The VGCF_* word."""
        return self.registers["flags"]

    @property
    def online(self) -> bool:
        bit = VCPU_FLAG_ARM_ONLINE if self.layout == LAYOUT_ARM else VCPU_FLAG_ONLINE
        return bool(self.flags & bit)

    @property
    def in_kernel(self) -> bool:
        """Whether the vCPU was in guest kernel mode.

        x86: Xen sets VGCF_in_kernel for PV guests only (their kernel runs in ring 1 or
        3), so for HVM a non-null ring-0 CS is used instead.  ARM: EL1 (AArch64) or any
        mode but usr (AArch32).
        """
        if self.layout == LAYOUT_ARM:
            cpsr = self.registers["cpsr"]
            if cpsr & _ARM_CPSR_AARCH32:
                return (cpsr & 0x1F) != 0x10
            return ((cpsr >> 2) & 0x3) >= 1
        if self.flags & VCPU_FLAG_IN_KERNEL:
            return True
        cs = self.registers["cs"]
        return cs != 0 and (cs & 0x3) == 0

    @property
    def ip(self) -> int:
        return self.registers[{"x86_64": "rip", "x86_32": "eip", "arm": "pc64"}[self.layout]]

    @property
    def sp(self) -> int:
        """The stack pointer in effect (for ARM, the one selected by mode / SPSel)."""
        if self.layout == LAYOUT_X86_64:
            return self.registers["rsp"]
        if self.layout == LAYOUT_X86_32:
            return self.registers["esp"]
        cpsr = self.registers["cpsr"]
        if cpsr & _ARM_CPSR_AARCH32:
            return self.registers[_ARM32_BANKED_SP.get(cpsr & 0x1F, "x13")]
        # AArch64: EL1 with SPSel=1 (cpsr bit 0, "EL1h") uses SP_EL1, else SP_EL0.
        in_el1 = ((cpsr >> 2) & 0x3) >= 1
        return self.registers["sp_el1" if in_el1 and cpsr & 1 else "sp_el0"]

    @property
    def flags_reg(self) -> int:
        """rflags / eflags / cpsr."""
        name = {"x86_64": "rflags", "x86_32": "eflags", "arm": "cpsr"}[self.layout]
        return self.registers[name]

    @property
    def page_table_base_raw(self) -> int:
        """ctrlreg[3] as stored (x86), or the TTBR that maps the kernel half (ARM)."""
        if self.layout == LAYOUT_ARM:
            return self.registers[self._arm_kernel_ttbr()]
        return self.registers["cr3"]

    def _arm_kernel_ttbr(self) -> str:
        """AArch64 kernels live in the TTBR1 half.  AArch32 uses TTBR1 only when the
        address space is split (TTBCR.N != 0, or T1SZ != 0 with LPAE, as Linux's LPAE
        3G/1G split does); otherwise TTBR0 translates everything."""
        registers = self.registers
        if not registers["cpsr"] & _ARM_CPSR_AARCH32:
            return "ttbr1"
        ttbcr = registers["ttbcr"]
        if ttbcr & _ARM32_TTBCR_EAE:
            split = (ttbcr >> 16) & 0x7
        else:
            split = ttbcr & 0x7
        return "ttbr1" if split else "ttbr0"

    def decoded_page_table_base(self, is_pv: bool) -> tuple[str, int]:
        """(kind, address) of the top-level page table, kind being ADDRESS_MACHINE or
        ADDRESS_GUEST_PHYSICAL.

        * 64-bit PV: ``cr3 = mfn << 12`` of the kernel L4 (a machine address).
        * 32-bit PV: ``cr3`` is Xen's compat encoding, a 32-bit rotate
          ``mfn << 12 | mfn >> 20`` so that MFNs >= 2^20 fit; undone here.
        * HVM/PVH: the raw guest CR3's table base by the paging mode CR4 implies
          (:func:`x86_cr3_base`: PAE keeps bits 11:5; PCID, PWT/PCD, bit 63 dropped).
        * ARM (always translated): the kernel TTBR's base address (ASID/CnP dropped);
          AArch32 short-descriptor TTBRs are masked to bits 31:(14-N).
        """
        raw = self.page_table_base_raw
        if self.layout == LAYOUT_ARM:
            return ADDRESS_GUEST_PHYSICAL, self._arm_table_base(raw)
        if is_pv:
            return ADDRESS_MACHINE, pv_cr3_to_machine_address(raw, self.layout)
        return ADDRESS_GUEST_PHYSICAL, x86_cr3_base(raw, self.registers["cr4"])[1]

    def _arm_table_base(self, ttbr: int) -> int:
        cpsr, ttbcr = self.registers["cpsr"], self.registers["ttbcr"]
        if cpsr & _ARM_CPSR_AARCH32 and not ttbcr & _ARM32_TTBCR_EAE:
            # Short-descriptor: TTBR0 base is bits 31:(14-N), TTBR1 base bits 31:14.
            low = 14 - (ttbcr & 0x7) if self._arm_kernel_ttbr() == "ttbr0" else 14
            return ttbr & (0xFFFF_FFFF >> low << low)
        return ttbr & _ARM_TTBR_BASE_MASK


def decode_vcpu(raw: bytes, layout: str, byteorder: str, slot: int) -> VcpuContext:
    """Decode one context; ``raw`` may be a whole slot (longer than the layout)."""
    codec, names = _codec(layout, byteorder)
    size = LAYOUT_SIZES[layout]
    if len(raw) < size:
        raise ValueError(f"vcpu slot {slot}: {len(raw)} bytes, the {layout} context needs {size}")
    registers = dict(zip(names, codec.unpack_from(raw, 0)))
    return VcpuContext(slot=slot, layout=layout, registers=registers)


def decode_all(
    data: bytes, entsize: int, count: int, layout: str, byteorder: str
) -> list[VcpuContext]:
    """Decode up to ``count`` slots of ``entsize`` bytes from ``data`` (``.xen_prstatus``).

    Bounded by ``len(data)``, never by ``count`` alone: a slot is decoded only if the
    layout's bytes lie entirely inside ``data``.
    """
    size = LAYOUT_SIZES.get(layout)
    if size is None:
        raise ValueError(f"unknown vcpu context layout {layout!r}")
    if entsize < size:
        raise ValueError(f"prstatus entsize {entsize} is smaller than the {layout} context")
    view = memoryview(data)
    available = 0 if len(view) < size else (len(view) - size) // entsize + 1
    return [
        decode_vcpu(view[slot * entsize : slot * entsize + size], layout, byteorder, slot)
        for slot in range(min(max(count, 0), available))
    ]


def encode_vcpu(
    layout: str, byteorder: str, registers: dict[str, int], entsize: int | None = None
) -> bytes:
    """Build a context (zero-filled, ``entsize`` bytes, default the layout size).

    Registers not given are zero; an unknown register name raises KeyError, a value that
    does not fit its field raises ValueError.
    """
    codec, names = _codec(layout, byteorder)
    size = LAYOUT_SIZES[layout]
    length = size if entsize is None else entsize
    if length < size:
        raise ValueError(f"entsize {length} is smaller than the {layout} context ({size})")
    unknown = set(registers) - set(names)
    if unknown:
        raise KeyError(f"unknown {layout} registers: {', '.join(sorted(unknown))}")
    out = bytearray(length)
    try:
        codec.pack_into(out, 0, *(registers.get(name, 0) for name in names))
    except struct.error as exc:
        raise ValueError(f"{layout} register value out of range: {exc}") from None
    return bytes(out)


# --- layouts defined beside their own decoders ----------------------------------------------

#: An HVM guest's ``struct hvm_hw_cpu`` save record (``hvmcontext`` defines its table,
#: registers it here and decodes it into ``hvmcontext.HvmCpuContext``).
LAYOUT_HVM_CPU = "hvm_cpu"


def register_layout(layout: str, fields: list[Field], size: int, basic: list[str]) -> None:
    """Make ``layout_fields``/``register_groups``/``decode_vcpu``/``encode_vcpu`` know a
    layout whose table lives in another module (checked like the tables above)."""
    _compile(tuple(fields), size, "<")  # raises if out of order, overlapping or too long
    unknown = set(basic) - {field.name for field in fields}
    if unknown:
        raise AssertionError(f"basic registers not in the {layout} table: {sorted(unknown)}")
    _LAYOUT_FIELDS[layout] = list(fields)
    LAYOUT_SIZES[layout] = size
    _BASIC_REGISTERS[layout] = list(basic)
    _codec.cache_clear()
