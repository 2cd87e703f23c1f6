"""A small batching queue in front of `keye.model.generate.generate`: requests that arrive within a short window
(or while the model is busy) are decoded together as one packed prefill + KV-cache decode batch.

Each prompt carries its own sampling settings and seed (keye.model.generate.Prompt fields), so requests with
different settings share a batch and a seeded request gives the same tokens whatever else is in its batch.
One worker thread owns the model; callers get a concurrent.futures.Future.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any


def seeded_generator(seed: int, index: int, device: Any = "cpu") -> Any:
    """The generator of the `index`-th sample of a request with `seed` (the server's choices and the local rollout
    engine use the same rule, so both draw the same samples from the same weights)."""
    import torch

    return torch.Generator(device=device).manual_seed((int(seed) * 1_000_003 + int(index)) % (2**63))


class GenerationBatcher:
    def __init__(
        self,
        model: Any,
        decode: Callable[[list[int]], str],
        eos_token_ids: Sequence[int],
        *,
        window_s: float = 0.01,
        max_batch_prompts: int = 64,
        lock: threading.Lock | None = None,
    ) -> None:
        self.model, self.decode, self.eos = model, decode, list(eos_token_ids)
        self.window_s, self.max_batch = window_s, max_batch_prompts
        self.lock = lock or threading.Lock()  # held while generating (a trainer may share the model)
        self._q: queue.Queue[tuple[list[Any], int, Future] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="keye-generate", daemon=True)
        self._thread.start()
        self.batches = 0  # how many generate() calls ran (tests check that requests were batched)
        self.max_seen = 0

    def submit(self, prompts: list[Any], top_logprobs: int = 0) -> Future:
        fut: Future = Future()
        self._q.put((prompts, top_logprobs, fut))
        return fut

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        from keye.model.generate import generate

        while True:
            first = self._q.get()
            if first is None:
                return
            jobs = [first]
            n = len(first[0])
            deadline = time.monotonic() + self.window_s
            while n < self.max_batch:
                try:
                    job = self._q.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if job is None:
                    self._q.put(None)
                    break
                jobs.append(job)
                n += len(job[0])
            prompts = [p for job in jobs for p in job[0]]
            try:
                with self.lock:
                    results = generate(
                        self.model,
                        prompts,
                        eos_token_ids=self.eos,
                        decode=self.decode,
                        top_logprobs=max(job[1] for job in jobs),
                    )
            except Exception as e:  # the batch fails together; each caller sees the error
                for job in jobs:
                    job[2].set_exception(e)
                continue
            self.batches += 1
            self.max_seen = max(self.max_seen, len(prompts))
            i = 0
            for job in jobs:
                job[2].set_result(results[i : i + len(job[0])])
                i += len(job[0])
