"""The GPU benches' one timer: median milliseconds of a callable over CUDA events (kernels are asynchronous, so
wall-clock time around a launch measures the launch, not the kernel)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def median_ms(fn: Callable[[], object], reps: int = 10, warmup: int = 2) -> float:
    """Median milliseconds of `fn` over `reps` runs, each between two CUDA events, after `warmup` runs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def graph_replay_ms(fn: Callable[[], object], reps: int = 200) -> float:
    """Median milliseconds of one replay of `fn` captured in a CUDA graph (how a serving loop runs a decode step),
    after three warm-up calls on a side stream (the capture needs allocations made outside it)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return median_ms(graph.replay, reps=reps, warmup=10)
