"""Open any Xen memory file as a layer: each format's probe decides which reader gets it.

``open_image(context, location)`` adds a ``FileLayer`` and, on it, the Xen layer of the
first format whose probe claims the file:

1. a save image (``xl save``, a libxl/libxc stream, an XCP-ng/XenServer suspend image:
   ``formats.saveimage.probe_save_image``, a strict magic at offset 0) ->
   ``XenSaveImageLayer``;
2. anything else is read as a dump-core -> ``XenDumpCoreLayer``, whose parser names the
   problem precisely when the file is not one (``not an ELF file ...``).

The ``xen.*`` plugins (``magic.XenCoreMagic``) and the script API (``api.open_image``)
use it; ``memory.open_core`` still opens a dump-core only.
"""

from __future__ import annotations

import os
from pathlib import Path

from volatility3.framework import interfaces
from volatility3.framework.layers import physical

from ..formats.errors import XenFormatError
from ..formats.saveimage import XenSaveImage, probe_save_image
from .errors import XenCoreFormatException
from .memory import XenDumpCoreLayer, _base_reader
from .saveimage import XenSaveImageLayer

_path_join = interfaces.configuration.path_join

DUMP_CORE = "Xen dump-core"
SAVE_IMAGE = XenSaveImage.format_name


class XenImageOpenError(XenCoreFormatException):
    """``open_image`` could not use the file; ``format_name`` says what it was taken for."""

    def __init__(self, layer_name: str, message: str, format_name: str) -> None:
        super().__init__(layer_name, message)
        self.format_name = format_name


def _location_url(location: str | os.PathLike[str]) -> str:
    url = str(location)
    return url if "://" in url else Path(url).resolve().as_uri()


def open_image(
    context: interfaces.context.ContextInterface,
    location: str | os.PathLike[str],
    layer_name: str | None = None,
) -> str:
    """Add a ``FileLayer`` for ``location`` (a path or URL) and the Xen layer that reads it
    (save image or dump-core); return the Xen layer's name.

    Raises ``XenImageOpenError`` (a ``XenCoreFormatException``) with a one-line reason if
    the file is neither usable format; the layers it added are removed again.
    """
    file_name = context.layers.free_layer_name("XenImageFile")
    context.config[_path_join(file_name, "location")] = _location_url(location)
    added = [file_name]
    format_name = DUMP_CORE
    try:
        context.layers.add_layer(physical.FileLayer(context, file_name, file_name))
        read, size = _base_reader(context.layers[file_name])
        probe = probe_save_image(read, size)
        layer_class: type = XenDumpCoreLayer
        if probe.is_xen:
            format_name, layer_class = SAVE_IMAGE, XenSaveImageLayer
            if probe.problem:
                raise XenImageOpenError(file_name, probe.problem, format_name)
        name = layer_name or context.layers.free_layer_name(layer_class.__name__)
        context.config[_path_join(name, "base_layer")] = file_name
        context.layers.add_layer(layer_class(context, name, name))
        added.append(name)
        return name
    except XenImageOpenError:
        _remove(context, added)
        raise
    except XenFormatError as exc:
        _remove(context, added)
        raise XenImageOpenError(file_name, exc.message, format_name) from exc
    except BaseException:
        _remove(context, added)
        raise


def _remove(context: interfaces.context.ContextInterface, names: list[str]) -> None:
    for name in reversed(names):
        if name in context.layers:
            context.layers.del_layer(name)
