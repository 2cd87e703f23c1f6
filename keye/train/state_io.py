"""Optimizer, RNG and trainer state as safetensors + JSON: a checkpoint can be read without running any code.

`torch.load(weights_only=False)` unpickles, and a pickle can call anything on load (a crafted `__reduce__`), so a
step checkpoint shared between people or machines would be a way to run code. Here a nested state (dicts, lists,
tuples, str/int/float/bool/None, tensors, numpy arrays and scalars) is split into its tensors, stored in one
safetensors file, and a JSON skeleton kept in the file's metadata that says where each tensor goes. Loading only
parses JSON and tensor bytes. Round trips are bit-exact (floats go through repr, arrays through their raw bytes),
which exact resume depends on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

TREE_KEY = "keye_state_tree"
FORMAT_KEY = "keye_state_format"
FORMAT = "keye.state/v1"


class StateFormatError(ValueError):
    """A state file that is not in this format (e.g. an old pickle checkpoint) or is damaged."""


def _flatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if obj is None or isinstance(obj, bool | str):
        return obj
    if isinstance(obj, int | float) and not isinstance(obj, np.generic):
        return obj
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        key = f"t{len(tensors)}"
        raw = np.ascontiguousarray(obj).view(np.uint8).reshape(-1)
        tensors[key] = torch.from_numpy(raw.copy())
        return {"__ndarray__": key, "dtype": obj.dtype.str, "shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        return {"__npscalar__": obj.dtype.str, "value": obj.item()}
    if isinstance(obj, tuple):
        return {"__tuple__": [_flatten(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_flatten(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not any(k.startswith("__") for k in obj):
            return {k: _flatten(v, tensors) for k, v in obj.items()}
        items = []
        for k, v in obj.items():
            if not isinstance(k, str | int | float | bool) and k is not None:
                raise TypeError(f"state key {k!r} ({type(k).__name__}) cannot be stored without pickle")
            items.append([k, _flatten(v, tensors)])
        return {"__items__": items}
    raise TypeError(
        f"{type(obj).__module__}.{type(obj).__name__} cannot be stored without pickle: {obj!r:.80}"
    )


def _unflatten(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, list):
        return [_unflatten(v, tensors) for v in node]
    if not isinstance(node, dict):
        return node
    if "__tensor__" in node:
        return tensors[node["__tensor__"]]
    if "__ndarray__" in node:
        raw = tensors[node["__ndarray__"]].numpy().tobytes()
        return np.frombuffer(raw, dtype=np.dtype(node["dtype"])).reshape(node["shape"]).copy()
    if "__npscalar__" in node:
        return np.dtype(node["__npscalar__"]).type(node["value"])
    if "__tuple__" in node:
        return tuple(_unflatten(v, tensors) for v in node["__tuple__"])
    if "__items__" in node:
        return {k: _unflatten(v, tensors) for k, v in node["__items__"]}
    return {k: _unflatten(v, tensors) for k, v in node.items()}


def save_state_file(obj: Any, path: str | Path) -> Path:
    tensors: dict[str, torch.Tensor] = {}
    tree = _flatten(obj, tensors)
    save_file(tensors, str(path), metadata={FORMAT_KEY: FORMAT, TREE_KEY: json.dumps(tree)})
    return Path(path)


def load_state_file(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        legacy = path.with_suffix(".pt")
        hint = (
            f" (found {legacy.name}: a pickle from an older keye, which is never loaded; delete that step "
            "checkpoint to start the stage again)"
            if legacy.is_file()
            else ""
        )
        raise StateFormatError(f"{path}: missing{hint}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (SafetensorError, OSError) as e:
        raise StateFormatError(f"{path}: not a readable state file ({e})") from None
    if meta.get(FORMAT_KEY) != FORMAT or TREE_KEY not in meta:
        raise StateFormatError(f"{path}: not a {FORMAT} file")
    return _unflatten(json.loads(meta[TREE_KEY]), tensors)
