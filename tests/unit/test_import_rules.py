"""The layering rules of docs/ARCHITECTURE.md, checked from the imports themselves (ast, every import in a file,
top level or inside a function), so a rule broken by a new import fails here instead of in a review.

1. Below keye/stages (data, datasets, model, kernels, train, eval, rl, serve) nothing imports lineage, config or
   tracking: libraries take plain values and return plain values.
2. A flow holds no ids, SQL or lineage calls: flows plan, submit tasks and record through keye.stages.
3. keye/model and keye/kernels import only torch, triton, numpy, safetensors, the standard library and each other
   (they must run on a bare GPU box).
4. One owner per engine: duckdb only in keye/core/lineage.py, mlflow only in keye/core/tracking.py (and the local
   server commands), prefect only in flows/; keye/ never imports flows/ (only the CLI, lazily).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LIBRARIES = ("data", "datasets", "model", "kernels", "train", "eval", "rl", "serve", "agent")
STAGE_LAYER = ("keye.core.lineage", "keye.core.config", "keye.core.tracking", "keye.stages", "flows")


def _files(*dirs: str) -> list[Path]:
    return sorted(f for d in dirs if (ROOT / d).is_dir() for f in (ROOT / d).rglob("*.py"))


def _imports(path: Path) -> set[str]:
    """Every module a file imports (absolute names; relative imports resolved against the file's package)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                out.add(".".join(base + ([node.module] if node.module else [])))
            else:
                out.add(node.module or "")
    return out


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _rel(f: Path) -> str:
    return str(f.relative_to(ROOT))


def test_libraries_below_the_stages_take_plain_values():
    bad = {
        _rel(f): sorted(m for m in _imports(f) if _under(m, STAGE_LAYER))
        for f in _files(*(f"keye/{d}" for d in LIBRARIES))
    }
    assert {f: m for f, m in bad.items() if m} == {}


@pytest.mark.parametrize("flow", _files("flows"), ids=lambda f: f.name)
def test_flows_hold_no_ids_sql_or_lineage_calls(flow: Path):
    tree = ast.parse(flow.read_text(encoding="utf-8"))
    assert not [m for m in _imports(flow) if _under(m, ("keye.core.lineage", "duckdb"))]
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            assert node.attr not in ("lineage", "key", "produce"), f"{flow.name}:{node.lineno}: .{node.attr}"
        if isinstance(node, ast.Name):
            assert node.id != "make_id", f"{flow.name}:{node.lineno}: make_id"
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            words = node.value.upper().split()
            assert not {"SELECT", "INSERT", "UPDATE", "DELETE"} & set(words[:1]), f"{flow.name}: SQL"
    text = flow.read_text(encoding="utf-8")
    if "@flow" in text:  # a flow file (flows/artifacts.py, runners.py, submit.py are Prefect helpers)
        logic = [ln for ln in text.splitlines() if not ln.lstrip().startswith('("')]  # STEPS table rows: data
        assert len(logic) < 40, f"{flow.name}: a flow is thin wiring"


def test_model_and_kernels_need_only_torch_triton_numpy_safetensors():
    allowed = ("torch", "triton", "numpy", "safetensors", "keye.model", "keye.kernels", "__future__")
    stdlib = set(sys.stdlib_module_names)
    bad = {}
    for f in _files("keye/model", "keye/kernels"):
        extra = sorted(m for m in _imports(f) if not _under(m, allowed) and m.split(".")[0] not in stdlib)
        if extra:
            bad[_rel(f)] = extra
    assert bad == {}


@pytest.mark.parametrize(
    ("engine", "owners"),
    [
        ("duckdb", ("keye/core/lineage.py", "keye/core/lineage_snapshot.py")),
        ("mlflow", ("keye/core/tracking.py", "keye/services.py", "keye/doctor.py")),
        ("prefect", ("flows/",)),
    ],
)
def test_one_owner_per_engine(engine: str, owners: tuple[str, ...]):
    users = [_rel(f) for f in _files("keye", "flows") if any(_under(m, (engine,)) for m in _imports(f))]
    assert [u for u in users if not u.startswith(owners)] == []


def test_keye_never_imports_flows_except_the_cli_lazily():
    users = [_rel(f) for f in _files("keye") if any(_under(m, ("flows",)) for m in _imports(f))]
    assert users == ["keye/cli.py"]
