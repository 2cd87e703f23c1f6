"""The project's tokenizer and its ONE chat template, shared by training, generation and evaluation.

Why one place: if training renders a conversation one way and generation another, the model sees prompts it was
never trained on. `render_chat` is the only template; `encode_chat` produces exactly `encode(render_chat(...))`
(tested) but builds visual placeholder runs without tokenising them, and marks which tokens carry loss.

Follows the Qwen2-VL / Qwen3 conventions (ChatML `<|im_start|>role ... <|im_end|>`, `<|vision_start|>` +
`<|image_pad|>` runs, `<think>` tags) so a local Qwen3 tokenizer.json loads as-is, plus Keye-VL's text timestamp
before every frame. The default is a byte-level BPE trained with Hugging Face `tokenizers` on the run's corpus.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from keye.core.atomic import atomic_write_text

# Special tokens by role. Names follow Qwen2-VL/Qwen3 where one exists, so a Qwen tokenizer maps onto them.
SPECIAL_TOKENS: dict[str, str] = {
    "pad": "<|endoftext|>",
    "im_start": "<|im_start|>",
    "im_end": "<|im_end|>",
    "vision_start": "<|vision_start|>",
    "vision_end": "<|vision_end|>",
    "image_pad": "<|image_pad|>",
    "video_pad": "<|video_pad|>",
    "frame_start": "<|frame_start|>",  # one sampled frame: timestamp text + vision span
    "frame_end": "<|frame_end|>",
    "time_start": "<|time_start|>",  # a text timestamp of a frame, e.g. <|time_start|>12.5 seconds<|time_end|>
    "time_end": "<|time_end|>",
    "span_start": "<|span_start|>",  # a clip-time span in dense captions: <|span_start|>1.0 - 2.5 seconds<|span_end|>
    "span_end": "<|span_end|>",
    "think_start": "<think>",
    "think_end": "</think>",
    "answer_start": "<answer>",
    "answer_end": "</answer>",
}
ROLES: tuple[str, ...] = ("system", "user", "assistant")
# Tool use (Qwen2.5 / Hermes): plain-text tags, not special tokens, so the vocabulary (and every existing prompt's
# ids) stays as it is. An assistant message may carry "tool_calls"; a "tool" message is rendered inside a user turn.
TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"
TOOL_RESPONSE_START, TOOL_RESPONSE_END = "<tool_response>", "</tool_response>"
META_FILE = "keye_tokenizer.json"
TOKENIZER_FILE = "tokenizer.json"
# Qwen2-style pre-tokenisation regex (contractions, letters, single digits, punctuation runs, newlines, spaces).
_SPLIT_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def format_time(t: float) -> str:
    """Seconds as the model reads and writes them: one decimal, e.g. '12.5'."""
    return f"{t:.1f}"


@dataclass
class KeyeTokenizer:
    """A `tokenizers.Tokenizer` plus the ids of the special tokens the template and the model use."""

    tok: Tokenizer
    source: str = "bpe"  # "bpe" (trained here) or the path of the HF directory it was loaded from
    special_ids: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        missing = [t for t in SPECIAL_TOKENS.values() if self.tok.token_to_id(t) is None]
        if missing:
            self.tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
        self.special_ids = {k: int(self.tok.token_to_id(v)) for k, v in SPECIAL_TOKENS.items()}

    @property
    def vocab_size(self) -> int:
        """Rows the model's embedding needs: above every id, also when added tokens leave gaps."""
        n = int(self.tok.get_vocab_size(with_added_tokens=True))
        return max(n, max(self.special_ids.values(), default=-1) + 1)

    def id(self, name: str) -> int:
        """Id of a special token by role name (see SPECIAL_TOKENS)."""
        return self.special_ids[name]

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def image_id(self) -> int:
        """The placeholder id the model replaces by projected visual tokens (images and video frames)."""
        return self.special_ids["image_pad"]

    @property
    def pad_id(self) -> int:
        return self.special_ids["pad"]

    @property
    def eos_id(self) -> int:
        return self.special_ids["im_end"]

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token strings in it become their ids."""
        return list(self.tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(e.ids) for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def to_json(self) -> str:
        return self.tok.to_str()

    def content_hash(self) -> str:
        """sha256 of the serialised tokenizer and its special-token map: the artifact id in lineage."""
        h = hashlib.sha256()
        h.update(self.to_json().encode())
        h.update(json.dumps(self.special_ids, sort_keys=True).encode())
        return h.hexdigest()

    def save(self, directory: str | Path) -> Path:
        """Write tokenizer.json + keye_tokenizer.json (atomically) into `directory`; returns it."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_text(d / TOKENIZER_FILE, self.to_json())
        meta = {
            "schema": "keye.tokenizer/v1",
            "source": self.source,
            "special_tokens": SPECIAL_TOKENS,
            "special_ids": self.special_ids,
            "vocab_size": self.vocab_size,
            "sha256": self.content_hash(),
        }
        atomic_write_text(d / META_FILE, json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return d


def train_bpe(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2) -> KeyeTokenizer:
    """Train a byte-level BPE on `texts` (the run's corpus); digits are single tokens, so times tokenise
    uniformly. The same texts in any order give the same bytes (issue 24): the trainer counts words into hash
    maps whose iteration order (which decides ties between equally frequent pairs) follows insertion order and,
    with Rayon on, the order its threads finish; so the texts go in sorted and the count runs on one thread."""
    if vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"vocab_size must exceed the 256 byte symbols plus specials, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    with _single_threaded():
        tok.train_from_iterator(sorted(texts), trainer=trainer)
    return KeyeTokenizer(tok, source="bpe")


@contextmanager
def _single_threaded() -> Iterator[None]:
    """TOKENIZERS_PARALLELISM=false for the duration (the library reads it at each parallel call)."""
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def load_tokenizer(directory: str | Path) -> KeyeTokenizer:
    """Load a tokenizer saved by `KeyeTokenizer.save`, or any local Hugging Face directory with a tokenizer.json
    (e.g. Qwen3's); missing special tokens are added after the existing vocabulary."""
    d = Path(directory)
    path = d / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{d}: no {TOKENIZER_FILE} (give a directory saved by keye or a HF tokenizer dir)"
        )
    tok = Tokenizer.from_file(str(path))
    meta_path = d / META_FILE
    source = json.loads(meta_path.read_text())["source"] if meta_path.is_file() else str(d)
    kt = KeyeTokenizer(tok, source=source)
    if meta_path.is_file():
        want = json.loads(meta_path.read_text()).get("sha256")
        if want and want != kt.content_hash():
            raise ValueError(f"{d}: tokenizer content hash {kt.content_hash()[:12]} != recorded {want[:12]}")
    return kt


