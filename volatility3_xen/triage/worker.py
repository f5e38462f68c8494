"""One Volatility run per task, in whatever process Dask gives it: rows, never a traceback.

The worker drives Volatility exactly as ``vol`` does (cli/__init__.py): plugin and symbol
paths, ``framework.import_files``, a fresh ``contexts.Context`` per task,
``automagic.choose_automagic`` + ``construct_plugin``, then a walk of the TreeGrid.  Our Xen
stackers and the ``xen.*`` plugins come in by importing the plugin folder, like ``vol -p``;
no volatility3_xen internals are imported (they are free to move).

Start-up (importing every plugin, refreshing the symbol identifier cache) is paid once per
worker process: ``_engine()`` keeps it for the life of the process.  Everything a task
touches beyond that lives in its own context and is dropped when the task returns.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import gc
import hashlib
import io
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from . import table
from .spec import (
    Failure,
    ImageJob,
    ImageResult,
    KnownImage,
    PluginJob,
    PluginResult,
    Settings,
    StackFacts,
    Timing,
    one_line,
    plugin_os,
)

vollog = logging.getLogger(__name__)

# Volatility keeps process-wide state (plugin and symbol paths, class registries, caches)
# and is not written for concurrent runs in one interpreter: a Dask worker started with
# several threads still runs one Volatility task at a time.
_RUN_LOCK = threading.Lock()
_ENGINE: _Engine | None = None
_HASH_BLOCK = 1 << 20


class PluginNameError(ValueError):
    """A --plugins name that matches no plugin, or several."""


class _Engine:
    """Volatility, loaded and configured once per process."""

    def __init__(self, settings: Settings) -> None:
        import volatility3.plugins
        import volatility3.symbols
        from volatility3 import framework
        from volatility3.framework import constants

        framework.require_interface_version(2, 0, 0)
        self.settings = settings
        self.cache = cache_dir(settings)  # before CACHE_PATH is changed below
        plugin_dirs = [os.path.abspath(p) for p in settings.plugin_dirs]
        ours = _xen_plugin_dir()
        if ours and ours not in plugin_dirs:
            plugin_dirs.append(ours)
        volatility3.plugins.__path__ = plugin_dirs + list(constants.PLUGINS_PATH)
        volatility3.symbols.__path__ = [os.path.abspath(p) for p in settings.symbol_dirs] + list(
            constants.SYMBOL_BASEPATHS
        )
        constants.CACHE_PATH = self.cache
        os.makedirs(self.cache, exist_ok=True)
        constants.OFFLINE = settings.offline
        # Dask workers are daemonic processes: they may not fork Volatility's pool.
        constants.PARALLELISM = constants.Parallelism.Off
        self.failures = framework.import_files(volatility3.plugins, True)
        self.plugins = framework.list_plugins()
        self.version = constants.PACKAGE_VERSION
        self._refresh_symbol_cache()
        self._caches: list[Any] | None = None
        self._modules_seen = 0
        # Everything loaded so far lives as long as the worker: keep it out of the
        # collector's full passes, which then only walk what tasks allocate.
        gc.collect()
        gc.freeze()

    def _refresh_symbol_cache(self) -> None:
        """Update the identifier cache once, under a lock: workers starting together on one
        host would otherwise rewrite the same SQLite file at the same moment."""
        from volatility3.framework import automagic, contexts

        context = contexts.Context()
        magic = [m for m in automagic.available(context) if type(m).__name__ == "SymbolCacheMagic"]
        with _file_lock(os.path.join(self.cache, "vx3-triage.lock")):
            for item in magic:
                item(context, item.config_path, None)

    def caches(self) -> list[Any]:
        """Volatility's memoizing caches (``functools.lru_cache`` on functions and methods).

        In a ``vol`` run they die with the process; in a long-lived worker a method cache
        keeps the ``self`` of every call alive, i.e. each task's symbol tables (a parsed
        ISF is ~70 MB): without clearing them a worker grows by ~165 MB per task and its
        garbage collections get slower with every task."""
        found: dict[int, Any] = {}
        for name, module in list(sys.modules.items()):
            if not name.startswith("volatility3.") or module is None:
                continue
            for value in list(vars(module).values()):
                members = vars(value).values() if isinstance(value, type) else [value]
                for member in members:
                    member = getattr(member, "__func__", member)  # classmethod/staticmethod
                    if callable(getattr(member, "cache_clear", None)):
                        found[id(member)] = member
        return list(found.values())

    def forget(self) -> None:
        """Clear the caches after a task (the next context starts from nothing anyway)."""
        if self._caches is None or len(sys.modules) != self._modules_seen:
            self._modules_seen = len(sys.modules)
            self._caches = self.caches()
        for cached in self._caches:
            with contextlib.suppress(Exception):
                cached.cache_clear()

    def automagics(self, context: Any, plugin: type) -> list[Any]:
        from volatility3.framework import automagic

        chosen = automagic.choose_automagic(automagic.available(context), plugin)
        # Refreshed once at start-up (see _refresh_symbol_cache).
        return [m for m in chosen if type(m).__name__ != "SymbolCacheMagic"]


def _xen_plugin_dir() -> str | None:
    """Our plugin folder when running from a checkout (an installed wheel puts it inside
    Volatility's own plugin directory, which Volatility searches anyway)."""
    try:
        from volatility3_xen.api import plugin_dir
    except Exception as error:  # a half-moved tree must not stop other plugins
        vollog.warning(f"cannot locate the xen plugin folder: {one_line(error)}")
        return None
    return plugin_dir()


def cache_dir(settings: Settings) -> str:
    """Volatility's cache directory for this run.

    Default: a triage-private folder per set of symbol directories, because Volatility's
    identifier cache forgets the symbols of directories a run does not list: a ``vol`` run
    elsewhere with other ``-s`` would make our banner look-ups miss mid-run.
    """
    if settings.cache_path:
        return os.path.abspath(settings.cache_path)
    from volatility3.framework import constants

    tag = hashlib.sha256("\0".join(os.path.abspath(p) for p in settings.symbol_dirs).encode())
    return os.path.join(constants.CACHE_PATH, f"vx3-triage-{tag.hexdigest()[:12]}")


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _engine(settings: Settings) -> _Engine:
    global _ENGINE
    if _ENGINE is None or _ENGINE.settings != settings:
        # A new setting set means new paths: import again (new plugins register themselves).
        _ENGINE = _Engine(settings)
    return _ENGINE


def _forget(settings: Settings) -> None:
    """Drop what the finished task left in Volatility's caches, so that a worker's memory
    stays flat from task to task.  No explicit ``gc.collect()``: a full collection of a
    worker's heap costs up to a second per task, and the next task's allocations trigger
    the collector soon enough for the context's reference cycles."""
    if _ENGINE is not None:
        _ENGINE.forget()


def resolve_plugins(names: list[str], settings: Settings) -> dict[str, str]:
    """Table name -> Volatility plugin key, resolving names the way ``vol`` does (an exact
    key, else the one key that contains the name).  Raises PluginNameError."""
    engine = _engine(settings)
    keys = sorted(engine.plugins)
    resolved: dict[str, str] = {}
    for name in names:
        if name in engine.plugins:
            key = name
        else:
            matches = [k for k in keys if k.startswith(name + ".")] or [
                k for k in keys if name in k
            ]
            if len(matches) != 1:
                hint = (
                    ", ".join(matches[:8]) if matches else "none (is its folder in --plugin-dirs?)"
                )
                raise PluginNameError(f"plugin {name!r} matches {len(matches)} plugins: {hint}")
            key = matches[0]
        resolved[table_name(key, keys)] = key
    return resolved


def table_name(key: str, keys: list[str]) -> str:
    """``linux.pslist.PsList`` -> ``linux.pslist`` when its module holds one plugin."""
    module = key.rsplit(".", 1)[0]
    if "." in key and sum(1 for k in keys if k.rsplit(".", 1)[0] == module) == 1:
        return module
    return key


class _Warnings(logging.Handler):
    """Collects what Volatility and our layers say at WARNING and above during a task, so
    that a failure row can say why (e.g. "Xen dump-core cannot be used: ...")."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            text = one_line(record.getMessage(), 300)
            if text not in self.messages and len(self.messages) < 20:
                self.messages.append(text)


@contextlib.contextmanager
def _task_scope() -> Iterator[_Warnings]:
    handler = _Warnings()
    loggers = [logging.getLogger("volatility3"), logging.getLogger("volatility3_xen")]
    with _RUN_LOCK:
        for logger in loggers:
            logger.addHandler(handler)
        try:
            yield handler
        finally:
            for logger in loggers:
                logger.removeHandler(handler)


_FAST_EXIT = False


def _worker_name() -> str:
    try:
        from distributed import get_worker

        address = str(get_worker().address)
    except Exception:  # not inside a Dask worker (tests, benchmarks)
        return f"{socket.gethostname()}:{os.getpid()}"
    _exit_fast_at_shutdown()
    return address


def _exit_fast_at_shutdown() -> None:
    """In a Dask worker process, skip the interpreter's teardown at exit.

    Freeing the symbol tables and caches of a Volatility run takes seconds, and a nanny
    closing the cluster waits for the process, then kills it: every run would end with a
    multi-second stall and a warning.  Nothing in a worker needs a clean teardown (results
    went back to the driver; Dask closed its comms before exiting), so the last thing the
    process does at exit is ``os._exit``, after flushing its output.
    """
    global _FAST_EXIT
    if _FAST_EXIT:
        return
    _FAST_EXIT = True

    def leave() -> None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(0)

    atexit.register(leave)


def _failure(job_image: str, plugin: str, error: BaseException, **kwargs: Any) -> Failure:
    return Failure(
        job_image, plugin, type(error).__name__, one_line(error) or repr(error), **kwargs
    )


def _with_log(message: str, warnings: list[str]) -> str:
    """A failure message plus what was logged, as one line."""
    extra = [w for w in warnings if w not in message]
    return one_line(message + (f" (log: {'; '.join(extra)})" if extra else ""))


# -- image identity and detection ------------------------------------------------------------


def identify_image(job: ImageJob, settings: Settings) -> ImageResult | Failure:
    """sha256 and size of the file; with ``job.detect``, the layers Volatility stacks on it."""
    timing = Timing(_worker_name(), time.time())
    try:
        stat = os.stat(job.path)
        if not os.path.isfile(job.path):
            raise IsADirectoryError(f"{job.path} is not a regular file")
        if stat.st_size == 0:
            raise EOFError(f"{job.path} is empty")
        known = job.known
        started = time.perf_counter()
        if known is not None and (known.size, known.mtime_ns) == (stat.st_size, stat.st_mtime_ns):
            digest = known.sha256  # unchanged since the run that hashed it
        else:
            digest = _sha256(job.path)
        hash_seconds = time.perf_counter() - started
    except (OSError, EOFError) as error:
        timing.finished = time.time()
        return _failure(job.image, "image", error, timing=timing)
    facts, warnings = None, []
    if job.detect:
        with _task_scope() as log:
            try:
                facts = _detect(job.path, settings)
            except Exception as error:
                timing.finished = time.time()
                return _failure(job.image, "image", error, warnings=log.messages, timing=timing)
            finally:
                _forget(settings)
            warnings = log.messages
        if not facts.stacked:
            timing.finished = time.time()
            return Failure(
                job.image,
                "image",
                "NotAMemoryImage",
                _with_log(_NOT_MEMORY, warnings),
                facts=facts,
                warnings=warnings,
                timing=timing,
            )
    timing.finished = time.time()
    return ImageResult(
        job.image,
        job.path,
        stat.st_size,
        stat.st_mtime_ns,
        digest,
        hash_seconds,
        facts,
        warnings,
        timing,
    )


_NOT_MEMORY = (
    "nothing usable stacks on this file: not a memory image Volatility reads, or a raw image whose "
    "kernel has no symbol table in --symbols"
)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(_HASH_BLOCK)  # one buffer for the whole file: no per-block allocation
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while True:
            count = handle.readinto(buffer)
            if not count:
                break
            digest.update(view[:count])
    return digest.hexdigest()


def known_image(result: ImageResult) -> KnownImage:
    return KnownImage(result.size, result.mtime_ns, result.sha256)


def _detect(path: str, settings: Settings) -> StackFacts:
    """Stack every layer Volatility can on the file (all stackers, in their order), as the
    LayerStacker automagic does for a plugin of no OS category."""
    from volatility3 import framework
    from volatility3.framework import contexts, interfaces
    from volatility3.framework.automagic import stacker
    from volatility3.framework.configuration import requirements
    from volatility3.framework.layers import physical

    _engine(settings)
    context = contexts.Context()
    context.config["base.location"] = requirements.URIRequirement.location_from_file(path)
    try:
        context.layers.add_layer(physical.FileLayer(context, "base", "base"))
        stack_set = sorted(
            framework.class_subclasses(interfaces.automagic.StackerLayerInterface),
            key=lambda item: item.stack_order,
        )
        top = stacker.LayerStacker.stack_layer(context, "base", stack_set)
        return _facts(context, top[0])
    finally:
        _destroy(context)


def _facts(context: Any, top: str | None) -> StackFacts:
    """Layer stack, OS and banner as the context shows them below ``top``."""
    facts = StackFacts()
    if top is None or top not in context.layers:
        return facts
    pending, seen = [top], set()
    while pending:
        name = pending.pop(0)
        if name in seen or name not in context.layers:
            continue
        seen.add(name)
        layer = context.layers[name]
        facts.layers.append(f"{name}:{type(layer).__name__}")
        facts.xen |= type(layer).__module__.startswith("volatility3_xen")
        os_name = layer.metadata.get("os", None)
        if facts.os is None and os_name and os_name != "Unknown":
            facts.os = str(os_name)
        for key, value in layer.config.items():
            if key.endswith("kernel_banner") and isinstance(value, str) and facts.kernel is None:
                facts.kernel = value.rstrip("\x00").strip()
        pending.extend(layer.dependencies)
    names = [entry.split(":", 1)[0] for entry in facts.layers[:-1]]  # all but the file
    facts.usable = facts.os is not None or any(_maps_something(context.layers[n]) for n in names)
    facts.xen = facts.xen and facts.usable
    return facts


def _maps_something(layer: Any) -> bool:
    """Whether a layer maps at least one byte: the first item of its mapping, if any (a
    format layer answers from its first run at once)."""
    try:
        span = layer.maximum_address - layer.minimum_address + 1
        for _ in layer.mapping(layer.minimum_address, span, ignore_errors=True):
            return True
    except Exception:  # a layer that cannot even say: nothing usable
        return False
    return False


def _top_layer(context: Any) -> str | None:
    """The layer nothing else in the context is built on (the kernel's, if any)."""
    names = list(context.layers)
    below = {dep for name in names for dep in context.layers[name].dependencies}
    tops = [name for name in names if name not in below]
    # Deepest stack wins: a process layer or a helper layer beside the kernel is shorter.
    return max(tops, key=lambda name: _depth(context, name), default=None)


def _depth(context: Any, name: str) -> int:
    deps = [d for d in context.layers[name].dependencies if d in context.layers]
    return 1 + max((_depth(context, d) for d in deps), default=0)


def _destroy(context: Any) -> None:
    """Close every file the context opened (a long-lived worker would leak handles)."""
    for name in list(context.layers):
        with contextlib.suppress(Exception):
            context.layers[name].destroy()


# -- plugin runs -----------------------------------------------------------------------------


_HANDLER: type | None = None


def _file_handler() -> type:
    """Files a plugin writes (dumps) are not part of a triage store: drop them (the same
    in-memory shape as vol's own handler, minus the write to disk)."""
    global _HANDLER
    if _HANDLER is None:
        from volatility3.framework import interfaces

        class DiscardFileHandler(io.BytesIO, interfaces.plugins.FileHandlerInterface):
            def __init__(self, filename: str) -> None:
                io.BytesIO.__init__(self)
                interfaces.plugins.FileHandlerInterface.__init__(self, filename)

            def close(self) -> None:
                io.BytesIO.close(self)

        _HANDLER = DiscardFileHandler
    return _HANDLER


def run_plugin(job: PluginJob, settings: Settings) -> PluginResult | Failure:
    """Run one plugin on one image in a fresh context; its rows or one Failure."""
    timing = Timing(_worker_name(), time.time())
    facts: StackFacts | None = None
    with _task_scope() as log:
        context = None
        try:
            from volatility3.framework import contexts, exceptions, plugins
            from volatility3.framework.automagic import stacker
            from volatility3.framework.configuration import requirements

            engine = _engine(settings)
            if not os.path.isfile(job.path):
                raise FileNotFoundError(f"{job.path} is not a readable file")
            plugin = engine.plugins[job.plugin_key]
            context = contexts.Context()
            context.config["automagic.LayerStacker.single_location"] = (
                requirements.URIRequirement.location_from_file(job.path)
            )
            automagics = engine.automagics(context, plugin)
            context.config["automagic.LayerStacker.stackers"] = stacker.choose_os_stackers(plugin)
            try:
                constructed = plugins.construct_plugin(
                    context, automagics, plugin, "plugins", None, _file_handler()
                )
            except exceptions.UnsatisfiedException as error:
                facts = _facts(context, _top_layer(context))
                wanted = ", ".join(sorted(error.unsatisfied)) or "unknown"
                timing.finished = time.time()
                return Failure(
                    job.image,
                    job.plugin,
                    "UnsatisfiedException",
                    _with_log(f"unsatisfied requirements: {wanted}", log.messages),
                    facts=facts,
                    warnings=log.messages,
                    timing=timing,
                )
            grid = constructed.run()
            columns = [(column.name, table.kind_of(column.type)) for column in grid.columns]
            rows: list[tuple] = []
            depths: list[int] = []

            def visit(node: Any, accumulator: None) -> None:
                depths.append(max(0, node.path_depth - 1))
                rows.append(tuple(table.plain(v, k) for v, (_, k) in zip(node.values, columns)))

            grid.populate(visit, None)
            facts = _facts(context, _top_layer(context))
            # ConstructionMagic rebuilds the stacked layers from their configuration, which
            # does not carry the stacker's "os" metadata: a plugin of an OS category that
            # ran is evidence enough.
            facts.os = facts.os or plugin_os(job.plugin)
            timing.finished = time.time()
            return PluginResult(
                job.image, job.plugin, columns, rows, depths, facts, log.messages, timing
            )
        except Exception as error:
            if context is not None and facts is None:
                with contextlib.suppress(Exception):
                    facts = _facts(context, _top_layer(context))
            timing.finished = time.time()
            failure = _failure(job.image, job.plugin, error, facts=facts, timing=timing)
            failure.warnings = log.messages
            failure.message = _with_log(failure.message, log.messages)
            return failure
        finally:
            if context is not None:
                _destroy(context)
            del context
            _forget(settings)


def volatility_version(settings: Settings) -> str:
    return str(_engine(settings).version)


def warm_up(settings: Settings) -> str:
    """Load Volatility in this process now (Dask ``client.run`` on every worker), so the
    first task of each worker does not pay for it; returns the worker's name."""
    _engine(settings)
    return _worker_name()
