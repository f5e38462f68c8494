"""``XenCoreRequirement`` and the automagic that satisfies it without stacking.

Why: ``xen.*`` plugins need nothing but the Xen layer of the file (a dump-core or a save
image), yet no built-in stacker
excludes the "xen" plugin category, so Volatility's ``LayerStacker`` would run every OS
stacker (banner scans over the whole guest) before ``xen.info`` could print a header.

``XenCoreMagic`` runs at priority 5, after ``ConstructionMagic`` (0, which honours saved
configurations) and before ``LayerStacker`` (10).  For each unsatisfied
``XenCoreRequirement`` it opens the CLI's ``-f`` file directly as ``FileLayer`` + the Xen
layer its format needs (``images.open_image``: ``XenSaveImageLayer`` for a save image,
``XenDumpCoreLayer`` otherwise) and points the requirement at it; LayerStacker then finds
nothing left to do and returns at once.

If the file is not a usable Xen image the automagic logs one line saying why (``not a
usable Xen dump-core: ...`` or ``not a usable Xen save image: ...``), leaves the
requirement unsatisfied (Volatility then reports it in its usual way) and leaves
LayerStacker no stacker to run: none can produce what a xen plugin needs.
"""

from __future__ import annotations

import logging
from urllib.parse import unquote, urlparse

from volatility3 import framework
from volatility3.framework import constants, exceptions, interfaces
from volatility3.framework.automagic import stacker
from volatility3.framework.configuration import requirements

from ..formats.errors import XenFormatError
from . import inguest
from .images import DUMP_CORE, XenImageOpenError, open_image
from .memory import find_xen_layer

vollog = logging.getLogger(__name__)

# Where the CLI puts ``-f`` / ``--single-location`` (cli/__init__.py sets this key itself).
_STACKER_PATH = interfaces.configuration.path_join(
    constants.AUTOMAGIC_CONFIG_PATH, stacker.LayerStacker.__name__
)
SINGLE_LOCATION_KEY = interfaces.configuration.path_join(_STACKER_PATH, "single_location")
STACKERS_KEY = interfaces.configuration.path_join(_STACKER_PATH, "stackers")
# A stacker name that matches no stacker class (see _narrow_layer_stacker).
NO_STACKER = "none: not a usable Xen image"


class XenCoreRequirement(requirements.TranslationLayerRequirement):
    """A translation layer that is, or sits on, a Xen guest layer (dump-core, save image)."""

    def __init__(
        self,
        name: str = "primary",
        description: str = "Memory layer of a Xen dump-core or save image",
        default: interfaces.configuration.ConfigSimpleType = None,
        optional: bool = False,
    ) -> None:
        super().__init__(name, description, default, optional)

    def unsatisfied(
        self, context: interfaces.context.ContextInterface, config_path: str
    ) -> dict[str, interfaces.configuration.RequirementInterface]:
        unsatisfied = super().unsatisfied(context, config_path)
        if unsatisfied:
            return unsatisfied
        path = interfaces.configuration.path_join(config_path, self.name)
        value = self.config_value(context, path, None)
        if isinstance(value, str) and find_xen_layer(context, value) is None:
            vollog.log(constants.LOGLEVEL_V, f"TypeError - {value} is not a Xen guest layer")
            return {path: self}
        return {}


class XenCoreMagic(interfaces.automagic.AutomagicInterface):
    """Opens the ``-f`` file as a Xen image (dump-core or save image) for unsatisfied
    ``XenCoreRequirement``s."""

    priority = 5

    def __call__(
        self,
        context: interfaces.context.ContextInterface,
        config_path: str,
        requirement: interfaces.configuration.RequirementInterface,
        progress_callback: constants.ProgressCallback = None,
    ) -> list[str] | None:
        pending = self.find_requirements(context, config_path, requirement, XenCoreRequirement)
        if not pending:
            return None
        location = context.config.get(SINGLE_LOCATION_KEY, None)
        if not location:
            return None  # no -f: LayerStacker says so in its usual way
        if progress_callback is not None:
            progress_callback(0, "Opening the Xen image")
        layer_name = self._open(context, str(location))
        if layer_name is None:
            self._narrow_layer_stacker(context)
            return [path for path, _ in pending]
        for path, _ in pending:
            context.config[path] = layer_name
        return None

    @staticmethod
    def _open(context: interfaces.context.ContextInterface, location: str) -> str | None:
        """``images.open_image``; on failure log why, remove what it added, return None."""
        before = set(context.layers)
        kind = DUMP_CORE
        try:
            return open_image(context, location)
        except XenImageOpenError as exc:
            problem, kind = str(exc), exc.format_name
        except XenFormatError as exc:
            problem = str(exc)
        except (OSError, exceptions.LayerException) as exc:
            problem = f"cannot be read: {exc}"
        for name in set(context.layers) - before:
            context.layers.del_layer(name)
        if kind == DUMP_CORE:  # no Xen file at all: an image taken inside a PV guest?
            try:
                found = inguest.open_inguest_instead(context, location)
            except XenFormatError as exc:
                problem, kind, found = str(exc), inguest.FORMAT_NAME, None
            if found is not None:
                return found
        vollog.error(f"{_display_name(location)}: not a usable {kind}: {problem}")
        return None

    @staticmethod
    def _narrow_layer_stacker(context: interfaces.context.ContextInterface) -> None:
        """Leave LayerStacker nothing to try, unless the user chose the stackers.

        The CLI selects every stacker for a "xen" plugin (no stacker excludes that
        category).  The OS stackers cannot build what a xen plugin requires, and the Xen
        stacker would repeat the parse that just failed (and log it a second time), so
        running any of them only delays the same "unsatisfied" outcome by full scans of
        the file.  LayerStacker keeps the stackers whose names are listed; a list naming
        none of them selects none.
        """
        chosen = context.config.get(STACKERS_KEY, None)
        everything = {
            cls.__name__
            for cls in framework.class_subclasses(interfaces.automagic.StackerLayerInterface)
        }
        if isinstance(chosen, list) and set(chosen) >= everything:
            context.config[STACKERS_KEY] = [NO_STACKER]


def _display_name(location: str) -> str:
    """A ``file:`` URL as the path the user typed; other URLs as they are."""
    if location.startswith("file:"):
        return unquote(urlparse(location).path)
    return location
