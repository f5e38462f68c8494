"""The measurements: each figure is taken beside its baseline in the same run.

In-process: our layer's construction and reads, against raw ``FileLayer`` reads.
Subprocesses: Volatility's built-in ``XenCoreDumpLayer`` (so a slow open can be cut off by a
timeout), libkdumpfile (Debian's module lives in the system python only), peak memory (a fresh
process gives a clean RSS high-water mark), ``vol linux.pslist`` runs and ``vol xen.info`` /
``xen.vcpus`` runs beside vol's start-up.

Run as a script, this module is the fresh-process worker:
``python bench_measure.py memory|open CORE`` or ``fragmented CORE PFNS LIMIT``.
"""

from __future__ import annotations

import contextlib
import gc
import json
import shutil
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from volatility3.framework import contexts  # noqa: E402
from volatility3.framework.layers import physical  # noqa: E402

from volatility3_xen.layers import memory as xen_layer  # noqa: E402

PAGE = 4096
MIB = 1 << 20
SYSTEM_PYTHON = "/usr/bin/python3"

Result = dict[str, Any]


# -- our layer, in process ---------------------------------------------------------------------


def clear_layer_caches() -> None:
    """Forget page maps, reported warnings and cached reads: the next open is cold."""
    xen_layer._PAGE_MAP_CACHE.clear()
    xen_layer._REPORTED.clear()
    xen_layer._RunMappedLayer._cached_read.cache_clear()


def file_layer(path: Path) -> tuple[contexts.Context, physical.FileLayer]:
    """A fresh context holding a ``FileLayer`` on ``path`` (as vol builds it)."""
    context = contexts.Context()
    context.config["bench_file.location"] = path.resolve().as_uri()
    base = physical.FileLayer(context, "bench_file", "bench_file")
    context.add_layer(base)
    return context, base


def construct(path: Path) -> tuple[float, xen_layer.XenDumpCoreLayer, physical.FileLayer]:
    """Seconds to construct ``XenDumpCoreLayer`` on a ``FileLayer`` in a fresh context."""
    context, base = file_layer(path)
    context.config["bench_xen.base_layer"] = base.name
    start = time.perf_counter()
    layer = xen_layer.XenDumpCoreLayer(context, "bench_xen", "bench_xen")
    return time.perf_counter() - start, layer, base


def open_ours(path: Path, reps: int, probe: int, expected: bytes) -> Result:
    """Median cold construction (page-map cache cleared), median second construction (what
    vol's second build costs) and the first 4 KiB read after a cold open."""
    cold, second, first_read = [], [], []
    for _ in range(reps):
        clear_layer_caches()
        gc.collect()
        seconds, layer, _ = construct(path)
        start = time.perf_counter()
        data = layer.read(probe, PAGE)
        first_read.append(time.perf_counter() - start)
        if data != expected:
            raise AssertionError(f"{path}: wrong bytes at {probe:#x}")
        cold.append(seconds)
        del layer
    for _ in range(reps):
        seconds, layer, _ = construct(path)
        second.append(seconds)
        del layer
    return {
        "cold_s": statistics.median(cold),
        "cold_all_s": cold,
        "second_s": statistics.median(second),
        "first_read_s": statistics.median(first_read),
    }


def check_pages(layer: xen_layer.XenDumpCoreLayer, pages: dict[int, bytes]) -> None:
    """A benchmark that reads wrong bytes measures nothing: check before timing."""
    for address, expected in pages.items():
        if layer.read(address, len(expected)) != expected:
            raise AssertionError(f"{layer.name}: wrong bytes at {address:#x}")


def _best_of(rounds: int, *runs: Callable[[], float]) -> list[float]:
    """Run each timing function once to warm up, then ``rounds`` times interleaved; the best
    time of each (least disturbed by the other tenants of this machine)."""
    for run in runs:
        run()
    best = [float("inf")] * len(runs)
    for _ in range(rounds):
        for i, run in enumerate(runs):
            best[i] = min(best[i], run())
    return best


