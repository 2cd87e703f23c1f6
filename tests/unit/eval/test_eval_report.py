"""The HTML report a person reads: rounded numbers, scores below chance marked, no empty header rows, the
training curves, the blank-frame comparison as a picture, and one section against the registered best."""

from __future__ import annotations

import re

from keye.eval.heldout import describe_control
from keye.eval.report import write_report

TIMELENS = {
    "kind": "timelens",
    "primary": "mIoU",
    "mIoU": 25.237113402061855,
    "R1@0.3": 38.513513513513516,
    "R1@0.5": 12.0,
    "chance": {"mIoU": 31.06, "R1@0.3": 40.2, "R1@0.5": 10.0},
    "n": 74,
    "n_unparsable": 3,
}
VIDEOMME = {
    "kind": "videomme",
    "primary": "accuracy",
    "accuracy": 41.17647058823529,
    "accuracy_answered": 41.17647058823529,
    "chance": {"accuracy": 25.0},
    "n": 68,
    "n_unparsable": 0,
    "by_task": {
        "color": {"n": 30, "accuracy": 50.0, "chance": 25.0},
        "shape": {"n": 38, "accuracy": 10.5263, "chance": 25.0},
    },
}
CONTROL = {
    "real": {"n": 68, "accuracy": 41.17647058823529, "chance": 22.58, "p_value": 2.8e-7},
    "blank": {"n": 68, "accuracy": 22.058823529411764, "chance": 22.58, "p_value": 0.61},
    "real_vs_blank": {"p_value": 4.5e-5, "right_only_here": 17, "right_only_in_control": 4},
}
CURVES = {
    "train:sft": {
        "loss": [(0, 5.2), (1, 4.1), (2, 3.3)],
        "lm_loss": [(0, 5.0), (1, 4.0), (2, 3.2)],
        "lr": [(0, 1e-4), (1, 1e-3), (2, 1e-3)],
    },
    "train:pretrain": {"loss": [(0, 7.0), (1, 6.0)]},
}
BEST = {
    "version": 3,
    "metrics": {"timelens/mIoU": 20.0, "videomme/accuracy": 45.5, "vision/mcq_accuracy": 45.5},
}


def _page(tmp_path, **kw):
    path = write_report(
        {"timelens": TIMELENS, "videomme": VIDEOMME},
        tmp_path,
        notes={"checkpoint": "/ckpt", "blank-frame control": describe_control(CONTROL)},
        **kw,
    )
    return path.read_text()


def test_numbers_are_rounded_and_below_chance_is_marked(tmp_path):
    page = _page(tmp_path)
    assert "38.513513513513516" not in page and "38.51" in page
    assert "41.1764" not in page and "41.2%" in page  # the control's line in the notes is rounded too
    below = re.findall(r"<span class='below'>([\d.]+) ▼ below chance</span>", page)
    assert "25.24" in below  # TimeLens mIoU 25.24 vs chance 31.06
    assert "38.51" in below and "10.53" in below  # R1@0.3 under 40.2, the shape task under 25
    assert "41.18" not in below and "12.00" not in below  # above chance: unmarked


def test_no_empty_header_rows(tmp_path):
    page = _page(tmp_path)
    for head in re.findall(r"<thead>(.*?)</thead>", page):
        assert re.sub(r"<[^>]+>", "", head).strip(), head
    assert "<th></th>" not in page


def test_curves_control_picture_and_best_comparison(tmp_path):
    page = _page(tmp_path, curves=CURVES, control=CONTROL, best=BEST)
    assert "<h2>Training curves</h2>" in page and "<h2>What the frames add: blank-frame control</h2>" in page
    for png in ("curves_train_sft.png", "curves_train_pretrain.png", "vision_control.png"):
        assert (tmp_path / png).stat().st_size > 5000
    assert page.count("data:image/png;base64,") == 4  # both curves, the control, the Video-MME task bars
    section = page.split("Against the registered best (version 3)</h2>")[1].split("</table>")[0]
    assert "-4.32" in section  # Video-MME 41.18 vs 45.5
    assert "5.24" in section  # TimeLens 25.24 vs 20.0
    assert "mcq_blank_accuracy" in section


def test_sections_are_left_out_without_their_inputs(tmp_path):
    page = _page(tmp_path)
    assert (
        "Training curves" not in page
        and "registered best" not in page
        and "blank-frame control</h2>" not in page
    )


def test_an_agent_checkpoint_shows_its_held_out_agent_tasks(tmp_path):
    """The agent_rl stage's comparison (start, warm-up, agent-RL; the two sign tests) and the wrong answers with
    their calls, escaped."""
    row = lambda s, t: {"success_rate": s, "tool_call_rate": t, "n_tasks": 4.0, "success_rate_search": s}  # noqa: E731
    test = lambda here, ctl, p: {"right_only_here": here, "right_only_in_control": ctl, "p_value": p}  # noqa: E731
    agent = {
        "before": row(0.0, 0.0),
        "after": row(0.75, 1.0) | {"self_correction_share": 0.25},
        "success_gain": 0.75,
        "sign_test": test(3, 0, 0.125),
        "rl_over_warmup": {"before": row(0.5, 1.0), "success_gain": 0.25, "sign_test": test(1, 0, 0.5)},
        "rows": {
            "after": [
                {"task_id": "v:search:0", "kind": "search", "success": True, "calls": [], "answer": "ok"},
                {
                    "task_id": "v:search:1",
                    "kind": "search",
                    "success": False,
                    "calls": [{"name": "search", "arguments": {"query": "x"}, "ok": True}],
                    "answer": "<answer>1 < 2",
                },
            ]  # fmt: skip
        },
    }
    page = write_report({"timelens": TIMELENS}, tmp_path, agent=agent).read_text()
    section = page.split("Agent tasks with tools (agent_rl)")[1]
    assert (
        "after the demonstration warm-up" in section and "agent-RL vs its warm-up: success +0.250" in section
    )
    assert "one-sided sign test p 0.12" in section and "search success" in section
    assert "v:search:1" in section and "v:search:0" not in section and "&lt;answer&gt;1 &lt; 2" in section
    assert "Agent tasks" not in write_report({"timelens": TIMELENS}, tmp_path / "plain").read_text()
