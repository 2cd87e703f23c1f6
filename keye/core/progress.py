"""Progress bars for long stages (rich), quiet when output is not a terminal (CI logs, Prefect workers)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager


class _Bar:
    def __init__(self, prog, task_id):
        self._prog, self._task = prog, task_id

    def advance(self, n: int = 1) -> None:
        if self._prog is not None:
            self._prog.advance(self._task, n)


@contextmanager
def progress(description: str, total: int) -> Iterator[_Bar]:
    if not sys.stderr.isatty() or total <= 0:
        yield _Bar(None, None)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=False,
    ) as prog:
        yield _Bar(prog, prog.add_task(description, total=total))
