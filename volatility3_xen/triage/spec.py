"""What the driver and the workers hand each other: plain, picklable records.

Nothing here imports Volatility, Dask or pyarrow, so a Dask worker unpickles these without
loading anything it does not need, and the driver plans a run before any engine starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: The pseudo-plugin name under which an image's own task (identity, detection) is
#: recorded in the ``tasks`` and ``errors`` tables.
IMAGE_TASK = "image"

#: Plugins run when ``--plugins`` is not given, by the OS the image's stack reports.
DEFAULT_PLUGINS: dict[str, tuple[str, ...]] = {
    "Linux": ("linux.pslist", "linux.lsmod", "linux.sockstat"),
    "Windows": ("windows.info", "windows.pslist", "windows.modules", "windows.netscan"),
    "Mac": ("mac.pslist", "mac.lsmod", "mac.netstat"),
}
#: Added for every image whose stack holds one of our Xen layers.
XEN_PLUGINS: tuple[str, ...] = ("xen.info", "xen.vcpus")

#: Plugin-name prefix -> the OS its plugins need (Volatility's own categories).
OS_CATEGORIES = {"linux": "Linux", "windows": "Windows", "mac": "Mac"}

#: What the summary counts, per OS: (processes, modules, sockets) tables.
COUNT_TABLES: dict[str, tuple[str, str, str]] = {
    "Linux": ("linux.pslist", "linux.lsmod", "linux.sockstat"),
    "Windows": ("windows.pslist", "windows.modules", "windows.netscan"),
    "Mac": ("mac.pslist", "mac.lsmod", "mac.netstat"),
}


@dataclass(frozen=True)
class Settings:
    """Volatility's process-wide options, the same for every task of a run."""

    symbol_dirs: tuple[str, ...] = ()
    plugin_dirs: tuple[str, ...] = ()
    cache_path: str | None = None  # None: a triage-private cache (see worker.cache_dir)
    offline: bool = False


@dataclass(frozen=True)
class KnownImage:
    """An image's identity from an earlier run, reused when its size and mtime match."""

    size: int
    mtime_ns: int
    sha256: str


@dataclass(frozen=True)
class ImageJob:
    image: str  # as given on the command line (the key everywhere in the store)
    path: str  # absolute, as the workers open it
    detect: bool  # also stack layers to learn the OS (needed to pick default plugins)
    known: KnownImage | None = None


@dataclass(frozen=True)
class PluginJob:
    image: str
    path: str
    plugin: str  # the table name (e.g. linux.pslist)
    plugin_key: str  # Volatility's plugin-list key (e.g. linux.pslist.PsList)


@dataclass
class StackFacts:
    """What a task's context shows about the image: its layer stack, top first."""

    layers: list[str] = field(default_factory=list)  # "name:Class" top to bottom
    os: str | None = None
    kernel: str | None = None  # the Linux banner Volatility matched
    xen: bool = False  # one of volatility3-xen's layers is in the stack
    usable: bool = False  # an OS layer, or a stacked layer that maps at least one byte

    @property
    def stacked(self) -> bool:
        """Something Volatility can read stands on the file.  A layer that maps nothing
        (e.g. one put on a damaged Xen core only to stop other stackers misreading it)
        does not count."""
        return self.usable


@dataclass
class Timing:
    worker: str = ""
    started: float = 0.0  # epoch seconds, on the worker
    finished: float = 0.0

    @property
    def seconds(self) -> float:
        return max(0.0, self.finished - self.started)


@dataclass
class ImageResult:
    image: str
    path: str
    size: int
    mtime_ns: int
    sha256: str
    hash_seconds: float
    facts: StackFacts | None  # None when detection was not asked for
    warnings: list[str]
    timing: Timing


@dataclass
class PluginResult:
    image: str
    plugin: str
    columns: list[tuple[str, str]]  # (name, kind): kinds in table.ARROW_TYPES
    rows: list[tuple]  # plain Python values, one per column
    depths: list[int]  # tree depth of each row (0: top level)
    facts: StackFacts
    warnings: list[str]
    timing: Timing


@dataclass
class Failure:
    """A task that did not produce its rows: becomes one row of the errors table."""

    image: str
    plugin: str
    error_class: str
    message: str  # one line
    facts: StackFacts | None = None
    warnings: list[str] = field(default_factory=list)
    timing: Timing = field(default_factory=Timing)


def plugin_os(plugin: str) -> str | None:
    """The OS a plugin needs, from its category (``linux.pslist`` -> Linux), else None."""
    return OS_CATEGORIES.get(plugin.split(".", 1)[0].lower())


def is_xen_plugin(plugin: str) -> bool:
    return plugin.split(".", 1)[0].lower() == "xen"


def plugins_for(facts: StackFacts, explicit: tuple[str, ...] | None) -> tuple[list[str], list[str]]:
    """(to run, skipped) for an image with these facts.

    Default set: the OS's plugins plus the Xen ones for Xen images.  An explicit list is
    filtered the same way: a Windows plugin is not run on a Linux image, nor ``xen.*`` on
    a raw one, so a mixed fleet takes one plugin list without an error per mismatch.
    """
    if explicit is None:
        wanted = list(DEFAULT_PLUGINS.get(facts.os or "", ()))
        if facts.xen:
            wanted += XEN_PLUGINS
        return wanted, []
    run, skipped = [], []
    for plugin in explicit:
        needs = plugin_os(plugin)
        if (needs is not None and needs != facts.os) or (is_xen_plugin(plugin) and not facts.xen):
            skipped.append(plugin)
        else:
            run.append(plugin)
    return run, skipped


def one_line(text: object, limit: int = 400) -> str:
    """A message fit for one cell: whitespace collapsed, control characters escaped."""
    flat = " ".join(str(text).split())
    flat = "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in flat)
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
