"""Submitting a stage's work as Prefect tasks; the orchestrator records each result as it lands (a crash loses
little), with a progress bar."""

from __future__ import annotations

from prefect.futures import as_completed

from keye.core.progress import progress


def run_batches(task, items: list, size: int, label: str, *args, on_result=None) -> list:
    """task(batch, *args) per batch of items; on_result(records) as each finishes; all records in item order."""
    futures = [task.submit(items[i : i + size], *args) for i in range(0, len(items), size)]
    with progress(label, total=len(items)) as bar:
        for fut in as_completed(futures):
            if on_result is not None:
                on_result(fut.result())
            bar.advance(len(fut.result()))
    return [r for fut in futures for r in fut.result()]


def run_each(task, calls: list[tuple], label: str, on_result=None) -> list:
    """task(*args) for each args tuple; on_result(args, result) as each finishes; results in call order."""
    futures = {task.submit(*args): args for args in calls}
    with progress(label, total=len(calls)) as bar:
        for fut in as_completed(list(futures)):
            if on_result is not None:
                on_result(futures[fut], fut.result())
            bar.advance()
    return [fut.result() for fut in futures]
