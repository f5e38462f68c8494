"""In-guest PV images: cost of recovering the machine-frame map, and of looking.

``python benchmarks/bench_inguest.py [--reps N] [--vol]`` on the real PV guest (a raw and a
LiME image derived from ``realxen-pv1.core``, 128 MiB) measures:

- map recovery through the layer's own reader (``FileLayer`` / ``LimeLayer``), median of N,
  and per GiB of guest memory (target <= 1 s/GiB);
- the failure path (anchor page zeroed: every candidate range is searched);
- peak memory allocated during recovery (``tracemalloc``: numpy and Python objects)
  against the recovered map's own size (target <= 2x);
- what the in-guest stacker adds on a non-PV raw image (the bundled guest): the banner
  scan up to the first hit plus the kernel-parameter lookup, warm (parameters cached per
  ISF) and the one-time ISF read;
- with ``--vol``: ``vol linux.pslist`` wall time on the raw image vs the dump-core.

Writes ``benchmarks/last-inguest-run.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import volatility3.plugins  # noqa: E402
import volatility3.symbols  # noqa: E402
from volatility3 import framework  # noqa: E402
from volatility3.framework import constants, contexts  # noqa: E402
from volatility3.framework.layers import lime, physical  # noqa: E402

from volatility3_xen.formats.inguest import InGuestPVImage, present_runs  # noqa: E402
from volatility3_xen.formats.p2mrecovery import recover_machine_frames  # noqa: E402
from volatility3_xen.layers import inguest  # noqa: E402
from volatility3_xen.layers.memory import _base_reader  # noqa: E402
from volatility3_xen.testdata import inguest as inguest_data  # noqa: E402
from volatility3_xen.testdata import samples  # noqa: E402

CACHE = REPO / ".cache"
VOL_CACHE = CACHE / "volatility3-cache-bench-inguest"
GIB = 1 << 30
PAGE = 4096


def _quiet(_message: str) -> None:
    pass


def images() -> dict[str, Path]:
    core = samples.ensure_realxen("core", cache=CACHE / "samples", status=_quiet)
    paths = {"core": core}
    for kind in ("raw", "lime"):
        target = core.with_name(f"{core.stem}.inguest.{kind}")
        if not target.exists():
            partial = target.with_suffix(".part")
            (inguest_data.write_lime if kind == "lime" else inguest_data.write_raw)(core, partial)
            partial.replace(target)
        paths[kind] = target
    paths["no-anchor"] = CACHE / "realxen-pv1.inguest.no-anchor.raw"
    return paths


def symbols_dir() -> Path:
    shared = REPO.parent / "shared" / "guests" / "symbols"
    return shared if shared.exists() else REPO / "samples" / "symbols"


def base_layer(path: Path, kind: str) -> tuple[contexts.Context, str]:
    context = contexts.Context()
    context.config["file.location"] = path.resolve().as_uri()
    context.layers.add_layer(physical.FileLayer(context, "file", "file"))
    if kind != "lime":
        return context, "file"
    context.config["lime.base_layer"] = "file"
    context.layers.add_layer(lime.LimeLayer(context, "lime", "lime"))
    return context, "lime"


def layout_of(parameters: dict) -> inguest.KernelLayout:
    return inguest.kernel_layout(parameters, b"Linux version 6.1")


def time_recovery(path: Path, kind: str, layout, reps: int) -> dict:
    times, cpu, result = [], [], None
    for _ in range(reps):
        context, name = base_layer(path, kind)
        read, size = _base_reader(context.layers[name])
        start, start_cpu = time.perf_counter(), time.process_time()
        try:
            result = recover_machine_frames(read, size, layout)
        except Exception as exc:  # noqa: BLE001 - the failure path is timed too
            result = exc
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    seconds, cpu_seconds = statistics.median(times), statistics.median(cpu)
    guest = size / GIB
    out = {
        "seconds": seconds,
        "all_s": times,
        "cpu_s": cpu_seconds,
        "guest_gib": guest,
        "s_per_gib": seconds / guest,
        "cpu_s_per_gib": cpu_seconds / guest,
    }
    if isinstance(result, Exception):
        out["error"] = str(result)
    else:
        out["mapped"] = result.mapped
        out["ranges_tested"] = result.ranges_tested
    return out


def memory(path: Path, layout) -> dict:
    context, name = base_layer(path, "raw")
    read, size = _base_reader(context.layers[name])
    tracemalloc.start()
    result = recover_machine_frames(read, size, layout)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    image = InGuestPVImage("bench", present_runs([(0, size)]), result, layout)
    frames = image.machine_frames
    frames.m2p_runs  # noqa: B018 - built on first use: part of the map's size
    final = frames.nbytes() + result.pfns.nbytes + result.mfns.nbytes
    return {"peak_bytes": peak, "map_bytes": final, "ratio": peak / final}


def non_pv_stacker(raw: Path, reps: int) -> dict:
    """The in-guest stacker on the bundled non-PV guest: it must decline; how long."""
    context, name = base_layer(raw, "raw")
    found = inguest.find_banner(context, name)
    if found is None:
        return {"error": "no Linux banner found (symbol cache empty?)"}
    inguest._KERNELS.clear()
    start = time.perf_counter()
    inguest._read_isf(found[1])
    isf_read = time.perf_counter() - start
    inguest.kernel_parameters(found[1])  # the disk cache now holds it
    times = []
    for _ in range(reps):
        inguest._KERNELS.clear()  # warm disk cache, cold process: as a new vol run
        context, name = base_layer(raw, "raw")
        start = time.perf_counter()
        stacked = inguest.XenInGuestPVStacker.stack(context, name)
        times.append(time.perf_counter() - start)
        assert stacked is None and list(context.symbol_space) == []
    return {"seconds": statistics.median(times), "all_s": times, "isf_first_read_s": isf_read}


def vol_pslist(path: Path, symbols: Path) -> float:
    command = [shutil.which("vol") or "vol", "-q", "--cache-path", str(VOL_CACHE)]
    command += ["-p", str(REPO / "plugins"), "-s", str(symbols), "-f", str(path), "linux.pslist"]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0 or "realxen_server" not in done.stdout:
        raise RuntimeError(done.stderr[-2000:])
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--vol", action="store_true", help="also time vol linux.pslist")
    args = parser.parse_args()
    paths = images()
    symbols = symbols_dir()
    VOL_CACHE.mkdir(parents=True, exist_ok=True)
    constants.CACHE_PATH = str(VOL_CACHE)
    volatility3.symbols.__path__ = [str(symbols), *volatility3.symbols.__path__]
    framework.import_files(volatility3.plugins, True)
    isf = symbols / "linux" / "debian-cloud-6.1.0-47.json.xz"
    layout = layout_of(inguest._read_isf(isf.resolve().as_uri()))
    if not paths["no-anchor"].exists():
        context, name = base_layer(paths["raw"], "raw")
        read, size = _base_reader(context.layers[name])
        anchor = recover_machine_frames(read, size, layout).anchors[0][0]
        shutil.copyfile(paths["raw"], paths["no-anchor"])
        with open(paths["no-anchor"], "r+b") as handle:
            handle.seek(anchor * PAGE)
            handle.write(bytes(PAGE))
    # The identifier cache the banner lookup uses: one vol run fills it.
    subprocess.run(
        [shutil.which("vol") or "vol", "-q", "--cache-path", str(VOL_CACHE), "-s", str(symbols)]
        + ["-f", str(paths["raw"]), "banners.Banners"],
        capture_output=True,
        check=False,
    )
    raw_guest = samples.ensure_raw_image(samples.load_facts(samples.bundled_sample_dir()))
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "recovery_raw": time_recovery(paths["raw"], "raw", layout, args.reps),
        "recovery_lime": time_recovery(paths["lime"], "lime", layout, args.reps),
        "failure_no_anchor": time_recovery(paths["no-anchor"], "raw", layout, args.reps),
        "memory": memory(paths["raw"], layout),
        "non_pv_stacker": non_pv_stacker(raw_guest, args.reps),
    }
    if args.vol:
        results["vol_pslist"] = {
            "raw_s": vol_pslist(paths["raw"], symbols),
            "core_s": vol_pslist(paths["core"], symbols),
        }
    out = REPO / "benchmarks" / "last-inguest-run.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    for key, value in results.items():
        print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
