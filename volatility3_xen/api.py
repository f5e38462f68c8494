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

``XenDumpCore.open(path)`` (volatility3_xen.formats.dumpcore) gives the same facts without any
Volatility context.
"""

from __future__ import annotations

from pathlib import Path

from .layers.memory import add_machine_layer, find_xen_layer, open_core

__all__ = ["open_core", "find_xen_layer", "add_machine_layer", "plugin_dir"]


def plugin_dir() -> str | None:
    """The directory to give ``vol -p`` so that it loads our plugins and stackers.

    A source checkout has ``<repo>/plugins``; an installed wheel puts ``xen/`` into
    Volatility's own plugin directory, which ``vol`` searches anyway (None then).
    """
    checkout = Path(__file__).resolve().parents[1] / "plugins"
    if (checkout / "xen").is_dir():
        return str(checkout)
    return None
