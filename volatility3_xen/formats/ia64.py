"""ia64 (Itanium) dump-cores: the ``vcpu_guest_context`` slots, the ``mapped_regs_t``
pages of ``.xen_ia64_mapped_regs`` and libxc's crossed section headers.

What libxc wrote for an ia64 domain (Xen 3.1-4.2; ia64 was removed before 4.3), from
``tools/libxc/xc_core.c`` and ``xc_core_ia64.[ch]`` of the last tree that had them
(xen-project/xen e567964a54^) and ``docs/misc/dump-core-format.txt``:

* ``e_machine`` EM_IA_64 (50), little-endian; the page size is the toolstack's
  PAGE_SIZE (16 KiB typically).
* Both PV and HVM (VTi) domains are auto-translated (``xc_core_arch_auto_translated_
  physmap`` returns 1): the table is ``.xen_pfn`` (pfns), never ``.xen_p2m``, while the
  header magic still says PV (0xF00FEBED) for a PV domain: ``info->hvm ? MAGIC_HVM :
  MAGIC``.  So an ia64 PV core is read pseudo-physically like an HVM one.
* ``.xen_prstatus``: ``sizeof(vcpu_guest_context_any_t)`` per vCPU, which on ia64 is the
  plain ``vcpu_guest_context``: 22208 bytes from Xen 3.2 (3ddb3a23d8, 2007) to 4.2
  (``xen/include/public/arch-ia64.h``; offsets below checked by compiling that header
  with an LP64 compiler, where ``long double`` is 16-byte aligned as on ia64).  Earlier
  trees had other sizes; those slots are not decoded (the reader says so).
* ``.xen_ia64_mapped_regs`` (PV only): one ``mapped_regs_t`` (the privregs page the
  guest shares with Xen: virtual psr, interruption registers, region and kernel
  registers) per vCPU, each ``max(XMAPPEDREGS_SIZE, PAGE_SIZE)`` bytes, of which the
  4096-byte ``struct mapped_regs`` is decoded.
* The crossed headers (dump-core-layout.md section 2): the section headers are made in
  the order prstatus, mapped_regs, shared_info (so the mapped_regs header says "right
  after prstatus" and the shared_info header "after the mapped_regs"), but the data is
  written prstatus, shared_info, mapped_regs.  :func:`mapped_regs_extent` undoes it.

Xen/ia64's ``arch_get_info_guest`` never sets ``flags``, so a real core's contexts show
VGCF_online clear: ``online`` reads that bit and nothing more.  No Volatility import.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from . import vcpu as vcpu_mod
from .vcpu import Field, VcpuContext

EM_IA_64 = 50
MAPPED_REGS_SECTION = ".xen_ia64_mapped_regs"

#: ``vcpu_guest_context`` of Xen 3.2-4.2 (arch-ia64.h).
LAYOUT_IA64 = "ia64"
#: The same followed by the vCPU's ``mapped_regs_t`` (fields ``mr_*``): a PV core.
LAYOUT_IA64_PV = "ia64_pv"
CONTEXT_SIZE = 22208
MAPPED_REGS_SIZE = 4096  # XMAPPEDREGS_SIZE = sizeof(struct mapped_regs)

VGCF_ONLINE = 1 << 3  # ia64's VGCF_online
_PSR_CPL_SHIFT = 32  # psr.cpl: bits 33:32; 3 is user mode


def _run(prefix: str, base: int, count: int, fmt: str = "Q") -> list[Field]:
    stride = struct.calcsize("<" + fmt)
    return [Field(f"{prefix}{i}", base + i * stride, fmt) for i in range(count)]


_REGS = 16  # struct vcpu_guest_context_regs regs (16-byte aligned: it holds long doubles)
_AR = _REGS + 488  # union vcpu_ar_regs ar[128]
_CR = _REGS + 1512  # union vcpu_cr_regs cr[128]

CONTEXT_FIELDS: list[Field] = [
    Field("flags", 0, "Q"),
    *_run("r", _REGS, 32),
    *_run("b", _REGS + 256, 8),
    *_run("bank", _REGS + 320, 16),
    Field("ip", _REGS + 448, "Q"),
    Field("psr", _REGS + 456, "Q"),
    Field("cfm", _REGS + 464, "Q"),
    Field("pr", _REGS + 472, "Q"),
    Field("nats", _REGS + 480, "I"),
    Field("bnats", _REGS + 484, "I"),
    *_run("ar_kr", _AR, 8),
    Field("ar_rsc", _AR + 8 * 16, "Q"),
    Field("ar_bsp", _AR + 8 * 17, "Q"),
    Field("ar_bspstore", _AR + 8 * 18, "Q"),
    Field("ar_rnat", _AR + 8 * 19, "Q"),
    Field("ar_fcr", _AR + 8 * 21, "Q"),
    Field("ar_eflag", _AR + 8 * 24, "Q"),
    Field("ar_csd", _AR + 8 * 25, "Q"),
    Field("ar_ssd", _AR + 8 * 26, "Q"),
    Field("ar_cflg", _AR + 8 * 27, "Q"),
    Field("ar_fsr", _AR + 8 * 28, "Q"),
    Field("ar_fir", _AR + 8 * 29, "Q"),
    Field("ar_fdr", _AR + 8 * 30, "Q"),
    Field("ar_ccv", _AR + 8 * 32, "Q"),
    Field("ar_unat", _AR + 8 * 36, "Q"),
    Field("ar_fpsr", _AR + 8 * 40, "Q"),
    Field("ar_itc", _AR + 8 * 44, "Q"),
    Field("ar_pfs", _AR + 8 * 64, "Q"),
    Field("ar_lc", _AR + 8 * 65, "Q"),
    Field("ar_ec", _AR + 8 * 66, "Q"),
    Field("cr_dcr", _CR, "Q"),
    Field("cr_itm", _CR + 8 * 1, "Q"),
    Field("cr_iva", _CR + 8 * 2, "Q"),
    Field("cr_pta", _CR + 8 * 8, "Q"),
    Field("cr_ipsr", _CR + 8 * 16, "Q"),
    Field("cr_isr", _CR + 8 * 17, "Q"),
    Field("cr_iip", _CR + 8 * 19, "Q"),
    Field("cr_ifa", _CR + 8 * 20, "Q"),
    Field("cr_itir", _CR + 8 * 21, "Q"),
    Field("cr_iipa", _CR + 8 * 22, "Q"),
    Field("cr_ifs", _CR + 8 * 23, "Q"),
    Field("cr_iim", _CR + 8 * 24, "Q"),
    Field("cr_iha", _CR + 8 * 25, "Q"),
    Field("cr_lid", _CR + 8 * 64, "Q"),
    Field("cr_ivr", _CR + 8 * 65, "Q"),
    Field("cr_tpr", _CR + 8 * 66, "Q"),
    Field("cr_eoi", _CR + 8 * 67, "Q"),
    *_run("cr_irr", _CR + 8 * 68, 4),
    Field("cr_itv", _CR + 8 * 72, "Q"),
    Field("cr_pmv", _CR + 8 * 73, "Q"),
    Field("cr_cmcv", _CR + 8 * 74, "Q"),
    Field("cr_lrr0", _CR + 8 * 80, "Q"),
    Field("cr_lrr1", _CR + 8 * 81, "Q"),
    # f[128] (2048 bytes of floating-point registers) is not exposed.
    *_run("dbr", _REGS + 4592, 8),
    *_run("ibr", _REGS + 4656, 8),
    *_run("rr", _REGS + 4720, 8),
    *_run("pkr", _REGS + 4784, 16),
    Field("xip", _REGS + 4912, "Q"),
    Field("xpsr", _REGS + 4920, "Q"),
    Field("xfs", _REGS + 4928, "Q"),
    *_run("xr", _REGS + 4936, 4),
    # tr (24 translation registers) is not exposed.
    Field("excp_iipa", _REGS + 5736, "Q"),
    Field("excp_ifa", _REGS + 5744, "Q"),
    Field("excp_isr", _REGS + 5752, "Q"),
    Field("excp_vector", _REGS + 5760, "I"),
    Field("rbs_voff", _REGS + 5764, "I"),
    # rbs[2048], the register backing store still in the CPU, is not exposed.
    Field("rbs_rnat", _REGS + 22152, "Q"),
    Field("num_phys_stacked", _REGS + 22160, "Q"),
    Field("event_callback_ip", 22192, "Q"),
    Field("privregs_pfn", 22200, "Q"),
]

# struct mapped_regs, 4096 bytes; absolute offsets within it.
MAPPED_REGS_FIELDS: list[tuple[str, int, str]] = [
    ("vac", 0, "Q"),
    ("vdc", 8, "Q"),
    ("virt_env_vaddr", 16, "Q"),
    ("vhpi", 256, "Q"),
    *((f"vgr{i}", 1024 + 8 * i, "Q") for i in range(16)),
    *((f"vbgr{i}", 1152 + 8 * i, "Q") for i in range(16)),
    ("vnat", 1280, "Q"),
    ("vbnat", 1288, "Q"),
    *((f"vcpuid{i}", 1296 + 8 * i, "Q") for i in range(5)),
    ("vpsr", 1424, "Q"),
    ("vpr", 1432, "Q"),
    ("dcr", 2048, "Q"),
    ("itm", 2056, "Q"),
    ("iva", 2064, "Q"),
    ("pta", 2112, "Q"),
    ("ipsr", 2176, "Q"),
    ("isr", 2184, "Q"),
    ("iip", 2200, "Q"),
    ("ifa", 2208, "Q"),
    ("itir", 2216, "Q"),
    ("iipa", 2224, "Q"),
    ("ifs", 2232, "Q"),
    ("iim", 2240, "Q"),
    ("iha", 2248, "Q"),
    ("tpr", 2576, "Q"),
    ("precover_ifs", 3072, "Q"),
    ("unat", 3080, "Q"),
    ("interrupt_collection_enabled", 3088, "I"),
    ("interrupt_mask_addr", 3096, "Q"),
    ("pending_interruption", 3104, "I"),
    ("vpsr_pp", 3108, "B"),
    ("vpsr_dfh", 3109, "B"),
    ("hpsr_dfh", 3110, "B"),
    ("hpsr_mfh", 3111, "B"),
    ("metaphysical_mode", 3144, "I"),
    ("banknum", 3148, "I"),
    *((f"rrs{i}", 3152 + 8 * i, "Q") for i in range(8)),
    *((f"krs{i}", 3216 + 8 * i, "Q") for i in range(8)),
    ("itc_offset", 3408, "Q"),
    ("itc_last", 3416, "Q"),
]
PV_FIELDS: list[Field] = [
    *CONTEXT_FIELDS,
    *(Field(f"mr_{name}", CONTEXT_SIZE + offset, fmt) for name, offset, fmt in MAPPED_REGS_FIELDS),
]

#: ``xen.vcpus`` without ``--all``: ip, sp (r12), psr first, as for the other layouts.
BASIC = (
    "ip r12 psr cfm pr b0 r1 r13 ar_bsp ar_bspstore ar_pfs ar_rsc "
    "cr_iip cr_ipsr cr_ifs cr_iva cr_pta privregs_pfn"
).split()
PV_BASIC = [*BASIC, "mr_vpsr", "mr_iip", "mr_ipsr", "mr_ifs", "mr_banknum"]

vcpu_mod.register_layout(LAYOUT_IA64, CONTEXT_FIELDS, CONTEXT_SIZE, BASIC)
vcpu_mod.register_layout(LAYOUT_IA64_PV, PV_FIELDS, CONTEXT_SIZE + MAPPED_REGS_SIZE, PV_BASIC)


@dataclass(frozen=True)
class Ia64VcpuContext(VcpuContext):
    """One ia64 ``.xen_prstatus`` slot (with its ``mapped_regs_t`` as ``mr_*`` for PV)."""

    @property
    def online(self) -> bool:
        return bool(self.flags & VGCF_ONLINE)

    @property
    def in_kernel(self) -> bool:
        """psr.cpl below 3 (Xen reports the guest's virtual psr for PV)."""
        return (self.registers["psr"] >> _PSR_CPL_SHIFT) & 3 != 3

    @property
    def ip(self) -> int:
        return self.registers["ip"]

    @property
    def sp(self) -> int:
        return self.registers["r12"]  # the memory stack pointer by convention

    @property
    def flags_reg(self) -> int:
        return self.registers["psr"]

    @property
    def page_table_base_raw(self) -> int:
        raise ValueError("ia64 has no single page-table base register")

    def decoded_page_table_base(self, is_pv: bool = False) -> tuple[str, int]:
        """ia64 translates through region registers and the VHPT (cr.pta), not a CR3:
        there is no table base to decode (``ADDRESS_NONE``)."""
        return vcpu_mod.ADDRESS_NONE, 0


@dataclass(frozen=True)
class MappedRegsExtent:
    """Where ``.xen_ia64_mapped_regs`` and ``.xen_shared_info`` really are."""

    regs_offset: int
    shared_info_offset: int | None
    crossed: bool  # libxc's crossed headers were recognised and undone


def mapped_regs_extent(
    regs: tuple[int, int], shared_info: tuple[int, int] | None
) -> MappedRegsExtent:
    """Undo libxc's crossed ia64 headers.  ``regs``/``shared_info`` are the headers'
    (offset, size).  libxc lays the headers out regs-then-shared-info, back to back, but
    writes the shared-info page first: when the headers have exactly that shape, the
    shared info starts at the regs header's offset and the regs follow it.  Any other
    shape (no shared info, or a writer without the bug) is taken as it stands."""
    regs_offset, regs_size = regs
    if shared_info is not None:
        info_offset, info_size = shared_info
        if info_offset == regs_offset + regs_size and info_offset != regs_offset:
            return MappedRegsExtent(regs_offset + info_size, regs_offset, True)
        return MappedRegsExtent(regs_offset, info_offset, False)
    return MappedRegsExtent(regs_offset, None, False)


def decode_ia64_vcpus(
    prstatus: bytes,
    entsize: int,
    count: int,
    mapped_regs: Sequence[bytes] | None = None,
    byteorder: str = "little",
) -> list[VcpuContext]:
    """Decode ``count`` slots of ``entsize`` bytes (each at least ``CONTEXT_SIZE``) of
    ``.xen_prstatus``; with ``mapped_regs`` (the start of each vCPU's entry), slot *k*'s
    ``mapped_regs_t`` is appended as ``mr_*`` registers.  Bounded by the bytes given: a
    slot whose context is cut off is not decoded, and one whose ``mapped_regs_t`` is
    missing or short is decoded without it (layout ``ia64``)."""
    contexts: list[VcpuContext] = []
    view = memoryview(prstatus)
    for slot in range(max(count, 0)):
        start = slot * entsize
        if start + CONTEXT_SIZE > len(view):
            break
        raw = bytes(view[start : start + CONTEXT_SIZE])
        layout = LAYOUT_IA64
        if mapped_regs is not None and slot < len(mapped_regs):
            page = mapped_regs[slot]
            if len(page) >= MAPPED_REGS_SIZE:
                raw += bytes(page[:MAPPED_REGS_SIZE])
                layout = LAYOUT_IA64_PV
        decoded = vcpu_mod.decode_vcpu(raw, layout, byteorder, slot)
        contexts.append(Ia64VcpuContext(slot=slot, layout=layout, registers=decoded.registers))
    return contexts


def encode_mapped_regs(
    registers: dict[str, int], entsize: int = MAPPED_REGS_SIZE, byteorder: str = "little"
) -> bytes:
    """A ``mapped_regs_t`` page (for the writer's test cores): ``registers`` by their
    names without the ``mr_`` prefix, ``entsize`` bytes, the rest zero."""
    prefixed = {f"mr_{name}": value for name, value in registers.items()}
    full = vcpu_mod.encode_vcpu(LAYOUT_IA64_PV, byteorder, prefixed)
    return full[CONTEXT_SIZE:].ljust(entsize, b"\0")
