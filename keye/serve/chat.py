"""OpenAI chat messages -> the model's Prompt, through the project's ONE chat template (keye.data.tokenizer
.encode_chat) and frame sampler (keye.data.sampling.plan_frames + keye.data.video.decode_frames), so a served or
rolled-out prompt is laid out exactly as training and `keye eval` lay it out (keye/eval/predict.py).

Content parts accepted (OpenAI chat-completions format plus two keye extensions):
  {"type": "text", "text": ...}
  {"type": "image_url", "image_url": {"url": "data:image/...;base64,..."}}    one image, resized within the
        checkpoint's per-frame token bounds (only data: URLs: the server never fetches)
  {"type": "video_url", "video_url": {"url": "/path/or/file:///path.mp4", "start": s, "end": e, "fps": f}}
        frames planned by the checkpoint's sampling policy (fps overridden when given) over [start, end] seconds;
        each frame is stamped with its time in the video (start + offset), as training stamps clip times;
        "timestamps": "relative" stamps from 0 instead (the range shown as a clip of its own, as training shows
        a grounding query's windows)
  {"type": "video_frames", "frames": [{"time": t, "url": "data:..."}, ...]}    frames already chosen by the
        client, each stamped with its time
In process (rollouts) a video part may also carry decoded frames: {"type": "video", "frames": uint8 [N,H,W,3],
"times": [...]}. Any error in a message is a ChatRequestError naming the message and part (a 400 when served).
Tool use: assistant messages may carry OpenAI `tool_calls`, "tool" messages carry the tools' answers (frames too),
and `build_prompt(..., tools=[...])` offers the tools; the template lays them out (keye.data.tokenizer).
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from keye.agent.tool_calls import tool_name
from keye.data.frame_cache import FrameCache
from keye.data.sampling import SamplingPolicy

POLICY_FILE = "sampling_policy.json"  # written beside the weights by keye.train.bundle


class ChatRequestError(ValueError):
    """A request the model cannot answer as given; the message says which field and why."""


def decode_data_url(url: str, where: str) -> np.ndarray:
    """uint8 [H, W, 3] RGB from a data:image/...;base64 URL."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(url, str) or not url.startswith("data:") or ";base64," not in url:
        raise ChatRequestError(
            f"{where}: only data:image/...;base64 URLs are accepted (the server does not fetch)"
        )
    try:
        raw = base64.b64decode(url.split(";base64,", 1)[1], validate=True)
        with Image.open(io.BytesIO(raw)) as img:
            return np.array(img.convert("RGB"))
    except (binascii.Error, ValueError, UnidentifiedImageError, OSError) as e:
        raise ChatRequestError(f"{where}: the image cannot be decoded ({e})") from e


def _resize(img: np.ndarray, height: int, width: int) -> np.ndarray:
    from PIL import Image

    if img.shape[:2] == (height, width):
        return img
    return np.array(Image.fromarray(img).resize((width, height), Image.BICUBIC))


@dataclass
class _Built:
    parts: list[dict[str, Any]] = field(default_factory=list)  # encode_chat content parts
    frames: list[np.ndarray] = field(default_factory=list)  # uint8 [H, W, 3] in order of appearance


