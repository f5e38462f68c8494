"""What puts a Xen layer on a file: ``stack_xen_file`` (the flow every Xen file stacker
shares) and ``XenDumpCoreStacker`` (order 9, ahead of Volatility's own ELF and Xen
stackers at 10, which would claim the file and misread it)."""

from __future__ import annotations

import logging
from typing import Callable

from volatility3.framework import constants, interfaces

from ..formats.dumpcore import Probe, probe_xen_core
from ..formats.elfcore import Reader
from ..formats.errors import XenFormatError
from .memory import (
    UNREADABLE,
    XenDumpCoreLayer,
    XenGuestLayer,
    _report_once,
    refuse,
    stackable_base,
)

vollog = logging.getLogger(__name__)


def stack_xen_file(
    context: interfaces.context.ContextInterface,
    layer_name: str,
    probe: Callable[[Reader, int], Probe],
    layer_class: type[XenGuestLayer],
    what: str,
) -> interfaces.layers.DataLayerInterface | None:
    """The one flow of every Xen file stacker: probe the base cheaply; not ours -> None;
    ours but unusable -> a ``XenRefusedLayer`` with a one-line reason (so that
    Volatility's ELF and Xen stackers, order 10, never read it wrongly after us); else
    ``layer_class`` on it.  ``what`` names the format in messages ("Xen dump-core")."""
    source = stackable_base(context, layer_name)
    if source is None:
        return None
    try:
        found = probe(source.read, source.size)
    except UNREADABLE as exc:
        _report_once(source.source, f"cannot be read: {exc}")
        return None
    if not found.is_xen:
        vollog.log(constants.LOGLEVEL_VVVV, f"{source.source}: not a {what}")
        return None
    if found.problem:
        return refuse(context, layer_name, source.source, f"{what} cannot be used: {found.problem}")
    new_name = context.layers.free_layer_name(layer_class.__name__)
    context.config[interfaces.configuration.path_join(new_name, "base_layer")] = layer_name
    try:
        return layer_class(context, new_name, new_name)
    except XenFormatError as exc:
        return refuse(context, layer_name, source.source, f"{what} cannot be used: {exc}")


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
        return stack_xen_file(
            context, layer_name, probe_xen_core, XenDumpCoreLayer, "Xen dump-core"
        )