# ----------------------------------------------------------------------------------------------- chat template
# A message: {"role": "system"|"user"|"assistant", "content": str | list[part]}, where a part is
#   {"type": "text", "text": str}
#   {"type": "image", "tokens": int}
#   {"type": "video", "frames": [{"time": float, "tokens": int}, ...]}   (tokens per frame after the 2x2 merge)
# Rendering: <|im_start|>{role}\n{content}<|im_end|>\n per message; a frame is
#   <|frame_start|><|time_start|>{t:.1f} seconds<|time_end|><|vision_start|><|image_pad|>*n<|vision_end|><|frame_end|>
# (every frame is its own image grid for the ViT, so frames use the model's one placeholder id, image_pad;
# video_pad is kept for Qwen compatibility only).
# add_generation_prompt appends "<|im_start|>assistant\n". Loss falls on assistant content and its <|im_end|>.
# Tool use: an assistant message's "tool_calls" follow its text as <tool_call>\n{json}\n</tool_call> lines (loss on
# them: the model writes them); a run of "tool" messages is one user turn of <tool_response>\n...\n</tool_response>
# blocks joined by "\n" (no loss; their content may hold frames).


def _tool_call_text(call: dict[str, Any]) -> str:
    """One call as the model writes it (Qwen / Hermes): <tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>.
    Accepts the OpenAI wire form too ({"function": {"name", "arguments": JSON string}})."""
    fn = call.get("function", call)
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            pass  # kept as the string the model wrote: a malformed call is re-rendered as it was
    body = json.dumps({"name": fn.get("name"), "arguments": args}, ensure_ascii=False)
    return f"{TOOL_CALL_START}\n{body}\n{TOOL_CALL_END}"


