"""The stacker that puts a Xen layer on a file: ``XenDumpCoreStacker`` (order 9, ahead of
Volatility's own ELF and Xen stackers at 10, which would claim the file and misread it)."""

from __future__ import annotations

import logging

from volatility3.framework import constants, exceptions, interfaces

from ..formats.dumpcore import Probe, probe_xen_core
from ..formats.errors import XenFormatError
from .memory import (
    XenDumpCoreLayer,
    XenGuestLayer,
    XenMachineLayer,
    _base_reader,
    _file_identity,
    _report_once,
)

vollog = logging.getLogger(__name__)


class XenDumpCoreStacker(interfaces.automagic.StackerLayerInterface):
    """Stacks ``XenDumpCoreLayer`` on a Xen dump-core file.

    Order 9: below Volatility's ``Elf64Stacker`` and ``XenCoreDumpStacker`` (10), which
    would otherwise claim the file first and map it wrongly.
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
        base = context.layers[layer_name]
        if isinstance(base, (XenGuestLayer, XenMachineLayer)):
            return None
        try:
            read, size = _base_reader(base)
            probe: Probe = probe_xen_core(read, size)
        except exceptions.InvalidAddressException:
            return None
        identity = _file_identity(base)
        source = identity[0] if identity else layer_name
        if not probe.is_xen:
            vollog.log(constants.LOGLEVEL_VVVV, f"{source}: not a Xen dump-core")
            return None
        if probe.problem:
            _report_once(source, f"Xen dump-core cannot be used: {probe.problem}")
            return None
        new_name = context.layers.free_layer_name("XenDumpCoreLayer")
        context.config[interfaces.configuration.path_join(new_name, "base_layer")] = layer_name
        try:
            return XenDumpCoreLayer(context, new_name, new_name)
        except XenFormatError as exc:
            # Volatility hides stacker exceptions below -vvvvv; an analyst holding a
            # damaged core must learn why it is read as raw bytes.
            _report_once(source, f"Xen dump-core cannot be used: {exc}")
            return None
