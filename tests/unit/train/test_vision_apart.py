"""ViT and LM apart (keye.model.vision_parallel) on 2 gloo CPU processes: rank 0's pack holds a 5-frame video,
rank 1's one frame; the frames are encoded by both ranks (balanced by patches) and the visual tokens sent back to
the LM that holds their placeholders. Loss and every gradient (ViT, projector, LM) equal one process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dist_launch import launch
from safetensors.torch import load_file

from keye.model.vision_parallel import deal_frames


def test_frames_are_dealt_in_order_by_patch_count() -> None:
    assert deal_frames([16, 24, 64, 24, 4, 16], 2) == [0, 0, 0, 1, 1, 1]  # 104 vs 44 patches, runs in order
    assert deal_frames([10] * 8, 4) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert deal_frames([5], 3) == [1]  # one frame: whoever holds its midpoint
    owners = deal_frames([1] * 7 + [100], 2)
    assert owners == sorted(owners)


@pytest.mark.slow
def test_vit_apart_equals_one_process(tmp_path: Path) -> None:
    one = launch({"mode": "vit", "grads": str(tmp_path / "g1.safetensors")}, 1, tmp_path, "vit1")
    two = launch({"mode": "vit", "grads": str(tmp_path / "g2.safetensors")}, 2, tmp_path, "vit2")
    assert all(
        p > 0 for p in two["patches_encoded"]
    )  # both ranks ran the ViT although rank 1 holds 1 frame...
    assert two["frames_held"] == [6]  # ...rank 0 holds 6 (the video + one frame)
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6, abs=0)
    g1, g2 = load_file(tmp_path / "g1.safetensors"), load_file(tmp_path / "g2.safetensors")
    assert sorted(g1) == sorted(g2)
    assert any(k.startswith("vision.encoder.") for k in g1) and any(k.startswith("projector.") for k in g1)
    for name in g1:
        scale = float(g1[name].abs().max())
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-5, atol=1e-5 * max(scale, 1e-12), msg=name)
