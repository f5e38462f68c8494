"""Volatility layers for Xen guest memory files.

- ``XenGuestLayer``: the base of every pseudo-physical layer over a Xen file (one per
  format), built from a ``formats.image.GuestMemoryImage``; what every OS layer (Intel,
  PV Intel) sits on.
- ``XenDumpCoreLayer``: guest pseudo-physical address -> file offset in ``.xen_pages``.
- ``XenMachineLayer``: machine address -> pseudo-physical address (PV guests; identity for
  auto-translated guests), built on demand by ``api.add_machine_layer``.

The layer publishes no ``os``/``architecture`` metadata, so OS detection still runs.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import lzma
import os
import urllib.response
import zlib
from array import array
from bisect import bisect_right
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np
from volatility3.framework import exceptions, interfaces
from volatility3.framework.configuration import requirements
from volatility3.framework.layers import linear, physical

from ..formats.dumpcore import XenDumpCore
from ..formats.elfcore import Reader
from ..formats.errors import XenFormatError, printable
from ..formats.image import GuestMemoryImage, MachineFrameMap, RegionMapper, mmap_file_region
from ..formats.pagemap import PageMap, Runs, scaled_column, uint64_array
from .errors import XenCoreFormatException

vollog = logging.getLogger(__name__)

FileIdentity = tuple[str, int, int, int, int, int, int]
# Page maps of files already opened in this process, keyed by ``BaseFile.identity``:
# Volatility builds the layer twice per run (stacker, then ConstructionMagic).


class ParseCache(dict):
    """What a layer parsed from a file, kept for the next construction from the same
    file (Volatility builds every layer twice per run); the oldest of ``size`` goes first.
    """

    def __init__(self, size: int = 4) -> None:
        super().__init__()
        self.size = size

    def lookup(self, key: Any) -> Any:
        return self.get(key) if key is not None else None

    def keep(self, key: Any, value: Any) -> None:
        if key is None or key in self:
            return
        if len(self) >= self.size:
            self.pop(next(iter(self)))
        self[key] = value


_PAGE_MAP_CACHE: ParseCache = ParseCache()
# Reads up to this size go through the per-layer read cache; larger ones bypass it.
_CACHED_READ_MAX = 1 << 16
# (file, message) pairs already logged, so the second construction does not repeat them.
_REPORTED: set[tuple[str, str]] = set()
# What ``FileLayer`` reads when no decompressor sits between it and the file.
_PLAIN_FILE_TYPES = (io.BufferedReader, io.BufferedRandom, io.FileIO)
_FILE_LAYER_READ = physical.FileLayer.read
#: What reading a base layer can raise besides our own errors: invalid addresses, and the
#: decompressors' complaints about a damaged ``.gz``/``.bz2``/``.xz`` (OSError, EOFError,
#: zlib.error, lzma.LZMAError).
UNREADABLE = (exceptions.InvalidAddressException, OSError, EOFError, zlib.error, lzma.LZMAError)


@dataclass(frozen=True)
class BaseFile:
    """The bytes a Xen layer is built on, and how to read them.

    Every ``XenGuestLayer`` source (and its stacker) gets these from ``base_file(layer)``
    instead of looking at the file on disk: Volatility's ``FileLayer`` decompresses
    ``.gz``/``.bz2``/``.xz`` transparently, so the disk file's bytes are not the layer's.
    """

    #: ``read(offset, length)``: the base layer's bytes, short at the end.
    read: Reader
    #: The base layer's size (decompressed size for compressed evidence).
    size: int
    #: What messages are about: the file's path, else the base layer's name.
    source: str
    #: The page-map cache key: the open file's (device, inode, size, mtime, ctime), the
    #: decoding (``"file"`` or the decompressor) and the layer's size; None: do not cache.
    identity: FileIdentity | None
    #: ``map_region(offset, length)`` over the open file when the layer's bytes are the
    #: file's own bytes (a plain local file), else None: read through the layer.
    map_region: RegionMapper | None

    @property
    def own_bytes(self) -> bool:
        """Does the base layer give the file's own bytes (no decompressor in between)?"""
        return self.map_region is not None


