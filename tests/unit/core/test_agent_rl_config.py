"""The agent_rl stage is a default stage after video_rl (a branch the eval reports), a config that lists it runs it
between train and eval, and its settings are validated like every section."""

import pytest

from keye.core.config import ConfigError, load_config
from keye.stages.agent_rl import settings


def test_agent_rl_is_a_default_stage_ordered_after_train(tmp_path):
    stages = load_config(None).stages
    assert stages[stages.index("video_rl") + 1 : stages.index("eval")] == ["agent_rl"]
    p = tmp_path / "p.yaml"
    p.write_text(
        "stages: [eval, agent_rl, train]\nagent_rl: {steps: 3, tools: [frames, python], max_turns: 2}\n"
    )
    cfg = load_config(p)
    assert cfg.stages == ["train", "agent_rl", "eval"]
    grpo, agent, tools = settings(cfg.agent_rl)
    assert (
        tools.tools == ("frames", "python")
        and tools.max_turns == 2
        and agent.group_size == grpo.group_size == 8
    )


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("agent_rl: {tools: [browser]}", "agent_rl.tools"),
        ("agent_rl: {group_size: 1}", "agent_rl.group_size"),
    ],
)
def test_bad_agent_rl_settings_name_the_field(tmp_path, text, field):
    p = tmp_path / "p.yaml"
    p.write_text(text + "\n")
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(p)
