"""Images taken inside a 64-bit Xen PV Linux guest (LiME, AVML, raw, ELF) as Xen layers.

Such an image is pseudo-physical, but the guest's page tables hold machine frames and
the image has no p2m: on it Volatility's stock ``LinuxIntel32e`` walks into nowhere and
``linux.pslist`` prints nothing.  Here:

- ``XenInGuestPVStacker`` (order 32: after the file-format stackers at 10, before our
  PV stacker at 33 and Volatility's Linux stackers at 34/35) runs on a physical layer,
  finds the Linux banner the way Volatility's banner stacker does (stopping at the first
  hit), reads the kernel's ISF for the few addresses it needs (cached per ISF), checks
  that the banner sits where a PV kernel puts it (link address, no KASLR) and that
  ``xen_domain_type`` says XEN_PV_DOMAIN, and only then recovers the machine-frame map
  (``formats.p2mrecovery``) and returns a ``XenInGuestPVLayer``.  Any other kernel is
  left to Volatility's own stackers untouched.  A PV guest whose map cannot be recovered
  gets one line saying why and ``memory.refuse``'s layer, so that no stock Intel layer
  ends up on its machine-frame page tables.
- ``XenInGuestPVLayer`` is a ``XenGuestLayer`` over the physical layer (identity map)
  whose ``machine_frames`` is the recovered map: ``XenPVLinuxIntelStacker`` then stacks
  ``XenPVLinuxIntel32e`` on it exactly as on a PV dump-core.
- ``open_inguest`` opens a file this way for the ``xen.*`` plugins and scripts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from volatility3 import framework
from volatility3.framework import constants, exceptions, interfaces, layers
from volatility3.framework.automagic import stacker as stacker_module
from volatility3.framework.automagic import symbol_cache
from volatility3.framework.configuration import requirements
from volatility3.framework.layers import intel, physical, resources, scanners

from ..formats.dumpcore import probe_xen_core
from ..formats.errors import XenFormatError
from ..formats.inguest import FORMAT_NAME, InGuestPVImage, present_runs
from ..formats.p2mrecovery import (
    DIRECT_MAP_BEFORE_4_20,
    DIRECT_MAP_SINCE_4_20,
    START_KERNEL_MAP,
    XEN_PV_DOMAIN,
    KernelLayout,
    Recovery,
    is_pv_guest,
    recover_machine_frames,
)
from .errors import XenCoreFormatException
from .memory import (
    UNREADABLE,
    ParseCache,
    XenGuestLayer,
    XenMachineLayer,
    XenRefusedLayer,
    _base_reader,
    base_file,
    refuse,
)

vollog = logging.getLogger(__name__)
_path_join = interfaces.configuration.path_join

# KernelLayout fields that are addresses, each a config key of the layer.
_ADDRESS_FIELDS = tuple(
    f.name for f in dataclasses.fields(KernelLayout) if f.name not in ("top_table_name",)
)
_CONTAINERS = {"FileLayer": "raw", "LimeLayer": "LiME", "Elf64Layer": "ELF", "AVMLLayer": "AVML"}
# Recovered maps by (file identity, layer chain, layout): Volatility builds the layer twice
# (stacker, then ConstructionMagic from the configuration).
_RECOVERED = ParseCache(size=2)
# ISF url -> kernel parameters (what the stacker reads from an ISF), in this process.
_KERNELS: dict[str, dict[str, Any] | None] = {}
_KERNEL_CACHE_FILE = "volatility3_xen_pv_kernels.json"
_KERNEL_CACHE_VERSION = 1
_NOT_PV = "not the memory of a 64-bit Xen PV Linux guest whose kernel symbols are known"


class XenInGuestPVLayer(XenGuestLayer):
    """Pseudo-physical memory of a PV guest imaged from inside, with the machine-frame
    map recovered from its own page tables and p2m (``formats.p2mrecovery``).

    Addresses are the base layer's (the identity over the pages it holds); the config
    holds the kernel addresses the recovery needs, so ``-c`` replays need no ISF.
    """

    _version = (1, 0, 0)
    _required_framework_version = (2, 26, 0)

    def __init__(
        self,
        context: interfaces.context.ContextInterface,
        config_path: str,
        name: str,
        metadata: dict[str, Any] | None = None,
        progress_callback: constants.ProgressCallback = None,
    ) -> None:
        super().__init__(context=context, config_path=config_path, name=name, metadata=metadata)
        self._base_layer = self._target_layer = self.config["base_layer"]
        base = context.layers[self._base_layer]
        layout = layout_from_config(self.config)
        try:
            source = base_file(_bottom_layer(context, self._base_layer))
        except UNREADABLE as exc:
            raise XenCoreFormatException(name, f"{self._base_layer} cannot be read: {exc}") from exc
        self._source = source.source
        read, size = _base_reader(base)
        key = None
        if source.identity is not None:
            key = (source.identity, _layer_chain(context, self._base_layer), layout)
        recovery = _RECOVERED.lookup(key)
        if recovery is None:
            try:
                recovery = recover_machine_frames(
                    read, size, layout, name=self._source, progress=progress_callback
                )
            except XenFormatError as exc:
                raise XenCoreFormatException.from_format_error(name, exc) from exc
            except UNREADABLE as exc:
                raise XenCoreFormatException(name, f"{self._source} cannot be read: {exc}") from exc
            _RECOVERED.keep(key, recovery)
        container = _CONTAINERS.get(type(base).__name__, type(base).__name__)
        self._install(
            InGuestPVImage(self._source, _present(base), recovery, layout, container=container)
        )

    @classmethod
    def get_requirements(cls) -> list[interfaces.configuration.RequirementInterface]:
        return [
            requirements.TranslationLayerRequirement(name="base_layer", optional=False),
            requirements.StringRequirement(name="top_table_name", optional=True),
            *(
                requirements.IntRequirement(name=field, optional=True, default=0)
                for field in _ADDRESS_FIELDS
            ),
        ]

    @property
    def recovery(self) -> Recovery:
        return self._image.recovery


def layout_from_config(config: interfaces.configuration.HierarchicalDict) -> KernelLayout:
    # 0 stands for "the ISF has no such symbol" (no kernel address is 0).
    values = {field: config.get(field, None) for field in _ADDRESS_FIELDS}
    values = {key: value for key, value in values.items() if value}
    if "top_table" not in values:
        raise exceptions.LayerException("XenInGuestPVLayer", "no top_table in the configuration")
    top_name = config.get("top_table_name", None) or "init_top_pgt"
    return KernelLayout(top_table_name=top_name, **values)


def _bottom_layer(context: interfaces.context.ContextInterface, name: str) -> Any:
    layer = context.layers[name]
    while isinstance(layer, interfaces.layers.TranslationLayerInterface) and layer.dependencies:
        layer = context.layers[layer.dependencies[0]]
    return layer


def _layer_chain(context: interfaces.context.ContextInterface, name: str) -> tuple[str, ...]:
    chain, layer = [], context.layers[name]
    while True:
        chain.append(f"{type(layer).__name__}:{layer.maximum_address}")
        if not isinstance(layer, interfaces.layers.TranslationLayerInterface):
            return tuple(chain)
        if not layer.dependencies:
            return tuple(chain)
        layer = context.layers[layer.dependencies[0]]


def _present(base: interfaces.layers.DataLayerInterface) -> Any:
    """The byte ranges ``base`` holds (a LiME/ELF/AVML layer's segments; all of a file)."""
    if isinstance(base, interfaces.layers.TranslationLayerInterface):
        end = base.maximum_address + 1
        ranges = [
            (offset, length) for offset, length, _, _, _ in base.mapping(0, end, ignore_errors=True)
        ]
        return present_runs(ranges)
    return present_runs([(0, base.maximum_address + 1)])


# -- the kernel: banner -> ISF -> layout ------------------------------------------------------

_SYMBOLS = (
    "linux_banner",
    "init_top_pgt",
    "init_level4_pgt",
    "_end",
    "level2_ident_pgt",
    "level2_kernel_pgt",
    "page_offset_base",
    "xen_p2m_addr",
    "xen_p2m_size",
    "p2m_top",
    "xen_domain_type",
)


def _kernel_cache_path() -> Path:
    return Path(constants.CACHE_PATH) / _KERNEL_CACHE_FILE


def _isf_stamp(url: str) -> str:
    """What makes a cached entry stale: the ISF file's size and mtime when it is local."""
    path = url[len("file://") :] if url.startswith("file://") else None
    if path is None and url.startswith("jar:file:"):
        path = url[len("jar:file:") :].split("!", 1)[0]
    if path:
        try:
            stat = os.stat(path.replace("%20", " "))
        except OSError:
            return "missing"
        return f"{stat.st_size}:{stat.st_mtime_ns}"
    return "remote"


def kernel_parameters(isf_url: str) -> dict[str, Any] | None:
    """The addresses the in-guest reader needs from one Linux ISF, or None if the ISF is
    not an x86_64 PV-capable kernel's.  Read once per ISF (about 1 s for a 16 MB ISF) and
    kept in ``constants.CACHE_PATH``, so later runs on any image cost nothing here."""
    if isf_url in _KERNELS:
        return _KERNELS[isf_url]
    stamp = _isf_stamp(isf_url)
    cache_path = _kernel_cache_path()
    try:
        cached = json.loads(cache_path.read_text())
        if cached.get("version") != _KERNEL_CACHE_VERSION:
            cached = {"version": _KERNEL_CACHE_VERSION, "kernels": {}}
    except (OSError, ValueError, AttributeError):
        cached = {"version": _KERNEL_CACHE_VERSION, "kernels": {}}
    entry = cached["kernels"].get(isf_url)
    if isinstance(entry, dict) and entry.get("stamp") == stamp:
        _KERNELS[isf_url] = entry.get("parameters")
        return _KERNELS[isf_url]
    parameters = _read_isf(isf_url)
    _KERNELS[isf_url] = parameters
    cached["kernels"][isf_url] = {"stamp": stamp, "parameters": parameters}
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        # A fresh, exclusively created name (never a predictable one a planted symlink
        # could redirect), renamed over the cache file only when complete.
        handle, partial = tempfile.mkstemp(dir=cache_path.parent, suffix=".tmp")
        try:
            with os.fdopen(handle, "w") as out:
                out.write(json.dumps(cached))
            os.replace(partial, cache_path)
        except BaseException:
            os.unlink(partial)
            raise
    except OSError as exc:
        vollog.debug(f"cannot write {cache_path}: {exc}")
    return parameters


def _read_isf(isf_url: str) -> dict[str, Any] | None:
    try:
        with resources.ResourceAccessor().open(isf_url) as handle:
            isf = json.load(handle)
        symbols = isf.get("symbols", {})
        enum = isf.get("enums", {}).get("xen_domain_type", {})
    except (OSError, ValueError, AttributeError) as exc:
        vollog.debug(f"cannot read {isf_url}: {exc}")
        return None
    found = {name: symbols[name].get("address") for name in _SYMBOLS if name in symbols}
    if "xen_domain_type" not in found or "linux_banner" not in found:
        return None  # a kernel without Xen guest support, or not x86_64
    if "init_top_pgt" not in found and "init_level4_pgt" not in found:
        return None
    found["XEN_PV_DOMAIN"] = enum.get("constants", {}).get("XEN_PV_DOMAIN", XEN_PV_DOMAIN)
    return found


def _kernel_version(banner: bytes) -> tuple[int, int]:
    match = re.match(rb"Linux version (\d+)\.(\d+)", banner)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def kernel_layout(parameters: dict[str, Any], banner: bytes) -> KernelLayout:
    """The recovery's parameters from an ISF's addresses (``kernel_parameters``)."""
    top_name = "init_top_pgt" if "init_top_pgt" in parameters else "init_level4_pgt"
    return KernelLayout(
        top_table=parameters[top_name],
        top_table_name=top_name,
        kernel_end=parameters.get("_end"),
        ident_l2=parameters.get("level2_ident_pgt"),
        kernel_l2=parameters.get("level2_kernel_pgt"),
        direct_map_variable=parameters.get("page_offset_base"),
        direct_map=(
            DIRECT_MAP_SINCE_4_20 if _kernel_version(banner) >= (4, 20) else DIRECT_MAP_BEFORE_4_20
        ),
        p2m_list=parameters.get("xen_p2m_addr"),
        p2m_size=parameters.get("xen_p2m_size"),
        p2m_top=parameters.get("p2m_top"),
        domain_type=parameters.get("xen_domain_type"),
        pv_domain_value=parameters.get("XEN_PV_DOMAIN", XEN_PV_DOMAIN),
        kernel_map=START_KERNEL_MAP,
    )


def find_banner(
    context: interfaces.context.ContextInterface,
    layer_name: str,
    progress_callback: constants.ProgressCallback = None,
) -> tuple[bytes, str] | None:
    """The first known Linux banner in the layer and its ISF url (Volatility's banner
    scan, stopped at the first hit)."""
    banners = symbol_cache.load_cache_manager().get_identifier_dictionary(operating_system="linux")
    banners = {banner: url for banner, url in banners.items() if banner and url}
    if not banners:
        return None
    scanner = scanners.MultiStringScanner(list(banners))
    layer = context.layers[layer_name]
    hits = layer.scan(context=context, scanner=scanner, progress_callback=progress_callback)
    for _, banner in hits:
        return banner, banners[banner]
    return None


def pv_kernel_layout(
    context: interfaces.context.ContextInterface,
    layer_name: str,
    progress_callback: constants.ProgressCallback = None,
) -> KernelLayout | None:
    """The kernel layout if ``layer_name`` holds a 64-bit PV Linux guest, else None."""
    found = find_banner(context, layer_name, progress_callback)
    if found is None:
        return None
    banner, isf_url = found
    parameters = kernel_parameters(isf_url)
    if parameters is None:
        return None
    layout = kernel_layout(parameters, banner)
    read, _ = _base_reader(context.layers[layer_name])
    # A PV kernel runs at its link address: the banner is at linux_banner - __START_KERNEL_map.
    offset = parameters["linux_banner"] - layout.kernel_map
    if offset < 0 or read(offset, len(banner)) != banner:
        return None
    if not is_pv_guest(read, layout):
        return None
    return layout


class XenInGuestPVStacker(interfaces.automagic.StackerLayerInterface):
    """Stacks ``XenInGuestPVLayer`` on the physical image of a 64-bit Xen PV Linux guest.

    Order 32: after the file-format stackers (LiME, ELF, AVML at 10), before
    ``XenPVLinuxIntelStacker`` (33), which then stacks the PV Intel layer on ours, and
    before Volatility's Linux stackers (34/35), whose stock Intel layer would misread the
    guest's machine-frame page tables.
    """

    stack_order = 32
    exclusion_list = ["mac", "windows"]

    @classmethod
    def stack(
        cls,
        context: interfaces.context.ContextInterface,
        layer_name: str,
        progress_callback: constants.ProgressCallback = None,
    ) -> interfaces.layers.DataLayerInterface | None:
        layer = context.layers[layer_name]
        skip = (intel.Intel, XenGuestLayer, XenMachineLayer, XenRefusedLayer)
        if isinstance(layer, skip) or layer.metadata.get("os", "Unknown") not in ("Unknown", None):
            return None  # not physical memory, or an OS layer already
        try:
            layout = pv_kernel_layout(context, layer_name, progress_callback)
        except UNREADABLE as exc:
            vollog.debug(f"{layer_name}: {exc}")
            return None
        if layout is None:
            return None
        source = base_file(_bottom_layer(context, layer_name)).source
        vollog.info(f"{source}: a Xen PV guest's memory; recovering its machine-frame map")
        name = context.layers.free_layer_name("XenInGuestPVLayer")
        configure(context, name, layer_name, layout)
        try:
            return XenInGuestPVLayer(context, name, name, progress_callback=progress_callback)
        except XenCoreFormatException as exc:
            return refuse(
                context,
                layer_name,
                source,
                f"{FORMAT_NAME}, but its machine-frame map cannot be recovered: {exc}",
            )


def configure(
    context: interfaces.context.ContextInterface, name: str, base_layer: str, layout: KernelLayout
) -> None:
    """Write ``XenInGuestPVLayer``'s configuration for ``layout`` at config path ``name``."""
    context.config[_path_join(name, "base_layer")] = base_layer
    context.config[_path_join(name, "top_table_name")] = layout.top_table_name
    for field in _ADDRESS_FIELDS:
        value = getattr(layout, field)
        context.config[_path_join(name, field)] = 0 if value is None else value


def open_inguest(
    context: interfaces.context.ContextInterface,
    location: str | os.PathLike[str],
    progress_callback: constants.ProgressCallback = None,
) -> str:
    """Add a ``FileLayer`` for ``location``, Volatility's file-format layer (LiME, ELF,
    AVML) if one claims it, and a ``XenInGuestPVLayer``; return the last one's name.

    Raises ``XenCoreFormatException`` with a one-line reason when the file is not the
    memory of a 64-bit PV Linux guest whose ISF is known, or its map cannot be recovered.
    The layers it added are removed again then.
    """
    url = str(location)
    if "://" not in url:
        url = Path(url).resolve().as_uri()
    before = set(context.layers)
    file_name = context.layers.free_layer_name("XenInGuestFile")
    context.config[_path_join(file_name, "location")] = url
    context.layers.add_layer(physical.FileLayer(context, file_name, file_name))
    framework.import_files(layers, True)  # the file-format stackers (LiME, ELF, AVML, ...)
    formats = sorted(
        (
            candidate
            for candidate in framework.class_subclasses(interfaces.automagic.StackerLayerInterface)
            if candidate.stack_order < XenInGuestPVStacker.stack_order
            and candidate.__module__.startswith("volatility3.framework")
        ),
        key=lambda candidate: candidate.stack_order,
    )
    stacked = stacker_module.LayerStacker.stack_layer(
        context, file_name, formats, progress_callback
    )
    try:
        try:
            layout = pv_kernel_layout(context, stacked[0], progress_callback)
        except UNREADABLE as exc:
            raise XenCoreFormatException(file_name, f"cannot be read: {exc}") from exc
        if layout is None:
            raise XenCoreFormatException(file_name, _NOT_PV)
        name = context.layers.free_layer_name("XenInGuestPVLayer")
        configure(context, name, stacked[0], layout)
        try:
            layer = XenInGuestPVLayer(context, name, name, progress_callback=progress_callback)
        except XenCoreFormatException as exc:
            raise XenCoreFormatException(
                name, f"its machine-frame map cannot be recovered: {exc}"
            ) from exc
    except XenCoreFormatException:
        for name in [*stacked, *(set(context.layers) - before - set(stacked))]:
            if name in context.layers and name not in before:
                context.layers.del_layer(name)
        raise
    context.layers.add_layer(layer)
    return name


def open_inguest_instead(
    context: interfaces.context.ContextInterface,
    location: str | os.PathLike[str],
    progress_callback: constants.ProgressCallback = None,
) -> str | None:
    """For a file that is no Xen dump-core at all (the dump-core probe finds no Xen ELF
    core): ``open_inguest``, or None when it is not a PV guest's memory either.

    Raises ``XenCoreFormatException`` when it is a PV guest's memory whose map cannot be
    recovered (the reason is one line).
    """
    url = str(location)
    if "://" not in url:
        url = Path(url).resolve().as_uri()
    probe_name = context.layers.free_layer_name("XenInGuestProbe")
    context.config[_path_join(probe_name, "location")] = url
    try:
        context.layers.add_layer(physical.FileLayer(context, probe_name, probe_name))
        read, size = _base_reader(context.layers[probe_name])
        if probe_xen_core(read, size).is_xen:
            return None
    except UNREADABLE:
        return None
    finally:
        if probe_name in context.layers:
            context.layers.del_layer(probe_name)
    try:
        return open_inguest(context, url, progress_callback)
    except XenCoreFormatException as exc:
        if exc.message == _NOT_PV:
            return None
        raise