def source_name(layer: interfaces.layers.DataLayerInterface) -> str:
    """What messages about ``layer``'s bytes name: the file's path, else the layer's name."""
    location = getattr(layer, "location", None)
    if isinstance(location, str) and location.startswith("file:"):
        return unquote(urlparse(location).path)
    return layer.name


def _open_stream(layer: interfaces.layers.DataLayerInterface) -> Any | None:
    """The file object a stock ``FileLayer`` reads from (its private ``_file``), or None
    for any other layer."""
    if not isinstance(layer, physical.FileLayer) or type(layer).read is not _FILE_LAYER_READ:
        return None
    try:
        return layer._file
    except Exception:  # noqa: BLE001 - whatever the accessor raises: no fast path
        return None


def base_file(layer: interfaces.layers.DataLayerInterface) -> BaseFile:
    """What the layer below a Xen layer holds: the helper every Xen stacker and layer uses.

    The ``mmap`` fast path (``map_region``) is offered only when ``layer`` is a stock
    ``FileLayer`` reading a regular file directly: same size as the layer, no decompressor
    or other layer in between.  It maps the descriptor Volatility already holds (checked
    again at each use), never the path, so a file replaced on disk after Volatility opened
    it cannot mix old and new bytes.
    """
    read, size = _base_reader(layer)
    source = source_name(layer)
    stream = _open_stream(layer)
    if stream is None:
        return BaseFile(read, size, source, None, None)
    # urllib wraps a local file in an ``addinfourl`` whose ``fp`` is the file itself; the
    # decompressors wrap it instead (their ``fileno()`` is the compressed file's).
    inner = stream.fp if isinstance(stream, urllib.response.addbase) else stream
    try:
        fileno = stream.fileno()
        stat = os.fstat(fileno)
    except (OSError, ValueError, AttributeError):
        return BaseFile(read, size, source, None, None)
    if not S_ISREG(stat.st_mode):
        return BaseFile(read, size, source, None, None)
    plain = isinstance(inner, _PLAIN_FILE_TYPES) and stat.st_size == size
    decoding = "file" if plain else type(inner).__name__
    identity = (
        decoding,
        stat.st_dev,
        stat.st_ino,
        stat.st_size,
        stat.st_mtime_ns,
        stat.st_ctime_ns,
        size,
    )
    if plain:
        mapper = _descriptor_mapper(fileno, stat.st_dev, stat.st_ino)
        return BaseFile(read, size, source, identity, mapper)
    return BaseFile(_windowed_reader(read, size, identity), size, source, identity, None)


# Reads from decompressed streams already made, by file identity (see _windowed_reader).
_WINDOWS: dict[FileIdentity, list[tuple[int, bytes]]] = {}
_WINDOWS_FILES = 2
_WINDOW_COUNT = 8
#: Bytes kept in front of a far-forward read of a decompressed stream.
READ_BEHIND = 8 << 20
_WINDOW_BYTES = 2 * READ_BEHIND + (2 << 20)


def _windowed_reader(read: Reader, size: int, identity: FileIdentity) -> Reader:
    """``read`` for a base layer that decompresses: remembers what it read.

    A decompressor only seeks forward cheaply: every backward seek starts again from the
    beginning of the file.  A dump-core's reader jumps between the headers at the start
    and the string table and page table at the end, so each such jump would cost a pass
    over the whole file.  This reader keeps its last few reads (shared by every layer on
    the same file, so Volatility's second construction reads nothing again), and a
    far-forward read also keeps up to ``READ_BEHIND`` bytes before it, which the
    decompressor produced anyway: the page table, stored just before the string table,
    is then read from memory.  Memory stays bounded: at most ``_WINDOW_COUNT`` windows of
    together ``_WINDOW_BYTES`` per file, for ``_WINDOWS_FILES`` files.
    """
    windows = _WINDOWS.pop(identity, [])
    if len(_WINDOWS) >= _WINDOWS_FILES:
        _WINDOWS.pop(next(iter(_WINDOWS)))
    _WINDOWS[identity] = windows
    position = 0

    def windowed(offset: int, length: int) -> bytes:
        nonlocal position
        length = min(length, size - offset)
        if offset < 0 or length <= 0:
            return b""
        end = offset + length
        for start, data in windows:
            if start <= offset and end <= start + len(data):
                return data[offset - start : end - start]
        start = max(position, offset - READ_BEHIND) if offset > position else offset
        data = read(start, end - start)
        position = start + len(data)
        if len(data) <= _WINDOW_BYTES // 2:
            windows.append((start, data))
            while len(windows) > _WINDOW_COUNT or sum(len(w) for _, w in windows) > _WINDOW_BYTES:
                windows.pop(0)
        return data[offset - start :]

    return windowed


