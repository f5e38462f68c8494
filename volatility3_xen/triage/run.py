"""Orchestration: plan the (image, plugin) pairs, run them on Dask, commit to the store.

The engine is Dask distributed: an in-process ``LocalCluster`` with one single-threaded
worker process per core by default, or any existing cluster through ``--scheduler``.
Images are opened by the workers at the path the driver resolves (absolute), so on a
cluster every worker must see the images at the same path (a shared filesystem).

Per image: one *image task* (sha256 and size; with the default plugin set, also the
layer stack, to learn the OS), then its plugin tasks.  With an explicit ``--plugins``
list the first plugin (the *probe*) runs beside the image task and the rest wait for it:
a file on which nothing stacks gives one error row instead of one per plugin.

Failure model: every task returns rows or one Failure (never raises); a worker that dies
under a task (OOM kill, segfault) makes Dask retry the task on another worker up to
``max_retries`` times, then the task's future fails with ``KilledWorker`` and that becomes
the error row.  Ctrl-C cancels what is queued, commits what finished, and closes the
cluster; the store is consistent at every commit (see store.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from .spec import (
    DEFAULT_PLUGINS,
    IMAGE_TASK,
    XEN_PLUGINS,
    Failure,
    ImageJob,
    ImageResult,
    PluginJob,
    PluginResult,
    Settings,
    StackFacts,
    plugin_os,
    plugins_for,
)
from .store import Batch, PluginPart, Store, epoch, now

vollog = logging.getLogger(__name__)


class SchedulerUnreachable(Exception):
    """--scheduler names a scheduler that does not answer (or has no workers)."""


class RunAborted(Exception):
    """The cluster lost all its workers for longer than the run is willing to wait."""


@dataclass
class RunOptions:
    images: list[str]
    store: str
    plugins: list[str] | None = None  # None: the default set for each image's OS
    settings: Settings = field(default_factory=Settings)
    workers: int | None = None  # LocalCluster worker processes (default: one per core)
    scheduler: str | None = None  # tcp://host:port of an existing cluster
    max_retries: int = 1  # times a task may take a worker down before it is an error
    memory_limit: str = "auto"  # per LocalCluster worker ("auto": RAM / workers)
    commit_seconds: float = 30.0  # commit collected results at least this often
    compact: bool = True  # merge the store's batches at the end of the run
    connect_timeout: float = 10.0
    no_worker_timeout: float = 120.0


@dataclass
class RunReport:
    run_id: str
    status: str  # complete | interrupted | aborted
    engine: str
    workers: int
    planned: int = 0  # tasks submitted by this run
    done: int = 0
    failed: int = 0
    skipped: int = 0
    already_done: int = 0  # pairs an earlier run finished
    seconds: float = 0.0
    task_seconds: list[float] = field(default_factory=list)  # worker wall time per task


class Progress(Protocol):
    def update(self, total: int, done: int, failed: int, running: int) -> None: ...

    def note(self, text: str) -> None: ...


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def _key(kind: str, image: str, run_id: str) -> str:
    return f"vx3-{kind}-{hashlib.sha1(image.encode()).hexdigest()[:12]}-{run_id}"


@contextlib.contextmanager
def _engine(options: RunOptions) -> Iterator[tuple[Any, str, int]]:
    """(client, description, worker count); closes what it started."""
    import dask
    from distributed import Client, LocalCluster

    # The driver shows progress and a summary; Dask's own INFO lines are noise there.
    logging.getLogger("distributed").setLevel(logging.ERROR)
    quiet = {"distributed.admin.tick.limit": "1h"}  # a long plugin blocks no event loop
    if options.scheduler:
        with dask.config.set(quiet):
            try:
                client = Client(options.scheduler, timeout=options.connect_timeout)
            except (OSError, TimeoutError) as error:
                raise SchedulerUnreachable(
                    f"cannot reach the Dask scheduler at {options.scheduler} within "
                    f"{options.connect_timeout:g} s: {error}"
                ) from None
            try:
                try:
                    client.wait_for_workers(1, timeout=options.no_worker_timeout)
                except (OSError, TimeoutError):
                    raise SchedulerUnreachable(
                        f"the Dask scheduler at {options.scheduler} has had no worker for "
                        f"{options.no_worker_timeout:g} s"
                    ) from None
                workers = sum(client.nthreads().values())
                yield client, f"scheduler {options.scheduler}", workers
            finally:
                client.close(timeout=10)
        return
    n = options.workers or os.cpu_count() or 1
    config = {
        **quiet,
        # The bounded retry: a task that takes down max_retries + 1 workers fails with
        # KilledWorker instead of being rescheduled for ever.
        "distributed.scheduler.allowed-failures": options.max_retries,
        # One task per worker thread at a time: a task merely queued on a worker that dies
        # would otherwise count as a suspect too, and the priorities would not hold.
        "distributed.scheduler.worker-saturation": 1.0,
        "distributed.worker.daemon": True,
        # Dask's statistical profiler samples the running thread's stack every 10 ms:
        # work (under the GIL) that a triage run never looks at.
        "distributed.worker.profile.enabled": False,
        # Give a dying worker's tasks back quickly (default waits for the nanny longer).
        "distributed.comm.timeouts.connect": "30s",
    }
    with dask.config.set(config), _workers_ignore_sigint():
        cluster = LocalCluster(
            n_workers=n,
            threads_per_worker=1,
            processes=True,
            # The scheduler's HTTP routes start even without a dashboard, by default on
            # port 8787: a free local port keeps two runs (or a user's cluster) apart.
            dashboard_address="127.0.0.1:0",
            memory_limit=options.memory_limit,
            silence_logs=logging.ERROR,
        )
    try:
        with dask.config.set(config):
            client = Client(cluster)
            try:
                yield client, f"LocalCluster({n} workers)", n
            finally:
                client.close(timeout=10)
    finally:
        with contextlib.suppress(Exception):
            cluster.close(timeout=20)


@contextlib.contextmanager
def _workers_ignore_sigint() -> Iterator[None]:
    """Worker processes started now inherit an ignored SIGINT: a Ctrl-C at the terminal
    (sent to the whole process group) then reaches only the driver, which stops the run
    cleanly, instead of killing workers mid-task."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _multi_os(plugins: list[str]) -> bool:
    return len({plugin_os(p) for p in plugins} - {None}) > 1