def tools_system_text(tools: Sequence[dict[str, Any]]) -> str:
    """The tool block appended to the system message when tools are offered: Qwen2.5 / Hermes tags, one JSON line
    per tool, and each tool written compactly (name, description, argument schemas, required).

    Why compact: the OpenAI wrapper ({"type": "function", "function": ...}, the "object" type, additionalProperties)
    and Hermes' two sentences of instructions carry nothing a call needs, and a tokenizer trained on video text
    writes them nearly byte by byte: for the three agent tools the block was 1148 tokens, most of every agent
    prompt, and a tiny model copies from its tool turns far later behind it (bench/RESULTS.md `## agent_rl: the
    default pipeline's recipe`). What the parser checks (keye.agent.tool_calls) is all still there."""
    lines = "\n".join(json.dumps(_compact_tool(t), ensure_ascii=False) for t in tools)
    return (
        f"# Tools\n<tools>\n{lines}\n</tools>\nTo call one, write {TOOL_CALL_START}\n"
        f'{{"name": <name>, "arguments": <json object>}}\n{TOOL_CALL_END}'
    )


def _compact_tool(tool: dict[str, Any]) -> dict[str, Any]:
    """name, description, the properties' schemas and required, from an OpenAI function spec (or a bare one)."""
    fn = tool.get("function", tool) if isinstance(tool, dict) else {}
    params = fn.get("parameters") or {}
    out: dict[str, Any] = {"name": fn.get("name")}
    if fn.get("description"):
        out["description"] = fn["description"]
    props = params.get("properties") if isinstance(params, dict) else None
    out["arguments"] = props if isinstance(props, dict) else params
    if isinstance(params, dict) and params.get("required"):
        out["required"] = params["required"]
    return out