def stackable_base(
    context: interfaces.context.ContextInterface, layer_name: str
) -> BaseFile | None:
    """``base_file`` of the layer a Xen stacker was offered, or None when it is not for a
    Xen stacker: one of our own layers, or bytes that cannot be read (a damaged compressed
    file: said once, at warning level, since every stacker fails on it alike)."""
    base = context.layers[layer_name]
    if isinstance(base, (XenGuestLayer, XenMachineLayer, XenRefusedLayer)):
        return None
    try:
        return base_file(base)
    except UNREADABLE as exc:
        _report_once(source_name(base), f"cannot be read: {exc}")
        return None


def _descriptor_mapper(fileno: int, device: int, inode: int) -> RegionMapper:
    """Maps regions of the file open as ``fileno``, refusing (OSError, so the caller reads
    instead) if that descriptor no longer names the same file."""

    def map_region(offset: int, length: int) -> memoryview:
        stat = os.fstat(fileno)
        if (stat.st_dev, stat.st_ino) != (device, inode):
            raise OSError(f"descriptor {fileno} no longer names the file that was opened")
        return mmap_file_region(fileno, offset, length)

    return map_region


def _base_reader(base: interfaces.layers.DataLayerInterface):
    """A ``read(offset, length)`` over a Volatility layer that returns short reads at
    the end instead of raising (the parser checks lengths itself)."""
    size = base.maximum_address + 1

    def read(offset: int, length: int) -> bytes:
        if offset >= size or length <= 0:
            return b""
        return base.read(offset, min(length, size - offset), pad=True)

    return read, size


def _report_once(source: str, message: str, level: int = logging.WARNING) -> None:
    if (source, message) not in _REPORTED:
        _REPORTED.add((source, message))
        vollog.log(level, printable(f"{source}: {message}"))


