"""Save-image benchmarks: open cost, read throughput and ``vol linux.pslist``.

``python benchmarks/bench_save.py`` (about 2 minutes; ``--quick`` skips the 64 GiB guest
and runs fewer rounds) writes, into ``.cache/bench-save/``:

- sparse ``xl save`` images of 16 and 64 GiB PV guests (real PAGE_DATA records of 1024
  pfns each, page contents left as holes but for marker pages), and a 16 GiB HVM one;
- PV and HVM save images of the bundled real guest (``samples/``).

and prints (and writes to ``benchmarks/last-save-run.json``):

- open: constructing ``XenSaveImageLayer`` on a ``FileLayer`` in a fresh interpreter
  (median of 3; imports excluded, as for the dump-core figures), checked against markers;
- sequential 1 MiB and random 4 KiB reads through the layer vs. reading the same bytes
  of the file through its ``FileLayer`` (best of N, interleaved);
- ``vol linux.pslist`` on the real guest's PV save image vs. its raw image (medians).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import resource
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for path in (REPO, HERE):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import bench_measure as bm  # noqa: E402
from volatility3.framework import contexts  # noqa: E402
from volatility3.framework.layers import physical  # noqa: E402

from volatility3_xen.layers import memory as xen_memory  # noqa: E402
from volatility3_xen.layers import saveimage as xen_save  # noqa: E402
from volatility3_xen.testdata import samples, savewriter  # noqa: E402

PAGE = 4096
GIB = 1 << 30
MIB = 1 << 20
SAVE_VERSION = 1  # bump when the writer changes, so cached images are rebuilt
MARKERS = 16
Result = dict[str, Any]


def marker_page(pfn: int) -> bytes:
    return struct.pack("<QQ", pfn, 0x45564153454E4558) * (PAGE // 16)  # "XENESAVE"


def sparse_save(cache: Path, kind: str, guest_bytes: int) -> tuple[Path, list[int]]:
    """An ``xl save`` of a ``guest_bytes`` guest: every pfn sent once, 1024 per record;
    contents are holes but for ``MARKERS`` pages spread over the guest."""
    pages = guest_bytes // PAGE
    path = cache / f"{kind}-{guest_bytes // GIB}g.v{SAVE_VERSION}.save"
    markers = [int(p) for p in np.linspace(0, pages - 1, MARKERS).astype(np.int64)]
    if not path.exists():
        part = path.with_suffix(".part")
        pfns = np.arange(pages, dtype=np.uint64)
        batches = savewriter.batches_for_pfns(pfns)
        spec = savewriter.SaveSpec(guest=kind, wrapper="xl", batches=batches)
        spec.vcpus = {0: {"cr3": 0x1000}} if kind == "pv" else {}
        layout = savewriter.write_save(part, spec)
        with open(part, "r+b") as out:
            for pfn in markers:
                record = layout.page_records[pfn // savewriter.BATCH]
                out.seek(record.data_at + (pfn % savewriter.BATCH) * PAGE)
                out.write(marker_page(pfn))
        part.replace(path)
    return path, markers


def real_saves(cache: Path) -> dict[str, Path]:
    """PV and HVM ``xl save`` images of the bundled guest (and its raw image)."""
    facts = samples.load_facts(samples.bundled_sample_dir())
    raw = samples.ensure_raw_image(facts)
    paths = {"raw": raw}
    for kind in ("pv", "hvm"):
        path = cache / f"imageC-{kind}.v{SAVE_VERSION}.save"
        if not path.exists():
            with (
                open(raw, "rb") as handle,
                mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as m,
            ):
                savewriter.write_from_image(path.with_suffix(".part"), m, facts.registers, kind)
            path.with_suffix(".part").replace(path)
        paths[kind] = path
    return paths


# --- measurements ---------------------------------------------------------------------------


def construct(path: Path) -> tuple[float, xen_save.XenSaveImageLayer, physical.FileLayer]:
    context = contexts.Context()
    context.config["bench_file.location"] = path.resolve().as_uri()
    base = physical.FileLayer(context, "bench_file", "bench_file")
    context.add_layer(base)
    context.config["bench_save.base_layer"] = base.name
    start = time.perf_counter()
    layer = xen_save.XenSaveImageLayer(context, "bench_save", "bench_save")
    seconds = time.perf_counter() - start
    context.add_layer(layer)
    return seconds, layer, base


def open_fresh(path: Path, markers: list[int], reps: int) -> Result:
    times = []
    for _ in range(reps):
        done = subprocess.run(
            [sys.executable, __file__, "open", str(path), ",".join(map(str, markers))],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        result = bm._last_json(done)
        if "error" in result:
            return result
        times.append(result["seconds"])
    times.sort()
    return {"seconds": times[len(times) // 2], "all_s": times, "file_bytes": path.stat().st_size}


def _open_worker(path: Path, markers: list[int]) -> Result:
    seconds, layer, _ = construct(path)
    for pfn in markers:
        if layer.read(pfn * PAGE, PAGE) != marker_page(pfn):
            return {"error": f"marker page {pfn:#x} reads wrong"}
    return {"seconds": seconds, "runs": len(layer.image.page_runs())}


def _file_offset(layer: xen_save.XenSaveImageLayer, pfn: int) -> int:
    runs = layer.image.page_runs()
    i = runs.find(pfn)
    return runs.value[i] + (pfn - runs.key[i]) * PAGE


def reads(path: Path, rounds: int, sequential_bytes: int, random_reads: int) -> Result:
    """Sequential 1 MiB reads over guest memory vs. 1 MiB reads of the file at the same
    pages' offsets; random 4 KiB reads vs. the same pages read from the file."""
    _, layer, base = construct(path)
    pfns = list(range(0, sequential_bytes // PAGE))
    chunks = [(pfn * PAGE, _file_offset(layer, pfn)) for pfn in pfns[:: MIB // PAGE]]
    for address, offset in chunks[:8]:
        if layer.read(address, PAGE) != base.read(offset, PAGE):
            raise AssertionError(f"page {address:#x} differs from the file")
    layer_read, file_read = layer.read, base.read

    def seq_layer() -> float:
        xen_memory._RunMappedLayer._cached_read.cache_clear()
        start = time.perf_counter()
        for address, _ in chunks:
            layer_read(address, MIB, True)
        return time.perf_counter() - start

    def seq_file() -> float:
        start = time.perf_counter()
        for _, offset in chunks:
            file_read(offset, MIB, True)
        return time.perf_counter() - start

    layer_s, raw_s = bm._best_of(rounds, seq_layer, seq_file)
    sequential = bm._throughput(len(chunks) * MIB, layer_s, raw_s)
    mapped = int(sum(layer.image.page_runs().count))
    chosen = random.Random(7).sample(range(mapped), min(random_reads, mapped))
    runs = layer.image.page_runs()
    starts = np.cumsum([0] + list(runs.count))
    picks = []
    for index in chosen:
        run = int(np.searchsorted(starts, index, side="right") - 1)
        picks.append(runs.key[run] + index - int(starts[run]))
    addresses = [pfn * PAGE for pfn in picks]
    offsets = [_file_offset(layer, pfn) for pfn in picks]

    def rnd_layer() -> float:
        xen_memory._RunMappedLayer._cached_read.cache_clear()
        start = time.perf_counter()
        for address in addresses:
            layer_read(address, PAGE)
        return time.perf_counter() - start

    def rnd_file() -> float:
        start = time.perf_counter()
        for offset in offsets:
            file_read(offset, PAGE)
        return time.perf_counter() - start

    layer_s, raw_s = bm._best_of(rounds, rnd_layer, rnd_file)
    return {
        "sequential": sequential,
        "random": bm._throughput(len(addresses) * PAGE, layer_s, raw_s),
    }


def pslist(save: Path, raw: Path, symbols: Path, rounds: int) -> Result:
    """``vol linux.pslist`` on the save image and on the raw image, alternating: medians of
    wall time and of CPU time (user + system).  On a shared machine wall time mostly
    measures the other tenants; the CPU a run consumes much less so."""
    wall: dict[str, list[float]] = {"save": [], "raw": []}
    cpu: dict[str, list[float]] = {"save": [], "raw": []}
    outputs = {}
    cache = REPO / ".cache" / "volatility3-cache"  # private: see tests/conftest.py
    for _ in range(rounds):
        for name, target in (("save", save), ("raw", raw)):
            command = bm._vol_command() + ["-q", "--cache-path", str(cache)]
            command += ["-p", str(REPO / "plugins"), "-s", str(symbols)]
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            done = subprocess.run(
                command + ["-f", str(target), "linux.pslist"],
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
            wall[name].append(time.perf_counter() - start)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            if done.returncode != 0:
                tail = (done.stderr.strip().splitlines() or [""])[-1][:160]
                return {"error": f"vol on {target.name} exited {done.returncode}: {tail}"}
            cpu[name].append(
                (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            )
            outputs[name] = [
                line for line in done.stdout.splitlines() if "Volatility 3" not in line
            ]
    median = statistics.median
    return {
        "save_wall_s": median(wall["save"]),
        "raw_wall_s": median(wall["raw"]),
        "wall_ratio": median(wall["save"]) / median(wall["raw"]),
        "save_cpu_s": median(cpu["save"]),
        "raw_cpu_s": median(cpu["raw"]),
        "cpu_ratio": median(cpu["save"]) / median(cpu["raw"]),
        "wall_all_s": wall,
        "cpu_all_s": cpu,
        "same_output": outputs["save"] == outputs["raw"],
        "processes": len(outputs["save"]) - 1,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="no 64 GiB guest, fewer rounds")
    parser.add_argument("--cache", type=Path, default=REPO / ".cache" / "bench-save")
    parser.add_argument("--symbols", type=Path, default=REPO / "samples" / "symbols")
    args = parser.parse_args(argv)
    args.cache.mkdir(parents=True, exist_ok=True)
    rounds = 2 if args.quick else 5
    results: Result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    sizes = [("pv", 16), ("hvm", 16)] + ([] if args.quick else [("pv", 64)])
    for kind, gib in sizes:
        path, markers = sparse_save(args.cache, kind, gib * GIB)
        label = f"open {kind.upper()} {gib} GiB"
        results[label] = open_fresh(path, markers, 5)
        print(label, json.dumps(results[label]), flush=True)
    path16, _ = sparse_save(args.cache, "pv", 16 * GIB)
    results["reads PV 16 GiB"] = reads(path16, rounds, 256 * MIB, 4096)
    print("reads PV 16 GiB", json.dumps(results["reads PV 16 GiB"]), flush=True)
    real = real_saves(args.cache)
    results["reads real PV"] = reads(real["pv"], rounds, 128 * MIB, 4096)
    print("reads real PV", json.dumps(results["reads real PV"]), flush=True)
    results["pslist real PV"] = pslist(
        real["pv"], real["raw"], args.symbols, 2 if args.quick else 3
    )
    print("pslist real PV", json.dumps(results["pslist real PV"]), flush=True)
    results["load average"] = os.getloadavg()
    (HERE / "last-save-run.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "open":
        try:
            found = _open_worker(Path(sys.argv[2]), [int(p) for p in sys.argv[3].split(",") if p])
        except Exception as exc:  # noqa: BLE001 - reported as the figure's error
            found = {"error": f"{type(exc).__name__}: {exc}"[:200]}
        print(json.dumps(found))
    else:
        sys.exit(main())
