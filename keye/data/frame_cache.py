"""Decoded frames kept in memory between questions that show the same video the same way."""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np


def file_key(path: str | os.PathLike[str]) -> tuple[str, int, int]:
    """(path, mtime ns, size): a key that changes when the file does."""
    st = os.stat(path)
    return (str(path), st.st_mtime_ns, st.st_size)


class FrameCache:
    """Decoded frames (and probes) of recent videos, keyed by the file (file_key) and the exact frame plan, least
    recently used first out past `max_bytes`. Why: RL asks the same prompts again and again (G samples,
    dynamic-sampling refills, Context-RL resampling, later steps), and an eval asks several questions of each video
    and then asks them all again for the checkpoint it compares with; decoding took ~40% of a default Video-RL step
    and ~75% of a held-out grounding answer on the 2-core CPU. A hit returns the very array a decode would make."""

    def __init__(self, max_bytes: int = 256 << 20) -> None:
        self.max_bytes, self.bytes, self.hits, self.misses = max_bytes, 0, 0, 0
        self._items: OrderedDict[Any, tuple[Any, int]] = OrderedDict()

    def get_or_make(self, key: Any, make: Any) -> Any:
        if key in self._items:
            self._items.move_to_end(key)
            self.hits += 1
            return self._items[key][0]
        self.misses += 1
        value = make()
        size = int(getattr(value, "nbytes", 0)) + 256
        if size <= self.max_bytes:
            if isinstance(value, np.ndarray):
                value.setflags(write=False)  # shared by every later hit
            self._items[key] = (value, size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (_, dropped) = self._items.popitem(last=False)
                self.bytes -= dropped
        return value

    def probe(self, path: str | os.PathLike[str]) -> Any:
        """keye.data.video.probe of the file, cached by file_key (a file that cannot be stat'ed goes straight to
        probe, which raises VideoRejected naming what is wrong)."""
        from keye.data import video

        try:
            key = file_key(path)
        except OSError:
            return video.probe(path, min_duration=0.0)
        return self.get_or_make(("probe", key), lambda: video.probe(path, min_duration=0.0))

    def frames(
        self, path: str | os.PathLike[str], times: Sequence[float], size: tuple[int, int]
    ) -> np.ndarray:
        """keye.data.video.decode_frames of the file at `times`, resized to `size` = (h, w), cached by file_key and
        the exact plan (read-only: shared by every later hit)."""
        from keye.data import video

        times = tuple(float(t) for t in times)
        return self.get_or_make(
            ("frames", file_key(path), times, *size), lambda: video.decode_frames(path, times, size=size)
        )
