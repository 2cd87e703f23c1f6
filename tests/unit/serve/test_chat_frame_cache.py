"""keye.data.frame_cache.FrameCache in ChatModel: a prompt asked again reuses the decoded frames (RL asks each
prompt many times), gives the very same prompt, notices a rewritten file, and stays within its byte budget."""

from __future__ import annotations

import os

import numpy as np
import torch
from test_serve import _video, make_checkpoint  # noqa: F401  (same directory)

from keye.data.frame_cache import FrameCache
from keye.serve.chat import ChatModel


def _ask(url, start=0.5, end=2.5):
    video = {"type": "video_url", "video_url": {"url": str(url), "start": start, "end": end}}
    return [{"role": "user", "content": [video, {"type": "text", "text": "When?"}]}]


def test_repeated_prompts_hit_the_cache_and_equal_a_fresh_decode(tmp_path):
    ckpt = make_checkpoint(tmp_path)
    _video(tmp_path / "clip.mp4")
    chat = ChatModel.from_checkpoint(ckpt)
    first = chat.build_prompt(_ask(tmp_path / "clip.mp4"))
    assert (chat.frames_cache.hits, chat.frames_cache.misses) == (0, 2)  # the probe and the frames
    again = chat.build_prompt(_ask(tmp_path / "clip.mp4"))
    assert chat.frames_cache.hits == 2
    fresh = ChatModel.from_checkpoint(ckpt).build_prompt(_ask(tmp_path / "clip.mp4"))
    for p in (again, fresh):
        assert torch.equal(p.input_ids, first.input_ids) and torch.equal(p.pixel_patches, first.pixel_patches)
    chat.build_prompt(_ask(tmp_path / "clip.mp4", start=1.0))  # another range: its own frames
    assert chat.frames_cache.misses == 3

    # the file rewritten (other pixels, a later mtime): decoded again, not served from the cache
    _video(tmp_path / "clip.mp4", w=80, h=64)
    st = os.stat(tmp_path / "clip.mp4")
    os.utime(tmp_path / "clip.mp4", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed = chat.build_prompt(_ask(tmp_path / "clip.mp4"))
    assert chat.frames_cache.misses == 5
    assert not torch.equal(changed.pixel_patches, first.pixel_patches)


def test_the_cache_evicts_the_least_recently_used_past_its_budget():
    cache = FrameCache(max_bytes=3 * (1000 + 256))
    arrays = {k: np.full(1000, k, np.uint8) for k in range(5)}
    for k in (0, 1, 2):
        cache.get_or_make(k, lambda k=k: arrays[k])
    cache.get_or_make(0, lambda: None)  # a hit: 0 becomes the most recent
    cache.get_or_make(3, lambda: arrays[3])  # evicts 1, the least recent
    assert cache.bytes <= cache.max_bytes
    made = []
    for k in (0, 2, 3, 1):
        cache.get_or_make(k, lambda k=k: made.append(k) or arrays[k])
    assert made == [1]
    out = cache.get_or_make(1, lambda: None)  # the newest, still kept
    assert not out.flags.writeable  # shared with later hits: nobody may write into it
    big = cache.get_or_make("big", lambda: np.zeros(10**6, np.uint8))  # over the budget: returned, not kept
    assert big.shape == (10**6,) and "big" not in cache._items
