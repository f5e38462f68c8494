"""The script API: put a Xen memory file on a Volatility context in a few lines.

    from volatility3.framework import contexts
    from volatility3_xen import api, report

    context = contexts.Context()
    xen = api.open_image(context, "guest.save")     # dump-core or save image -> layer name
    layer = context.layers[xen]
    layer.read(0x1000, 16)                           # guest pseudo-physical bytes
    layer.image.format_name, layer.image.guest_type  # "Xen save image", "PV"
    [v.ip for v in layer.image.vcpus()]              # vCPU registers
    report.facts(layer.image)                        # what xen.info prints
    machine = api.add_machine_layer(context, xen)    # PV dump-cores: machine addresses

``open_core`` opens a dump-core only (``layer.core``: notes, sections, page map).
``XenDumpCore.open(path)`` / ``XenSaveImage.open(path)`` (``volatility3_xen.formats``) give
the same facts without any Volatility context.
"""

from __future__ import annotations

from pathlib import Path

from .layers.images import XenImageOpenError, open_image
from .layers.memory import add_machine_layer, find_xen_layer, open_core

__all__ = [
    "XenImageOpenError",
    "add_machine_layer",
    "find_xen_layer",
    "open_core",
    "open_image",
    "plugin_dir",
]


def plugin_dir() -> str | None:
    """The directory to give ``vol -p`` so that it loads our plugins and stackers.

    A source checkout has ``<repo>/plugins``; an installed wheel puts ``xen/`` into
    Volatility's own plugin directory, which ``vol`` searches anyway (None then).
    """
    checkout = Path(__file__).resolve().parents[1] / "plugins"
    if (checkout / "xen").is_dir():
        return str(checkout)
    return None
