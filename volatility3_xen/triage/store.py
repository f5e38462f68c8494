"""The result store: Parquet files in committed batches, read through DuckDB views.

Layout (a directory)::

    STORE/TRIAGE-STORE.json           format marker
    STORE/batches/000007-<run>/       one committed batch
        batch.json                    seq, run, supersedes (compaction)
        meta/{tasks,errors,images,runs}.parquet
        plugins/<plugin>.parquet      e.g. plugins/linux.pslist.parquet

Why batches: a run writes everything it collected since its last commit into a hidden
``.tmp-*`` directory and renames it into place; the rename is the commit, so a run killed
at any moment (Ctrl-C, SIGKILL, power) leaves committed batches and garbage the next
writer removes, never half a table.  A pair (image, plugin) gets rows only from a task
that succeeded, and a run only schedules pairs whose latest attempt is not done, so rows
are never duplicated; the views also keep only each pair's latest successful attempt, in
case an image changed between runs.  Compaction writes one batch that *supersedes* all
live ones, then deletes them; a reader ignores superseded batches, so a crash between the
two steps is harmless too.

Views (``Store.connect()``): one per plugin table, named after it (``"linux.pslist"``,
plus ``linux_pslist`` for SQL without quotes); ``tasks`` (latest attempt per pair),
``errors`` (pairs whose latest attempt failed), ``images`` (latest identity per image),
``runs``, and the full ``task_history``, ``error_history``, ``image_history``.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import table
from .spec import KnownImage, StackFacts

MARKER = "TRIAGE-STORE.json"
FORMAT = "volatility3-xen triage store"
VERSION = 1
META_TABLES = ("tasks", "errors", "images", "runs")
#: Columns triage adds to every plugin row (the plugin's own columns come between
#: ``image`` and these).
ROW_META = ("tree_depth", "row_index", "image_sha256", "run_id")
_BATCH = re.compile(r"^(\d{6,})-([0-9a-zA-Z_-]+)$")


class StoreError(Exception):
    """Not a store, a store in use by another run, or a store from a newer version."""


def _schemas() -> dict[str, Any]:
    import pyarrow as pa

    ts = pa.timestamp("us", tz="UTC")
    return {
        "tasks": pa.schema(
            [
                ("image", pa.string()),
                ("plugin", pa.string()),
                ("status", pa.string()),  # ok | error | skipped
                ("rows", pa.int64()),
                ("error_class", pa.string()),
                ("message", pa.string()),
                ("os", pa.string()),
                ("kernel", pa.string()),
                ("xen", pa.bool_()),
                ("layers", pa.string()),
                ("warnings", pa.string()),
                ("worker", pa.string()),
                ("started", ts),
                ("finished", ts),
                ("seconds", pa.float64()),
                ("run_id", pa.string()),
                ("recorded_at", ts),
                ("batch_seq", pa.int64()),
            ]
        ),
        "errors": pa.schema(
            [
                ("image", pa.string()),
                ("image_sha256", pa.string()),
                ("plugin", pa.string()),
                ("error_class", pa.string()),
                ("message", pa.string()),
                ("worker", pa.string()),
                ("run_id", pa.string()),
                ("recorded_at", ts),
                ("batch_seq", pa.int64()),
            ]
        ),
        "images": pa.schema(
            [
                ("image", pa.string()),
                ("path", pa.string()),
                ("image_sha256", pa.string()),
                ("size", pa.int64()),
                ("mtime_ns", pa.int64()),
                ("hash_seconds", pa.float64()),
                ("run_id", pa.string()),
                ("recorded_at", ts),
                ("batch_seq", pa.int64()),
            ]
        ),
        "runs": pa.schema(
            [
                ("run_id", pa.string()),
                ("status", pa.string()),  # running | complete | interrupted | aborted
                ("started", ts),
                ("finished", ts),
                ("host", pa.string()),
                ("engine", pa.string()),
                ("workers", pa.int64()),
                ("plugins", pa.string()),
                ("symbols", pa.string()),
                ("volatility", pa.string()),
                ("triage", pa.string()),
                ("tasks_done", pa.int64()),
                ("tasks_failed", pa.int64()),
                ("batch_seq", pa.int64()),
            ]
        ),
    }


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def epoch(seconds: float) -> datetime.datetime | None:
    if not seconds:
        return None
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)


@dataclass
class PluginPart:
    """One successful task's rows, waiting for its batch to be written."""

    image: str
    image_sha256: str
    run_id: str
    columns: list[tuple[str, str]]
    rows: list[tuple]
    depths: list[int]