def sequential(
    layer: xen_layer.XenDumpCoreLayer,
    base: physical.FileLayer,
    address: int,
    file_offset: int,
    length: int,
    rounds: int,
    chunk: int = MIB,
) -> Result:
    """1 MiB reads over ``[address, address+length)`` through the layer, and over the same
    number of bytes of the file from ``file_offset`` through the ``FileLayer``."""
    count = length // chunk
    layer_read, file_read = layer.read, base.read

    def through_layer() -> float:
        xen_layer._RunMappedLayer._cached_read.cache_clear()
        start = time.perf_counter()
        for k in range(count):
            layer_read(address + k * chunk, chunk, True)
        return time.perf_counter() - start

    def through_file() -> float:
        start = time.perf_counter()
        for k in range(count):
            file_read(file_offset + k * chunk, chunk, True)
        return time.perf_counter() - start

    layer_s, raw_s = _best_of(rounds, through_layer, through_file)
    return _throughput(count * chunk, layer_s, raw_s)


def random_pages(
    layer: xen_layer.XenDumpCoreLayer,
    base: physical.FileLayer,
    pfns: np.ndarray,
    rounds: int,
) -> Result:
    """4 KiB reads of distinct pages (so the read cache never hits), in random order, through
    the layer and straight from the file at the pages' offsets."""
    core, page_map = layer.core, layer.page_map
    addresses = [int(pfn) << core.page_shift for pfn in pfns]
    offsets = [core.page_offset(page_map.page_index(int(pfn))) for pfn in pfns]
    for address, offset in zip(addresses[:64], offsets[:64]):
        if layer.read(address, PAGE) != base.read(offset, PAGE):
            raise AssertionError(f"{layer.name}: page {address:#x} differs from the file")
    layer_read, file_read = layer.read, base.read

    def through_layer() -> float:
        xen_layer._RunMappedLayer._cached_read.cache_clear()
        start = time.perf_counter()
        for address in addresses:
            layer_read(address, PAGE)
        return time.perf_counter() - start

    def through_file() -> float:
        start = time.perf_counter()
        for offset in offsets:
            file_read(offset, PAGE)
        return time.perf_counter() - start

    layer_s, raw_s = _best_of(rounds, through_layer, through_file)
    result = _throughput(len(addresses) * PAGE, layer_s, raw_s)
    result["reads"] = len(addresses)
    result["layer_us_per_read"] = layer_s / len(addresses) * 1e6
    result["raw_us_per_read"] = raw_s / len(addresses) * 1e6
    return result


def _throughput(nbytes: int, layer_s: float, raw_s: float) -> Result:
    return {
        "bytes": nbytes,
        "layer_s": layer_s,
        "raw_s": raw_s,
        "layer_mib_s": nbytes / MIB / layer_s,
        "raw_mib_s": nbytes / MIB / raw_s,
        "ratio": raw_s / layer_s,  # layer speed as a fraction of raw speed
    }


def mapped_pfns(layer: xen_layer.XenDumpCoreLayer) -> np.ndarray:
    runs = layer.page_map.pfn_runs
    return np.concatenate(
        [np.arange(k, k + c, dtype=np.uint64) for k, c in zip(runs.key, runs.count)]
    )


# -- other readers, in subprocesses --------------------------------------------------------------

_BUILTIN_WORKER = """
import json, sys, time
from volatility3.framework import contexts
from volatility3.framework.layers import physical, xen
context = contexts.Context()
context.config["base.location"] = sys.argv[1]
context.add_layer(physical.FileLayer(context, "base", "base"))
context.config["xen.base_layer"] = "base"
start = time.perf_counter()
try:
    xen.XenCoreDumpLayer(context, "xen", "xen")
    print(json.dumps({"seconds": time.perf_counter() - start}))
except Exception as exc:
    print(json.dumps({"error": f"{type(exc).__name__}: {exc}"[:200]}))
"""


def open_builtin(path: Path, timeout: float) -> Result:
    """Construction time of Volatility's ``XenCoreDumpLayer`` (measured in the subprocess)."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", _BUILTIN_WORKER, path.resolve().as_uri()],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    return _last_json(done)


_KDUMP_WORKER = """
import json, sys, time, kdumpfile
path, address, reps, expected = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
times = []
for _ in range(reps):
    start = time.perf_counter()
    dump = kdumpfile.kdumpfile(path)
    data = bytes(dump.read(kdumpfile.KDUMP_KPHYSADDR, address, 4096))
    times.append(time.perf_counter() - start)
    del dump
