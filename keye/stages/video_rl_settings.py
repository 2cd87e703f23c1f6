"""The `video_rl` config section as the library's GRPO settings: apart from the stage module so that benches that
run the library's RL loop on a machine without the tracking stack (MLflow, DuckDB) can build the same settings."""

from __future__ import annotations

from keye.core.config import VideoRLSettings
from keye.rl.context_rl import ContextRLSettings
from keye.rl.grpo import GRPOSettings


def grpo_settings(s: VideoRLSettings) -> GRPOSettings:
    """The library's settings from the config section (one name per knob, as verl / TRL name them)."""
    c = s.context_rl
    context = None
    if c.enabled:
        context = ContextRLSettings(
            success_threshold=c.success_threshold,
            context=c.context,
            hint_level=c.hint_level,
            resample_n=c.resample_n,
            recovered_weight=c.recovered_weight,
            max_recovered=c.max_recovered,
        )
    return GRPOSettings(
        group_size=s.group_size,
        max_new_tokens=s.max_new_tokens,
        temperature=s.temperature,
        top_p=s.top_p,
        scale_rewards=s.scale_rewards,
        loss_agg_mode=s.loss_agg_mode,
        clip_ratio_low=s.clip_ratio_low,
        clip_ratio_high=s.clip_ratio_high,
        importance_sampling_level=s.importance_sampling_level,
        kl_coef=s.kl_coef,
        overlong_buffer_len=s.overlong_buffer_len,
        filter_groups=s.filter_groups,
        max_num_gen_batches=s.max_num_gen_batches,
        ppo_epochs=s.ppo_epochs,
        micro_batch_size=s.micro_batch_size,
        context_rl=context,
    )