@dataclass
class Batch:
    """What a run collected since its last commit."""

    meta: dict[str, list[dict[str, Any]]] = field(
        default_factory=lambda: {name: [] for name in META_TABLES}
    )
    plugins: dict[str, list[PluginPart]] = field(default_factory=dict)

    def add(self, name: str, row: dict[str, Any]) -> None:
        self.meta[name].append(row)

    def add_rows(self, plugin: str, part: PluginPart) -> None:
        self.plugins.setdefault(plugin, []).append(part)

    @property
    def empty(self) -> bool:
        return not any(self.meta.values()) and not self.plugins

    @property
    def tasks(self) -> int:
        return len(self.meta["tasks"])


@dataclass
class StoreState:
    """What earlier runs left: enough to plan a resumed run."""

    done: set[tuple[str, str]]  # (image, plugin) whose latest attempt is ok or skipped
    failed: set[tuple[str, str]]
    known: dict[str, KnownImage]  # image -> identity from its latest hash
    detected: dict[str, StackFacts]  # image -> facts of its latest successful detection


class Store:
    def __init__(self, root: str | os.PathLike[str], create: bool = False) -> None:
        self.root = Path(root)
        marker = self.root / MARKER
        if not marker.exists():
            if not create:
                raise StoreError(f"{self.root} is not a triage store (no {MARKER})")
            if self.root.exists() and any(self.root.iterdir()):
                raise StoreError(f"{self.root} exists, is not empty and is not a triage store")
            (self.root / "batches").mkdir(parents=True, exist_ok=True)
            _write_json(marker, {"format": FORMAT, "version": VERSION})
        info = json.loads(marker.read_text())
        if info.get("format") != FORMAT or int(info.get("version", 0)) > VERSION:
            raise StoreError(f"{self.root}: unsupported store format {info}")
        self.batches_dir = self.root / "batches"
        self.batches_dir.mkdir(exist_ok=True)
        self._lock_handle: Any = None

    # -- writer side -------------------------------------------------------------------------

    @contextlib.contextmanager
    def writing(self) -> Iterator[Store]:
        """Exclusive right to write (one run or compaction at a time); cleans up what an
        interrupted writer left."""
        handle = open(self.root / ".lock", "a+")  # noqa: SIM115 - held for the block
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise StoreError(f"{self.root} is being written by another triage run") from None
        self._lock_handle = handle
        try:
            self._recover()
            yield self
        finally:
            self._lock_handle = None
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()

    def _recover(self) -> None:
        for stale in self.batches_dir.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        for name in self._superseded(self._committed()):
            shutil.rmtree(self.batches_dir / name, ignore_errors=True)

    def next_seq(self) -> int:
        seqs = [int(_BATCH.match(p.name).group(1)) for p in self._committed()]  # type: ignore[union-attr]
        return max(seqs, default=0) + 1

    def commit(self, batch: Batch, run_id: str, supersedes: list[str] | None = None) -> str | None:
        """Write the batch and make it visible atomically; returns its directory name."""
        if self._lock_handle is None:
            raise StoreError("commit() outside Store.writing()")
        if batch.empty and not supersedes:
            return None
        import pyarrow as pa
        import pyarrow.parquet as pq

        seq = self.next_seq()
        for rows in batch.meta.values():
            for row in rows:
                row["batch_seq"] = seq
        tmp = self.batches_dir / f".tmp-{uuid.uuid4().hex}"
        (tmp / "meta").mkdir(parents=True)
        (tmp / "plugins").mkdir()
        schemas = _schemas()
        for name in META_TABLES:
            data = pa.Table.from_pylist(batch.meta[name], schema=schemas[name])
            _write_parquet(pq, data, tmp / "meta" / f"{name}.parquet")
        for plugin, parts in batch.plugins.items():
            for index, data in enumerate(plugin_tables(parts)):
                suffix = "" if index == 0 else f"~{index}"
                _write_parquet(pq, data, tmp / "plugins" / f"{plugin}{suffix}.parquet")
        name = f"{seq:06d}-{run_id}"
        _write_json(tmp / "batch.json", {"seq": seq, "run": run_id, "supersedes": supersedes or []})
        _fsync_dir(tmp / "meta")
        _fsync_dir(tmp / "plugins")
        os.rename(tmp, self.batches_dir / name)
        _fsync_dir(self.batches_dir)
        return name

    def compact(self, run_id: str) -> str | None:
        """Merge every live batch into one (fewer, larger files: Parquet's per-file footer
        dominates small tables).  Keeps all task/error history, and plugin rows of each
        pair's latest successful attempt only."""
        live = self.live_batches()
        if len(live) <= 1:
            return None
        import pyarrow.parquet as pq

        with self.connect() as con:
            meta = {
                n: con.sql(f"SELECT * FROM {_HISTORY[n]}").to_arrow_table() for n in META_TABLES
            }
            plugin_data = {
                p: con.sql(f'SELECT * FROM "{p}"').to_arrow_table() for p in self.plugin_tables()
            }
        seq = self.next_seq()
        tmp = self.batches_dir / f".tmp-{uuid.uuid4().hex}"
        (tmp / "meta").mkdir(parents=True)
        (tmp / "plugins").mkdir()
        for name, data in meta.items():
            _write_parquet(pq, data, tmp / "meta" / f"{name}.parquet")
        for plugin, data in plugin_data.items():
            _write_parquet(pq, data, tmp / "plugins" / f"{plugin}.parquet")
        names = [p.name for p in live]
        _write_json(tmp / "batch.json", {"seq": seq, "run": run_id, "supersedes": names})
        _fsync_dir(tmp / "meta")
        _fsync_dir(tmp / "plugins")
        name = f"{seq:06d}-{run_id}"
        os.rename(tmp, self.batches_dir / name)
        _fsync_dir(self.batches_dir)
        for old in names:
            shutil.rmtree(self.batches_dir / old, ignore_errors=True)
        return name

    # -- reader side -------------------------------------------------------------------------

    def _committed(self) -> list[Path]:
        return sorted(
            (p for p in self.batches_dir.iterdir() if p.is_dir() and _BATCH.match(p.name)),
            key=lambda p: p.name,
        )

    @staticmethod
    def _superseded(batches: list[Path]) -> set[str]:
        gone: set[str] = set()
        for path in batches:
            with contextlib.suppress(OSError, ValueError):
                gone.update(json.loads((path / "batch.json").read_text()).get("supersedes", []))
        return gone

    def live_batches(self) -> list[Path]:
        committed = self._committed()
        gone = self._superseded(committed)
        return [p for p in committed if p.name not in gone]

    def files(self, sub: str, name: str) -> list[str]:
        found = []
        for batch in self.live_batches():
            found += sorted(str(p) for p in (batch / sub).glob(f"{name}.parquet"))
            found += sorted(str(p) for p in (batch / sub).glob(f"{name}~*.parquet"))
        return found

    def plugin_tables(self) -> list[str]:
        names = set()
        for batch in self.live_batches():
            for path in (batch / "plugins").glob("*.parquet"):
                names.add(path.name[: -len(".parquet")].split("~", 1)[0])
        return sorted(names)

    def size(self, plugins_only: bool = False) -> int:
        total = 0
        for batch in self.live_batches():
            for path in batch.rglob("*.parquet"):
                if not plugins_only or path.parent.name == "plugins":
                    total += path.stat().st_size
        return total

    def connect(self) -> Any:
        """An in-memory DuckDB connection with a view per table (see the module doc)."""
        import duckdb
        import pyarrow as pa

        con = duckdb.connect(":memory:")
        schemas = _schemas()
        for name in META_TABLES:
            files = self.files("meta", name)
            if files:
                source = f"read_parquet({_sql_list(files)}, union_by_name=true)"
            else:
                con.register(f"_empty_{name}", pa.Table.from_pylist([], schema=schemas[name]))
                source = f"_empty_{name}"
            con.execute(f"CREATE VIEW {_HISTORY[name]} AS SELECT * FROM {source}")
        con.execute(
            "CREATE VIEW tasks AS SELECT * FROM task_history QUALIFY row_number() OVER "
            "(PARTITION BY image, plugin ORDER BY batch_seq DESC, recorded_at DESC) = 1"
        )
        con.execute(
            "CREATE VIEW errors AS SELECT e.* FROM error_history e JOIN tasks t "
            "ON e.image = t.image AND e.plugin = t.plugin AND e.run_id = t.run_id "
            "WHERE t.status = 'error'"
        )
        con.execute(
            "CREATE VIEW images AS SELECT * FROM image_history QUALIFY row_number() OVER "
            "(PARTITION BY image ORDER BY batch_seq DESC, recorded_at DESC) = 1"
        )
        con.execute(
            "CREATE VIEW runs AS SELECT * FROM run_history QUALIFY row_number() OVER "
            "(PARTITION BY run_id ORDER BY batch_seq DESC) = 1"
        )
        for plugin in self.plugin_tables():
            files = self.files("plugins", plugin)
            con.execute(
                f'CREATE VIEW "{plugin}" AS SELECT p.* FROM '
                f"read_parquet({_sql_list(files)}, union_by_name=true) p "
                f"SEMI JOIN (SELECT image, run_id FROM tasks WHERE plugin = {_sql_str(plugin)} "
                f"AND status = 'ok') t ON p.image = t.image AND p.run_id = t.run_id"
            )
            alias = re.sub(r"\W", "_", plugin)
            if alias != plugin:
                con.execute(f'CREATE VIEW "{alias}" AS SELECT * FROM "{plugin}"')
        return con

    def state(self) -> StoreState:
        with self.connect() as con:
            done, failed, detected = set(), set(), {}
            for image, plugin, status in con.sql(
                "SELECT image, plugin, status FROM tasks"
            ).fetchall():
                (done if status in ("ok", "skipped") else failed).add((image, plugin))
            rows = con.sql(
                "SELECT image, os, kernel, xen, layers FROM tasks "
                "WHERE plugin = 'image' AND status = 'ok' AND layers IS NOT NULL"
            ).fetchall()
            for image, os_name, kernel, xen, layers in rows:
                detected[image] = StackFacts(layers.split(" > "), os_name, kernel, bool(xen), True)
            known = {
                image: KnownImage(size, mtime_ns, sha)
                for image, size, mtime_ns, sha in con.sql(
                    "SELECT image, size, mtime_ns, image_sha256 FROM images"
                ).fetchall()
            }
        return StoreState(done, failed, known, detected)