times.sort()
print(json.dumps({"seconds": times[len(times) // 2], "all_s": times,
                  "correct": data[:16].hex() == expected}))
"""


def open_kdumpfile(path: Path, address: int, expected: bytes, reps: int) -> Result:
    """libkdumpfile open + first 4 KiB read, median of ``reps`` (timed in the subprocess)."""
    if not Path(SYSTEM_PYTHON).exists():
        return {"error": f"{SYSTEM_PYTHON} missing"}
    done = subprocess.run(
        [SYSTEM_PYTHON, "-c", _KDUMP_WORKER, str(path), str(address), str(reps), expected.hex()],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    return _last_json(done)


def _in_fresh_process(mode: str, path: Path, *extra: str) -> Result:
    """Run this module's ``mode`` worker on ``path`` in a new interpreter."""
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), mode, str(path), *extra],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    return _last_json(done)


def memory(path: Path) -> Result:
    """Peak memory of a cold open, measured in a fresh process (see ``_memory_worker``)."""
    return _in_fresh_process("memory", path)


def open_fresh_process(path: Path, reps: int) -> Result:
    """Cold construction in ``reps`` new interpreters (as each ``vol`` run pays it: first
    touch of every page of the table buffers), median."""
    times = []
    for _ in range(reps):
        result = _in_fresh_process("open", path)
        if "error" in result:
            return result
        times.append(result["seconds"])
    return {"seconds": statistics.median(times), "all_s": times}


def _last_json(done: subprocess.CompletedProcess) -> Result:
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {done.returncode}: {tail[:200]}"}
    return json.loads(lines[-1])


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: ``5`` into clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        return False
    return _status_kib("VmHWM") <= _status_kib("VmRSS") + 1024


def _memory_worker(path: Path) -> Result:
    clear_layer_caches()
    gc.collect()
    rss_before = _status_kib("VmRSS")
    reset = _reset_peak_rss()
    _, layer, _ = construct(path)
    peak_kib, rss_after = _status_kib("VmHWM"), _status_kib("VmRSS")
    page_map = layer.page_map
    result: Result = {
        "table_bytes": layer.core.table.size,
        "maps_bytes": page_map.nbytes(),
        "layer_run_bytes": sum(len(a) * a.itemsize for a in _layer_runs(layer)),
        "pfn_runs": len(page_map.pfn_runs),
        "peak_rss_delta_bytes": (peak_kib - rss_before) * 1024 if reset else None,
        "held_rss_bytes": (rss_after - rss_before) * 1024,
    }
    if layer.is_pv:
        result["m2p_runs"] = len(page_map.m2p_runs)
        result["maps_after_m2p_bytes"] = page_map.nbytes()
    del layer, page_map
    clear_layer_caches()
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    _, layer, _ = construct(path)
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    result["tracemalloc_peak_bytes"] = peak - before
    result["tracemalloc_held_bytes"] = current - before
    return result


def fragmented(path: Path, markers: tuple[int, ...], address_limit: int = 0) -> Result:
    """Page map and layer costs on an unsorted or fragmented table, in a fresh process
    (``_fragmented_worker``), under ``RLIMIT_AS = address_limit`` bytes when non-zero."""
    return _in_fresh_process("fragmented", path, ",".join(map(str, markers)), str(address_limit))


@contextlib.contextmanager
def _timed(result: Result, name: str):
    """``result[name + '_s']`` (wall) and ``[name + '_cpu_s']`` (this process's user +
    system time, page faults included: what a loaded machine does not inflate)."""
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    result[f"{name}_s"] = time.perf_counter() - wall
    result[f"{name}_cpu_s"] = time.process_time() - cpu


