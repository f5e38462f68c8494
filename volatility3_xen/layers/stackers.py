"""The stacker that puts a Xen layer on a file: ``XenDumpCoreStacker`` (order 9, ahead of
Volatility's own ELF and Xen stackers at 10, which would claim the file and misread it)."""

from __future__ import annotations

import logging

from volatility3.framework import constants, interfaces

from ..formats.dumpcore import Probe, probe_xen_core
from ..formats.errors import XenFormatError
from .memory import UNREADABLE, XenDumpCoreLayer, _report_once, refuse, stackable_base

vollog = logging.getLogger(__name__)


class XenDumpCoreStacker(interfaces.automagic.StackerLayerInterface):
    """Stacks ``XenDumpCoreLayer`` on a Xen dump-core file.

    Order 9: below Volatility's ``Elf64Stacker`` and ``XenCoreDumpStacker`` (10), which
    would otherwise claim the file first and map it wrongly.  A file the probe recognises
    but that cannot be used gets a ``XenRefusedLayer`` (``memory.refuse``), so that those
    stackers never see it either.
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
            probe: Probe = probe_xen_core(source.read, source.size)
        except UNREADABLE as exc:
            _report_once(source.source, f"cannot be read: {exc}")
            return None
        if not probe.is_xen:
            vollog.log(constants.LOGLEVEL_VVVV, f"{source.source}: not a Xen dump-core")
            return None
        # From here on the file is ours: a refusal keeps Volatility's ELF and Xen stackers
        # (order 10) from reading it wrongly after us.
        if probe.problem:
            return refuse(
                context, layer_name, source.source, f"Xen dump-core cannot be used: {probe.problem}"
            )
        new_name = context.layers.free_layer_name("XenDumpCoreLayer")
        context.config[interfaces.configuration.path_join(new_name, "base_layer")] = layer_name
        try:
            return XenDumpCoreLayer(context, new_name, new_name)
        except XenFormatError as exc:
            reason = f"Xen dump-core cannot be used: {exc}"
            return refuse(context, layer_name, source.source, reason)
