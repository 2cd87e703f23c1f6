"""The ``hf`` captioner: a local transformers vision-language model directory, loaded offline.

Any model that ``AutoProcessor`` + ``AutoModelForImageTextToText`` load (Qwen2-VL / Qwen2.5-VL / Qwen3-VL, LLaVA,
Idefics, ...) with a chat template: the clip's frames go in as images, each preceded by its timestamp text (the
same interleaved layout as the ``openai`` backend), greedy decoding, the answer parsed like every model captioner.
Follows the transformers image-text-to-text chat-template usage. Clips run one at a time (one model per process).
Note: in transformers 5 the Qwen2-VL processors need torchvision (for their video processor) to be built.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

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


def build_chat(times: list[float], prompt: str) -> list[dict[str, Any]]:
    """Chat messages with one image placeholder per frame, each after its timestamp."""
    content: list[dict[str, Any]] = []
    for t in times:
        content.append({"type": "text", "text": timestamp_text(t)})
        content.append({"type": "image"})
    content.append({"type": "text", "text": prompt})
    return [{"role": "user", "content": content}]


class HFLocalCaptioner:
    name = "hf"

    def __init__(
        self,
        model_dir: str,
        model_name: str | None = None,
        prompt: str | None = None,
        prompt_version: str | None = None,
        fps: float = 1.0,
        min_frames: int = 2,
        max_frames: int = 8,
        max_tokens_per_frame: int = 256,
        max_new_tokens: int = 256,
        device: str = "cpu",
        dtype: str = "auto",
    ) -> None:
        self.model_dir = Path(model_dir)
        self.model = model_name or self.model_dir.name
        self.prompt, self.prompt_version = prompt_identity(prompt, prompt_version)
        self.frame_opts = dict(
            fps=fps, min_frames=min_frames, max_frames=max_frames, max_tokens_per_frame=max_tokens_per_frame
        )
        self.max_new_tokens, self.device, self.dtype = max_new_tokens, device, dtype
        self._processor: Any = None
        self._model: Any = None
        self._lock = threading.Lock()

    def load(self) -> None:
        """Load processor and model (once); CaptionerError with the reason when the directory is not usable."""
        with self._lock:
            if self._model is not None:
                return
            if not (self.model_dir / "config.json").is_file():
                raise CaptionerError(
                    f"hf captioner: {self.model_dir} is not a transformers model directory (no config.json)"
                )
            import torch
            from transformers import AutoModelForImageTextToText, AutoProcessor

            try:
                processor = AutoProcessor.from_pretrained(self.model_dir, local_files_only=True)
            except Exception as e:
                raise CaptionerError(
                    f"hf captioner: cannot build the processor of {self.model_dir}: {e}"
                ) from e
            if not getattr(processor, "chat_template", None):
                raise CaptionerError(f"hf captioner: {self.model_dir} has no chat template")
            dtype = self.dtype if self.dtype == "auto" else getattr(torch, self.dtype)
            try:
                model = AutoModelForImageTextToText.from_pretrained(
                    self.model_dir, local_files_only=True, dtype=dtype
                )
            except Exception as e:
                raise CaptionerError(f"hf captioner: cannot load the model in {self.model_dir}: {e}") from e
            self._processor, self._model = processor, model.to(self.device).eval()

    def _one(self, clip: ClipRef) -> CaptionRecord:
        import torch
        from PIL import Image

        fail = lambda why: CaptionRecord.failed(clip, self.name, self.model, self.prompt_version, why)
        try:
            times, frames = sample_clip_frames(clip, **self.frame_opts)
        except Exception as e:  # any decode failure concerns this clip only
            return fail(f"cannot sample frames of {clip.video_path} [{clip.start:.2f}, {clip.end:.2f}]: {e}")
        proc, model = self._processor, self._model
        text = proc.apply_chat_template(
            build_chat(times, render_prompt(self.prompt, clip)), add_generation_prompt=True, tokenize=False
        )
        images = [Image.fromarray(f) for f in frames]
        inputs = proc(text=[text], images=images, return_tensors="pt").to(self.device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        n_prompt = int(inputs["input_ids"].shape[1])
        new = out[:, n_prompt:]
        answer = proc.batch_decode(new, skip_special_tokens=True)[0]
        caption, dense, how = parse_model_answer(answer, clip.duration)
        if not caption:
            return fail("the model returned an empty caption")
        meta = {
            "frame_times": [round(t, 3) for t in times],
            "frame_size": [int(frames.shape[1]), int(frames.shape[2])],
            "parsed_as": how,
            "prompt_tokens": n_prompt,
            "new_tokens": int(new.shape[1]),
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
