"""Every reward on hand-made answers, sloppy ones included; the registry by name and by import path."""

import pytest

from keye.rl.rewards import (
    combined_reward,
    get_reward,
    register_reward,
    registered_rewards,
    temporal_iou,
)

GT = {"span": [2.0, 4.0], "duration": 10.0}


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("The event happens in 2.0 - 4.0 seconds.", 1.0),
        ("2s to 4s", 1.0),
        ("from 00:02 to 00:04", 1.0),
        ("The event happens in 3.0 - 5.0 seconds", (1 / 3) * 0.9 * 0.9),  # IoU 1/3, both ends 1 s off of 10 s
        ("<think>it starts late</think> 2 - 6", 0.5 * 1.0 * 0.8),  # IoU 2/4, end 2 s off
        ("1 - 10", (2 / 9) * 0.9 * 0.4),
        ("5.0 - 3.0 seconds", 0.0),  # reversed
        ("8 - 15", 0.0),  # clipped to [8, 10]: no overlap
        ("-1 - 4", (2 / 3) * 0.9 * 1.0),  # read as 1 - 4 (no negative times): IoU 2/3, start 1 s off
        ("", 0.0),
        ("no idea", 0.0),
        ("at 3 seconds", 0.0),  # one time only
    ],
)
def test_time_r1_iou(answer, expected):
    assert get_reward("time_r1_iou")(answer, GT) == pytest.approx(expected, abs=1e-9)


def test_temporal_iou_by_hand():
    assert temporal_iou((0, 2), (1, 3)) == pytest.approx(1 / 3)
    assert temporal_iou((0, 1), (2, 3)) == 0.0
    assert temporal_iou((3, 3), (2, 4)) == 0.0


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("3 - 5", 1.0),
        ("The event happens in 0.0 - 10.0 seconds", 1.0),
        ("5 - 3", 0.0),
        ("8 - 15", 0.0),
        ("banana", 0.0),
        ("", 0.0),
        ("3 - 3", 0.0),
    ],
)
def test_span_format(answer, expected):
    assert get_reward("span_format")(answer, GT) == expected


def test_time_r1_is_iou_plus_format():
    a = "The event happens in 3.0 - 5.0 seconds"
    assert get_reward("time_r1")(a, GT) == pytest.approx(1 + (1 / 3) * 0.81)
    assert get_reward("time_r1")("nothing", GT) == 0.0


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("B", 1.0),
        ("(B)", 1.0),
        ("Answer: b.", 1.0),
        ("The best answer is B because ...", 1.0),
        ("<think>maybe A</think>B", 1.0),
        ("a red circle", 1.0),
        ("C", 0.0),
        ("A man walks", 0.0),
        ("", 0.0),
        ("I cannot tell", 0.0),
    ],
)
def test_mcq_exact_match_through_the_eval_parser(answer, expected):
    ref = {"answer": "B", "options": ["a blue square", "a red circle", "a green star", "nothing"]}
    assert get_reward("mcq")(answer, ref) == expected


def test_mcq_format():
    ref = {"answer": "B", "n_options": 4}
    assert get_reward("mcq_format")("D", ref) == 1.0
    assert get_reward("mcq_format")("I cannot tell", ref) == 0.0


def test_registry_user_rewards_and_weighted_sums():
    @register_reward("says_hello")
    def _hello(completion, reference):
        return 1.0 if "hello" in completion else 0.0

    assert "says_hello" in registered_rewards()
    r = combined_reward({"says_hello": 0.5, "time_r1_iou": 1.0})
    assert r("hello 2 - 4", GT) == pytest.approx(1.5)
    assert combined_reward("span_format")("2 - 4", GT) == 1.0
    by_path = get_reward("keye.rl.rewards:temporal_iou")
    assert by_path is temporal_iou
    with pytest.raises(KeyError, match="unknown reward"):
        get_reward("nope")
    with pytest.raises(KeyError, match="cannot import"):
        get_reward("keye.rl.rewards:nope")
    with pytest.raises(ValueError):
        combined_reward({})
