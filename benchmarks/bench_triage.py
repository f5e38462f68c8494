#!/usr/bin/env python
"""Fleet triage benchmark: 8 images x linux.pslist, triage on 1 and 2 Dask workers beside
plain ``vol`` runs of the same plugin on the same images, in the same run.

    python benchmarks/bench_triage.py             # 2 interleaved rounds (~4 min on 2 cores)
    python benchmarks/bench_triage.py --rounds 1  # ~2 min

The 8 images are hardlinks to the bundled guest's PV core (3), HVM core (3) and raw image
(2), under different names (``python -m volatility3_xen samples`` builds them).  Every
round runs, back to back: the 8 ``vol -r csv`` runs one after the other, ``triage run``
with ``--workers 1`` and with ``--workers 2`` (each a fresh CLI process and a fresh store);
the best round of each is kept, because the machine is shared and noise only adds time.

Figures (targets from issue 12):
- throughput: 1-worker wall time / 2-worker wall time (>= 1.7x);
- per-task overhead: the 1-worker triage wall time per task, everything included (Python
  and Dask start-up, hashing, store, shutdown), vs the mean ``vol`` run (<= 1.10x); the
  worker-side time of a task is reported beside it;
- store size: the plugin table's Parquet bytes vs the CSV ``vol -r csv`` printed for the
  same rows (<= 1.5x), and the whole store (with the tasks/images/runs tables).

Writes ``benchmarks/TRIAGE.md`` and ``benchmarks/triage-last-run.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from volatility3_xen.triage.store import Store  # noqa: E402

PLUGIN = "linux.pslist"
ENV = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def sample(kind: str) -> Path:
    done = subprocess.run(
        [sys.executable, "-m", "volatility3_xen", "samples", kind],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=ENV,
        check=True,
    )
    return Path(done.stdout.strip().splitlines()[-1])


def images(work: Path) -> list[Path]:
    sources = [sample("pv")] * 3 + [sample("hvm")] * 3 + [sample("raw")] * 2
    out = []
    for index, source in enumerate(sources, 1):
        target = work / f"guest{index}{source.suffix}"
        if not target.exists():
            try:
                os.link(source, target)
            except OSError:
                shutil.copyfile(source, target)
        out.append(target)
    return out


def vol_command() -> list[str]:
    script = Path(sys.executable).with_name("vol")
    return [str(script)] if script.exists() else [sys.executable, "-m", "volatility3.cli"]


def run_vol(image: Path, symbols: Path, cache: Path) -> tuple[float, int]:
    """Wall seconds of one ``vol -r csv`` run and the bytes of CSV it printed."""
    command = vol_command() + [
        "-q", "-r", "csv", "-p", str(REPO / "plugins"), "-s", str(symbols),
        "--cache-path", str(cache), "-f", str(image), PLUGIN,
    ]  # fmt: skip
    cache.mkdir(parents=True, exist_ok=True)  # vol does not create it
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, cwd=REPO, env=ENV)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"vol failed on {image}: {done.stderr.decode()[-2000:]}")
    return wall, len(done.stdout)


def run_triage(
    paths: list[Path], workers: int, store: Path, symbols: Path, cache: Path
) -> dict[str, Any]:
    shutil.rmtree(store, ignore_errors=True)
    command = [
        sys.executable, "-m", "volatility3_xen", "triage", "run", *map(str, paths),
        "--plugins", PLUGIN, "-s", str(symbols), "--cache-path", str(cache),
        "--workers", str(workers), "-o", str(store), "--no-progress",
    ]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=ENV)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"triage failed ({done.returncode}): {done.stderr[-3000:]}")
    with Store(store).connect() as con:
        tasks = con.execute(
            "SELECT plugin, status, seconds FROM tasks ORDER BY plugin, image"
        ).fetchall()
        rows = con.execute(f'SELECT count(*) FROM "{PLUGIN}"').fetchall()[0][0]
    failed = [t for t in tasks if t[1] != "ok"]
    if failed:
        raise SystemExit(f"triage tasks failed: {failed}")
    return {
        "workers": workers,
        "wall_s": wall,
        "plugin_task_s": [t[2] for t in tasks if t[0] == PLUGIN],
        "image_task_s": [t[2] for t in tasks if t[0] == "image"],
        "rows": rows,
        "plugin_table_bytes": Store(store).size(plugins_only=True),
        "store_bytes": Store(store).size(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "bench-triage")
    parser.add_argument("--symbols", type=Path, default=REPO / "samples" / "symbols")
    parser.add_argument("--output", type=Path, default=HERE / "TRIAGE.md")
    parser.add_argument("--json", type=Path, default=HERE / "triage-last-run.json")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    paths = images(args.work)
    vol_cache, triage_cache = args.work / "vol-cache", args.work / "triage-cache"
    began = time.perf_counter()
    load_start = os.getloadavg()
    # Warm both symbol caches and the page cache: the first run of each pays for them.
    run_vol(paths[0], args.symbols, vol_cache)
    run_triage(paths[:1], 1, args.work / "warm.store", args.symbols, triage_cache)

    rounds: list[dict[str, Any]] = []
    for number in range(1, args.rounds + 1):
        vol = [run_vol(p, args.symbols, vol_cache) for p in paths]
        one = run_triage(paths, 1, args.work / "w1.store", args.symbols, triage_cache)
        two = run_triage(paths, 2, args.work / "w2.store", args.symbols, triage_cache)
        rounds.append(
            {
                "vol_s": [t for t, _ in vol],
                "csv_bytes": sum(n for _, n in vol),
                "triage_1": one,
                "triage_2": two,
            }
        )
        print(
            f"round {number}: vol {sum(t for t, _ in vol):.1f} s for 8 runs, triage 1 worker "
            f"{one['wall_s']:.1f} s, 2 workers {two['wall_s']:.1f} s",
            file=sys.stderr,
        )
    vol_total = min(sum(r["vol_s"]) for r in rounds)
    best_vol = min(rounds, key=lambda r: sum(r["vol_s"]))
    one = min((r["triage_1"] for r in rounds), key=lambda t: t["wall_s"])
    two = min((r["triage_2"] for r in rounds), key=lambda t: t["wall_s"])
    n = len(paths)
    vol_mean = vol_total / n
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "python": platform.python_version(),
        "commit": _commit(),
        "images": n,
        "plugin": PLUGIN,
        "rounds": rounds,
        "vol_total_s": vol_total,
        "vol_median_s": statistics.median(best_vol["vol_s"]),
        "triage_1_s": one["wall_s"],
        "triage_2_s": two["wall_s"],
        "speedup": one["wall_s"] / two["wall_s"],
        "per_task_ratio": (one["wall_s"] / n) / vol_mean,
        "worker_task_median_s": statistics.median(one["plugin_task_s"]),
        "worker_task_ratio": statistics.median(one["plugin_task_s"])
        / statistics.median(best_vol["vol_s"]),
        "image_task_median_s": statistics.median(one["image_task_s"]),
        "rows": one["rows"],
        "csv_bytes": best_vol["csv_bytes"],
        "plugin_table_bytes": two["plugin_table_bytes"],
        "store_bytes": two["store_bytes"],
        "seconds": time.perf_counter() - began,
        "load_average": [round(x, 2) for x in load_start + os.getloadavg()],
    }
    result["store_ratio"] = result["plugin_table_bytes"] / result["csv_bytes"]
    result["whole_store_ratio"] = result["store_bytes"] / result["csv_bytes"]
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    args.output.write_text(report(result))
    print(report(result))
    return 0


def _commit() -> str:
    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
    )
    return done.stdout.strip() or "unknown"


def _verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def report(r: dict[str, Any]) -> str:
    return f"""# Fleet triage benchmark

