"""Cache keys of stages: input artifact ids + settings + the code that computes the stage.

A re-run skips a stage whose key is already a complete artifact in lineage; change the inputs, the settings or
the code and the key changes, so the stage runs again (DESIGN.md: "cache key = input artifact ids + stage config hash").
The code part is computed, never listed: the source of every keye/ and flows/ module a stage's entry modules import,
transitively (found with ast, so a lazy import inside a function or a "module:attr" plug-in string counts too).
A hand-written list goes stale the day someone edits a module it forgot (the tokenizer, the model, a kernel).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel


def stable_hash64(text: str) -> int:
    """A 64-bit hash of text that is the same in every process and run (Python's hash() is salted per process):
    for deterministic per-sample choices that must survive a restart."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Content hash of a file, streamed in chunks so large videos and shards never sit in memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def hash_checkpoint_dir(path: str | Path) -> str:
    """One content hash for a checkpoint directory (every file's name and bytes): lineage and `keye verify`."""
    root = Path(path)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(root)).encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def settings_hash(settings: BaseModel | dict[str, Any], *extra: Any) -> str:
    """Stable short hash of settings (and extra inputs)."""
    data = settings.model_dump(mode="json") if isinstance(settings, BaseModel) else settings
    blob = json.dumps([data, list(extra)], sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


ROOT = Path(__file__).resolve().parents[2]
"""The directory holding the keye/ and flows/ packages (the repository root of a checkout)."""

_PACKAGES = ("keye", "flows")
# Modules that only record a run: their own source counts, what they import does not (keye.core.tracking imports
# keye.eval.predict for the registered chat model; following it would tie every stage's key to the model code).
RECORD_ONLY = ("keye.core.tracking",)
_MODULE_STRING = re.compile(r"^((?:keye|flows)(?:\.\w+)+)(?::\w+)?$")


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """The source file of a keye/flows module under root, or None (not ours, or no such module)."""
    parts = name.split(".")
    if parts[0] not in _PACKAGES:
        return None
    base = root.joinpath(*parts)
    for f in (base.with_suffix(".py"), base / "__init__.py"):
        if f.is_file():
            return f
    return None


def _imported_names(module: str, path: Path) -> set[str]:
    """Every module name an ast of the file mentions: imports anywhere (top level or inside functions), and
    "keye.x.y" / "keye.x.y:attr" string constants (lazy imports through importlib, plug-in registries)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):  # `if TYPE_CHECKING:` imports never run
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names.add(target)
            names.update(f"{target}.{a.name}" for a in node.names)  # `from pkg import submodule`
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            m = _MODULE_STRING.match(node.value)
            if m:
                names.add(m.group(1))
    return names


def module_closure(*entries: str, root: Path = ROOT) -> dict[str, Path]:
    """The keye/flows modules that `entries` import, transitively, with the packages above them.

    A package that is only the parent of an imported module (`keye.model` for `from keye.model.config import X`)
    adds its own file but not what it imports in turn: the code uses the submodule, not the package's other
    modules. A package imported by name (`from keye.model import build_model`) is followed like any module.
    """
    deep: dict[str, Path] = {}
    shallow: dict[str, Path] = {}
    todo = [(e, True) for e in entries]
    while todo:
        name, follow = todo.pop()
        if name in deep or (not follow and name in shallow):
            continue
        path = module_file(name, root)
        if path is None:
            continue
        parts = name.split(".")
        todo += [(".".join(parts[:i]), False) for i in range(1, len(parts))]  # importing a.b.c runs a, a.b
        if follow and name not in RECORD_ONLY:
            deep[name] = path
            todo += [(n, True) for n in sorted(_imported_names(name, path))]
        else:
            shallow[name] = path
    missing = [e for e in entries if e not in deep and e not in shallow]
    if missing:
        raise ValueError(f"code_hash: no module {missing} under {root}")
    return {**shallow, **deep}


@lru_cache(maxsize=64)
def _closure_hash(entries: tuple[str, ...], root: Path) -> str:
    h = hashlib.sha256()
    for name, path in sorted(module_closure(*entries, root=root).items()):
        h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def code_hash(*entry_modules: str, root: Path = ROOT) -> str:
    """Hash of the source of every module the entry modules import, transitively, in sorted order.

    Computed once per process (the sources do not change under a running pipeline)."""
    return _closure_hash(tuple(sorted(entry_modules)), root)
