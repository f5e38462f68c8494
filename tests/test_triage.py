"""Fleet triage (volatility3_xen.triage): real Dask runs over the bundled guest's PV and HVM
cores, its raw image and damaged or foreign files, checked row for row against ``vol -r
json`` of the same plugin on the same image; a real ``dask scheduler`` + two ``dask
worker`` processes on 127.0.0.1; resume after an injected failure, a killed worker and a
Ctrl-C; and query / rare / diff / summary on a store whose contents the test wrote.

The Volatility work is a dozen plugin runs on a 128 MiB guest, two at a time (about two
minutes on two cores); everything else takes seconds.
"""

from __future__ import annotations

import atexit
import datetime
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("dask")
pytest.importorskip("distributed")
pytest.importorskip("pyarrow")
pytest.importorskip("duckdb")

from volatility3_xen.triage import analysis, cli  # noqa: E402
from volatility3_xen.triage.run import RunOptions, run_triage  # noqa: E402
from volatility3_xen.triage.spec import Settings  # noqa: E402
from volatility3_xen.triage.store import Batch, PluginPart, Store, now  # noqa: E402

from .conftest import REPO, run_vol  # noqa: E402

LINUX_DEFAULT = ["linux.pslist", "linux.lsmod", "linux.sockstat"]
XEN = ["xen.info", "xen.vcpus"]
ENV = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def sample(kind: str) -> Path:
    """The bundled guest's core, from the package's own sample builder (its CLI)."""
    done = subprocess.run(
        [sys.executable, "-m", "volatility3_xen", "samples", kind],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env=ENV,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return Path(done.stdout.strip().splitlines()[-1])


def link(source: Path, target: Path) -> Path:
    """A second name for an image (a hardlink where possible: no 128 MiB copy)."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
    return target


# vol's identifier cache forgets the symbols of other -s directories: a private one keeps
# other vol runs on the machine from making our banner look-ups miss.
VOL_CACHE = Path(tempfile.mkdtemp(prefix="vx3-triage-vol-"))
atexit.register(shutil.rmtree, VOL_CACHE, True)


@functools.cache
def vol_rows(image: Path, plugin: str, symbols: Path) -> list[tuple[int, dict[str, Any]]]:
    """``vol -r json`` of one plugin, flattened depth-first: (depth, row) per node."""
    done = run_vol(
        "--cache-path", str(VOL_CACHE), "-s", str(symbols), "-r", "json", "-f", str(image), plugin
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out: list[tuple[int, dict[str, Any]]] = []

    def walk(nodes: list[dict[str, Any]], depth: int) -> None:
        for node in nodes:
            children = node.pop("__children", [])
            out.append((depth, node))
            walk(children, depth + 1)

    walk(json.loads(done.stdout), 0)
    return out


def as_json(value: Any) -> Any:
    """A stored value as vol's JSON renderer prints it."""
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex(" ")
    return value


def store_rows(con: Any, plugin: str, image: str) -> list[tuple[int, dict[str, Any]]]:
    columns = analysis.plugin_columns(con, plugin)
    select = ", ".join(f'"{c}"' for c in columns)
    rows = con.execute(
        f'SELECT tree_depth, {select} FROM "{plugin}" WHERE image = ? ORDER BY row_index', [image]
    ).fetchall()
    return [(r[0], {c: as_json(v) for c, v in zip(columns, r[1:])}) for r in rows]


# -- the fleet: a LocalCluster with two workers over real cores -------------------------------


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, guest_image: Path, symbols_dir: Path) -> dict:
    base = tmp_path_factory.mktemp("fleet")
    pv, hvm = link(sample("pv"), base / "pv.core"), link(sample("hvm"), base / "hvm.core")
    raw = link(guest_image, base / "guest.raw")
    # Damaged: a core cut off after its headers (the pages and the table are gone).
    damaged = base / "cut.core"
    with open(hvm, "rb") as source:
        damaged.write_bytes(source.read(64 * 1024))
    text = base / "notes.txt"
    text.write_text("not a memory image\n" * 100)
    images = [str(p) for p in (pv, hvm, raw, damaged, text)] + [str(base / "missing.core")]
    store = base / "fleet.store"
    report = run_triage(
        RunOptions(
            images=images,
            store=str(store),
            settings=Settings(symbol_dirs=(str(symbols_dir),), cache_path=str(base / "cache")),
            workers=2,
        )
    )
    return {
        "report": report,
        "store": store,
        "pv": str(pv),
        "hvm": str(hvm),
        "raw": str(raw),
        "damaged": str(damaged),
        "text": str(text),
        "missing": images[-1],
        "symbols": symbols_dir,
    }