class _RunMappedLayer(linear.LinearlyMappedLayer):
    """A linearly mapped layer over sorted address runs held in ``array('Q')``s.

    Subclasses set ``_run_addr``, ``_run_target`` and ``_run_size`` (bytes, sorted by
    address) and ``_target_layer``.  Lookups are one ``bisect`` per call; a read that
    falls inside one run goes straight to the layer below.
    """

    _run_addr: array
    _run_target: array
    _run_size: array
    _target_layer: str

    def _set_runs(
        self, runs: Runs, shift: int, value_shift: int | None = None, target_base: int = 0
    ) -> None:
        """Runs of frames -> runs of bytes (address, target address, size).  Values are
        frames too unless ``value_shift`` says otherwise (0: they are byte offsets)."""
        value_shift = shift if value_shift is None else value_shift
        self._run_addr = scaled_column(runs.key, shift)
        self._run_target = scaled_column(runs.value, value_shift, target_base)
        self._run_size = scaled_column(runs.count, shift)

    # -- mapping ---------------------------------------------------------------------------

    def mapping(
        self, offset: int, length: int, ignore_errors: bool = False
    ) -> Iterable[tuple[int, int, int, int, str]]:
        run_addr, run_size, run_target = self._run_addr, self._run_size, self._run_target
        i = bisect_right(run_addr, offset) - 1
        if i < 0 or offset - run_addr[i] >= run_size[i]:
            i += 1  # i is now the first run that ends after offset
        if length == 0:
            if i < len(run_addr) and run_addr[i] <= offset:
                yield offset, 0, run_target[i] + offset - run_addr[i], 0, self._target_layer
            elif not ignore_errors:
                raise exceptions.InvalidAddressException(
                    self.name, offset, f"Address {offset:#x} is not in {self.name}"
                )
            return
        end = offset + length
        count = len(run_addr)
        while offset < end:
            if i < count and run_addr[i] <= offset:
                delta = offset - run_addr[i]
                chunk = min(run_size[i] - delta, end - offset)
                yield offset, chunk, run_target[i] + delta, chunk, self._target_layer
                offset += chunk
                i += 1
            else:
                if not ignore_errors:
                    raise exceptions.InvalidAddressException(
                        self.name, offset, f"Address {offset:#x} is not in {self.name}"
                    )
                if i >= count or run_addr[i] >= end:
                    return
                offset = run_addr[i]

    def read(self, offset: int, length: int, pad: bool = False) -> bytes:
        # Small reads are cached like Volatility's own LinearlyMappedLayer.read, which this
        # replaces.  Big ones (scanners read 1 MiB+ chunks) are not: a cache of 512 such
        # results pins hundreds of MiB and makes every chunk a fresh, page-faulting buffer,
        # which costs several times the read itself.
        if length <= _CACHED_READ_MAX:
            return self._cached_read(offset, length, pad)
        return self._read(offset, length, pad)

    @functools.lru_cache(maxsize=512)  # noqa: B019 - per layer, like LinearlyMappedLayer.read
    def _cached_read(self, offset: int, length: int, pad: bool) -> bytes:
        return self._read(offset, length, pad)

    def _read(self, offset: int, length: int, pad: bool) -> bytes:
        # Fast path: the whole request lies in one run (almost every read does).
        run_addr = self._run_addr
        i = bisect_right(run_addr, offset) - 1
        if i >= 0:
            delta = offset - run_addr[i]
            if delta + length <= self._run_size[i]:
                return self._context.layers[self._target_layer].read(
                    self._run_target[i] + delta, length, pad
                )
        return linear.LinearlyMappedLayer.read.__wrapped__(self, offset, length, pad)

    def is_valid(self, offset: int, length: int = 1) -> bool:
        # Fast path (Intel layers ask this for every page they map): inside one run.
        run_addr = self._run_addr
        i = bisect_right(run_addr, offset) - 1
        if i >= 0 and length > 0 and offset - run_addr[i] + length <= self._run_size[i]:
            return True
        try:
            return sum(chunk for _, chunk, _, _, _ in self.mapping(offset, length)) == length
        except exceptions.InvalidAddressException:
            return False

    @property
    def minimum_address(self) -> int:
        return 0

    @property
    def maximum_address(self) -> int:
        if not self._run_addr:
            return 0
        return self._run_addr[-1] + self._run_size[-1] - 1

    @property
    def dependencies(self) -> list[str]:
        return [self._target_layer]


class XenGuestLayer(_RunMappedLayer):
    """A guest's pseudo-physical memory from one Xen file (``image.GuestMemoryImage``).

    Subclasses parse their format in ``__init__`` and call ``_install(image)``; the
    layers above (Intel, PV Intel, the machine layer), the stackers, the ``xen.*`` plugins
    and the script API use only what is defined here, whatever the file format.
    """

    _image: GuestMemoryImage
    _source: str

    def _open_base(self) -> BaseFile:
        """Bind the ``base_layer`` requirement and describe its bytes (``base_file``);
        subclasses call this first.  An unreadable base raises ``XenCoreFormatException``."""
        self._base_layer = self._target_layer = self.config["base_layer"]
        self._source = self._base_layer
        with self._parsing():
            base = base_file(self.context.layers[self._base_layer])
        self._source = base.source
        return base

    @contextlib.contextmanager
    def _parsing(self) -> Iterator[None]:
        """Turns what parsing the base's bytes can raise (the format readers' errors, a
        decompressor's) into one-line ``XenCoreFormatException``s."""
        try:
            yield
        except XenCoreFormatException:
            raise
        except XenFormatError as exc:
            raise XenCoreFormatException.from_format_error(self.name, exc) from exc
        except UNREADABLE as exc:
            raise XenCoreFormatException(
                self.name, f"{self._source} cannot be read: {exc}"
            ) from exc

    def _install(self, image: GuestMemoryImage) -> None:
        self._image = image
        self._set_runs(image.page_runs(), image.page_shift, value_shift=0)
        for warning in image.warnings:
            _report_once(self._source, warning)

    @classmethod
    def get_requirements(cls) -> list[interfaces.configuration.RequirementInterface]:
        return [requirements.TranslationLayerRequirement(name="base_layer", optional=False)]

    # -- the header API (what xen.info / xen.vcpus render) ----------------------------------

    @property
    def image(self) -> GuestMemoryImage:
        """The parsed file: what it says about the guest, its vCPUs and its page map."""
        return self._image

    @property
    def source(self) -> str:
        """The file's path (or the base layer's name): what messages are about."""
        return self._source

    @property
    def page_size(self) -> int:
        return self._image.page_size

    @property
    def is_pv(self) -> bool:
        return self._image.is_pv

    @property
    def machine_frames(self) -> MachineFrameMap | None:
        """pfn <-> mfn when the guest's page tables hold machine frames (the PV walk
        needs it), else None."""
        return self._image.machine_frames

    # -- machine frames --------------------------------------------------------------------

    def pfn_to_mfn(self, pfn: int) -> int | None:
        """Machine frame backing ``pfn`` (PV); the identity on stored pfns otherwise."""
        return self._image.pfn_to_mfn(pfn)

    def mfn_to_pfn(self, mfn: int) -> int | None:
        """pfn of machine frame ``mfn``, or None when the guest does not own it."""
        return self._image.mfn_to_pfn(mfn)

    def machine_to_physical(self, address: int) -> int | None:
        return self._image.machine_to_physical(address)

    def physical_to_machine(self, address: int) -> int | None:
        return self._image.physical_to_machine(address)


