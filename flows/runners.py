"""Task runner from the config: threads (default; PyAV and torch release the GIL), processes, or Ray."""

from __future__ import annotations

from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

from keye.core.config import RunnerSettings


def task_runner(settings: RunnerSettings):
    if settings.kind == "thread":
        return ThreadPoolTaskRunner(max_workers=settings.max_workers)
    if settings.kind == "process":
        return ProcessPoolTaskRunner(max_workers=settings.max_workers)
    try:
        from prefect_ray import RayTaskRunner
    except ImportError as e:  # pragma: no cover - optional extra
        raise RuntimeError("runner.kind=ray needs the [ray] extra: pip install 'keye[ray]'") from e
    return RayTaskRunner(address=settings.ray_address) if settings.ray_address else RayTaskRunner()
