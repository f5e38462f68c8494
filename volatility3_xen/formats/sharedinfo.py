"""The interesting parts of a dump-core's ``.xen_shared_info`` page (x86 guests).

The page is the guest's ``shared_info`` as Xen lays it out for the guest's width: the
x86_64 layout for 64-bit PV guests, the compat x86_32 layout for 32-bit PV guests (same
layout names as :mod:`volatility3_xen.vcpu`).  For HVM guests the width is the guest's
own (a 32-bit HVM guest gets the compat layout although the core is EM_X86_64); the
caller chooses.  Offsets: dump-core-layout.md section 5, ``xen/include/public/xen.h`` and
``arch-x86/xen.h``.  No Volatility import.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple

from .vcpu import LAYOUT_X86_32, LAYOUT_X86_64

#: vcpu_info slots in shared_info (XEN_LEGACY_MAX_VCPUS on x86); each is 64 bytes.
LEGACY_MAX_VCPUS = 32
VCPU_INFO_SIZE = 64


class _SharedInfoLayout(NamedTuple):
    word: str  # struct format of xen_ulong_t / unsigned long for this guest width
    vcpu_cr2: int  # offset of arch_vcpu_info.cr2 inside vcpu_info
    wc_version: int
    wc_sec_hi: int  # outside arch on x86_64, last field of arch_shared_info on x86_32
    max_pfn: int  # arch_shared_info starts here; its fields follow at word stride
    size: int


_LAYOUTS = {
    LAYOUT_X86_64: _SharedInfoLayout("Q", 16, 3072, 3084, 3088, 3136),
    LAYOUT_X86_32: _SharedInfoLayout("I", 8, 2304, 2340, 2316, 2344),
}

# arch_shared_info fields in order, each one guest word wide.
_ARCH_FIELDS = (
    "max_pfn",
    "pfn_to_mfn_frame_list_list",
    "nmi_reason",
    "p2m_cr3",
    "p2m_vaddr",
    "p2m_generation",
)


@dataclass(frozen=True)
class SharedInfo:
    """Decoded fields; a field is None when the section ends before it (truncated file).

    ``p2m_cr3`` is the page table that maps the guest's linear p2m list at ``p2m_vaddr``,
    in ``xen_pfn_to_cr3`` form (``mfn << 12`` for 64-bit guests, the rotated compat form
    for 32-bit ones; see ``VcpuContext.decoded_page_table_base``); Xen >= 4.16 toolstacks
    use it.  ``pfn_to_mfn_frame_list_list`` is the MFN of the older 3-level p2m tree.
    """

    layout: str
    wc_version: int | None
    wc_sec: int | None
    wc_nsec: int | None
    wc_sec_hi: int | None
    max_pfn: int | None
    pfn_to_mfn_frame_list_list: int | None
    nmi_reason: int | None
    p2m_cr3: int | None
    p2m_vaddr: int | None
    p2m_generation: int | None
    vcpu_cr2: tuple[int, ...]  # one per vcpu_info slot that fits in the data

    @property
    def wallclock_seconds(self) -> int | None:
        """Seconds since the epoch of the guest's wall clock at system time 0."""
        if self.wc_sec is None:
            return None
        return self.wc_sec | ((self.wc_sec_hi or 0) << 32)


def decode_shared_info(data: bytes, layout: str, byteorder: str) -> SharedInfo:
    """Decode ``.xen_shared_info`` bytes (bounded by ``len(data)``)."""
    spec = _LAYOUTS.get(layout)
    if spec is None:
        raise ValueError(f"no shared_info decoder for layout {layout!r} (x86 only)")
    prefix = {"little": "<", "big": ">"}.get(byteorder)
    if prefix is None:
        raise ValueError(f"unknown byte order {byteorder!r} (expected 'little' or 'big')")

    def read(fmt: str, offset: int) -> int | None:
        fmt = prefix + fmt
        if offset + struct.calcsize(fmt) > len(data):
            return None
        return struct.unpack_from(fmt, data, offset)[0]

    word_size = struct.calcsize(spec.word)
    arch = {
        name: read(spec.word, spec.max_pfn + index * word_size)
        for index, name in enumerate(_ARCH_FIELDS)
    }
    cr2 = []
    for vcpu in range(LEGACY_MAX_VCPUS):
        value = read(spec.word, vcpu * VCPU_INFO_SIZE + spec.vcpu_cr2)
        if value is None:
            break
        cr2.append(value)
    return SharedInfo(
        layout=layout,
        wc_version=read("I", spec.wc_version),
        wc_sec=read("I", spec.wc_version + 4),
        wc_nsec=read("I", spec.wc_version + 8),
        wc_sec_hi=read("I", spec.wc_sec_hi),
        vcpu_cr2=tuple(cr2),
        **arch,
    )
