"""The script API: put a Xen dump-core on a Volatility context in a few lines.

    from volatility3.framework import contexts
    from volatility3_xen import api

    context = contexts.Context()
    xen = api.open_core(context, "guest.core")      # -> layer name
    layer = context.layers[xen]
    layer.read(0x1000, 16)                           # guest pseudo-physical bytes
    layer.core.notes.xen_version                     # decoded notes
    [v.ip for v in layer.core.vcpus()]               # vCPU registers
    machine = api.add_machine_layer(context, xen)    # PV: machine addresses

``XenDumpCore.open(path)`` (volatility3_xen.dumpcore) gives the same facts without any
Volatility context.
"""

from __future__ import annotations

import os
from pathlib import Path

from volatility3.framework import interfaces
from volatility3.framework.layers import physical

from .layer import XenDumpCoreLayer, XenMachineLayer

__all__ = ["open_core", "find_xen_layer", "add_machine_layer", "plugin_dir"]


def open_core(
    context: interfaces.context.ContextInterface,
    location: str | os.PathLike[str],
    layer_name: str | None = None,
) -> str:
    """Add a ``FileLayer`` for ``location`` (a path or ``file:`` URL) and a
    ``XenDumpCoreLayer`` over it; return the Xen layer's name.

    Raises ``XenCoreFormatException`` if the file is not a usable dump-core.
    """
    url = str(location)
    if "://" not in url:
        url = Path(url).resolve().as_uri()
    file_name = context.layers.free_layer_name("XenCoreFile")
    context.config[interfaces.configuration.path_join(file_name, "location")] = url
    context.layers.add_layer(physical.FileLayer(context, file_name, file_name))
    name = layer_name or context.layers.free_layer_name("XenDumpCoreLayer")
    context.config[interfaces.configuration.path_join(name, "base_layer")] = file_name
    context.layers.add_layer(XenDumpCoreLayer(context, name, name))
    return name


def find_xen_layer(
    context: interfaces.context.ContextInterface, layer_name: str
) -> XenDumpCoreLayer | None:
    """The Xen dump-core layer at or below ``layer_name`` (e.g. below a kernel layer)."""
    pending, seen = [layer_name], set()
    while pending:
        name = pending.pop()
        if name in seen or name not in context.layers:
            continue
        seen.add(name)
        layer = context.layers[name]
        if isinstance(layer, XenDumpCoreLayer):
            return layer
        pending.extend(layer.dependencies)
    return None


def add_machine_layer(context: interfaces.context.ContextInterface, xen_layer_name: str) -> str:
    """Add a ``XenMachineLayer`` (machine addresses) over a Xen layer; return its name."""
    name = context.layers.free_layer_name("XenMachineLayer")
    context.config[interfaces.configuration.path_join(name, "xen_layer")] = xen_layer_name
    context.layers.add_layer(XenMachineLayer(context, name, name))
    return name


def plugin_dir() -> str | None:
    """The directory to give ``vol -p`` so that it loads our plugins and stackers.

    A source checkout has ``<repo>/plugins``; an installed wheel puts ``xen/`` into
    Volatility's own plugin directory, which ``vol`` searches anyway (None then).
    """
    checkout = Path(__file__).resolve().parents[1] / "plugins"
    if (checkout / "xen").is_dir():
        return str(checkout)
    return None
