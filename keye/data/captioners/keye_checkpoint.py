"""The ``keye`` captioner: this project's own checkpoint as a captioner (the slot that closes the loop: a model
trained by the pipeline can caption the next round of videos).

What a checkpoint directory must hold (checked up front, with a clear error naming what is missing):
- ``config.json`` + safetensors weights, loaded by ``keye.model.load_checkpoint``;
- ``tokenizer.json`` (Hugging Face ``tokenizers`` format) whose vocabulary matches the model's, with the model's
  ``image_token_id`` as the frame placeholder.
Prompt layout (Keye/Qwen-VL style interleaving, the same as the other model captioners): for every frame its
timestamp text, then ``frame_tokens(h, w)`` image placeholders that the model fills with that frame's visual tokens,
then the prompt text; greedy decoding with ``keye.model.generate.generate`` until an end token. Pixels are scaled
as SigLIP expects ((x/255 - 0.5) / 0.5). When the training tokenizer's chat template lands, ``prompt_ids`` is the one
place to switch to it, so captioning prompts match training prompts exactly.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from keye.data.captioners.base import (
    CaptionerError,
    CaptionRecord,
    ClipRef,
    parse_model_answer,
    prompt_identity,
    render_prompt,
    sample_clip_frames,
    timestamp_text,
)

END_TOKENS = ("<|im_end|>", "<|endoftext|>", "</s>", "<eos>")


def frames_to_patches(frames: np.ndarray, patch: int) -> tuple[Any, Any]:
    """uint8 [N,H,W,3] -> (pixel_patches [N*h*w, 3*P*P] float32, patch_grids int32 [N, 3]) for the ViT."""
    import torch

    from keye.model.patches import frame_patches

    n, h, w, _ = frames.shape
    grids = torch.tensor([[1, h // patch, w // patch]] * n, dtype=torch.int32)
    return torch.from_numpy(frame_patches(np.ascontiguousarray(frames), patch)), grids


class KeyeCheckpointCaptioner:
    name = "keye"

    def __init__(
        self,
        checkpoint_dir: str,
        model_name: str | None = None,
        prompt: str | None = None,
        prompt_version: str | None = None,
        fps: float = 1.0,
        min_frames: int = 2,
        max_frames: int = 8,
        max_tokens_per_frame: int = 256,
        max_new_tokens: int = 256,
        device: str = "cpu",
        end_tokens: list[str] | None = None,
    ) -> None:
        self.checkpoint_dir = Path(checkpoint_dir)
        self.model = model_name or self.checkpoint_dir.name
        self.prompt, self.prompt_version = prompt_identity(prompt, prompt_version)
        self.frame_opts = dict(
            fps=fps, min_frames=min_frames, max_frames=max_frames, max_tokens_per_frame=max_tokens_per_frame
        )
        self.max_new_tokens, self.device = max_new_tokens, device
        self.end_tokens = tuple(end_tokens or END_TOKENS)
        self._net: Any = None
        self._tok: Any = None
        self._eos: list[int] = []
        self._lock = threading.Lock()

    def load(self) -> None:
        with self._lock:
            if self._net is not None:
                return
            d = self.checkpoint_dir
            missing = [n for n in ("config.json", "tokenizer.json") if not (d / n).is_file()]
            if not d.is_dir() or missing or not list(d.glob("*.safetensors")):
                what = missing + ([] if list(d.glob("*.safetensors")) else ["*.safetensors weights"])
                raise CaptionerError(f"keye captioner: checkpoint {d} lacks {', '.join(what)}")
            from tokenizers import Tokenizer

            from keye.model import load_checkpoint

            try:
                net = load_checkpoint(d, device=self.device)
            except Exception as e:
                raise CaptionerError(f"keye captioner: cannot load checkpoint {d}: {e}") from e
            tok = Tokenizer.from_file(str(d / "tokenizer.json"))
            vocab = net.config.lm.vocab_size
            if tok.get_vocab_size(with_added_tokens=True) > vocab:
                raise CaptionerError(
                    f"keye captioner: tokenizer.json has {tok.get_vocab_size()} tokens, the model only {vocab}"
                )
            self._eos = [i for t in self.end_tokens if (i := tok.token_to_id(t)) is not None]
            if not self._eos:
                raise CaptionerError(
                    f"keye captioner: tokenizer.json has none of the end tokens {self.end_tokens}"
                )
            self._net, self._tok = net, tok

    def prompt_ids(self, times: list[float], frame_hw: tuple[int, int], prompt: str) -> list[int]:
        """Token ids of the prompt: per frame its timestamp then its image placeholders, then the prompt."""
        from keye.model.vision_tokens import frame_tokens

        image_id = self._net.config.image_token_id
        n_img = frame_tokens(
            *frame_hw, patch=self._net.config.vision.patch_size, merge=self._net.config.vision.spatial_merge
        )
        ids: list[int] = []
        for t in times:
            ids += self._tok.encode(timestamp_text(t), add_special_tokens=False).ids
            ids += [image_id] * n_img
        ids += self._tok.encode(prompt, add_special_tokens=False).ids
        return ids

    def _one(self, clip: ClipRef) -> CaptionRecord:
        from keye.model.generate import Prompt, generate

        fail = lambda why: CaptionRecord.failed(clip, self.name, self.model, self.prompt_version, why)
        try:
            times, frames = sample_clip_frames(clip, **self.frame_opts)
        except Exception as e:  # any decode failure concerns this clip only
            return fail(f"cannot sample frames of {clip.video_path} [{clip.start:.2f}, {clip.end:.2f}]: {e}")
        ids = self.prompt_ids(times, (frames.shape[1], frames.shape[2]), render_prompt(self.prompt, clip))
        patches, grids = frames_to_patches(frames, self._net.config.vision.patch_size)
        t0 = time.perf_counter()
        (res,) = generate(
            self._net,
            [Prompt(input_ids=ids, pixel_patches=patches.to(self._net.dtype), patch_grids=grids)],
            max_new_tokens=self.max_new_tokens,
            eos_token_ids=self._eos,
        )
        answer = self._tok.decode([t for t in res.token_ids if t not in self._eos], skip_special_tokens=True)
        caption, dense, how = parse_model_answer(answer, clip.duration)
        if not caption:
            return fail("the model returned an empty caption")
        meta = {
            "frame_times": [round(t, 3) for t in times],
            "frame_size": [int(frames.shape[1]), int(frames.shape[2])],
            "parsed_as": how,
            "prompt_tokens": len(ids),
            "new_tokens": len(res.token_ids),
            "finish_reason": res.finish_reason,
            "latency_s": round(time.perf_counter() - t0, 3),
        }
        return CaptionRecord(
            clip.clip_id,
            self.name,
            self.model,
            self.prompt_version,
            caption=caption,
            dense_captions=dense,
            meta=meta,
        )

    def caption(self, clips: list[ClipRef]) -> list[CaptionRecord]:
        if not clips:
            return []
        self.load()
        return [self._one(clip) for clip in clips]