def _fragmented_worker(path: Path, markers: list[int], address_limit: int) -> Result:
    """1. The page map alone (``formats``: ``XenDumpCore.page_map``, and for PV
    ``m2p_runs``): seconds and tracemalloc peak (numpy's allocations included).
    2. The whole open as vol does it (``XenDumpCoreLayer``, and for PV the
    ``XenMachineLayer`` that builds the machine-to-pfn runs): seconds and peak RSS delta.
    Every marker page is read back through the layers before anything is reported."""
    import resource

    from bench_cores import PAGE as BENCH_PAGE
    from bench_cores import marker_page

    from volatility3_xen.formats.dumpcore import XenDumpCore

    if address_limit:
        resource.setrlimit(resource.RLIMIT_AS, (address_limit, address_limit))
    result: Result = {"address_limit": address_limit}
    core = XenDumpCore.open(path)
    tracemalloc.start()
    with _timed(result, "pagemap"):
        page_map = core.page_map
    if core.is_pv:
        with _timed(result, "m2p"):
            m2p = page_map.m2p_runs
        result["m2p_runs"] = len(m2p)
    result["pagemap_tracemalloc_peak_bytes"] = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    result["table_bytes"] = core.table.size
    result["maps_bytes"] = page_map.nbytes()
    result["pfn_runs"] = len(page_map.pfn_runs)
    result["warnings"] = list(page_map.warnings)
    del core, page_map
    clear_layer_caches()
    gc.collect()
    rss_before = _status_kib("VmRSS")
    reset = _reset_peak_rss()
    with _timed(result, "open"):
        _, layer, _ = construct(path)
    for pfn in markers:
        if layer.read(pfn * BENCH_PAGE, BENCH_PAGE) != marker_page(pfn):
            raise AssertionError(f"{path}: wrong bytes at pfn {pfn:#x}")
    if layer.is_pv:
        layer.context.add_layer(layer)
        with _timed(result, "machine_layer"):
            machine = layer.context.layers[xen_layer.add_machine_layer(layer.context, layer.name)]
        for pfn in markers:
            mfn = layer.pfn_to_mfn(pfn)
            if mfn is None or machine.read(mfn * BENCH_PAGE, BENCH_PAGE) != marker_page(pfn):
                raise AssertionError(f"{path}: machine frame of pfn {pfn:#x} reads wrong")
    result["layer_peak_rss_delta_bytes"] = (
        (_status_kib("VmHWM") - rss_before) * 1024 if reset else None
    )
    result["vm_peak_bytes"] = _status_kib("VmPeak") * 1024
    result["checked_pages"] = len(markers)
    return result


def vol_info_limited(core: Path, cache_path: Path, address_limit: int) -> Result:
    """Wall time of one ``vol xen.info`` process under ``RLIMIT_AS = address_limit``
    (vol's start-up included), and whether it printed its table."""
    import resource

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (address_limit, address_limit))

    cache_path.mkdir(parents=True, exist_ok=True)
    command = _vol_command() + ["-q", "-p", str(REPO / "plugins"), "--cache-path"]
    command += [str(cache_path), "-f", str(core), "xen.info"]
    start = time.perf_counter()
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=600, preexec_fn=limit, check=False
    )
    seconds = time.perf_counter() - start
    error = _companion_error("xen.info", done)
    return {"error": error} if error else {"seconds": seconds, "address_limit": address_limit}


def _layer_runs(layer: xen_layer.XenDumpCoreLayer) -> list:
    return [layer._run_addr, layer._run_target, layer._run_size]


def pslist(core: Path, raw: Path, symbols: Path, rounds: int, cache_path: Path) -> Result:
    """Wall time of ``vol linux.pslist`` on the core and on the raw image, alternating;
    medians, and whether both printed the same table.  A private ``--cache-path``: the
    shared identifier cache is rewritten by vol runs with other symbol directories."""
    times: dict[str, list[float]] = {"core": [], "raw": []}
    outputs: dict[str, str] = {}
    cache_path.mkdir(parents=True, exist_ok=True)
    for _ in range(rounds):
        for name, target in (("core", core), ("raw", raw)):
            command = _vol_command() + ["-q", "-p", str(REPO / "plugins"), "-s", str(symbols)]
            command += ["--cache-path", str(cache_path)]
            command += ["-f", str(target), "linux.pslist"]
            seconds, done = _timed_vol(command)
            times[name].append(seconds)
            if done.returncode != 0:
                tail = (done.stderr.strip().splitlines() or [""])[-1][:160]
                return {"error": f"vol on {target.name} exited {done.returncode}: {tail}"}
            outputs[name] = "\n".join(
                line for line in done.stdout.splitlines() if line and "Volatility 3" not in line
            )
    core_s, raw_s = statistics.median(times["core"]), statistics.median(times["raw"])
    return {
        "core_s": core_s,
        "raw_s": raw_s,
        "core_all_s": times["core"],
        "raw_all_s": times["raw"],
        "ratio": core_s / raw_s,
        "same_output": outputs["core"] == outputs["raw"],
        "processes": outputs["core"].count("\n"),
    }


