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

from ..formats.saveimage import XenSaveImage, probe_save_image
from .memory import ParseCache, XenGuestLayer
from .stackers import stack_xen_file

vollog = logging.getLogger(__name__)

# Walks of files already opened in this process (Volatility builds a layer twice per run).
_SCAN_CACHE = ParseCache()


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
        cached = _SCAN_CACHE.lookup(base.identity)
        with self._parsing():
            image = XenSaveImage(
                base.read, base.size, name=self._source, map_region=base.map_region, scan=cached
            )
        _SCAN_CACHE.keep(base.identity, image.scan)
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
        return stack_xen_file(
            context, layer_name, probe_save_image, XenSaveImageLayer, "Xen save image"
        )