class _Run:
    """The driver's book-keeping for one run."""

    def __init__(self, options: RunOptions, store: Store, run_id: str) -> None:
        self.options = options
        self.store = store
        self.run_id = run_id
        self.batch = Batch()
        self.keys: dict[str, str] = {}  # table name -> Volatility plugin key
        self.explicit: tuple[str, ...] | None = None
        self.identity: dict[str, ImageResult] = {}
        self.deferred: dict[str, list[PluginResult | Failure]] = {}
        self.queued: dict[str, list[str]] = {}  # waiting for the image's probe
        self.probe: dict[str, str] = {}
        self.dead: set[str] = set()
        self.futures: dict[Any, tuple[str, str, str]] = {}  # future -> (kind, image, plugin)
        self.backlog: list[tuple[int, int, tuple[str, str, str], Any, Any]] = []
        self.sequence = 0
        self.client: Any = None
        self.ac: Any = None
        self.report: RunReport | None = None
        self.last_commit = time.monotonic()
        self.run_row: dict[str, Any] = {}
        self.done_pairs: set[tuple[str, str]] = set()

    # -- planning ----------------------------------------------------------------------------

    def resolve(self, names: list[str]) -> None:
        from . import worker

        self.keys.update(worker.resolve_plugins(names, self.options.settings))

    def plan(self) -> list[tuple[ImageJob, list[str]]]:
        """Per image still to do: its image job and the plugins to run at once."""
        state = self.store.state()
        self.done_pairs = state.done
        out: list[tuple[ImageJob, list[str]]] = []
        seen: set[str] = set()
        assert self.report is not None
        for image in self.options.images:
            if image in seen:
                continue
            seen.add(image)
            path = os.path.abspath(image)
            known = state.known.get(image)
            if self.explicit is not None and not _multi_os(list(self.explicit)):
                pending = [p for p in self.explicit if (image, p) not in state.done]
                self.report.already_done += len(self.explicit) - len(pending)
                if not pending and (image, IMAGE_TASK) in state.done:
                    continue
                out.append((ImageJob(image, path, detect=False, known=known), pending))
                continue
            facts = state.detected.get(image)
            if facts is not None and (image, IMAGE_TASK) in state.done:
                wanted, _ = plugins_for(facts, self.explicit)
                pending = [p for p in wanted if (image, p) not in state.done]
                self.report.already_done += len(wanted) - len(pending)
                if not pending:
                    continue
                # Known OS: no need to stack again; the image task only re-checks identity.
                self.queued[image] = pending
                out.append((ImageJob(image, path, detect=False, known=known), []))
                continue
            out.append((ImageJob(image, path, detect=True, known=known), []))
        return out

    # -- submission --------------------------------------------------------------------------

    def submit_image(self, job: ImageJob) -> None:
        from . import worker

        self._queue(100, ("image", job.image, IMAGE_TASK), worker.identify_image, job)

    def submit_plugin(self, image: str, plugin: str, priority: int = 0) -> None:
        from . import worker

        if plugin not in self.keys:
            self.resolve([plugin])
        job = PluginJob(image, os.path.abspath(image), plugin, self.keys[plugin])
        self._queue(priority, ("plugin", image, plugin), worker.run_plugin, job)

    def _queue(self, priority: int, what: tuple[str, str, str], function: Any, job: Any) -> None:
        """Tasks wait here, not on the cluster: the driver hands Dask a task only when a
        worker thread is idle (see ``fill``)."""
        self.sequence += 1
        heapq.heappush(self.backlog, (-priority, self.sequence, what, function, job))
        assert self.report is not None
        self.report.planned += 1

    def fill(self) -> int:
        """Submit as many tasks as there are idle worker threads; returns the number of
        tasks running.

        Why not submit everything and let Dask queue: a worker that dies (OOM kill, a
        crashing plugin) makes every task *assigned* to it a suspect, and a task that is a
        suspect in max_retries + 1 deaths fails with KilledWorker.  Handing out work only
        to idle threads means the only task on a dying worker is the one that was running
        there, so innocent tasks never become error rows; it also keeps the priorities
        exact (image tasks first) and makes "running" a true count.
        """
        processing = self.client.processing()
        running = sum(len(keys) for keys in processing.values())
        if not self.backlog:
            return running
        threads = self.client.nthreads()
        idle = sum(max(0, n - len(processing.get(w, ()))) for w, n in threads.items())
        # Submitted but not yet assigned by the scheduler: they will take idle threads.
        idle -= max(0, len(self.futures) - running)
        while self.backlog and idle > 0:
            _, _, what, function, job = heapq.heappop(self.backlog)
            kind, image, plugin = what
            future = self.client.submit(
                function,
                job,
                self.options.settings,
                key=_key(plugin if kind == "plugin" else "image", image, self.run_id),
                pure=False,
            )
            self.futures[future] = what
            self.ac.add(future)
            idle -= 1
        return running

    # -- results -----------------------------------------------------------------------------

    def handle(self, future: Any) -> None:
        kind, image, plugin = self.futures.pop(future)
        if future.status == "cancelled":
            return
        try:
            result = future.result()
        except Exception as error:  # from Dask: KilledWorker, lost scheduler, ...
            result = Failure(image, plugin, type(error).__name__, _dask_message(error, self))
        finally:
            future.release()
        if image in self.dead:
            return
        if kind == "image":
            self._image_done(image, result)
        else:
            self._plugin_done(image, plugin, result)

    def _image_done(self, image: str, result: ImageResult | Failure) -> None:
        if isinstance(result, Failure):
            self._task_row(result, None)
            self._error_row(result, None)
            self._kill(image)
            return
        self.identity[image] = result
        self.batch.add(
            "images",
            {
                "image": image,
                "path": result.path,
                "image_sha256": result.sha256,
                "size": result.size,
                "mtime_ns": result.mtime_ns,
                "hash_seconds": result.hash_seconds,
                "run_id": self.run_id,
                "recorded_at": now(),
            },
        )
        self._task_row(result, None)
        if result.facts is not None:
            # Detection told us the OS: choose the plugins now.
            wanted, skipped = plugins_for(result.facts, self.explicit)
            self._submit_or_skip(image, wanted, skipped if self.explicit else [], result.facts)
        elif image in self.queued and image not in self.probe:
            # The OS was known from an earlier run: the identity check was all we waited for.
            self._submit_or_skip(image, self.queued.pop(image), [], None)
        for item in self.deferred.pop(image, []):
            self._record(item)

    def _plugin_done(self, image: str, plugin: str, result: PluginResult | Failure) -> None:
        if self.probe.get(image) == plugin:
            del self.probe[image]
            facts = result.facts
            unsatisfied = isinstance(result, Failure) and result.error_class in (
                "UnsatisfiedException",
                "FileNotFoundError",
            )
            if unsatisfied and (facts is None or not facts.stacked):
                # Its requirements found nothing usable on the file: the other plugins
                # would fail the same way.  (A plugin that raised by itself says nothing
                # about the file.)
                result.error_class = "NotAMemoryImage"
                result.message = (
                    f"nothing usable stacks on this file for {plugin} (not a memory image, or no "
                    f"symbols for its kernel in --symbols); other plugins not run: "
                    f"{result.message}"
                )
                self.queued.pop(image, None)
            else:
                wanted, skipped = plugins_for(
                    facts or StackFacts(), tuple(self.queued.pop(image, ()))
                )
                self._submit_or_skip(image, wanted, skipped, facts or StackFacts())
        if image in self.identity:
            self._record(result)
        else:
            self.deferred.setdefault(image, []).append(result)

    def _submit_or_skip(
        self, image: str, wanted: list[str], skipped: list[str], facts: StackFacts | None
    ) -> None:
        for plugin in skipped:
            if (image, plugin) not in self.done_pairs and facts is not None:
                self._skipped(image, plugin, facts)
        for plugin in wanted:
            if (image, plugin) not in self.done_pairs:
                self.submit_plugin(image, plugin)

    def _skipped(self, image: str, plugin: str, facts: StackFacts) -> None:
        needs = plugin_os(plugin) or "a Xen dump-core"
        self.batch.add(
            "tasks",
            {
                "image": image,
                "plugin": plugin,
                "status": "skipped",
                "rows": 0,
                "message": f"needs {needs}; image: {facts.os or 'no OS found'}"
                + (", Xen" if facts.xen else ""),
                "os": facts.os,
                "kernel": facts.kernel,
                "xen": facts.xen,
                "layers": " > ".join(facts.layers) or None,
                "run_id": self.run_id,
                "recorded_at": now(),
            },
        )
        assert self.report is not None
        self.report.skipped += 1

    def _record(self, result: PluginResult | Failure) -> None:
        identity = self.identity.get(result.image)
        sha = identity.sha256 if identity else None
        self._task_row(result, sha)
        if isinstance(result, Failure):
            self._error_row(result, sha)
            return
        self.batch.add_rows(
            result.plugin,
            PluginPart(
                result.image, sha or "", self.run_id, result.columns, result.rows, result.depths
            ),
        )

    def _task_row(self, result: ImageResult | PluginResult | Failure, sha: str | None) -> None:
        assert self.report is not None
        facts = result.facts
        failed = isinstance(result, Failure)
        plugin = IMAGE_TASK if isinstance(result, ImageResult) else result.plugin
        self.batch.add(
            "tasks",
            {
                "image": result.image,
                "plugin": plugin,
                "status": "error" if failed else "ok",
                "rows": len(result.rows) if isinstance(result, PluginResult) else 0,
                "error_class": result.error_class if failed else None,
                "message": result.message if failed else None,
                "os": facts.os if facts else None,
                "kernel": facts.kernel if facts else None,
                "xen": facts.xen if facts else None,
                "layers": " > ".join(facts.layers) if facts and facts.layers else None,
                "warnings": "; ".join(result.warnings) or None,
                "worker": result.timing.worker or None,
                "started": epoch(result.timing.started),
                "finished": epoch(result.timing.finished),
                "seconds": result.timing.seconds if result.timing.started else None,
                "run_id": self.run_id,
                "recorded_at": now(),
            },
        )
        if failed:
            self.report.failed += 1
        else:
            self.report.done += 1
        if result.timing.started:
            self.report.task_seconds.append(result.timing.seconds)

    def _error_row(self, failure: Failure, sha: str | None) -> None:
        self.batch.add(
            "errors",
            {
                "image": failure.image,
                "image_sha256": sha,
                "plugin": failure.plugin,
                "error_class": failure.error_class,
                "message": failure.message,
                "worker": failure.timing.worker or None,
                "run_id": self.run_id,
                "recorded_at": now(),
            },
        )

    def _kill(self, image: str) -> None:
        """The image cannot be read: drop its other tasks (they are retried next run)."""
        self.dead.add(image)
        self.queued.pop(image, None)
        self.deferred.pop(image, None)
        self.backlog = [entry for entry in self.backlog if entry[2][1] != image]
        heapq.heapify(self.backlog)
        doomed = [f for f, (_, img, _) in self.futures.items() if img == image]
        for future in doomed:
            self.futures.pop(future, None)
        if doomed:
            self.client.cancel(doomed)

    # -- commits -----------------------------------------------------------------------------

    def commit(self, status: str) -> None:
        assert self.report is not None
        self.run_row.update(
            status=status,
            finished=now() if status != "running" else None,
            tasks_done=self.report.done,
            tasks_failed=self.report.failed,
        )
        if self.batch.empty and status == "running":
            return
        self.batch.add("runs", dict(self.run_row))
        self.store.commit(self.batch, self.run_id)
        self.batch = Batch()
        self.last_commit = time.monotonic()


