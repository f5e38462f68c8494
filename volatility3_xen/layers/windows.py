"""Windows HVM guests: each vCPU's CR3 tried as the kernel DTB (``XenVcpuWindowsStacker``)."""

from __future__ import annotations

import logging

from volatility3.framework import constants, interfaces
from volatility3.framework.automagic import windows as windows_automagic
from volatility3.framework.layers import intel

from ..formats import vcpu as xen_vcpu
from .memory import XenGuestLayer

vollog = logging.getLogger(__name__)

PAGE_SIZE = 1 << 12
_path_join = interfaces.configuration.path_join


class XenVcpuWindowsStacker(interfaces.automagic.StackerLayerInterface):
    """Tries each vCPU's CR3 of an HVM core as a Windows x64 DTB (order 39, ahead of the
    DTB scan of Volatility's ``WindowsIntelStacker``, 40).

    A candidate is returned only if Volatility's own ``Intel64LayerCheck`` (the
    ``_KUSER_SHARED_DATA`` test) accepts it; otherwise the normal scan runs.
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
            if vcpu_context.layout != xen_vcpu.LAYOUT_X86_64:
                continue
            # Masked: PCID and bit 63 dropped.
            _, dtb = vcpu_context.decoded_page_table_base(is_pv=False)
            if not dtb or dtb in tried or not xen_layer.is_valid(dtb, PAGE_SIZE):
                continue
            tried.add(dtb)
            name = context.layers.free_layer_name("IntelLayer")
            config_path = _path_join("IntelHelper", name)
            context.config[_path_join(config_path, "memory_layer")] = layer_name
            context.config[_path_join(config_path, "page_map_offset")] = dtb
            layer = intel.WindowsIntel32e(context, config_path, name, metadata={"os": "Windows"})
            if windows_automagic.Intel64LayerCheck.check(layer):
                vollog.debug(f"Xen: vCPU {vcpu_context.slot} CR3 {dtb:#x} is a Windows x64 DTB")
                return layer
            vollog.debug(f"Xen: vCPU {vcpu_context.slot} CR3 {dtb:#x} fails the Windows check")
        return None
