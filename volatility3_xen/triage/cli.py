"""``vol-xen-triage`` / ``python -m volatility3_xen triage``: run, query, summary, rare, diff.

Exit codes: 0 done (error rows are results, listed in the summary), 1 a query/analysis
problem, 2 bad arguments or an engine that cannot start (scheduler unreachable, store in
use), 3 run aborted (the cluster lost every worker), 130 interrupted (Ctrl-C; the store
holds everything that finished: rerun to resume).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import logging
import sys
from typing import Any

EXAMPLES = """\
examples:
  triage run guest-*.core --symbols samples/symbols --out fleet.store
  triage run *.core --plugins linux.pslist,linux.lsmod --scheduler tcp://sched:8786 -o fleet.store
  triage summary fleet.store
  triage rare fleet.store --plugin linux.pslist --column comm
  triage diff fleet.store web1.core web2.core --plugin linux.pslist --columns comm,uid
  triage query fleet.store 'SELECT image, COMM, PID FROM linux_pslist ORDER BY image, row_index'
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vol-xen-triage",
        description="Run Volatility plugins over many memory images on a Dask cluster into a "
        "Parquet store, and ask fleet questions of it with DuckDB.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run plugins over images into a store (resumable)")
    run.add_argument("images", nargs="+", help="memory images (any format Volatility reads)")
    run.add_argument("--out", "-o", required=True, metavar="STORE", help="store directory")
    run.add_argument(
        "--plugins",
        metavar="P1,P2",
        help="plugins to run (vol's names, e.g. linux.pslist); default: by the detected OS "
        "(Linux: linux.pslist,linux.lsmod,linux.sockstat; Windows: windows.info, "
        "windows.pslist,windows.modules,windows.netscan) plus xen.info,xen.vcpus on Xen images",
    )
    run.add_argument(
        "--symbols", "-s", action="append", default=[], metavar="DIR", help="symbol directory"
    )
    run.add_argument(
        "--plugin-dirs",
        "-p",
        action="append",
        default=[],
        metavar="DIR",
        help="extra Volatility plugin directory",
    )
    engine = run.add_mutually_exclusive_group()
    engine.add_argument(
        "--workers",
        "-w",
        type=int,
        metavar="N",
        help="worker processes of the local Dask cluster (default: one per core)",
    )
    engine.add_argument(
        "--scheduler",
        metavar="tcp://HOST:PORT",
        help="use an existing Dask cluster; its workers must see the images at the same path",
    )
    run.add_argument(
        "--max-retries",
        type=int,
        default=1,
        metavar="N",
        help="times a task may kill its worker (OOM, crash) before it becomes an error row; "
        "local cluster only, an external scheduler uses its own allowed-failures (default 1)",
    )
    run.add_argument(
        "--memory-limit",
        default="auto",
        metavar="SIZE",
        help="memory per local worker, e.g. 6GiB; over it Dask restarts the worker "
        "(default auto: RAM / workers)",
    )
    run.add_argument("--cache-path", metavar="DIR", help="Volatility cache directory")
    run.add_argument("--offline", action="store_true", help="never download symbols")
    run.add_argument(
        "--commit-every",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="commit finished results to the store at least this often (default 30)",
    )
    run.add_argument("--no-compact", action="store_true", help="leave the store's batches as is")
    run.add_argument(
        "--connect-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="how long to try to reach --scheduler (default 10)",
    )
    run.add_argument(
        "--no-worker-timeout",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="give up when the cluster has had no worker this long (default 120)",
    )
    bar = run.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_true", default=None)
    bar.add_argument("--no-progress", dest="progress", action="store_false")

    def with_format(command: argparse.ArgumentParser) -> None:
        command.add_argument(
            "--format",
            "-f",
            choices=["table", "csv", "tsv", "json"],
            help="output format (default: table on a terminal, tsv otherwise)",
        )

    query = sub.add_parser("query", help="run SQL (DuckDB) over a store")
    query.add_argument("store")
    query.add_argument("sql", help="e.g. 'SELECT * FROM \"linux.pslist\"' (also linux_pslist)")
    with_format(query)

    summary = sub.add_parser("summary", help="one line per image: OS, kernel, Xen, counts, errors")
    summary.add_argument("store")
    summary.add_argument("--errors", action="store_true", help="also list the current errors")
    with_format(summary)

    rare = sub.add_parser("rare", help="values seen in few images (least frequency of occurrence)")
    rare.add_argument("store")
    rare.add_argument("--plugin", required=True)
    rare.add_argument("--column", required=True, help="column name (case-insensitive)")
    rare.add_argument(
        "--max-images",
        type=int,
        metavar="N",
        help="only values in at most N images (default: values missing from some image)",
    )
    rare.add_argument("--limit", type=int, default=100, help="at most this many values (0: all)")
    with_format(rare)

    diff = sub.add_parser("diff", help="rows of a plugin in one image and not the other")
    diff.add_argument("store")
    diff.add_argument("image_a")
    diff.add_argument("image_b")
    diff.add_argument("--plugin", required=True)
    diff.add_argument("--columns", metavar="C1,C2", help="compare on these columns only")
    with_format(diff)

    compact = sub.add_parser("compact", help="merge a store's batches into one")
    compact.add_argument("store")
    return parser


