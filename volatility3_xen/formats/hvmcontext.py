"""An HVM guest's Xen-held state as saved: the ``XEN_DOMCTL_gethvmcontext`` blob.

A save image's ``HVM_CONTEXT`` record holds what ``hvm_save()`` wrote (Xen 4.17,
``xen/include/public/hvm/save.h`` and ``arch-x86/hvm/save.h``): a run of entries, each a
``struct hvm_save_descriptor {u16 typecode; u16 instance; u32 length}`` followed by
``length`` bytes, with no padding, ending with a zero-type, zero-length ``END``.  The first
entry is the ``HEADER`` (magic 0x54381286); ``CPU`` (typecode 2) entries are one
``struct hvm_hw_cpu`` per vCPU that was up (``instance`` is the vCPU id; Xen saves nothing
for a vCPU that is down).  Two CPU record sizes exist: 1032 bytes, and 1016 bytes from
Xen before 3.4 (``hvm_hw_cpu_compat``: no ``msr_tsc_aux``), which Xen's own
``_hvm_hw_fix_cpu`` widens on load; so does this module.

The CPU record has more registers than a dump-core's ``vcpu_guest_context``: EFER, the
segment limits, bases and attributes of every segment register (TR and LDTR too),
GDTR/IDTR, the SYSENTER and SYSCALL MSRs (STAR, LSTAR, CSTAR, SFMASK), the inactive GS
base (``shadow_gs``, MSR_KERNEL_GS_BASE), TSC_AUX, the guest TSC and the pending event.

``HVM_PARAMS`` records (``{u64 index, u64 value}`` pairs) are read by the stream reader
(``savestream``); ``hvm_param_name`` names them for ``xen.info``.

Hostile input: the walk is bounded by the blob (a descriptor's length never drives an
allocation; a length running past the end stops the walk with a warning), and every
problem is a warning, never an exception.  No Volatility import.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from . import vcpu as vcpu_mod
from .vcpu import Field, VcpuContext

LAYOUT_HVM_CPU = vcpu_mod.LAYOUT_HVM_CPU

HVM_FILE_MAGIC = 0x54381286
TYPE_END = 0
TYPE_HEADER = 1
TYPE_CPU = 2

#: ``hvm_save`` typecodes (Xen 4.17 ``DECLARE_HVM_SAVE_TYPE`` and ``*_CODE``).
HVM_SAVE_TYPES: dict[int, str] = {
    0: "END",
    1: "HEADER",
    2: "CPU",
    3: "PIC",
    4: "IOAPIC",
    5: "LAPIC",
    6: "LAPIC_REGS",
    7: "PCI_IRQ",
    8: "ISA_IRQ",
    9: "PCI_LINK",
    10: "PIT",
    11: "RTC",
    12: "HPET",
    13: "PMTIMER",
    14: "MTRR",
    15: "VIRIDIAN_DOMAIN",
    16: "CPU_XSAVE",
    17: "VIRIDIAN_VCPU",
    18: "VMCE_VCPU",
    19: "TSC_ADJUST",
    20: "CPU_MSR",
}

#: ``HVM_PARAM_*`` indices (Xen 4.17 ``xen/include/public/hvm/params.h``).
HVM_PARAM_NAMES: dict[int, str] = {
    0: "CALLBACK_IRQ",
    1: "STORE_PFN",
    2: "STORE_EVTCHN",
    4: "PAE_ENABLED",
    5: "IOREQ_PFN",
    6: "BUFIOREQ_PFN",
    9: "VIRIDIAN",
    10: "TIMER_MODE",
    11: "HPET_ENABLED",
    12: "IDENT_PT",
    13: "DM_DOMAIN",
    14: "ACPI_S_STATE",
    15: "VM86_TSS",
    16: "VPT_ALIGN",
    17: "CONSOLE_PFN",
    18: "CONSOLE_EVTCHN",
    19: "ACPI_IOPORTS_LOCATION",
    20: "MEMORY_EVENT_CR0",
    21: "MEMORY_EVENT_CR3",
    22: "MEMORY_EVENT_CR4",
    23: "MEMORY_EVENT_INT3",
    24: "NESTEDHVM",
    25: "MEMORY_EVENT_SINGLE_STEP",
    26: "BUFIOREQ_EVTCHN",
    27: "PAGING_RING_PFN",
    28: "MONITOR_RING_PFN",
    29: "SHARING_RING_PFN",
    30: "MEMORY_EVENT_MSR",
    31: "TRIPLE_FAULT_REASON",
    32: "IOREQ_SERVER_PFN",
    33: "NR_IOREQ_SERVER_PAGES",
    34: "VM_GENERATION_ID_ADDR",
    35: "ALTP2M",
    36: "X87_FIP_WIDTH",
    37: "VM86_TSS_SIZED",
    38: "MCA_CAP",
}


def hvm_param_name(index: int) -> str:
    """``HVM_PARAM_<NAME>`` for a known index, else ``HVM_PARAM_<index>``."""
    return f"HVM_PARAM_{HVM_PARAM_NAMES.get(index, str(index))}"


def hvm_save_type_name(typecode: int) -> str:
    return HVM_SAVE_TYPES.get(typecode, f"type {typecode}")


# --- struct hvm_hw_cpu (1032 bytes; offsets checked against the C header with gcc) ------------

CPU_RECORD_SIZE = 1032
CPU_RECORD_SIZE_COMPAT = 1016  # Xen < 3.4: no msr_tsc_aux
_COMPAT_TSC = 1000  # where the compat record's tsc, pending_event, error_code start
_FPU_INITIALISED = 1  # XEN_X86_FPU_INITIALISED, set unconditionally for compat records


def _run(names: str, base: int, fmt: str) -> list[Field]:
    stride = struct.calcsize("<" + fmt)
    return [Field(name, base + i * stride, fmt) for i, name in enumerate(names.split())]


# fpu_regs [0, 512) is not exposed.  Selector fields are named like the PV context's
# (cs, ss, ...) so that the columns both layouts share read the same.
_SEGMENTS = "cs ds es fs gs ss tr ldtr"
HVM_CPU_FIELDS: list[Field] = [
    *_run("rax rbx rcx rdx rbp rsi rdi rsp r8 r9 r10 r11 r12 r13 r14 r15", 512, "Q"),
    *_run("rip rflags cr0 cr2 cr3 cr4 dr0 dr1 dr2 dr3 dr6 dr7", 640, "Q"),
    *_run(_SEGMENTS, 736, "I"),
    *_run(" ".join(f"{s}_limit" for s in [*_SEGMENTS.split(), "idtr", "gdtr"]), 768, "I"),
    *_run(" ".join(f"{s}_base" for s in [*_SEGMENTS.split(), "idtr", "gdtr"]), 808, "Q"),
    *_run(" ".join(f"{s}_arbytes" for s in _SEGMENTS.split()), 888, "I"),
    *_run("sysenter_cs sysenter_esp sysenter_eip shadow_gs msr_flags", 920, "Q"),
    *_run("lstar star cstar sfmask efer tsc_aux tsc", 960, "Q"),
    *_run("pending_event error_code flags", 1016, "I"),
]

#: Shown without ``--all`` (``xen.vcpus``): the x86_64 dump-core columns' counterparts plus
#: EFER; the active GS base is ``gs_base`` and the inactive one ``shadow_gs``.
HVM_CPU_BASIC = (
    "rip rsp rflags cs ss ds es fs gs cr0 cr2 cr3 cr4 efer fs_base gs_base shadow_gs".split()
)

vcpu_mod.register_layout(LAYOUT_HVM_CPU, HVM_CPU_FIELDS, CPU_RECORD_SIZE, HVM_CPU_BASIC)

_CR0_PE = 1 << 0
_CR0_PG = 1 << 31
_RFLAGS_VM = 1 << 17


@dataclass(frozen=True)
class HvmCpuContext(VcpuContext):
    """One ``struct hvm_hw_cpu``: ``slot`` is the vCPU id (the descriptor's instance)."""

    @property
    def online(self) -> bool:
        return True  # Xen saves no CPU record for a vCPU that is down

    @property
    def cpl(self) -> int:
        """Current privilege level: SS.DPL (Xen's segment attributes, bits 6:5); 0 in real
        mode, 3 in virtual-8086 mode."""
        registers = self.registers
        if not registers["cr0"] & _CR0_PE:
            return 0
        if registers["rflags"] & _RFLAGS_VM:
            return 3
        return (registers["ss_arbytes"] >> 5) & 0x3

    @property
    def in_kernel(self) -> bool:
        return self.cpl == 0

    @property
    def ip(self) -> int:
        return self.registers["rip"]

    @property
    def sp(self) -> int:
        return self.registers["rsp"]

    @property
    def flags_reg(self) -> int:
        return self.registers["rflags"]

    @property
    def paging_mode(self) -> str:
        """``none`` (CR0.PG clear), else ``vcpu.x86_cr3_base``'s mode from CR4 and EFER:
        ``long``, ``pae`` or ``32-bit``."""
        if not self.registers["cr0"] & _CR0_PG:
            return "none"
        return self._cr3_base()[0]

    def _cr3_base(self) -> tuple[str, int]:
        registers = self.registers
        return vcpu_mod.x86_cr3_base(registers["cr3"], registers["cr4"], registers["efer"])

    def decoded_page_table_base(self, is_pv: bool = False) -> tuple[str, int]:
        """(ADDRESS_GUEST_PHYSICAL, CR3 base) by ``vcpu.x86_cr3_base`` with the record's
        EFER, so the paging mode is known rather than guessed (long: bits 51:12; PAE:
        31:5; 32-bit: 31:12)."""
        return vcpu_mod.ADDRESS_GUEST_PHYSICAL, self._cr3_base()[1]


@dataclass(frozen=True)
class HvmSaveHeader:
    magic: int
    version: int
    changeset: int
    cpuid: int  # CPUID[1].EAX of the saving host
    gtsc_khz: int  # the guest's TSC frequency

    @property
    def magic_ok(self) -> bool:
        return self.magic == HVM_FILE_MAGIC


@dataclass(frozen=True)
class HvmEntry:
    """One descriptor: where its body lies in the blob."""

    typecode: int
    instance: int
    offset: int  # of the body, in the blob
    length: int

    @property
    def name(self) -> str:
        return hvm_save_type_name(self.typecode)


@dataclass
class HvmContext:
    """A parsed ``HVM_CONTEXT`` blob: the header, every entry, the CPU records."""

    header: HvmSaveHeader | None
    entries: list[HvmEntry]
    vcpus: list[HvmCpuContext]
    ended: bool  # an END descriptor was found
    warnings: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Entries by type name, END excluded, in first-seen order."""
        counts: dict[str, int] = {}
        for entry in self.entries:
            if entry.typecode != TYPE_END:
                counts[entry.name] = counts.get(entry.name, 0) + 1
        return counts


_BYTEORDER = {"little": "<", "big": ">"}
_DESCRIPTOR = "HHI"
_HEADER = "IIQII"


def parse_hvm_context(blob: bytes, byteorder: str = "little") -> HvmContext:
    """Walk the descriptors of ``blob``; never raises on bad content (see ``warnings``).

    A CPU record of an unexpected size is skipped (shorter than the compat record) or
    read for its known 1032 bytes (longer), with a warning; a second record for the same
    vCPU replaces the first, as Xen's loader would.
    """
    prefix = _BYTEORDER.get(byteorder)
    if prefix is None:
        raise ValueError(f"unknown byte order {byteorder!r} (expected 'little' or 'big')")
    descriptor = struct.Struct(prefix + _DESCRIPTOR)
    header_struct = struct.Struct(prefix + _HEADER)
    view = memoryview(blob)
    size = len(view)
    entries: list[HvmEntry] = []
    cpus: dict[int, HvmCpuContext] = {}
    warnings: list[str] = []
    header: HvmSaveHeader | None = None
    ended = overrun = False
    offset = 0
    while offset + descriptor.size <= size:
        typecode, instance, length = descriptor.unpack_from(view, offset)
        body = offset + descriptor.size
        if length > size - body:
            warnings.append(
                f"HVM context: {hvm_save_type_name(typecode)} entry at {offset:#x} claims "
                f"{length} bytes, only {size - body} remain; the rest is ignored"
            )
            overrun = True
            break
        entry = HvmEntry(typecode, instance, body, length)
        entries.append(entry)
        offset = body + length
        if typecode == TYPE_END:
            ended = True
            break
        if typecode == TYPE_HEADER:
            if header is not None:
                warnings.append(f"HVM context: a second HEADER at {entry.offset:#x} is ignored")
            elif length < header_struct.size:
                warnings.append(f"HVM context: HEADER of {length} bytes is too short")
            else:
                header = HvmSaveHeader(*header_struct.unpack_from(view, body))
                if not header.magic_ok:
                    warnings.append(
                        f"HVM context: header magic {header.magic:#x}, expected {HVM_FILE_MAGIC:#x}"
                    )
        elif typecode == TYPE_CPU:
            context = _decode_cpu(view[body : body + length], byteorder, instance, warnings)
            if context is not None:
                if instance in cpus:
                    warnings.append(
                        f"HVM context: a second CPU record for vCPU {instance} replaces the first"
                    )
                cpus[instance] = context
    if not ended:
        if offset < size and not overrun:
            warnings.append(f"HVM context: {size - offset} trailing bytes without a descriptor")
        warnings.append("HVM context: no END descriptor (truncated?)")
    elif offset < size:
        warnings.append(f"HVM context: {size - offset} bytes after END are ignored")
    if entries and entries[0].typecode != TYPE_HEADER:
        warnings.append("HVM context: the first entry is not the HEADER")
    vcpus = [cpus[key] for key in sorted(cpus)]
    return HvmContext(header, entries, vcpus, ended, warnings)


def _decode_cpu(
    raw: memoryview, byteorder: str, instance: int, warnings: list[str]
) -> HvmCpuContext | None:
    length = len(raw)
    if length == CPU_RECORD_SIZE_COMPAT:
        # _hvm_hw_fix_cpu: tsc, pending_event, error_code move up by 8 (msr_tsc_aux = 0)
        # and fpu_initialised is set.
        flags = struct.pack({"little": "<I", "big": ">I"}[byteorder], _FPU_INITIALISED)
        raw = memoryview(
            bytes(raw[:_COMPAT_TSC]) + bytes(8) + bytes(raw[_COMPAT_TSC:]) + flags + bytes(4)
        )
    elif length < CPU_RECORD_SIZE:
        warnings.append(
            f"HVM context: CPU record for vCPU {instance} has {length} bytes "
            f"(expected {CPU_RECORD_SIZE} or {CPU_RECORD_SIZE_COMPAT}); skipped"
        )
        return None
    elif length > CPU_RECORD_SIZE:
        warnings.append(
            f"HVM context: CPU record for vCPU {instance} has {length} bytes; "
            f"the first {CPU_RECORD_SIZE} are read"
        )
    context = vcpu_mod.decode_vcpu(raw, LAYOUT_HVM_CPU, byteorder, instance)
    return HvmCpuContext(slot=instance, layout=LAYOUT_HVM_CPU, registers=context.registers)


def decode_hvm_vcpus(blob: bytes, byteorder: str = "little") -> list[VcpuContext]:
    """The CPU records of an ``HVM_CONTEXT`` blob, by vCPU id (warnings: ``parse_hvm_context``)."""
    return list(parse_hvm_context(blob, byteorder).vcpus)


# --- encoding (test data) -----------------------------------------------------------------------


def encode_hvm_cpu(
    registers: dict[str, int], byteorder: str = "little", compat: bool = False
) -> bytes:
    """A ``struct hvm_hw_cpu`` (or the 1016-byte compat one) with ``registers`` set."""
    raw = vcpu_mod.encode_vcpu(LAYOUT_HVM_CPU, byteorder, registers)
    if compat:
        return raw[:_COMPAT_TSC] + raw[_COMPAT_TSC + 8 : CPU_RECORD_SIZE - 8]
    return raw


def encode_hvm_context(
    cpus: dict[int, dict[str, int]],
    byteorder: str = "little",
    *,
    header: HvmSaveHeader | None = None,
    extra: Sequence[tuple[int, int, bytes]] = (),
    compat: bool = False,
) -> bytes:
    """An ``HVM_CONTEXT`` blob as ``hvm_save`` writes it: HEADER, one CPU record per vCPU id,
    ``extra`` entries ``(typecode, instance, body)``, END."""
    prefix = _BYTEORDER[byteorder]
    header = header or HvmSaveHeader(HVM_FILE_MAGIC, 1, 0, 0, 0)
    parts = [
        (TYPE_HEADER, 0, struct.pack(prefix + _HEADER, *_header_values(header))),
        *((TYPE_CPU, vid, encode_hvm_cpu(cpus[vid], byteorder, compat)) for vid in sorted(cpus)),
        *extra,
        (TYPE_END, 0, b""),
    ]
    return b"".join(
        struct.pack(prefix + _DESCRIPTOR, typecode, instance, len(body)) + body
        for typecode, instance, body in parts
    )


def _header_values(header: HvmSaveHeader) -> tuple[int, ...]:
    return header.magic, header.version, header.changeset, header.cpuid, header.gtsc_khz