def test_fleet_runs_every_pair_on_two_workers(fleet: dict) -> None:
    report = fleet["report"]
    assert report.status == "complete"
    assert report.engine == "LocalCluster(2 workers)"
    with Store(fleet["store"]).connect() as con:
        tasks = {
            (image, plugin): status
            for image, plugin, status in con.sql(
                "SELECT image, plugin, status FROM tasks"
            ).fetchall()
        }
        # Default plugin set by detected OS, plus the Xen plugins on Xen images only.
        for image in (fleet["pv"], fleet["hvm"]):
            for plugin in ["image", *LINUX_DEFAULT, *XEN]:
                assert tasks[(image, plugin)] == "ok", (image, plugin)
        for plugin in ["image", *LINUX_DEFAULT]:
            assert tasks[(fleet["raw"], plugin)] == "ok"
        assert (fleet["raw"], "xen.info") not in tasks
        workers = {w for (w,) in con.sql("SELECT DISTINCT worker FROM tasks").fetchall() if w}
        assert len(workers) == 2, workers  # both worker processes took tasks
        # Rows carry the image's identity: its real sha256.
        for image in (fleet["pv"], fleet["raw"]):
            (sha,) = con.execute(
                'SELECT DISTINCT image_sha256 FROM "linux.pslist" WHERE image = ?', [image]
            ).fetchall()[0]
            assert sha == _sha256(Path(image))


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(8 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def test_fleet_rows_equal_vol_json_output(fleet: dict) -> None:
    """Row for row and value for value against ``vol -r json``: every plugin on the raw
    image and on one core of each kind; the remaining pairs (the same guest) must then
    equal those."""
    with Store(fleet["store"]).connect() as con:
        pairs = con.sql(
            "SELECT image, plugin FROM tasks WHERE status = 'ok' AND plugin <> 'image' "
            "ORDER BY image, plugin"
        ).fetchall()
        stored = {(i, p): store_rows(con, p, i) for i, p in pairs}
    assert len(pairs) == 13
    checked = [
        (fleet["raw"], "linux.pslist"),
        (fleet["raw"], "linux.lsmod"),
        (fleet["raw"], "linux.sockstat"),
        (fleet["pv"], "linux.pslist"),
        (fleet["hvm"], "linux.pslist"),
        (fleet["pv"], "xen.info"),
        (fleet["pv"], "xen.vcpus"),
        (fleet["hvm"], "xen.info"),
        (fleet["hvm"], "xen.vcpus"),
    ]
    with ThreadPoolExecutor(2) as pool:
        expected = list(pool.map(lambda p: vol_rows(Path(p[0]), p[1], fleet["symbols"]), checked))
    for pair, rows in zip(checked, expected):
        assert stored[pair] == rows, pair
    for image in (fleet["pv"], fleet["hvm"]):
        for plugin in ("linux.lsmod", "linux.sockstat"):
            assert stored[(image, plugin)] == stored[(fleet["raw"], plugin)]
    # The guest's own processes are there (not just equal empty lists).
    comms = {row["COMM"] for _, row in stored[(fleet["pv"], "linux.pslist")]}
    assert {"demo_server", "demo_worker", "demo_shell"} <= comms
    assert len(stored[(fleet["pv"], "xen.info")]) > 20


def test_fleet_bad_files_are_one_error_row_each(fleet: dict) -> None:
    with Store(fleet["store"]).connect() as con:
        errors = con.sql("SELECT image, plugin, error_class, message FROM errors").fetchall()
    by_image: dict[str, list[tuple]] = {}
    for row in errors:
        by_image.setdefault(row[0], []).append(row)
    assert set(by_image) == {fleet["damaged"], fleet["text"], fleet["missing"]}
    assert all(len(rows) == 1 for rows in by_image.values()), by_image
    assert by_image[fleet["missing"]][0][2] == "FileNotFoundError"
    assert by_image[fleet["text"]][0][2] == "NotAMemoryImage"
    damaged = by_image[fleet["damaged"]][0]
    assert damaged[2] == "NotAMemoryImage"
    assert "Xen dump-core" in damaged[3]  # the layer's own one-line reason is kept
    assert all("\n" not in row[3] and "Traceback" not in row[3] for row in errors)
    # vol agrees that nothing usable is in the damaged core.
    done = run_vol(
        "--cache-path",
        str(VOL_CACHE),
        "-s",
        str(fleet["symbols"]),
        "-f",
        fleet["damaged"],
        "linux.pslist",
    )
    assert done.returncode != 0


def test_fleet_summary_rare_and_diff(fleet: dict) -> None:
    with Store(fleet["store"]).connect() as con:
        columns, rows = analysis.summary(con)
        summary = {row[0]: dict(zip(columns, row)) for row in rows}
        pslist = vol_rows(Path(fleet["raw"]), "linux.pslist", fleet["symbols"])
        for image in (fleet["pv"], fleet["hvm"], fleet["raw"]):
            assert summary[image]["os"] == "Linux"
            assert summary[image]["processes"] == len(pslist)
            assert summary[image]["modules"] == 0 and summary[image]["sockets"] == 0
            assert summary[image]["errors"] == 0
        banner = con.sql("SELECT DISTINCT kernel FROM tasks WHERE kernel IS NOT NULL").fetchall()
        assert len(banner) == 1 and banner[0][0].startswith("Linux version ")
        assert summary[fleet["pv"]]["kernel"] == "Linux " + banner[0][0].split()[2]
        # The Xen type is xen.info's "guest type" row, as vol prints it.
        for image in (fleet["pv"], fleet["hvm"]):
            info = vol_rows(Path(image), "xen.info", fleet["symbols"])
            kind = next(
                r["Value"] for _, r in info if (r["Group"], r["Field"]) == ("guest", "type")
            )
            assert summary[image]["xen"] == kind
        assert summary[fleet["raw"]]["xen"] == "no"
        assert summary[fleet["missing"]]["errors"] == 1
        # The same guest as PV, HVM and raw: no process differs, and nothing is rare.
        assert analysis.diff(con, "linux.pslist", fleet["pv"], fleet["hvm"])[1] == []
        assert analysis.diff(con, "linux.pslist", fleet["raw"], fleet["pv"])[1] == []
        assert analysis.rare(con, "linux.pslist", "comm")[1] == []
        # ... but the xen.info facts of the PV and HVM cores do differ.
        only = analysis.diff(
            con, "xen.info", fleet["pv"], fleet["hvm"], ["group", "field", "value"]
        )[1]
        assert (fleet["pv"], "guest", "type", "PV") in only


# -- a real distributed cluster: dask scheduler + 2 dask workers on 127.0.0.1 -----------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dask(*args: str) -> list[str]:
    script = Path(sys.executable).with_name("dask")
    return [str(script), *args] if script.exists() else [sys.executable, "-m", "dask", *args]


def _triage(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "volatility3_xen", "triage", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=ENV,
        check=False,
    )


def _stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + 20
    for process in processes:
        try:
            process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def test_distributed_scheduler_and_two_workers(fleet: dict, tmp_path: Path) -> None:
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    logs = [open(tmp_path / f"{name}.log", "w") for name in ("scheduler", "w1", "w2")]  # noqa: SIM115
    started = [
        subprocess.Popen(
            _dask("scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"),
            stdout=logs[0],
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            env=ENV,
        )
    ]
    try:
        for index in (1, 2):
            started.append(
                subprocess.Popen(
                    _dask(
                        "worker",
                        address,
                        "--nthreads",
                        "1",
                        "--name",
                        f"w{index}",
                        "--no-dashboard",
                        "--host",
                        "127.0.0.1",
                    ),
                    stdout=logs[index],
                    stderr=subprocess.STDOUT,
                    cwd=tmp_path,
                    env=ENV,
                )
            )
        store = tmp_path / "dist.store"
        done = _triage(
            "run",
            fleet["hvm"],
            fleet["raw"],
            "--plugins",
            "linux.pslist,xen.info",
            "--scheduler",
            address,
            "--connect-timeout",
            "60",
            "-s",
            str(fleet["symbols"]),
            "-o",
            str(store),
            "--no-progress",
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"on scheduler {address}" in done.stderr
        with Store(store).connect() as con, Store(fleet["store"]).connect() as ref:
            for image in (fleet["hvm"], fleet["raw"]):
                assert store_rows(con, "linux.pslist", image) == store_rows(
                    ref, "linux.pslist", image
                )
            assert store_rows(con, "xen.info", fleet["hvm"]) == store_rows(
                ref, "xen.info", fleet["hvm"]
            )
            # raw is no Xen core: xen.info is skipped there, not an error.
            status = con.execute(
                "SELECT status FROM tasks WHERE image = ? AND plugin = 'xen.info'", [fleet["raw"]]
            ).fetchall()[0]
            assert status == ("skipped",)
            workers = {w for (w,) in con.sql("SELECT DISTINCT worker FROM tasks").fetchall() if w}
            assert workers and all(w.startswith("tcp://127.0.0.1:") for w in workers)
    finally:
        _stop(started[::-1])
        for log in logs:
            log.close()


def test_unreachable_scheduler_is_a_clear_message(tmp_path: Path, symbols_dir: Path) -> None:
    started = time.monotonic()
    done = _triage(
        "run",
        str(tmp_path / "x.core"),
        "--scheduler",
        f"tcp://127.0.0.1:{_free_port()}",
        "--connect-timeout",
        "2",
        "-s",
        str(symbols_dir),
        "-o",
        str(tmp_path / "s"),
    )
    assert done.returncode == 2
    assert "cannot reach the Dask scheduler at tcp://127.0.0.1:" in done.stderr
    assert "Traceback" not in done.stderr
    assert time.monotonic() - started < 60


# -- resume: injected failure, a killed worker, Ctrl-C -----------------------------------------

FLAKY = '''
"""Test plugin: fails once (while fail-once exists beside it), then yields two rows."""
from pathlib import Path
from volatility3.framework import interfaces, renderers


class Flaky(interfaces.plugins.PluginInterface):
    _required_framework_version = (2, 0, 0)

    @classmethod
    def get_requirements(cls):
        return []

    def run(self):
        marker = Path(__file__).with_name("fail-once")
        if marker.exists():
            marker.unlink()
            raise RuntimeError("injected failure")
        rows = [(0, ("a", 1)), (0, ("b", 2))]
        return renderers.TreeGrid([("Name", str), ("Value", int)], iter(rows))
'''

CRASH = '''
"""Test plugin: its worker process dies (as under the kernel's OOM killer)."""
import os
import signal
from volatility3.framework import interfaces


class Crash(interfaces.plugins.PluginInterface):
    _required_framework_version = (2, 0, 0)

    @classmethod
    def get_requirements(cls):
        return []

    def run(self):
        os.kill(os.getpid(), signal.SIGKILL)
'''

SLOW = '''
"""Test plugin: waits while the file "slow" exists beside it (at most a minute)."""
import time
from pathlib import Path
from volatility3.framework import interfaces, renderers


class Slow(interfaces.plugins.PluginInterface):
    _required_framework_version = (2, 0, 0)

    @classmethod
    def get_requirements(cls):
        return []

    def run(self):
        deadline = time.monotonic() + 60
        while Path(__file__).with_name("slow").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        return renderers.TreeGrid([("Done", bool)], iter([(0, (True,))]))
'''


@pytest.fixture
def test_plugins(tmp_path: Path) -> Path:
    folder = tmp_path / "plugins"
    folder.mkdir()
    for name, text in (("flaky", FLAKY), ("crash", CRASH), ("slow", SLOW)):
        (folder / f"{name}.py").write_text(text)
    return folder


def _no_duplicates(con: Any, plugin: str) -> tuple[int, int]:
    return con.execute(
        f'SELECT count(*), count(DISTINCT (image, row_index)) FROM "{plugin}"'
    ).fetchall()[0]


def test_resume_after_injected_failure_and_killed_worker(
    fleet: dict, tmp_path: Path, test_plugins: Path
) -> None:
    (test_plugins / "fail-once").touch()
    raw_b = link(Path(fleet["raw"]), tmp_path / "b.raw")
    images = [fleet["raw"], str(raw_b)]
    store = tmp_path / "resume.store"
    settings = Settings(
        symbol_dirs=(str(fleet["symbols"]),),
        plugin_dirs=(str(test_plugins),),
        cache_path=str(tmp_path / "cache"),
    )

    def run(plugins: list[str]) -> Any:
        options = RunOptions(images, str(store), plugins, settings, workers=2, max_retries=1)
        return run_triage(options)

    first = run(["linux.pslist", "flaky.Flaky"])
    assert first.status == "complete"
    with Store(store).connect() as con:
        errors = con.sql("SELECT image, plugin, error_class, message FROM errors").fetchall()
        assert [(plugin, cls, message) for _, plugin, cls, message in errors] == [
            ("flaky", "RuntimeError", "injected failure")
        ]
        assert con.execute('SELECT count(*) FROM "flaky"').fetchall()[0] == (2,)

    # The rerun retries the failed pair only; a plugin that kills its worker (as the OOM
    # killer would) becomes an error row after one retry, and hurts no other task.
    started = time.monotonic()
    second = run(["linux.pslist", "flaky.Flaky", "crash.Crash"])
    assert second.status == "complete"
    assert time.monotonic() - started < 300  # the dying workers did not hang the run
    assert second.already_done == 3  # two pslist pairs and one flaky pair were not rerun
    with Store(store).connect() as con:
        errors = con.sql("SELECT plugin, error_class, message FROM errors").fetchall()
        assert [(plugin, cls) for plugin, cls, _ in errors] == [("crash", "KilledWorker")] * 2
        assert all("2 attempts" in message for *_, message in errors)
        assert con.execute('SELECT count(*) FROM "flaky"').fetchall()[0] == (4,)
        with Store(fleet["store"]).connect() as ref:
            expected = store_rows(ref, "linux.pslist", fleet["raw"])
        for image in images:
            assert store_rows(con, "linux.pslist", image) == expected
        total, distinct = _no_duplicates(con, "linux.pslist")
        assert total == distinct == 2 * len(expected)
        # The failed flaky attempt is history, not a current error.
        assert con.execute("SELECT count(*) FROM error_history WHERE plugin = 'flaky'").fetchall()[
            0
        ] == (1,)
    assert len(Store(store).live_batches()) == 1  # compacted


def test_ctrl_c_leaves_a_consistent_store_and_rerun_completes(
    fleet: dict, tmp_path: Path, test_plugins: Path
) -> None:
    (test_plugins / "slow").touch()
    store = tmp_path / "int.store"
    images = [fleet["raw"], str(link(Path(fleet["raw"]), tmp_path / "b.raw"))]
    args = [
        "run",
        *images,
        "--plugins",
        "linux.pslist,slow.Slow",
        "-s",
        str(fleet["symbols"]),
        "-p",
        str(test_plugins),
        "-o",
        str(store),
        "--commit-every",
        "0",
        "--no-progress",
        "--cache-path",
        str(tmp_path / "cache"),
        "--workers",
        "2",
    ]
    process = subprocess.Popen(
        [sys.executable, "-m", "volatility3_xen", "triage", *args],
        cwd=REPO,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Wait until the pslist results are committed while the slow tasks still run.
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if (store / "TRIAGE-STORE.json").exists() and Store(store).live_batches():
                with Store(store).connect() as con:
                    ok = con.execute(
                        "SELECT count(*) FROM tasks WHERE plugin = 'linux.pslist' AND status = 'ok'"
                    ).fetchall()[0][0]
                if ok == 2:
                    break
            assert process.poll() is None, process.communicate()
            time.sleep(0.5)
        else:
            pytest.fail("the pslist tasks were not committed in time")
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    assert process.returncode == 130, stderr[-2000:]
    assert "rerun to resume" in stderr and "Traceback" not in stderr
    with Store(store).connect() as con:
        assert con.sql("SELECT status FROM runs").fetchall() == [("interrupted",)]
        assert con.execute("SELECT count(*) FROM tasks WHERE plugin = 'slow'").fetchall()[0] == (0,)
        assert _no_duplicates(con, "linux.pslist")[0] > 0
    assert not list((store / "batches").glob(".tmp-*"))

    (test_plugins / "slow").unlink()
    options = RunOptions(
        images,
        str(store),
        ["linux.pslist", "slow.Slow"],
        Settings((str(fleet["symbols"]),), (str(test_plugins),), str(tmp_path / "cache")),
        workers=2,
    )
    report = run_triage(options)
    assert report.status == "complete" and report.already_done == 2
    with Store(store).connect() as con, Store(fleet["store"]).connect() as ref:
        expected = store_rows(ref, "linux.pslist", fleet["raw"])
        total, distinct = _no_duplicates(con, "linux.pslist")
        assert total == distinct == 2 * len(expected)
        assert con.execute('SELECT count(*) FROM "slow"').fetchall()[0] == (2,)
        assert con.execute("SELECT count(*) FROM errors").fetchall()[0] == (0,)


# -- query, rare, diff on a store with known contents ------------------------------------------

KNOWN = {
    "a.core": [(1, "init"), (2, "sshd"), (3, "evil")],
    "b.core": [(1, "init"), (2, "sshd")],
    "c.core": [(1, "init"), (2, "sshd"), (4, "cron"), (5, "cron")],
}


def _known_store(path: Path) -> Store:
    store = Store(path, create=True)
    with store.writing():
        for index, (image, procs) in enumerate(KNOWN.items()):
            batch = Batch()  # one batch per image: the views must join them
            batch.add(
                "tasks",
                {
                    "image": image,
                    "plugin": "linux.pslist",
                    "status": "ok",
                    "rows": len(procs),
                    "run_id": f"r{index}",
                    "recorded_at": now(),
                },
            )
            batch.add_rows(
                "linux.pslist",
                PluginPart(
                    image,
                    f"sha-{image}",
                    f"r{index}",
                    [("PID", "int"), ("COMM", "str")],
                    procs,
                    [0] * len(procs),
                ),
            )
            store.commit(batch, f"r{index}")
    return store


def test_query_rare_diff_on_known_store(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    store = _known_store(tmp_path / "known.store")
    # A crashed writer's leftover is invisible, and the next writer removes it.
    (store.batches_dir / ".tmp-crashed" / "plugins").mkdir(parents=True)
    (store.batches_dir / ".tmp-crashed" / "plugins" / "linux.pslist.parquet").write_text("junk")
    with store.connect() as con:
        assert con.execute("SELECT count(*) FROM linux_pslist").fetchall()[0] == (9,)
    with store.writing():
        pass
    assert not (store.batches_dir / ".tmp-crashed").exists()
    with store.connect() as con:
        columns, rows = analysis.rare(con, "linux.pslist", "comm")
        assert columns[:2] == ["COMM", "images (of 3)"]
        assert [(r[0], r[1], r[2], r[3]) for r in rows] == [
            ("cron", 1, "c.core", 2),
            ("evil", 1, "a.core", 1),
        ]
        everything = analysis.rare(con, "linux.pslist", "COMM", max_images=3)[1]
        assert [(r[0], r[1]) for r in everything] == [
            ("cron", 1),
            ("evil", 1),
            ("init", 3),
            ("sshd", 3),
        ]
        assert analysis.diff(con, "linux.pslist", "a.core", "b.core")[1] == [("a.core", 3, "evil")]
        assert analysis.diff(con, "linux.pslist", "b.core", "c.core", ["comm"])[1] == [
            ("c.core", "cron"),
            ("c.core", "cron"),
        ]
        with pytest.raises(analysis.AnalysisError, match="no successful linux.pslist"):
            analysis.diff(con, "linux.pslist", "a.core", "z.core")
        with pytest.raises(analysis.AnalysisError, match="no column"):
            analysis.rare(con, "linux.pslist", "nope")

    assert (
        cli.main(
            [
                "query",
                str(store.root),
                "SELECT image, count(*) AS n FROM linux_pslist GROUP BY image ORDER BY image",
                "-f",
                "csv",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.splitlines() == ["image,n", "a.core,3", "b.core,2", "c.core,4"]
    assert (
        cli.main(
            ["rare", str(store.root), "--plugin", "linux.pslist", "--column", "comm", "-f", "json"]
        )
        == 0
    )
    assert [r["COMM"] for r in json.loads(capsys.readouterr().out)] == ["cron", "evil"]
    assert cli.main(["query", str(store.root), "SELECT nope FROM linux_pslist"]) == 1
    assert "Binder" in capsys.readouterr().err

    # Compaction: one batch, same answers.
    with store.writing():
        store.compact("c")
    assert len(store.live_batches()) == 1
    with store.connect() as con:
        assert con.execute("SELECT count(*) FROM linux_pslist").fetchall()[0] == (9,)
        assert analysis.diff(con, "linux.pslist", "a.core", "b.core")[1] == [("a.core", 3, "evil")]


def test_store_refuses_a_second_writer_and_foreign_directories(tmp_path: Path) -> None:
    from volatility3_xen.triage.store import StoreError

    store = Store(tmp_path / "s", create=True)
    with store.writing(), pytest.raises(StoreError, match="another triage run"):
        with Store(tmp_path / "s").writing():
            pass
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "file").write_text("x")
    with pytest.raises(StoreError, match="not a triage store"):
        Store(tmp_path / "other", create=True)


def test_triage_cli_is_dispatched() -> None:
    done = _triage("--help", timeout=120)
    assert done.returncode == 0
    for command in ("run", "query", "summary", "rare", "diff"):
        assert command in done.stdout