_HISTORY = {
    "tasks": "task_history",
    "errors": "error_history",
    "images": "image_history",
    "runs": "run_history",
}


def plugin_tables(parts: list[PluginPart]) -> list[Any]:
    """Arrow tables for one plugin's parts: one per column signature (a plugin's columns
    are fixed by its class, so normally one), every task of the batch typed together."""
    import pyarrow as pa

    groups: dict[tuple[tuple[str, str], ...], list[PluginPart]] = {}
    for part in parts:
        groups.setdefault(tuple(part.columns), []).append(part)
    tables = []
    for columns, members in groups.items():
        names = _column_names([name for name, _ in columns])
        arrays: dict[str, Any] = {}
        arrays["image"] = pa.array([p.image for p in members for _ in p.rows], pa.string())
        for index, (name, (_, kind)) in enumerate(zip(names, columns)):
            values = [row[index] for p in members for row in p.rows]
            arrays[name] = table.column_array(kind, values)
        arrays["tree_depth"] = pa.array([d for p in members for d in p.depths], pa.int32())
        arrays["row_index"] = pa.array([i for p in members for i in range(len(p.rows))], pa.int32())
        arrays["image_sha256"] = pa.array(
            [p.image_sha256 for p in members for _ in p.rows], pa.string()
        )
        arrays["run_id"] = pa.array([p.run_id for p in members for _ in p.rows], pa.string())
        tables.append(pa.table(arrays))
    return tables


def _column_names(names: list[str]) -> list[str]:
    """Plugin column names, renamed where they would clash (case-insensitively, as DuckDB
    compares) with ours or with each other."""
    taken = {"image", *ROW_META}
    out = []
    for name in names:
        candidate = name or "column"
        while candidate.lower() in taken:
            candidate += "_"
        taken.add(candidate.lower())
        out.append(candidate)
    return out


def _write_parquet(pq: Any, data: Any, path: Path) -> None:
    # zstd: the store must stay within 1.5x the CSV of the same rows even for short
    # tables, and dictionary encoding already handles the repeated image/run columns.
    pq.write_table(data, str(path), compression="zstd")
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n")


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _sql_str(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _sql_list(items: list[str]) -> str:
    return "[" + ", ".join(_sql_str(i) for i in items) + "]"