def _dask_message(error: BaseException, run: _Run) -> str:
    from distributed import KilledWorker

    if isinstance(error, KilledWorker):
        last = getattr(getattr(error, "last_worker", None), "address", None) or "?"
        tries = (
            f"{run.options.max_retries + 1} attempts"
            if not run.options.scheduler
            else "the scheduler's allowed-failures retries"
        )
        return (
            f"every worker that ran it died (out of memory, crash or signal): {tries}, "
            f"the last on {last}"
        )
    return " ".join(str(error).split()) or repr(error)


def run_triage(options: RunOptions, progress: Progress | None = None) -> RunReport:
    """Run every (image, plugin) pair not yet done in ``options.store``; see the module doc."""
    from distributed import as_completed

    started = time.monotonic()
    run_id = new_run_id()
    store = Store(options.store, create=True)
    with store.writing():
        run = _Run(options, store, run_id)
        if options.plugins:
            run.resolve(options.plugins)
            run.explicit = tuple(run.keys)
        else:
            run.resolve(
                sorted({p for ps in DEFAULT_PLUGINS.values() for p in ps} | set(XEN_PLUGINS))
            )
        run.report = report = RunReport(run_id, "running", "", 0)
        plan = run.plan()
        from . import __version__, worker

        run.run_row = {
            "run_id": run_id,
            "status": "running",
            "started": now(),
            "host": socket.gethostname(),
            "plugins": ",".join(run.explicit) if run.explicit else "default",
            "symbols": ";".join(options.settings.symbol_dirs),
            "volatility": worker.volatility_version(options.settings),
            "triage": __version__,
        }
        if not plan:
            report.status = "complete"
            report.engine, report.seconds = "none (nothing to do)", time.monotonic() - started
            return report
        with _engine(options) as (client, engine, workers):
            report.engine, report.workers = engine, workers
            run.run_row.update(engine=engine, workers=workers)
            run.client, run.ac = client, as_completed()
            try:
                for job, plugins in plan:
                    run.submit_image(job)
                    if plugins:
                        # Explicit single-OS list: probe with the first, hold the rest.
                        first = next((p for p in plugins if plugin_os(p)), plugins[0])
                        run.probe[job.image] = first
                        run.queued[job.image] = [p for p in plugins if p != first]
                        run.submit_plugin(job.image, first, priority=50)
                _loop(run, progress)
                report.status = "complete"
            except KeyboardInterrupt:
                report.status = "interrupted"
                if progress:
                    progress.note("interrupted: cancelling queued tasks, committing finished ones")
                with contextlib.suppress(Exception):
                    client.cancel(list(run.futures))
            except RunAborted as error:
                report.status = "aborted"
                if progress:
                    progress.note(str(error))
            finally:
                run.commit(report.status if report.status != "running" else "interrupted")
        if options.compact and report.status == "complete":
            store.compact(run_id)
    report.seconds = time.monotonic() - started
    return report


