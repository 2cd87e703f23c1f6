"""Test setup: Triton runs in its interpreter on CPU machines (must be set before any kernel import); tests/ is on
sys.path so any test can import the shared fixtures (`from fixtures.corrupt_videos import ...`), and so are the
tests/unit/<package>/ folders (some tests reuse another's helpers).

Layout: tests/unit/<package>/ (one folder per keye package), tests/e2e/ (real flow runs), tests/fixtures/."""

import os
import sys
from pathlib import Path

import pytest

import keye  # noqa: F401  (first: pins torch's CPU kernels before any torch op, keye.determinism)

try:  # torch is optional for collecting a handful of pure-python tests
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False

_TESTS = Path(__file__).resolve().parent
# the shared fixtures, and the unit folders whose helpers other tests import (e.g. test_loader's shard builders)
for _p in [_TESTS, *sorted(p for p in (_TESTS / "unit").iterdir() if p.is_dir())]:
    sys.path.insert(0, str(_p))

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not _HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def train_corpus(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The small packed training corpus of test_train_data.build_corpus (shards, tokenizer, pack index), built once
    for every training test module; read-only."""
    from test_train_data import build_corpus

    return build_corpus(tmp_path_factory.mktemp("train_corpus"))