def _with_tools(messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The system message with the tool block after its text (a new system message when there is none)."""
    block = tools_system_text(tools)
    msgs = list(messages)
    if msgs and msgs[0].get("role") == "system":
        content = msgs[0].get("content", "")
        if isinstance(content, str):
            text = f"{content}\n\n{block}" if content else block
            msgs[0] = {**msgs[0], "content": text}
        else:
            msgs[0] = {**msgs[0], "content": [*content, {"type": "text", "text": f"\n\n{block}"}]}
        return msgs
    return [{"role": "system", "content": block}, *msgs]


def _segments(
    messages: Sequence[dict[str, Any]],
    add_generation_prompt: bool,
    tools: Sequence[dict[str, Any]] | None = None,
) -> list[tuple[str, Any, bool]]:
    """The conversation as (kind, value, loss) pieces: ("text", str, loss) or ("pad", (token_name, n), False)."""
    sp = SPECIAL_TOKENS
    out: list[tuple[str, Any, bool]] = []
    if tools:
        messages = _with_tools(messages, tools)
    for k, msg in enumerate(messages):
        role = msg.get("role")
        if role not in ROLES and role != "tool":
            raise ValueError(f"message role must be one of {(*ROLES, 'tool')}, got {role!r}")
        if role == "tool":  # tool responses: consecutive ones share one user turn (Qwen2.5 / Hermes)
            first = k == 0 or messages[k - 1].get("role") != "tool"
            last = k == len(messages) - 1 or messages[k + 1].get("role") != "tool"
            out.append(("text", f"{sp['im_start']}user\n" if first else "\n", False))
            out.append(("text", f"{TOOL_RESPONSE_START}\n", False))
        else:
            out.append(("text", f"{sp['im_start']}{role}\n", False))
        loss = role == "assistant" and not msg.get("no_loss", False)
        content = msg.get("content", "")
        if content is None:
            content = ""
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        for part in parts:
            kind = part.get("type")
            if kind == "text":
                out.append(("text", part["text"], loss))
            elif kind == "image":
                out.append(("text", sp["vision_start"], False))
                out.append(("pad", ("image_pad", int(part["tokens"])), False))
                out.append(("text", sp["vision_end"], False))
            elif kind == "video":
                for fr in part["frames"]:
                    stamp = f"{sp['frame_start']}{sp['time_start']}{format_time(fr['time'])} seconds{sp['time_end']}"
                    out.append(("text", stamp + sp["vision_start"], False))
                    out.append(("pad", ("image_pad", int(fr["tokens"])), False))
                    out.append(("text", sp["vision_end"] + sp["frame_end"], False))
            else:
                raise ValueError(f"unknown content part type {kind!r}")
        if role == "assistant" and msg.get("tool_calls"):
            calls = "\n".join(_tool_call_text(c) for c in msg["tool_calls"])
            has_text = any(p.get("type") == "text" and p["text"] for p in parts) or len(parts) > 1
            out.append(("text", ("\n" if has_text else "") + calls, loss))
        if role == "tool":
            out.append(("text", f"\n{TOOL_RESPONSE_END}", False))
            if not last:
                continue
        out.append(("text", sp["im_end"], loss))
        out.append(("text", "\n", False))
    if add_generation_prompt:
        out.append(("text", f"{sp['im_start']}assistant\n", False))
    return out


def render_chat(
    messages: Sequence[dict[str, Any]],
    add_generation_prompt: bool = False,
    tools: Sequence[dict[str, Any]] | None = None,
) -> str:
    """The conversation as one string, visual placeholders expanded (one pad token per visual token); `tools`
    (OpenAI function specs) adds the tool block to the system message."""
    pieces = []
    for kind, val, _ in _segments(messages, add_generation_prompt, tools):
        pieces.append(val if kind == "text" else SPECIAL_TOKENS[val[0]] * val[1])
    return "".join(pieces)


@dataclass
class ChatEncoding:
    """Token ids of a rendered conversation, which of them carry loss, and where the visual runs are."""

    ids: np.ndarray  # int64 [L]
    loss_mask: np.ndarray  # bool [L]
    visual_runs: list[tuple[int, int]]  # (start, length) of each image/frame placeholder run, in order

    @property
    def labels(self) -> np.ndarray:
        """Next-token targets aligned with `ids` (-100 where no loss): the model shifts them itself."""
        return np.where(self.loss_mask, self.ids, -100)


def encode_chat(
    tok: KeyeTokenizer,
    messages: Sequence[dict[str, Any]],
    add_generation_prompt: bool = False,
    tools: Sequence[dict[str, Any]] | None = None,
) -> ChatEncoding:
    """Equal to `tok.encode(render_chat(...))` (tested), but placeholder runs are written directly (a 200K-token
    video is not tokenised) and a loss mask marks assistant tokens. The text between two placeholder runs always
    borders special tokens, so encoding it alone gives the same ids as encoding the whole string; a token's loss
    flag is that of its first character."""
    segs = _segments(messages, add_generation_prompt, tools)
    # chunks: ("text", str, per-char loss) between placeholder runs, or ("pad", (name, n))
    chunks: list[tuple[str, Any, Any]] = []
    buf: list[str] = []
    flags: list[np.ndarray] = []
    for kind, val, loss in segs:
        if kind == "text":
            buf.append(val)
            flags.append(np.full(len(val), loss, dtype=bool))
            continue
        if buf:
            chunks.append(("text", "".join(buf), np.concatenate(flags)))
            buf, flags = [], []
        chunks.append(("pad", val, None))
    if buf:
        chunks.append(("text", "".join(buf), np.concatenate(flags)))
    texts = [c[1] for c in chunks if c[0] == "text"]
    encoded = iter(tok.tok.encode_batch(texts, add_special_tokens=False))
    ids: list[np.ndarray] = []
    mask: list[np.ndarray] = []
    runs: list[tuple[int, int]] = []
    pos = 0
    for kind, val, char_loss in chunks:
        if kind == "text":
            enc = next(encoded)
            arr = np.asarray(enc.ids, dtype=np.int64)
            starts = np.asarray([o[0] for o in enc.offsets], dtype=np.int64)
            m = char_loss[np.minimum(starts, max(len(char_loss) - 1, 0))] if arr.size else np.zeros(0, bool)
        else:
            arr = np.full(val[1], tok.id(val[0]), dtype=np.int64)
            m = np.zeros(val[1], dtype=bool)
            runs.append((pos, val[1]))
        ids.append(arr)
        mask.append(m)
        pos += arr.shape[0]
    return ChatEncoding(
        ids=np.concatenate(ids) if ids else np.zeros(0, np.int64),
        loss_mask=np.concatenate(mask) if mask else np.zeros(0, bool),
        visual_runs=runs,
    )
