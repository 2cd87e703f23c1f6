"""Issue 16, findings 2 and 3: nothing in a checkpoint is unpickled (a crafted state file cannot run code on resume),
and every checkpoint read checks the sha256 recorded per file when it was written, refusing with the file's name:
final checkpoints (keye.model.load_checkpoint, `keye eval`), step checkpoints (the resume path) and `keye verify`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from keye.model import build_model, load_checkpoint, save_checkpoint
from keye.model.checkpoint import read_state
from keye.train import checkpointing as ckpt

ROOT = Path(__file__).resolve().parents[3]


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def _step_checkpoint(out_dir: Path, step: int = 2) -> Path:
    """A real step checkpoint of a tiny model: two AdamW steps, then the trainer's own writers."""
    torch.manual_seed(0)
    model = build_model("tiny", vocab_size=300, seed=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad][:4], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    for _ in range(2):
        loss = sum((p.float() ** 2).sum() for p in opt.param_groups[0]["params"])
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    from keye.model.checkpoint import save_state

    tmp = ckpt.temp_dir_for(out_dir, step)
    ckpt.write_rank_files(tmp, 0, opt.state_dict())
    save_state(model.state_dict(), model.config, tmp / "model")
    trainer_state = {"step": step, "scheduler": sched.state_dict(), "loader": [{"epoch": 0, "pos": 7}]}
    final = ckpt.commit(tmp, ckpt.step_dir(out_dir, step), trainer_state, {"step": step}, keep_last=2)
    return final, opt.state_dict(), trainer_state


class _Evil:
    """What an attacker puts in a shared checkpoint: unpickling it writes a file (it could do anything)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path(self.marker).write_text, ("code ran from a checkpoint",))


def test_step_state_roundtrips_bit_exact_without_pickle(tmp_path):
    d, optim, trainer = _step_checkpoint(tmp_path / "run")
    got_optim, rng = ckpt.read_rank_files(d, 0)
    assert got_optim["param_groups"] == optim["param_groups"]
    for k, st in optim["state"].items():
        for name, t in st.items():
            assert torch.equal(got_optim["state"][k][name], t), (k, name)
    assert ckpt.read_trainer_state(d) == {**trainer, "scheduler": ckpt.read_trainer_state(d)["scheduler"]}
    assert ckpt.read_trainer_state(d)["scheduler"]["last_epoch"] == 2
    assert "python" not in rng  # Python's global stream is not training's (issue 24)
    ckpt.set_rng_state(rng)  # restores the numpy and torch streams from the stored state
    a = (__import__("numpy").random.rand(), torch.rand(1))
    ckpt.set_rng_state(rng)
    assert a == (__import__("numpy").random.rand(), torch.rand(1))
    for f in d.iterdir():  # nothing a reader would unpickle
        assert f.suffix != ".pt", f


def test_crafted_pickle_in_a_step_checkpoint_never_runs(tmp_path):
    d, _, _ = _step_checkpoint(tmp_path / "run")
    marker = tmp_path / "pwned.txt"
    torch.save({"step": 2, "payload": _Evil(str(marker))}, tmp_path / "evil.pt")
    evil = (tmp_path / "evil.pt").read_bytes()
    for name in ("trainer", "optim-rank0", "rng-rank0"):
        (d / f"{name}.pt").write_bytes(evil)  # the old layout's names
        target = d / f"{name}.safetensors"  # and the new ones, replaced by the same pickle
        if target.exists():
            target.write_bytes(evil)
    for read in (lambda: ckpt.read_trainer_state(d), lambda: ckpt.read_rank_files(d, 0)):
        with pytest.raises(ValueError) as err:
            read()
        assert str(d) in str(err.value)
    assert not marker.exists(), "code from a checkpoint ran on resume"


def test_corrupted_step_checkpoint_is_refused_naming_the_file(tmp_path):
    d, _, _ = _step_checkpoint(tmp_path / "run")
    weights = d / "model" / "model.safetensors"
    _flip(weights, weights.stat().st_size - 5)  # inside the tensor data: still parses
    with pytest.raises(ValueError, match=r"model/model\.safetensors.*sha256"):
        read_state(d / "model")
    d2, _, _ = _step_checkpoint(tmp_path / "run2")
    optim = d2 / "optim-rank0.safetensors"
    _flip(optim, optim.stat().st_size - 3)
    with pytest.raises(ValueError, match=r"optim-rank0\.safetensors"):
        ckpt.read_rank_files(d2, 0)


@pytest.fixture()
def final_checkpoint(tmp_path):
    model = build_model("tiny", vocab_size=300, seed=0)
    return save_checkpoint(model, tmp_path / "final")


def test_corrupted_final_checkpoint_is_refused_naming_the_file(final_checkpoint):
    weights = final_checkpoint / "model.safetensors"
    good = weights.read_bytes()
    load_checkpoint(final_checkpoint)  # intact: loads
    _flip(weights, len(good) - 7)  # a flipped bit inside the weights parses fine: only the hash can tell
    with pytest.raises(ValueError, match=r"model\.safetensors: sha256 does not match"):
        load_checkpoint(final_checkpoint)
    weights.write_bytes(good)
    _flip(final_checkpoint / "config.json", 5)
    with pytest.raises(ValueError, match=r"config\.json: sha256"):
        load_checkpoint(final_checkpoint)


def test_flipped_header_gives_one_line_naming_the_file(final_checkpoint, tmp_path):
    from test_eval_readers import _timelens

    weights = final_checkpoint / "model.safetensors"
    _flip(weights, 12)  # inside the JSON header
    bench = _timelens(tmp_path)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "keye.cli",
            "eval",
            "--checkpoint",
            str(final_checkpoint),
            "--bench",
            str(bench),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and str(weights) in lines[0], r.stderr[-3000:]
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_keye_verify_covers_step_checkpoints_and_names_files(tmp_path):
    from keye.core.hashing import hash_checkpoint_dir
    from keye.core.lineage import Lineage
    from keye.verify import verify_workspace

    ws = tmp_path / "ws"
    out = ws / "checkpoints" / "ck0"
    step, _, _ = _step_checkpoint(out)
    final = save_checkpoint(build_model("tiny", vocab_size=300, seed=0), out / "final")
    Lineage(ws).record_checkpoint("ck0", str(final), hash_checkpoint_dir(final), "pretrain", 2, None, [])
    assert verify_workspace(ws).problems == []
    rng = step / "rng-rank0.safetensors"
    _flip(rng, rng.stat().st_size - 2)
    _flip(final / "model.safetensors", (final / "model.safetensors").stat().st_size - 9)
    problems = verify_workspace(ws).problems
    assert any(str(rng) in p for p in problems), problems
    assert any(str(final / "model.safetensors") in p for p in problems), problems
    r = subprocess.run(
        [sys.executable, "-m", "keye.cli", "verify", "--workspace", str(ws)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert r.returncode == 1 and str(rng) in r.stdout, r.stdout + r.stderr
    shutil.rmtree(step)
    assert not any(str(rng) in p for p in verify_workspace(ws).problems)
    json.dumps(problems)