def _cell(value: Any) -> Any:
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex(" ")
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return value


def render(
    columns: list[str], rows: list[tuple], fmt: str | None, title: str | None = None
) -> None:
    fmt = fmt or ("table" if sys.stdout.isatty() else "tsv")
    if fmt == "json":
        json.dump(
            [dict(zip(columns, map(_cell, r))) for r in rows], sys.stdout, indent=1, default=str
        )
        sys.stdout.write("\n")
    elif fmt in ("csv", "tsv"):
        writer = csv.writer(
            sys.stdout, delimiter="," if fmt == "csv" else "\t", lineterminator="\n"
        )
        writer.writerow(columns)
        for row in rows:
            writer.writerow(["" if v is None else _cell(v) for v in row])
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title, show_lines=False)
        for column in columns:
            table.add_column(str(column), overflow="fold")
        for row in rows:
            table.add_row(*("" if v is None else str(_cell(v)) for v in row))
        console = Console()
        if not console.is_terminal:
            console = Console(width=200)  # piped: wrap less than the 80-column default
        console.print(table)


def _run(args: argparse.Namespace) -> int:
    from . import analysis
    from .progress import RichProgress
    from .run import RunOptions, SchedulerUnreachable, run_triage
    from .spec import Settings
    from .store import Store, StoreError
    from .worker import PluginNameError

    options = RunOptions(
        images=args.images,
        store=args.out,
        plugins=[p.strip() for p in args.plugins.split(",") if p.strip()] if args.plugins else None,
        settings=Settings(
            symbol_dirs=tuple(d for arg in args.symbols for d in arg.split(";") if d),
            plugin_dirs=tuple(d for arg in args.plugin_dirs for d in arg.split(";") if d),
            cache_path=args.cache_path,
            offline=args.offline,
        ),
        workers=args.workers,
        scheduler=args.scheduler,
        max_retries=args.max_retries,
        memory_limit=args.memory_limit,
        commit_seconds=args.commit_every,
        compact=not args.no_compact,
        connect_timeout=args.connect_timeout,
        no_worker_timeout=args.no_worker_timeout,
    )
    try:
        with RichProgress(args.progress) as progress:
            report = run_triage(options, progress)
    except (SchedulerUnreachable, StoreError, PluginNameError) as error:
        print(f"triage: {error}", file=sys.stderr)
        return 2
    print(
        f"triage: run {report.run_id} {report.status} on {report.engine}: "
        f"{report.done} ok, {report.failed} failed, {report.skipped} skipped, "
        f"{report.already_done} already done, {report.seconds:.1f} s; store {args.out}",
        file=sys.stderr,
    )
    if report.status == "interrupted":
        print(
            "triage: interrupted; finished tasks are in the store, rerun to resume", file=sys.stderr
        )
        return 130
    with Store(args.out).connect() as con:
        render(*analysis.summary(con), None, title=f"{args.out}: per image")
    return 3 if report.status == "aborted" else 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "run":
        try:
            return _run(args)
        except KeyboardInterrupt:  # before the engine started or after it stopped
            print("triage: interrupted", file=sys.stderr)
            return 130
    from . import analysis
    from .store import Store, StoreError

    try:
        store = Store(args.store)
        if args.command == "compact":
            with store.writing():
                store.compact("compact")
            return 0
        with store.connect() as con:
            if args.command == "query":
                result = con.sql(args.sql)
                if result is None:  # a statement without rows (SET, CREATE VIEW ...)
                    return 0
                render(result.columns, result.fetchall(), args.format)
            elif args.command == "summary":
                render(*analysis.summary(con), args.format)
                if args.errors:
                    render(*analysis.errors(con), args.format)
            elif args.command == "rare":
                render(
                    *analysis.rare(con, args.plugin, args.column, args.max_images, args.limit),
                    args.format,
                )
            elif args.command == "diff":
                columns = [c.strip() for c in args.columns.split(",")] if args.columns else None
                render(
                    *analysis.diff(con, args.plugin, args.image_a, args.image_b, columns),
                    args.format,
                )
    except (StoreError, analysis.AnalysisError) as error:
        print(f"triage: {error}", file=sys.stderr)
        return 1
    except Exception as error:  # DuckDB errors in user SQL: one line, not a traceback
        if type(error).__module__.split(".")[0] in ("duckdb", "_duckdb"):
            print(f"triage: {type(error).__name__}: {error}", file=sys.stderr)
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
