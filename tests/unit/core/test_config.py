"""pipelines.yaml schema: the default validates; bad configs fail before any work with the field path."""

from pathlib import Path

import pytest

from keye.core.config import ConfigError, PathSource, SyntheticSource, load_config

ROOT = Path(__file__).resolve().parents[3]


def test_repo_default_pipeline_validates():
    cfg = load_config(ROOT / "pipelines.yaml")
    assert cfg.stages == [
        "ingest",
        "caption",
        "shard",
        "pack",
        "train",
        "video_rl",
        "agent_rl",
        "eval",
    ]  # specialists and mopd: opt-in
    assert cfg.eval.grounding_probe_videos > 0  # the probe that lets the eval see video_rl's gain
    assert isinstance(cfg.sources[0], SyntheticSource)


def test_overrides_and_short_source_forms(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("sources:\n  - path: /data/videos\n  - synthetic: {n_videos: 3}\n")
    cfg = load_config(p, overrides=["ingest.max_clip_seconds=12", "shard.fps=4"], workspace=tmp_path / "ws")
    assert isinstance(cfg.sources[0], PathSource) and cfg.sources[0].path == "/data/videos"
    assert cfg.sources[1].n_videos == 3
    assert cfg.ingest.max_clip_seconds == 12.0 and cfg.shard.fps == 4.0
    assert cfg.workspace == str(tmp_path / "ws")


@pytest.mark.parametrize(
    ("yaml_text", "overrides", "expected"),
    [
        ("caption:\n  backend: magic\n", [], "caption.backend"),
        ("ingest:\n  max_clip_secs: 3\n", [], "ingest.max_clip_secs: unknown field"),
        ("stages: [ingest, train_everything]\n", [], "unknown stage(s) ['train_everything']"),
        ("ingest:\n  min_clip_seconds: 9\n  max_clip_seconds: 3\n", [], "min_clip_seconds must not exceed"),
        ("sources: []\n", [], "at least one source"),
        ("sources:\n  - synthetic: {max_objects: 4}\n", [], "sources.0.synthetic.max_objects"),
        ("", ["pack.mcq_turns=0"], "pack.mcq_turns"),
        ("", ["shard.target_bytes=-5"], "shard.target_bytes"),
        ("- just\n- a list\n", [], "top level must be a mapping"),
        ("a: [unclosed\n", [], "not valid YAML"),
        ("", ["train.dsa_selection=blocks"], "train.dsa_selection"),
        ("", ["train.dsa_selection_block=0"], "train.dsa_selection_block"),
        ("", ["train.dsa_indexer_dtype=fp16"], "train.dsa_indexer_dtype"),
        (
            "specialists:\n  domains:\n    ocr: {kinds: [videomme], rewards: {mcq: 1.0}, method: sft}\n",
            [],
            "specialists.domains.ocr: method sft trains a pack task, and 'ocr' is none",
        ),
        (
            "specialists:\n  domains:\n    mcq: {kinds: [videomme], rewards: {}, method: distil}\n",
            [],
            "method",
        ),
        (
            "mopd:\n  teacher_sampled: {ocr: 0.5}\n",
            [],
            "teacher_sampled names domain(s) ['ocr'] without a teacher",
        ),
        ("mopd:\n  teacher_sampled: {caption: 1.5}\n", [], "mopd.teacher_sampled.caption"),
        ("specialists:\n  sequential: [grounding, ocr]\n", [], "list two or more of the domains"),
        ("specialists:\n  sequential: [mcq]\n", [], "list two or more of the domains"),
        ("specialists:\n  sequential: [mcq, caption]\n", [], "['caption'] after the first domain must use"),
        (
            "sources: [/data/videos]\neval:\n  grounding_probe_videos: 100\n",
            [],
            "eval.grounding_probe_videos draws new held-out videos from a synthetic source",
        ),
        ("", ["eval.grounding_probe_videos=-1"], "eval.grounding_probe_videos"),
    ],
)
def test_bad_config_names_field(tmp_path, yaml_text, overrides, expected):
    p = tmp_path / "bad.yaml"
    p.write_text(yaml_text)
    with pytest.raises(ConfigError) as e:
        load_config(p, overrides=overrides)
    assert expected in str(e.value)
    assert str(p) in str(e.value) or "YAML" in str(e.value) or "top level" in str(e.value)


@pytest.mark.parametrize(
    ("field", "value", "own", "extra"),
    [
        ("dsa_selection", "block", "token", {"dsa_selection_block": 32}),
        ("dsa_indexer_dtype", "fp8", "bf16", {}),
    ],
)
def test_a_pipeline_dsa_setting_joins_every_recipe_without_its_own(tmp_path, field, value, own, extra):
    """`--set train.<field>=...` reaches each recipe (its cache key and the trainer); a recipe's own wins; unset,
    every recipe takes the start checkpoint's (a fresh preset: token selection, bf16 indexer)."""
    from keye.core.hashing import settings_hash

    base = load_config(ROOT / "pipelines.yaml")
    sets = [f"train.{field}={value}"] + [f"train.{k}={v}" for k, v in extra.items()]
    cfg = load_config(ROOT / "pipelines.yaml", overrides=sets)
    for name, want in {field: value, **extra}.items():
        assert all(getattr(s, name) == want for s in cfg.train.stages), name
        assert all(getattr(s, name) is None for s in base.train.stages), name
    assert all(
        settings_hash(a) != settings_hash(b) for a, b in zip(base.train.stages, cfg.train.stages, strict=True)
    )
    p = tmp_path / "p.yaml"
    p.write_text(
        f"train:\n  {field}: {value}\n  stages:\n"
        f"    - {{name: a, kind: long_sparse, steps: 1, lr: 1.0, tokens_per_step: 8, {field}: {own}}}\n"
        "    - {name: b, kind: sft, steps: 1, lr: 1.0, tokens_per_step: 8}\n"
    )
    a, b = load_config(p).train.stages
    assert (getattr(a, field), getattr(b, field)) == (own, value)


def test_the_indexer_dtype_of_a_recipe_reaches_the_model_config():
    from keye.train.trainer import _prepare_model

    cfg = load_config(ROOT / "pipelines.yaml", overrides=["train.dsa_indexer_dtype=fp8"])
    recipe = cfg.train.stages[0]
    assert _prepare_model(recipe, None, "tiny", 97, 96).config.lm.dsa.indexer_dtype == "fp8"
    bf16 = recipe.model_copy(update={"dsa_indexer_dtype": "bf16"})
    assert _prepare_model(bf16, None, "tiny", 97, 96).config.lm.dsa.indexer_dtype == "bf16"


def test_missing_file_and_bad_override(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, overrides=["ingest.max_clip_seconds"])


def test_synthetic_set_folder_names_what_changes_its_files(tmp_path):
    """A synthetic set is generated once per folder name, so every setting that changes the files is in it."""
    from keye.core.workspace import Workspace
    from keye.stages.sources import synthetic_dir

    ws = Workspace(tmp_path / "ws")
    default = synthetic_dir(SyntheticSource(), ws).name
    assert default.startswith("synthetic-v") and "-seed0-n40-long1" in default
    names = {
        synthetic_dir(SyntheticSource(**kw), ws).name
        for kw in ({}, {"max_objects": 1}, {"color_changes": False}, {"heldout_fraction": 0.3}, {"seed": 2})
    }
    assert len(names) == 5


def test_pipelines_yaml_states_no_default_twice():
    """Defaults are stated once: every value pipelines.yaml sets differs from the code default of its field."""
    import yaml

    from keye.core.config import PipelineConfig

    root = Path(__file__).resolve().parents[3]
    doc = yaml.safe_load((root / "pipelines.yaml").read_text())
    repeats = []
    for section, value in doc.items():
        field = PipelineConfig.model_fields[section]
        default = field.default_factory() if field.default_factory else field.default
        default = default.model_dump(mode="json") if hasattr(default, "model_dump") else default
        if isinstance(value, dict):
            repeats += [f"{section}.{k}" for k, v in value.items() if default.get(k) == v]
        elif value == default and section not in ("name", "workspace"):
            repeats.append(section)
    assert repeats == []


def test_set_reaches_a_recipe_by_its_name():
    """`--set train.stages.sft.<field>=...`: one recipe of the list, by name (what the MOPD configuration uses)."""
    sets = ["train.stages.sft.task_weights.caption=0.3", "train.stages.sft.loss_agg_mode=seq-mean-token-mean"]
    cfg = load_config(ROOT / "pipelines.yaml", overrides=sets)
    sft = next(r for r in cfg.train.stages if r.name == "sft")
    assert sft.task_weights == {"mcq": 1.0, "grounding": 1.0, "caption": 0.3}
    assert sft.loss_agg_mode == "seq-mean-token-mean"
    assert all(r.loss_agg_mode == "token-mean" for r in cfg.train.stages if r.name != "sft")
    with pytest.raises(ConfigError, match=r"no entry named 'sfft' \(entries: \['align'"):
        load_config(ROOT / "pipelines.yaml", overrides=["train.stages.sfft.lr=1"])
    with pytest.raises(ConfigError, match="name a field of the .sft. entry"):
        load_config(ROOT / "pipelines.yaml", overrides=["train.stages.sft=3"])