`python benchmarks/bench_triage.py` — {r["date"]}, {r["seconds"]:.0f} s; {r["machine"]}, \
Python {r["python"]}; commit {r["commit"]}; load average (1/5/15 min) \
{"/".join(f"{x:g}" for x in r["load_average"][:3])} at the start, \
{"/".join(f"{x:g}" for x in r["load_average"][3:])} at the end (the machine is shared).

{r["images"]} images (the bundled guest as 3 PV cores, 3 HVM cores, 2 raw images, 128 MiB \
each) x `{r["plugin"]}` ({r["rows"]} rows in all). Best of {len(r["rounds"])} interleaved \
rounds; each triage run is a fresh `python -m volatility3_xen triage run` process with a \
fresh store and a local Dask cluster, timed from start to exit.

| measure | target | measured |
|---|---|---|
| throughput, 2 workers vs 1 (8 images) | >= 1.7x | **{r["speedup"]:.2f}x** \
({r["triage_1_s"]:.1f} s vs {r["triage_2_s"]:.1f} s) — {_verdict(r["speedup"] >= 1.7)} |
| per task, 1-worker triage (all included) vs a plain `vol` run | <= 1.10x | \
**{r["per_task_ratio"]:.2f}x** ({r["triage_1_s"] / r["images"]:.2f} s vs \
{r["vol_total_s"] / r["images"]:.2f} s) — {_verdict(r["per_task_ratio"] <= 1.10)} |
| per task, worker-side time of the plugin task vs a `vol` run (medians) | | \
{r["worker_task_ratio"]:.2f}x ({r["worker_task_median_s"]:.2f} s vs {r["vol_median_s"]:.2f} s); \
the image task (sha256) {r["image_task_median_s"]:.2f} s |
| store: plugin table (Parquet) vs `vol -r csv` of the same rows | <= 1.5x | \
**{r["store_ratio"]:.2f}x** ({r["plugin_table_bytes"]:,} vs {r["csv_bytes"]:,} bytes) — \
{_verdict(r["store_ratio"] <= 1.5)} |
| store: whole directory's Parquet (with tasks, images, runs, errors) vs the same CSV | | \
{r["whole_store_ratio"]:.2f}x ({r["store_bytes"]:,} bytes) |

Why triage is not slower per task: a `vol` run pays Python start-up, importing every
plugin, refreshing the symbol cache and tearing the interpreter down; a triage worker pays
them once and then runs only the automagic and the plugin.  The fixed costs of a triage
run (Dask start-up, about 2-3 s, and shutdown) are what the 2-worker speed-up loses.
"""


if __name__ == "__main__":
    sys.exit(main())
