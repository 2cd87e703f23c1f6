"""Checkpoint I/O: safetensors shards + config.json + a weight-map index, written atomically; no pickle anywhere.

Layout follows the Hugging Face sharded-safetensors convention (model-0000i-of-0000n.safetensors and
model.safetensors.index.json) so standard tools can inspect it. Tied embeddings are stored once and re-tied on load.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from keye.model import integrity
from keye.model.config import ModelConfig
from keye.model.vlm import KeyeVL

FORMAT = "keye.checkpoint/v1"
INDEX = "model.safetensors.index.json"
CONFIG = "config.json"
TIED_KEY = "lm.lm_head.weight"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sort_header_metadata(path: Path) -> None:
    """safetensors writes its __metadata__ map in Rust hash order (random per process): the same weights gave
    other bytes (issue 24). Rewrite the header with that map's keys sorted; tensor offsets are unchanged."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        raw = f.read(n)
        header = json.loads(raw)
        if "__metadata__" in header:
            header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        new = json.dumps(header, separators=(",", ":")).encode()
        if len(new) > n:  # never: the same keys and values in another order
            raise ValueError(f"{path}: canonical safetensors header is longer than the written one")
        f.seek(8)
        f.write(new + b" " * (n - len(new)))  # the format allows trailing spaces in the header


class ShardWriter:
    """Streams tensors into safetensors shards of at most `max_shard_bytes` inside a temporary directory, then
    publishes the directory atomically (`commit`), so converters never hold a whole large model in memory."""

    def __init__(self, out_dir: str | Path, config: ModelConfig, max_shard_bytes: int = 2 << 30) -> None:
        self.out = Path(out_dir)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.out.parent / f".{self.out.name}.tmp-{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir()
        self.config = config
        self.max_shard_bytes = max_shard_bytes
        self.pending: dict[str, Tensor] = {}
        self.pending_bytes = 0
        self.files: list[tuple[str, list[str]]] = []
        self.total = 0

    def add(self, name: str, tensor: Tensor) -> None:
        if name in self.pending or any(name in keys for _, keys in self.files):
            raise KeyError(f"tensor {name} written twice")
        t = tensor.detach().contiguous().cpu()
        nbytes = t.numel() * t.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self.pending[name] = t
        self.pending_bytes += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        if not self.pending:
            return
        fname = f"part-{len(self.files):05d}.safetensors"
        save_file(self.pending, str(self.tmp / fname), metadata={"format": "pt", "keye_format": FORMAT})
        sort_header_metadata(self.tmp / fname)
        self.files.append((fname, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def commit(self) -> Path:
        try:
            self._flush()
            n = len(self.files)
            weight_map: dict[str, str] = {}
            for i, (part, keys) in enumerate(self.files):
                fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                os.replace(self.tmp / part, self.tmp / fname)
                weight_map.update({k: fname for k in keys})
            index = {"metadata": {"total_size": self.total, "format": FORMAT}, "weight_map": weight_map}
            (self.tmp / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            self.config.to_json(self.tmp / CONFIG)
            integrity.write_checksums(self.tmp)
            for f in self.tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            _fsync_dir(self.tmp)
            old = None
            if self.out.exists():
                old = self.out.parent / f".{self.out.name}.old-{uuid.uuid4().hex[:8]}"
                os.replace(self.out, old)
            os.replace(self.tmp, self.out)
            _fsync_dir(self.out.parent)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            self.abort()
            raise
        return self.out

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def save_state(
    state: dict[str, Tensor], config: ModelConfig, out_dir: str | Path, max_shard_bytes: int = 2 << 30
) -> Path:
    """Write a state dict + config as a checkpoint directory; the directory appears complete or not at all."""
    writer = ShardWriter(out_dir, config, max_shard_bytes)
    try:
        for name, tensor in state.items():
            writer.add(name, tensor)
    except BaseException:
        writer.abort()
        raise
    return writer.commit()


def save_checkpoint(
    model: KeyeVL, out_dir: str | Path, max_shard_bytes: int = 2 << 30, dtype: torch.dtype | None = None
) -> Path:
    """Save `model` (weights optionally cast to `dtype`) to `out_dir`; returns the directory."""
    state = model.state_dict()
    if model.config.lm.tie_word_embeddings:
        state.pop(TIED_KEY, None)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    return save_state(state, model.config, out_dir, max_shard_bytes)


def read_config(ckpt_dir: str | Path) -> ModelConfig:
    return ModelConfig.from_json(Path(ckpt_dir) / CONFIG)


def safetensors_files(ckpt_dir: str | Path) -> list[Path]:
    """The shard files of a checkpoint directory (ours or a Hugging Face one), index first."""
    d = Path(ckpt_dir)
    for index_name in (INDEX, "model.safetensors.index.json"):
        index = d / index_name
        if index.exists():
            return [d / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors files in {d}")
    return files


def read_state(
    ckpt_dir: str | Path, device: str | torch.device = "cpu", verify: bool = True
) -> dict[str, Tensor]:
    """All tensors of a checkpoint directory (any shard layout), by name; with `verify` (ours: always) every file
    is checked against the sha256 recorded when it was written before it is parsed."""
    d = Path(ckpt_dir)
    state: dict[str, Tensor] = {}
    files = safetensors_files(d)
    if verify:
        integrity.verify(d, only=[str(p.relative_to(d)) for p in files])
    for path in files:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                state[key] = f.get_tensor(key)
    return state


def load_checkpoint(
    ckpt_dir: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    strict: bool = True,
) -> KeyeVL:
    """Build the model described by config.json and load its weights (eval mode). Every recorded file of the
    directory is checked first: a corrupted checkpoint is refused with the file's name, never evaluated."""
    d = Path(ckpt_dir)
    recorded = integrity.recorded(d)
    integrity.verify(d, only=sorted(set(recorded) | {CONFIG}))
    unrecorded = [p for p in safetensors_files(d) if str(p.relative_to(d)) not in recorded]
    if unrecorded:
        integrity.verify(d, only=[str(unrecorded[0].relative_to(d))])  # raises, naming the file
    cfg = read_config(ckpt_dir)
    state = read_state(ckpt_dir, device, verify=False)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    with torch.device("meta"):
        model = KeyeVL(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if cfg.lm.tie_word_embeddings:
        model.lm.lm_head.weight = model.lm.embed_tokens.weight
        missing = [m for m in missing if m != TIED_KEY]
    if strict and (missing or unexpected):
        raise KeyError(
            f"checkpoint {ckpt_dir} does not match its config: missing {missing}, unexpected {unexpected}"
        )
    for module in model.modules():  # buffers that are not stored (e.g. a disabled router bias)
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf is not None and buf.device.type == "meta":
                module.register_buffer(
                    name, torch.zeros(buf.shape, dtype=buf.dtype, device=device), persistent=False
                )
    for name, p in model.named_parameters():
        if p.device.type == "meta":
            raise KeyError(f"parameter {name} was not loaded from {ckpt_dir}")
    return model.eval()