class ChatModel:
    """A model with the tokenizer and sampling policy it was trained with: turns chat messages into a Prompt and
    generated ids into text. Holds no request state; the model may be the trainer's live policy (rollouts)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        policy: SamplingPolicy | None = None,
        *,
        media_root: str | Path | None = None,
        name: str = "keye",
    ) -> None:
        if tokenizer.vocab_size > model.config.lm.vocab_size:
            raise ValueError(
                f"tokenizer has {tokenizer.vocab_size} tokens but the model only {model.config.lm.vocab_size}: "
                "they were not trained together"
            )
        self.model, self.tok, self.name = model, tokenizer, name
        self.policy = policy or SamplingPolicy()
        self.media_root = Path(media_root).resolve() if media_root else None
        self.eos_ids = [tokenizer.eos_id, tokenizer.pad_id]
        self.frames_cache = FrameCache()

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint_dir: str | Path,
        *,
        device: str = "cpu",
        dtype: Any = None,
        media_root: str | Path | None = None,
        name: str | None = None,
    ) -> ChatModel:
        """The weights (keye.model.load_checkpoint), tokenizer.json and sampling_policy.json of a checkpoint."""
        from keye.data.tokenizer import load_tokenizer
        from keye.model import load_checkpoint

        d = Path(checkpoint_dir)
        if not (d / "config.json").is_file():
            raise FileNotFoundError(
                f"{d}: no config.json (give a checkpoint directory written by keye train)"
            )
        policy_file = d / POLICY_FILE
        policy = (
            SamplingPolicy.model_validate_json(policy_file.read_text()) if policy_file.is_file() else None
        )
        model = load_checkpoint(d, device=device, dtype=dtype)
        return cls(model, load_tokenizer(d), policy, media_root=media_root, name=name or d.name)

    # ------------------------------------------------------------------------------------------ text
    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids if int(i) not in self.eos_ids])

    def token_text(self, token_id: int) -> str:
        return self.tok.decode([int(token_id)], skip_special_tokens=False)

    # ------------------------------------------------------------------------------------------ frames
    def _image_size(self, height: int, width: int) -> tuple[int, int]:
        from keye.model.vision_tokens import smart_resize, tokens_to_pixels

        p = self.policy
        return smart_resize(
            height,
            width,
            min_pixels=tokens_to_pixels(p.min_tokens_per_frame),
            max_pixels=tokens_to_pixels(p.max_tokens_per_frame),
        )

    def _tokens(self, height: int, width: int) -> int:
        from keye.model.vision_tokens import frame_tokens

        v = self.model.config.vision
        return frame_tokens(height, width, patch=v.patch_size, merge=v.spatial_merge)

    def _video_path(self, url: Any, where: str) -> Path:
        if not isinstance(url, str) or not url:
            raise ChatRequestError(f"{where}: video_url.url must be a local file path")
        path = Path(url[len("file://") :] if url.startswith("file://") else url)
        if "://" in url and not url.startswith("file://"):
            raise ChatRequestError(f"{where}: only local video files are accepted, got {url!r}")
        path = path.resolve()
        if self.media_root is not None and not path.is_relative_to(self.media_root):
            raise ChatRequestError(f"{where}: {path} is outside the served media root {self.media_root}")
        if not path.is_file():
            raise ChatRequestError(f"{where}: no video file at {path}")
        return path

    def _video_url(self, spec: Mapping[str, Any], where: str, out: _Built) -> None:
        from keye.data.sampling import plan_frames
        from keye.data.video import VideoRejected

        path = self._video_path(spec.get("url"), where)
        try:
            info = self.frames_cache.probe(path)
        except VideoRejected as e:
            raise ChatRequestError(f"{where}: {path} cannot be read as a video ({e.reason})") from e
        try:
            start = float(spec.get("start") or 0.0)
            end = float(spec["end"]) if spec.get("end") is not None else info.duration
            fps = spec.get("fps")
            policy = self.policy if fps is None else self.policy.model_copy(update={"fps": float(fps)})
            if fps is not None and not float(fps) > 0:
                raise ValueError("fps must be > 0")
        except (TypeError, ValueError) as e:
            raise ChatRequestError(f"{where}: start/end/fps must be numbers, fps > 0 ({e})") from e
        end = min(end, info.duration)
        if not 0 <= start < end:
            raise ChatRequestError(
                f"{where}: need 0 <= start < end <= {info.duration:.3f} s, got [{start}, {end}]"
            )
        stamps = spec.get("timestamps") or "absolute"
        if stamps not in ("absolute", "relative"):
            raise ChatRequestError(f"{where}: timestamps must be 'absolute' or 'relative', got {stamps!r}")
        plan = plan_frames(end - start, info.width, info.height, policy, video_fps=info.fps or None)
        times = tuple(start + t for t in plan.timestamps)
        try:
            frames = self.frames_cache.frames(path, times, (plan.height, plan.width))
        except VideoRejected as e:
            raise ChatRequestError(f"{where}: cannot decode frames of {path} ({e.reason})") from e
        # relative: the range is shown as a clip of its own, stamped from 0 (as training shows a clip's windows)
        offset = 0.0 if stamps == "relative" else start
        self._add_frames(out, [offset + t for t in plan.timestamps], list(frames))

    def _add_frames(self, out: _Built, times: Sequence[float], frames: Sequence[np.ndarray]) -> None:
        sized = []
        for f in frames:
            h, w = self._image_size(f.shape[0], f.shape[1])
            sized.append(_resize(np.ascontiguousarray(f, dtype=np.uint8), h, w))
        out.parts.append(
            {
                "type": "video",
                "frames": [
                    {"time": float(t), "tokens": self._tokens(f.shape[0], f.shape[1])}
                    for t, f in zip(times, sized, strict=True)
                ],
            }
        )
        out.frames.extend(sized)

    def _part(self, part: Any, where: str, out: _Built) -> None:
        if not isinstance(part, Mapping):
            raise ChatRequestError(f"{where}: a content part must be an object with a 'type'")
        kind = part.get("type")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise ChatRequestError(f"{where}: a text part needs a string 'text'")
            out.parts.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            spec = part.get("image_url")
            url = spec.get("url") if isinstance(spec, Mapping) else spec
            img = decode_data_url(url, where)
            h, w = self._image_size(*img.shape[:2])
            img = _resize(img, h, w)
            out.parts.append({"type": "image", "tokens": self._tokens(h, w)})
            out.frames.append(img)
        elif kind == "video_url":
            spec = part.get("video_url")
            if not isinstance(spec, Mapping):
                raise ChatRequestError(
                    f"{where}: video_url must be an object with 'url' (and start, end, fps)"
                )
            self._video_url(spec, where, out)
        elif kind == "video_frames":
            frames = part.get("frames")
            if not isinstance(frames, list) or not frames:
                raise ChatRequestError(
                    f"{where}: video_frames needs a non-empty list 'frames' of {{time, url}}"
                )
            try:
                times = [float(f["time"]) for f in frames]
            except (KeyError, TypeError, ValueError) as e:
                raise ChatRequestError(f"{where}: every frame needs a numeric 'time'") from e
            imgs = [decode_data_url(f.get("url"), f"{where}.frames[{i}]") for i, f in enumerate(frames)]
            self._add_frames(out, times, imgs)
        elif kind == "video" and "times" in part:
            frames = np.asarray(part["frames"])
            if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) != len(part["times"]):
                raise ChatRequestError(f"{where}: in-process video needs frames uint8 [N,H,W,3] and N times")
            self._add_frames(out, part["times"], list(frames))
        else:
            raise ChatRequestError(
                f"{where}: unsupported content part type {kind!r} (text, image_url, video_url, video_frames)"
            )

    # ------------------------------------------------------------------------------------------ prompt
    @staticmethod
    def _tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
        """An assistant message's OpenAI tool_calls, checked for the fields the template renders."""
        if not isinstance(calls, list):
            raise ChatRequestError(f"{where}: must be a list of tool calls")
        out = []
        for k, c in enumerate(calls):
            fn = c.get("function", c) if isinstance(c, Mapping) else None
            if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
                raise ChatRequestError(f"{where}[{k}]: need {{'function': {{'name', 'arguments'}}}}")
            out.append({"function": {"name": fn["name"], "arguments": fn.get("arguments", {})}})
        return out

    def build_prompt(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        continue_final: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
    ) -> Any:
        """The Prompt (token ids with the model's placeholder id, patches, grids) for `messages` followed by the
        assistant generation prompt. `continue_final` appends text after it (an answer to score, no generation);
        `tools` (OpenAI function specs) are offered in the system message, assistant `tool_calls` and "tool"
        messages render as keye.data.tokenizer lays them out."""
        import dataclasses

        import torch

        prompt, _ = self.encode(messages, tools=tools, add_generation_prompt=add_generation_prompt)
        if continue_final:
            extra = torch.tensor(self.tok.encode(continue_final), dtype=torch.int64)
            prompt = dataclasses.replace(prompt, input_ids=torch.cat([prompt.input_ids, extra]))
        return prompt

    def encode(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
    ) -> tuple[Any, Any]:
        """(Prompt, loss mask [L] bool): `build_prompt` plus which ids are assistant tokens (training on a
        conversation, e.g. tool-use demonstrations)."""
        import torch

        from keye.data.captioners.keye_checkpoint import frames_to_patches
        from keye.data.tokenizer import encode_chat
        from keye.model.generate import Prompt

        if not isinstance(messages, Sequence) or not messages:
            raise ChatRequestError("messages: need a non-empty list of messages")
        rendered, built = [], _Built()
        for i, msg in enumerate(messages):
            where = f"messages[{i}]"
            if not isinstance(msg, Mapping):
                raise ChatRequestError(f"{where}: a message must be an object with role and content")
            role = msg.get("role")
            if role not in ("system", "user", "assistant", "tool"):
                raise ChatRequestError(f"{where}.role: must be system, user, assistant or tool, got {role!r}")
            content = msg.get("content")
            if content is None:
                content = ""
            extra = {}
            if role == "assistant" and msg.get("tool_calls"):
                extra["tool_calls"] = self._tool_calls(msg["tool_calls"], f"{where}.tool_calls")
            if isinstance(content, str):
                rendered.append({"role": role, "content": content, **extra})
                continue
            if not isinstance(content, list):
                raise ChatRequestError(f"{where}.content: must be a string or a list of parts")
            mine = _Built()
            for j, part in enumerate(content):
                self._part(part, f"{where}.content[{j}]", mine)
            rendered.append({"role": role, "content": mine.parts, **extra})
            built.frames.extend(mine.frames)
        if tools is not None and (not isinstance(tools, Sequence) or not all(tool_name(t) for t in tools)):
            raise ChatRequestError('tools: need a list of {"type": "function", "function": {"name", ...}}')
        enc = encode_chat(
            self.tok, rendered, add_generation_prompt=add_generation_prompt, tools=tools or None
        )
        ids = torch.from_numpy(enc.ids.copy())
        for start, length in enc.visual_runs:  # the model fills its own placeholder id with visual tokens
            ids[start : start + length] = self.model.config.image_token_id
        mask = torch.from_numpy(enc.loss_mask.copy())
        if not built.frames:
            return Prompt(input_ids=ids), mask
        patch = self.model.config.vision.patch_size
        all_patches, all_grids = [], []
        for f in built.frames:  # frames may differ in size (images vs video), so patchify one at a time
            p, g = frames_to_patches(f[None], patch)
            all_patches.append(p)
            all_grids.append(g)
        prompt = Prompt(
            input_ids=ids,
            pixel_patches=torch.cat(all_patches).to(self.model.dtype),
            patch_grids=torch.cat(all_grids),
        )
        return prompt, mask
