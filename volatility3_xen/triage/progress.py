"""The terminal progress bar of ``triage run``: tasks done / failed / running and an ETA."""

from __future__ import annotations

import sys
from typing import Any


class RichProgress:
    """A rich progress bar on stderr; a no-op display when stderr is not a terminal,
    apart from the notes (so logs of batch jobs stay readable)."""

    def __init__(self, enabled: bool | None = None) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.console = Console(stderr=True)
        self.enabled = self.console.is_terminal if enabled is None else enabled
        self._progress = Progress(
            TextColumn("[bold]triage"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("[green]{task.fields[ok]} ok[/] [red]{task.fields[failed]} failed[/]"),
            TextColumn("{task.fields[running]} running"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            disable=not self.enabled,
            transient=False,
        )
        self._task: Any = None

    def __enter__(self) -> RichProgress:
        self._progress.start()
        self._task = self._progress.add_task("tasks", total=None, ok=0, failed=0, running=0)
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def update(self, total: int, done: int, failed: int, running: int) -> None:
        self._progress.update(
            self._task,
            total=max(total, 1),
            completed=done + failed,
            ok=done,
            failed=failed,
            running=running,
        )

    def note(self, text: str) -> None:
        if self.enabled:
            self._progress.console.print(text)
        else:
            print(text, file=sys.stderr)