# What a successful run of each companion plugin prints: its column header.
COMPANION_HEADERS = {"xen.info": "Group\tField\tValue", "xen.vcpus": "FileSlot\tOnline"}
# vol's start-up baseline: full start-up (argument parsing, every plugin imported, ``-p plugins``
# included) but no file, no layer stacking and no automagic; it only prints lists it holds.
STARTUP_PLUGIN = "frameworkinfo"
STARTUP_LABEL = "vol start-up"


def companion_plugins(cores: dict[str, Path], cache_path: Path, rounds: int) -> Result:
    """Wall time of ``vol xen.info`` and ``vol xen.vcpus`` on each core in ``cores`` (label ->
    path) and of ``vol frameworkinfo`` (start-up baseline): one untimed round (fills the
    private ``--cache-path``), then ``rounds`` interleaved rounds of fresh processes; medians,
    and each plugin's median minus the baseline's."""
    cache_path.mkdir(parents=True, exist_ok=True)
    common = _vol_command() + ["-q", "-p", str(REPO / "plugins"), "--cache-path", str(cache_path)]
    commands = {STARTUP_LABEL: common + [STARTUP_PLUGIN]}
    for label, core in cores.items():
        for plugin in COMPANION_HEADERS:
            commands[f"{plugin}, {label}"] = common + ["-f", str(core), plugin]
    times: dict[str, list[float]] = {name: [] for name in commands}
    for round_ in range(rounds + 1):
        for name, command in commands.items():
            seconds, done = _timed_vol(command)
            error = _companion_error(command[-1], done)
            if error:
                return {"error": f"{name}: {error}"}
            if round_:
                times[name].append(seconds)
    startup_all_s = times.pop(STARTUP_LABEL)
    baseline = statistics.median(startup_all_s)
    return {
        "startup_plugin": STARTUP_PLUGIN,
        "startup_s": baseline,
        "startup_all_s": startup_all_s,
        "runs": [
            {
                "label": name,
                "seconds": statistics.median(all_s),
                "all_s": all_s,
                "beyond_startup_s": statistics.median(all_s) - baseline,
            }
            for name, all_s in times.items()
        ],
    }


def _timed_vol(command: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    """Wall time of one ``vol`` process, with one retry (plugins/ is shared with live work)."""
    for _attempt in range(2):
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        seconds = time.perf_counter() - start
        if done.returncode == 0:
            break
    return seconds, done


def _companion_error(plugin: str, done: subprocess.CompletedProcess) -> str | None:
    """Why a run measured nothing: a failed exit, or output without the plugin's table."""
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or [""])[-1][:160]
        return f"exited {done.returncode}: {tail}"
    header = COMPANION_HEADERS.get(plugin)
    if header is None:
        return None
    if header not in done.stdout:
        return f"printed no {plugin} table"
    rows = done.stdout.split(header, 1)[1].splitlines()[1:]
    if not any(row.strip() for row in rows):
        return f"printed an empty {plugin} table"
    return None


def _vol_command() -> list[str]:
    script = Path(sys.executable).with_name("vol")
    if script.exists():
        return [str(script)]
    found = shutil.which("vol")
    return [found] if found else [sys.executable, "-m", "volatility3.cli"]


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "memory":
        print(json.dumps(_memory_worker(Path(sys.argv[2]))))
    elif len(sys.argv) == 3 and sys.argv[1] == "open":
        print(json.dumps({"seconds": construct(Path(sys.argv[2]))[0]}))
    elif len(sys.argv) == 5 and sys.argv[1] == "fragmented":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        marker_pfns = [int(pfn) for pfn in sys.argv[3].split(",") if pfn]
        try:
            found = _fragmented_worker(Path(sys.argv[2]), marker_pfns, int(sys.argv[4]))
        except MemoryError:
            found = {"error": f"MemoryError under RLIMIT_AS={sys.argv[4]}"}
        print(json.dumps(found))
    else:
        sys.exit("usage: bench_measure.py memory|open CORE | fragmented CORE PFNS LIMIT")
