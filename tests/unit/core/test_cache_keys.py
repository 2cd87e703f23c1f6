"""Stage cache keys cannot go stale: the code part is the transitive import closure of the stage, computed.

A temporary copy of the packages is edited and the keys are computed there in a fresh interpreter: an edit to the
model (which the train stage reaches only through keye.train.trainer -> keye.model) changes the train key; an edit
outside the code (a docs file) changes nothing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from keye.core.hashing import ROOT, module_closure
from keye.stages.artifact import STAGES, stage_modules


def _keys(root: Path) -> dict[str, str]:
    mods = {k: stage_modules(k) for k in STAGES}  # keye.core.hashing alone imports fast (no mlflow, prefect)
    code = (
        "import json; from keye.core.hashing import code_hash; "
        f"print(json.dumps({{k: code_hash(*m) for k, m in {mods!r}.items()}}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for pkg in ("keye", "flows", "docs"):
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=ignore)
    return tmp_path


def test_closure_reaches_the_code_that_changes_results():
    train = module_closure(*stage_modules("train"))
    for mod in (
        "keye.model.moe",
        "keye.model.vit",
        "keye.kernels.dispatch",
        "keye.data.loader",
        "keye.data.tokenizer",
    ):
        assert mod in train, mod
    caption = module_closure(*stage_modules("caption"))
    for mod in ("keye.data.captioners.sidecar", "keye.data.captioners.openai_compat", "keye.data.video"):
        assert mod in caption, mod  # backends are imported by "module:class" strings: found all the same
    assert "keye.cli" not in train
    assert "keye.train.trainer" not in module_closure(*stage_modules("eval"))


def test_a_changed_key_makes_the_stage_run_again(copy: Path, tmp_path: Path):
    """What a re-run does with a key: lineage holds the train artifact under the old code's key (complete), so the
    same code skips it; after the model edit the key is new and `produce` begins it (the stage runs)."""
    from keye.core.lineage import Lineage, make_id
    from keye.core.workspace import Workspace
    from keye.stages.artifact import StageRun

    ws = Workspace.at(tmp_path / "ws").ensure()
    lineage = Lineage(ws)
    run = StageRun(None, ws, lineage, None, "r-test", "train:sft")  # config and tracker: not used by produce

    def ckpt_id(code: str) -> str:  # what StageRun.key builds for the train stage (inputs + settings + code)
        return make_id("ck", "ps-1", None, "settings", "tiny", code)

    old = ckpt_id(_keys(copy)["train"])
    assert run.produce(old, "training", "sft", "settings", ["ps-1"]) is True  # first run: it has to be made
    lineage.complete_artifact(old)
    assert run.produce(old, "training", "sft", "settings", ["ps-1"]) is False  # same code: skipped

    moe = copy / "keye" / "model" / "moe.py"
    moe.write_text(moe.read_text().replace("def ", "def  ", 1))
    new = ckpt_id(_keys(copy)["train"])
    assert new != old
    assert run.produce(new, "training", "sft", "settings", ["ps-1"]) is True  # edited model: runs again


def test_model_edit_changes_train_key_and_docs_edit_does_not(copy: Path):
    before = _keys(copy)
    assert before == _keys(copy)  # stable across processes

    doc = next((copy / "docs").glob("*.md"))
    doc.write_text(doc.read_text() + "\nan unrelated edit\n")
    assert _keys(copy) == before

    moe = copy / "keye" / "model" / "moe.py"
    moe.write_text(moe.read_text() + "\n# an edit that could change results\n")
    after = _keys(copy)
    assert after["train"] != before["train"]
    assert after["eval"] != before["eval"]  # the eval stage runs the model too
    for stage in ("ingest", "shard", "pack"):  # they never import the model
        assert after[stage] == before[stage], stage

    cli = copy / "keye" / "cli.py"  # code that no stage imports
    cli.write_text(cli.read_text() + "\n# an edit outside every stage\n")
    assert _keys(copy) == after
