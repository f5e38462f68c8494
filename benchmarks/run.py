#!/usr/bin/env python
"""Benchmark suite: open time, read speed, memory, ``vol linux.pslist``, the companion
plugins (``vol xen.info``, ``xen.vcpus``) and the worst tables (a random 64 GiB HVM table,
a 16 GiB PV guest with machine frames fragmented at 4 KiB, also under a 1.5 GB
``RLIMIT_AS``) on Xen dump-cores.

    python benchmarks/run.py              # full run (~2-3 min on 2 cores)
    python benchmarks/run.py --quick      # fewer repetitions, built-in layer on 1 GiB only (~1 min)
    python benchmarks/run.py --sizes 1,16 --output /tmp/results.md --json /tmp/run.json

Every figure is measured beside its baseline in the same run (Volatility's built-in
``XenCoreDumpLayer``, libkdumpfile, raw ``FileLayer`` reads, ``vol`` on the raw image) and
reported as a ratio.  Sparse synthetic cores (HVM and PV, 1-64 GiB guests) and the real guest's
core are cached under ``.cache/bench/`` and reused; the real-guest rows are skipped when
``../shared`` is absent.  Results go to stdout, ``benchmarks/RESULTS.md`` and
``benchmarks/last-run.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(HERE), str(REPO)]

import bench_cores  # noqa: E402
import bench_measure as measure  # noqa: E402
import bench_report  # noqa: E402

Run = dict[str, Any]
COMPANION_GIB = 16  # the guest size the companion plugins' target is stated for


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--sizes", default="1,4,16,64", help="guest sizes in GiB (default 1,4,16,64)"
    )
    parser.add_argument("--kinds", default="hvm,pv", help="synthetic guest kinds (default hvm,pv)")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (< 2 min)")
    parser.add_argument("--cache-dir", type=Path, default=REPO / ".cache" / "bench")
    parser.add_argument(
        "--shared", type=Path, default=Path(os.environ.get("VX3_SHARED", REPO.parent / "shared"))
    )
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS.md", help="Markdown report")
    parser.add_argument("--json", type=Path, default=HERE / "last-run.json", help="JSON of the run")
    parser.add_argument(
        "--builtin-max-gib",
        type=int,
        default=None,
        help="largest HVM guest the built-in layer really opens; bigger ones are extrapolated "
        "(default 4, quick 1)",
    )
    parser.add_argument("--no-pslist", action="store_true", help="skip the vol linux.pslist runs")
    return parser.parse_args(argv)


def settings(args: argparse.Namespace) -> dict[str, Any]:
    quick = args.quick
    return {
        "sizes": [int(s) for s in args.sizes.split(",") if s],
        "kinds": [k for k in args.kinds.split(",") if k],
        "open_reps": 3 if quick else 7,
        "kdump_reps": 3 if quick else 7,
        "rounds": 3 if quick else 5,
        "random_reads": 5000 if quick else 20000,
        "sequential_synthetic_bytes": (256 if quick else 1024) << 20,
        "builtin_max_gib": args.builtin_max_gib or (1 if quick else 4),
        "fresh_reps": 3 if quick else 5,
        "builtin_timeout_s": 300,
        "pslist_rounds": 3,
        "companion_rounds": 3,
        "companion_gib": COMPANION_GIB,
        "fragmented_reps": 1 if quick else 3,
    }


def machine() -> dict[str, str]:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import volatility3.framework.constants as vol_constants

    def output(command: list[str]) -> str:
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=30, cwd=REPO)
            return done.stdout.strip() or "?"
        except (OSError, subprocess.SubprocessError):
            return "?"

    commit = output(["git", "rev-parse", "--short", "HEAD"])
    if output(
        ["git", "status", "--porcelain", "--untracked-files=no", "--", "volatility3_xen"]
    ) not in ("", "?"):
        commit += " + uncommitted changes"
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "volatility3": vol_constants.PACKAGE_VERSION,
        "libkdumpfile": output(["dpkg-query", "-W", "-f", "${Version}", "python3-libkdumpfile"]),
        "commit": commit,
        "load_average": " / ".join(f"{load:.1f}" for load in os.getloadavg()),
    }


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def probe(core: bench_cores.BenchCore) -> tuple[int, bytes]:
    """An address to read first, and the page it must hold."""
    if core.raw_image is None:
        pfn = core.marker_pfns[1]
        return pfn * bench_cores.PAGE, bench_cores.marker_page(pfn)
    address = 0x5720000  # the real guest's Linux banner page
    with open(core.raw_image, "rb") as image:
        image.seek(address)
        return address, image.read(bench_cores.PAGE)


def measure_open(cores: list[bench_cores.BenchCore], conf: dict[str, Any]) -> tuple[list[Run], str]:
    rows: list[Run] = []
    for core in cores:
        log(f"open: {core.label}")
        address, expected = probe(core)
        ours = measure.open_ours(core.path, conf["open_reps"], address, expected)
        kdump = measure.open_kdumpfile(core.path, address, expected[:16], conf["kdump_reps"])
        gib = core.guest_bytes / bench_cores.GIB
        if core.kind == "pv" or gib <= conf["builtin_max_gib"] + 0.5:
            builtin = measure.open_builtin(core.path, conf["builtin_timeout_s"])
        else:
            builtin = {"skipped": True}
        rows.append(
            {
                "label": core.label,
                "kind": core.kind,
                "guest_bytes": core.guest_bytes,
                "path": str(
                    core.path.relative_to(REPO) if core.path.is_relative_to(REPO) else core.path
                ),
                "table_bytes": _table_bytes(core),
                "ours": ours,
                "kdumpfile": kdump,
                "builtin": builtin,
                "fresh": measure.open_fresh_process(core.path, conf["fresh_reps"]),
                "memory": measure.memory(core.path),
            }
        )
    return rows, _extrapolate_builtin(rows)


def _table_bytes(core: bench_cores.BenchCore) -> int:
    _, layer, _ = measure.construct(core.path)
    return layer.core.table.size


def _extrapolate_builtin(rows: list[Run]) -> str:
    """The built-in layer's open is a Python loop over the table (O(pages)): estimate the
    rows it was not run on from the per-page time of the largest HVM guest it did open."""
    measured = [r for r in rows if r["kind"] == "hvm" and r["builtin"].get("seconds")]
    if not measured:
        return ""
    basis = max(measured, key=lambda r: r["guest_bytes"])
    per_page = basis["builtin"]["seconds"] / (basis["guest_bytes"] // bench_cores.PAGE)
    for row in rows:
        if row["builtin"].get("skipped"):
            row["builtin"]["estimate_s"] = per_page * (row["guest_bytes"] // bench_cores.PAGE)
    return (
        f"Built-in layer: measured up to the guests shown with a time; larger rows are "
        f"extrapolated at {per_page * 1e6:.0f} µs/page (measured on {basis['label']}). "
        "It cannot open PV cores at all (it reads `.xen_p2m` with an 8-byte entry type)."
    )


def measure_reads(
    real: bench_cores.BenchCore | None,
    synthetic: bench_cores.BenchCore | None,
    conf: dict[str, Any],
) -> list[Run]:
    rows: list[Run] = []
    rng = np.random.default_rng(7)
    if real is not None:
        log("reads: real guest")
        _, layer, base = measure.construct(real.path)
        guest = layer.maximum_address + 1
        rows.append(
            {
                "label": "sequential 1 MiB, whole real guest (HVM core)",
                "result": measure.sequential(
                    layer, base, 0, layer.core.pages.offset, guest, conf["rounds"]
                ),
            }
        )
        pfns = measure.mapped_pfns(layer)
        chosen = rng.choice(pfns, size=min(conf["random_reads"], len(pfns)), replace=False)
        rows.append(
            {
                "label": f"random 4 KiB, {len(chosen)} distinct pages, real guest",
                "result": measure.random_pages(layer, base, chosen, conf["rounds"]),
            }
        )
    if synthetic is not None:
        log(f"reads: {synthetic.label}")
        _, layer, base = measure.construct(synthetic.path)
        high = bench_cores.HIGH_RAM_START_PFN
        start_pfn = high if layer.page_map.page_index(high) is not None else 0x100
        length = conf["sequential_synthetic_bytes"]
        offset = layer.core.page_offset(layer.page_map.page_index(start_pfn))
        rows.append(
            {
                "label": f"sequential 1 MiB, {length >> 20} MiB of {synthetic.label} (sparse)",
                "result": measure.sequential(
                    layer, base, start_pfn * bench_cores.PAGE, offset, length, conf["rounds"]
                ),
            }
        )
        pfns = bench_cores.hvm_pfns(synthetic.guest_bytes)
        chosen = rng.choice(pfns, size=conf["random_reads"], replace=False)
        rows.append(
            {
                "label": f"random 4 KiB, {len(chosen)} distinct pages, {synthetic.label} (sparse)",
                "result": measure.random_pages(layer, base, chosen, conf["rounds"]),
            }
        )
    return rows


# The two worst tables: (kind, GiB, variant).
FRAGMENTED_CORES = [("hvm", 64, bench_cores.RANDOM), ("pv", 16, bench_cores.FRAGMENTED)]
ADDRESS_LIMIT = 1_500_000_000  # RLIMIT_AS for the constrained run (1.5 GB)


def measure_fragmented(cache: Path, conf: dict[str, Any]) -> list[Run]:
    """The page map and the whole open on a random 64 GiB HVM table and a 16 GiB PV guest
    whose machine frames are fragmented at 4 KiB: medians of fresh processes, then one run
    under ``RLIMIT_AS`` = 1.5 GB."""
    rows: list[Run] = []
    for kind, gib, variant in FRAGMENTED_CORES:
        core = bench_cores.synthetic_core(cache, kind, gib, variant)
        log(f"fragmented: {core.label}")
        runs = [
            measure.fragmented(core.path, core.marker_pfns) for _ in range(conf["fragmented_reps"])
        ]
        errors = [r["error"] for r in runs if "error" in r]
        row: Run = {"label": core.label, "kind": kind, "guest_bytes": core.guest_bytes}
        if errors:
            row["error"] = errors[0]
        else:
            row["runs"] = runs
            for name in ("pagemap", "m2p", "open", "machine_layer"):
                for key in (f"{name}_s", f"{name}_cpu_s"):
                    if key in runs[0]:
                        row[key] = statistics.median(r[key] for r in runs)
            for key in (
                "table_bytes",
                "maps_bytes",
                "pfn_runs",
                "m2p_runs",
                "pagemap_tracemalloc_peak_bytes",
                "layer_peak_rss_delta_bytes",
                "vm_peak_bytes",
            ):
                if key in runs[0]:
                    row[key] = max(r[key] for r in runs if r.get(key) is not None)
        row["limited"] = measure.fragmented(core.path, core.marker_pfns, ADDRESS_LIMIT)
        if kind == "hvm":
            row["vol_info_limited"] = measure.vol_info_limited(
                core.path, cache / "vol-cache", ADDRESS_LIMIT
            )
        rows.append(row)
    return rows


def measure_companions(
    cores: list[bench_cores.BenchCore], conf: dict[str, Any], cache: Path, notes: list[str]
) -> Run | None:
    """``vol xen.info`` / ``xen.vcpus`` on the synthetic cores of the target's size, beside
    vol's start-up; None (and a note) when no such core was generated."""
    # By label: an HVM core's guest_bytes leaves out the VGA hole, so it is not exactly 16 GiB.
    suffix = f" {conf['companion_gib']} GiB"
    chosen = {c.label: c.path for c in cores if c.raw_image is None and c.label.endswith(suffix)}
    if not chosen:
        notes.append(
            f"Companion plugin rows skipped: {conf['companion_gib']} is not among --sizes."
        )
        return None
    log(f"vol xen.info / xen.vcpus: {', '.join(chosen)}")
    # A private symbol/identifier cache: the shared one races with other vol runs on the machine.
    return measure.companion_plugins(chosen, cache / "vol-cache", conf["companion_rounds"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    conf = settings(args)
    started = time.perf_counter()
    cache: Path = args.cache_dir
    log(f"cores: generating or reusing under {cache}")
    cores = [
        bench_cores.synthetic_core(cache, kind, gib)
        for kind in conf["kinds"]
        for gib in conf["sizes"]
    ]
    real = bench_cores.real_guest_core(cache, args.shared)
    notes: list[str] = []
    if real is None:
        notes.append(f"Real-guest rows skipped: {args.shared} is absent.")
    else:
        cores.append(real)
    rows, builtin_note = measure_open(cores, conf)
    hvm = [c for c in cores if c.kind == "hvm" and c.raw_image is None]
    synthetic = min(hvm, key=lambda c: abs(c.guest_bytes - 16 * bench_cores.GIB)) if hvm else None
    reads = measure_reads(real, synthetic, conf)
    pslist: Run | None = None
    if real is not None and not args.no_pslist:
        log("vol linux.pslist")
        symbols = args.shared / "guests" / "symbols"
        pslist = measure.pslist(
            real.path, real.raw_image, symbols, conf["pslist_rounds"], cache / "vol-cache"
        )
    companions = measure_companions(cores, conf, cache, notes)
    fragmented = measure_fragmented(cache, conf)
    run: Run = {
        "command": "python benchmarks/run.py"
        + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "quick": args.quick,
        "settings": conf,
        "machine": machine(),
        "open": rows,
        "builtin_note": builtin_note,
        "reads": reads,
        "pslist": pslist,
        "companions": companions,
        "fragmented": fragmented,
        "notes": notes,
        "wall_s": time.perf_counter() - started,
    }
    run["targets"] = [
        {"target": name, "measured": value, "met": met}
        for name, value, met in bench_report.targets(run)
    ]
    text = bench_report.render(run)
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    args.json.write_text(json.dumps(run, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
