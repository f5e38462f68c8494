"""Windows HVM guests: each vCPU's CR3 (dump-core contexts, save-image CPU records) tried as
the kernel DTB (``XenVcpuWindowsStacker``)."""

from __future__ import annotations

import logging
import struct

from volatility3.framework import constants, exceptions, interfaces
from volatility3.framework.layers import intel

from ..formats import vcpu as xen_vcpu
from .memory import XenGuestLayer

vollog = logging.getLogger(__name__)

_path_join = interfaces.configuration.path_join


# The _KUSER_SHARED_DATA test of Volatility's WindowsIntelStacker (2.28.2's
# Intel32LayerCheck / Intel64LayerCheck), here so that every supported Volatility release
# (2.26 has no such class) runs the same test: the page is mapped at a fixed user address
# and a fixed kernel address, so both translate to the same frame, or at least the kernel
# one holds a known NtMajorVersion.
KUSER_USER_ADDRESS = 0x7FFE0000
KUSER_KERNEL_ADDRESS_32 = 0xFFDF0000
KUSER_KERNEL_ADDRESS_64 = 0xFFFFF78000000000
_KUSER_NT_MAJOR_OFFSET = 0x26C
_NT_MAJOR_VERSIONS = (3, 4, 5, 6, 10)


def kuser_shared_data_check(layer: intel.Intel, kernel_address: int) -> bool:
    """Is ``layer`` a Windows address space (``_KUSER_SHARED_DATA`` where it must be)?"""
    kernel = None
    try:
        kernel = layer.translate(kernel_address)[0]
        if kernel and kernel == layer.translate(KUSER_USER_ADDRESS)[0]:
            return True
    except exceptions.InvalidAddressException:
        pass
    if kernel is None:
        return False
    data = layer.read(kernel_address + _KUSER_NT_MAJOR_OFFSET, 4, pad=True)
    return struct.unpack("<I", data)[0] in _NT_MAJOR_VERSIONS


# Paging mode -> (Windows layer class, kernel address of _KUSER_SHARED_DATA, DTB alignment).
_WINDOWS_LAYERS: dict[str, tuple[type[intel.Intel], int, int]] = {
    xen_vcpu.PAGING_LONG: (intel.WindowsIntel32e, KUSER_KERNEL_ADDRESS_64, 1 << 12),
    xen_vcpu.PAGING_PAE: (intel.WindowsIntelPAE, KUSER_KERNEL_ADDRESS_32, 32),
    xen_vcpu.PAGING_32BIT: (intel.WindowsIntel, KUSER_KERNEL_ADDRESS_32, 1 << 12),
}
_CR4_LA57 = 1 << 12  # 5-level paging: Volatility has no Windows layer for it


class XenVcpuWindowsStacker(interfaces.automagic.StackerLayerInterface):
    """Tries each vCPU's CR3 of an HVM core, or of an HVM save image's CPU records
    (``formats.hvmcontext``, whose EFER settles long mode), as a Windows DTB (order 39,
    ahead of the DTB scan of Volatility's ``WindowsIntelStacker``, 40).

    The CR3 becomes a DTB by the one rule of ``formats.vcpu.x86_cr3_base`` (the paging
    mode CR4 implies: 4-level -> ``WindowsIntel32e``, PAE -> ``WindowsIntelPAE`` with a
    32-byte aligned PDPT, 32-bit -> ``WindowsIntel``).  A candidate is returned only if
    the ``_KUSER_SHARED_DATA`` test of Volatility's Windows stacker
    (:func:`kuser_shared_data_check`) accepts it; otherwise the normal scan runs.
    """

    stack_order = 39
    exclusion_list = ["linux", "mac"]

    @classmethod
    def stack(
        cls,
        context: interfaces.context.ContextInterface,
        layer_name: str,
        progress_callback: constants.ProgressCallback = None,
    ) -> interfaces.layers.DataLayerInterface | None:
        xen_layer = context.layers[layer_name]
        if not isinstance(xen_layer, XenGuestLayer) or xen_layer.is_pv:
            return None
        try:
            contexts = xen_layer.image.vcpus()
        except ValueError as exc:
            vollog.debug(f"{layer_name}: vCPU contexts unreadable: {exc}")
            return None
        tried = set()
        for vcpu_context in contexts:
            registers = vcpu_context.registers
            if "cr3" not in registers or "cr4" not in registers:
                continue  # not an x86 context
            if registers["cr4"] & _CR4_LA57:
                continue
            mode, dtb = xen_vcpu.x86_cr3_base(
                registers["cr3"], registers["cr4"], registers.get("efer")
            )
            layer_class, kuser_address, alignment = _WINDOWS_LAYERS[mode]
            if not dtb or (mode, dtb) in tried or not xen_layer.is_valid(dtb, alignment):
                continue
            tried.add((mode, dtb))
            name = context.layers.free_layer_name("IntelLayer")
            config_path = _path_join("IntelHelper", name)
            context.config[_path_join(config_path, "memory_layer")] = layer_name
            context.config[_path_join(config_path, "page_map_offset")] = dtb
            layer = layer_class(context, config_path, name, metadata={"os": "Windows"})
            slot, kind = vcpu_context.slot, layer_class.__name__
            if kuser_shared_data_check(layer, kuser_address):
                vollog.debug(f"Xen: vCPU {slot} CR3 {dtb:#x} is a Windows DTB ({kind})")
                return layer
            vollog.debug(f"Xen: vCPU {slot} CR3 {dtb:#x} fails the Windows check ({kind})")
        return None
