"""Issue 16, finding 4: every path of the config (sources, tokenizer, init checkpoint, captioner dirs and endpoint)
is checked in the config phase, before the workspace, MLflow or lineage exist: one line per problem, no traceback."""

import os
import textwrap


class _Result:
    def __init__(self, r):
        self.returncode, self.stderr, self.stdout = r.exit_code, r.output, r.output


def _keye(*args, cwd):
    """The real command line, in-process (the checks run before anything is started)."""
    from typer.testing import CliRunner

    from keye.cli import app

    old = os.getcwd()
    os.chdir(cwd)
    try:
        return _Result(CliRunner().invoke(app, list(args)))
    finally:
        os.chdir(old)


def test_all_path_problems_reported_before_any_workspace_write(tmp_path):
    ws = tmp_path / "ws"
    cfg = tmp_path / "p.yaml"
    cfg.write_text(
        textwrap.dedent(
            f"""
            workspace: {ws}
            sources:
              - path: {tmp_path / "no_videos"}
              - path: {tmp_path / "none" / "*.mp4"}
            caption: {{backend: keye, options: {{checkpoint_dir: {tmp_path / "no_captioner"}}}}}
            pack: {{tokenizer: {{path: {tmp_path / "no_tokenizer"}}}}}
            train: {{init_checkpoint: {tmp_path / "no_init"}}}
            """
        )
    )
    r = _keye("run", str(cfg), cwd=tmp_path)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    for field in (
        "sources[0].path",
        "sources[1].path",
        "caption.options.checkpoint_dir",
        "pack.tokenizer.path",
        "train.init_checkpoint",
    ):
        lines = [ln for ln in r.stderr.splitlines() if field in ln]
        assert len(lines) == 1, (field, r.stderr)
    assert not ws.exists(), "the workspace was created before the config was checked"


def test_stage_commands_check_their_own_paths_only(tmp_path):
    ws = tmp_path / "ws"
    r = _keye("ingest", str(tmp_path / "missing_folder"), "--workspace", str(ws), cwd=tmp_path)
    assert r.returncode == 2 and "sources[0].path" in r.stderr and "Traceback" not in r.stderr, r.stderr[
        -3000:
    ]
    assert not ws.exists()
    r = _keye(
        "train", "--workspace", str(ws), "--set", f"train.init_checkpoint={tmp_path / 'nope'}", cwd=tmp_path
    )
    assert r.returncode == 2 and "train.init_checkpoint" in r.stderr, r.stderr[-3000:]
    assert "sources" not in r.stderr and not ws.exists()
    (tmp_path / "tok").mkdir()  # exists, but holds no tokenizer.json
    r = _keye(
        "pack", "--workspace", str(ws), "--set", f"pack.tokenizer.path={tmp_path / 'tok'}", cwd=tmp_path
    )
    assert r.returncode == 2 and "has no tokenizer.json" in r.stderr and not ws.exists(), r.stderr[-3000:]