class XenDumpCoreLayer(XenGuestLayer):
    """Guest pseudo-physical memory of a Xen dump-core (``xl dump-core``), PV or HVM.

    Address ``pfn * page_size + off`` maps to ``.xen_pages + index * page_size + off``
    where entry ``index`` of ``.xen_pfn``/``.xen_p2m`` names ``pfn``.  pfns absent from
    the table are invalid (reads with ``pad=True`` zero-fill them).
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
        cached = _PAGE_MAP_CACHE.lookup(base.identity)
        with self._parsing():
            core = XenDumpCore(base.read, base.size, name=self._source, map_region=base.map_region)
            if cached is not None:
                core.adopt_page_map(cached)
            _PAGE_MAP_CACHE.keep(base.identity, core.page_map)
        self._core = core
        self._install(core)

    @property
    def core(self) -> XenDumpCore:
        """The parsed file: ELF facts, sections, notes, vCPU slots, table statistics."""
        return self._core

    @property
    def page_map(self) -> PageMap:
        return self._core.page_map


class XenRefusedLayer(_RunMappedLayer):
    """Stands on a layer we recognise (a Xen file, a PV guest's Xen layer) but cannot use,
    so that no later stacker claims it.

    Volatility's stackers try the top of the stack only, so once this layer is there its
    own ELF and Xen stackers (which misread Xen cores) and its Linux stackers (a stock Intel
    walk reads a PV guest's machine frames as pfns) get a layer that maps nothing, and
    plugins fail as unsatisfied after our one-line reason.  It publishes no architecture,
    so no kernel requirement accepts it; rebuilt from a configuration (a requirement that
    takes any layer chose it) it raises the reason instead of giving an empty view.
    """

    _version = (1, 0, 0)
    _required_framework_version = (2, 26, 0)

    def __init__(
        self,
        context: interfaces.context.ContextInterface,
        config_path: str,
        name: str,
        metadata: dict[str, Any] | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(context=context, config_path=config_path, name=name, metadata=metadata)
        self._target_layer = self.config["base_layer"]
        self.reason = reason or self.config.get("reason", None) or "refused"
        if reason is None:
            raise XenCoreFormatException(name, self.reason)
        self._run_addr, self._run_target, self._run_size = array("Q"), array("Q"), array("Q")

    @classmethod
    def get_requirements(cls) -> list[interfaces.configuration.RequirementInterface]:
        return [
            requirements.TranslationLayerRequirement(name="base_layer", optional=False),
            requirements.StringRequirement(name="reason", optional=True),
        ]


def refuse(
    context: interfaces.context.ContextInterface, layer_name: str, source: str, reason: str
) -> XenRefusedLayer:
    """Say ``source: reason`` once at warning level (vol's default console level) and
    return the layer a stacker returns to keep every other stacker off ``layer_name``.

    For every Xen source: a stacker that recognises its file (or a PV guest's layer) but
    cannot use it returns ``refuse(...)`` instead of None.
    """
    _report_once(source, reason)
    message = printable(f"{source}: {reason}")
    name = context.layers.free_layer_name("XenRefusedLayer")
    context.config[interfaces.configuration.path_join(name, "base_layer")] = layer_name
    context.config[interfaces.configuration.path_join(name, "reason")] = message
    return XenRefusedLayer(context, name, name, reason=message)


class XenMachineLayer(_RunMappedLayer):
    """Machine addresses of a PV guest, mapped onto its ``XenDumpCoreLayer``.

    Machine frames the guest does not own (Xen's, other domains') are invalid, and so are
    frames whose byte address would wrap past 2^64 (a warning says how many).  For an
    auto-translated (HVM/PVH) guest machine and pseudo-physical addresses coincide, as
    libkdumpfile's MACHPHYSADDR does.
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
        self._target_layer = self.config["xen_layer"]
        xen_layer = context.layers[self._target_layer]
        if not isinstance(xen_layer, XenGuestLayer):
            raise XenCoreFormatException(name, f"{self._target_layer} is not a Xen guest layer")
        frames = xen_layer.machine_frames
        runs = frames.m2p_runs if frames is not None else _identity_runs(xen_layer.image)
        shift = xen_layer.image.page_shift
        runs, dropped = _runs_below(runs, 1 << (64 - shift))
        self._set_runs(runs, shift)
        # Building the reverse map may have found shared machine frames: say so now.
        for warning in frames.warnings if frames is not None else ():
            _report_once(xen_layer.source, warning)
        if dropped:
            _report_once(
                xen_layer.source,
                f"{dropped} machine frames lie beyond the 64-bit machine address space "
                f"(mfn >= {1 << (64 - shift):#x}); the machine layer leaves them out",
            )

    @classmethod
    def get_requirements(cls) -> list[interfaces.configuration.RequirementInterface]:
        return [requirements.TranslationLayerRequirement(name="xen_layer", optional=False)]


def _identity_runs(image: GuestMemoryImage) -> Runs:
    runs = image.page_runs()
    return Runs(runs.key, runs.key, runs.count)


def _runs_below(runs: Runs, limit: int) -> tuple[Runs, int]:
    """``runs`` cut at key ``limit`` (frames whose byte address would wrap around 2^64
    when shifted), and how many frames were cut; ``runs`` itself when none are."""
    keys, values, counts = (
        np.frombuffer(column, dtype=np.uint64) for column in (runs.key, runs.value, runs.count)
    )
    bound = np.uint64(limit)
    # keys < bound and counts <= bound - keys, without overflowing key + count.
    keep = keys < bound
    room = np.where(keep, bound - np.minimum(keys, bound), np.uint64(0))
    if bool(np.all(keep)) and bool(np.all(counts <= room)):
        return runs, 0
    clipped = np.minimum(counts, room)[keep]
    # Counts add up to at most the table's entry count: no overflow.
    dropped = int((counts[keep] - clipped).sum()) + int(counts[~keep].sum())
    kept = Runs(uint64_array(keys[keep]), uint64_array(values[keep]), uint64_array(clipped))
    return kept, dropped


def find_xen_layer(
    context: interfaces.context.ContextInterface, layer_name: str
) -> XenGuestLayer | None:
    """The Xen guest layer at or below ``layer_name`` (e.g. below a kernel layer)."""
    pending, seen = [layer_name], set()
    while pending:
        name = pending.pop()
        if name in seen or name not in context.layers:
            continue
        seen.add(name)
        layer = context.layers[name]
        if isinstance(layer, XenGuestLayer):
            return layer
        pending.extend(layer.dependencies)
    return None


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


def add_machine_layer(context: interfaces.context.ContextInterface, xen_layer_name: str) -> str:
    """Add a ``XenMachineLayer`` (machine addresses) over a Xen layer; return its name."""
    name = context.layers.free_layer_name("XenMachineLayer")
    context.config[interfaces.configuration.path_join(name, "xen_layer")] = xen_layer_name
    context.layers.add_layer(XenMachineLayer(context, name, name))
    return name
