"""Volatility layer and stacker for saved Xen domains (``xl save``, libxl/libxc streams,
xenopsd suspend images).

- ``XenSaveImageLayer``: guest pseudo-physical address -> file offset of the last copy of
  that page in the stream's ``PAGE_DATA`` records (``formats.saveimage.XenSaveImage``).
- ``XenSaveImageStacker`` (order 9, like the dump-core stacker, ahead of every Volatility
  stacker): a strict, cheap probe of the first bytes.

PV save images hold page tables already rewritten to pfns (and CR3 too), so the layer has
no ``machine_frames``: ``XenPVLinuxIntelStacker`` leaves it alone and Volatility's own
Linux stacker puts its stock Intel layer on top, as on an HVM guest.
"""

from __future__ import annotations

import logging
from typing import Any

from volatility3.framework import constants, interfaces

from ..formats.errors import XenFormatError
from ..formats.saveimage import SaveScan, XenSaveImage, probe_save_image
from .memory import (
    UNREADABLE,
    FileIdentity,
    XenGuestLayer,
    _report_once,
    refuse,
    stackable_base,
)

vollog = logging.getLogger(__name__)

# Walks of files already opened in this process (Volatility builds a layer twice per run).
_SCAN_CACHE: dict[FileIdentity, SaveScan] = {}
_SCAN_CACHE_SIZE = 4


class XenSaveImageLayer(XenGuestLayer):
    """Guest pseudo-physical memory of a Xen save image, PV or HVM.

    Address ``pfn * page_size + off`` maps to the last ``PAGE_DATA`` copy of ``pfn``;
    pfns never sent, or last sent without data (XTAB, XALLOC, BROKEN), are invalid.
    """

    _version = (1, 0, 0)
    _required_framework_version = (2, 26, 0)

    def __init__(
        self,
        context: interfaces.context.ContextInterface,
        config_path: str,
        name: str,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(context=context, config_path=config_path, name=name, metadata=metadata)
        base = self._open_base()
        identity = base.identity
        cached = _SCAN_CACHE.get(identity) if identity else None
        with self._parsing():
            image = XenSaveImage(
                base.read, base.size, name=self._source, map_region=base.map_region, scan=cached
            )
        if identity and cached is None:
            if len(_SCAN_CACHE) >= _SCAN_CACHE_SIZE:
                _SCAN_CACHE.pop(next(iter(_SCAN_CACHE)))
            _SCAN_CACHE[identity] = image.scan
        self._install(image)

    @property
    def save_image(self) -> XenSaveImage:
        """The parsed stream: wrappers, domain header, records, vCPU contexts."""
        image = self._image
        assert isinstance(image, XenSaveImage)
        return image


class XenSaveImageStacker(interfaces.automagic.StackerLayerInterface):
    """Stacks ``XenSaveImageLayer`` on a Xen save image.

    Order 9, like ``XenDumpCoreStacker``: the probe is strict (a magic at offset 0 and
    the headers behind it), and a recognised but unusable image gets a
    ``XenRefusedLayer`` with a one-line reason instead of being read as raw memory.
    """

    stack_order = 9
    exclusion_list: list[str] = []

    @classmethod
    def stack(
        cls,
        context: interfaces.context.ContextInterface,
        layer_name: str,
        progress_callback: constants.ProgressCallback = None,
    ) -> interfaces.layers.DataLayerInterface | None:
        source = stackable_base(context, layer_name)
        if source is None:
            return None
        try:
            probe = probe_save_image(source.read, source.size)
        except UNREADABLE as exc:
            _report_once(source.source, f"cannot be read: {exc}")
            return None
        if not probe.is_xen:
            vollog.log(constants.LOGLEVEL_VVVV, f"{source.source}: not a Xen save image")
            return None
        if probe.problem:
            return refuse(
                context,
                layer_name,
                source.source,
                f"Xen save image cannot be used: {probe.problem}",
            )
        new_name = context.layers.free_layer_name("XenSaveImageLayer")
        context.config[interfaces.configuration.path_join(new_name, "base_layer")] = layer_name
        try:
            return XenSaveImageLayer(context, new_name, new_name)
        except XenFormatError as exc:
            return refuse(
                context, layer_name, source.source, f"Xen save image cannot be used: {exc}"
            )
