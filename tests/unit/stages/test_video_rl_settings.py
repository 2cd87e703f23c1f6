"""The `video_rl` config section reaches the library's GRPO settings knob for knob."""

from __future__ import annotations

import dataclasses

from keye.core.config import VideoRLSettings
from keye.rl.grpo import GRPOSettings
from keye.stages.video_rl_settings import grpo_settings


def test_every_shared_knob_is_carried_and_context_rl_follows_its_switch() -> None:
    s = VideoRLSettings(
        group_size=5, max_new_tokens=17, temperature=0.7, top_p=0.9, scale_rewards="none",
        loss_agg_mode="seq-mean-token-sum-norm", clip_ratio_low=0.1, clip_ratio_high=0.3,
        importance_sampling_level="sequence", kl_coef=0.05, overlong_buffer_len=4, filter_groups=False,
        max_num_gen_batches=2, ppo_epochs=2, micro_batch_size=7,
        context_rl={"success_threshold": 0.7, "context": "mistake_report", "hint_level": "answer",
                    "resample_n": 3, "recovered_weight": 0.5, "max_recovered": 2},
    )  # fmt: skip
    g = grpo_settings(s)
    shared = {f.name for f in dataclasses.fields(GRPOSettings)} & set(VideoRLSettings.model_fields) - {
        "context_rl"
    }
    assert len(shared) >= 15
    for name in shared:
        assert getattr(g, name) == getattr(s, name), name
    assert g.scale_rewards == "none" and g.micro_batch_size == 7 and g.importance_sampling_level == "sequence"
    c = g.context_rl
    assert c is not None and (c.success_threshold, c.context, c.resample_n, c.max_recovered) == (
        0.7, "mistake_report", 3, 2,
    )  # fmt: skip
    off = grpo_settings(
        s.model_copy(update={"context_rl": s.context_rl.model_copy(update={"enabled": False})})
    )
    assert off.context_rl is None and off.group_size == 5