def _loop(run: _Run, progress: Progress | None) -> None:
    """Until every task is back: fetch finished results, hand idle workers more work,
    commit now and then, show progress, and watch that the cluster still has workers.
    The scheduler is asked about idle threads only when something changed (or once a
    second): it runs in this process for a local cluster, and polling it costs CPU the
    workers need."""
    assert run.report is not None
    report = run.report
    last_check, last_fill, no_workers_since, running = -10.0, -10.0, None, 0
    while run.futures or run.backlog:
        now_ = time.monotonic()
        if now_ - last_check > 2.0:
            last_check = now_
            if not run.client.nthreads():
                no_workers_since = no_workers_since or now_
                if now_ - no_workers_since > run.options.no_worker_timeout:
                    raise RunAborted(
                        f"no Dask worker for {run.options.no_worker_timeout:g} s: stopping; "
                        "finished tasks are committed, rerun to resume"
                    )
            else:
                no_workers_since = None
        # Fetch finished results before handing out more work: a result lives on its
        # worker until fetched, and a worker killed by its next task would take it along
        # (Dask would then run the finished task again).
        finished = run.ac.next_batch(block=False) if run.ac.has_ready() else []
        for future in finished:
            if future in run.futures:
                run.handle(future)
        if finished or now_ - last_fill > 1.0:
            running = run.fill()
            last_fill = now_
        if now_ - run.last_commit >= run.options.commit_seconds and run.batch.tasks:
            run.commit("running")
        if progress:
            progress.update(report.planned, report.done, report.failed, running)
        if not run.ac.has_ready():
            time.sleep(0.05)
    if progress:
        progress.update(report.planned, report.done, report.failed, 0)
