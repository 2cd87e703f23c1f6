"""hf captioner: a tiny random-weight LLaVA-architecture model built from a config and saved to tmp_path, with a
byte-level tokenizer, chat template and CLIP image processor built offline; loaded back through AutoProcessor +
AutoModelForImageTextToText exactly as a downloaded VLM directory would be.

Qwen2-VL: transformers 5 cannot build a Qwen2-VL processor without torchvision (its video processor needs it), and
torchvision is not installed here, so the Qwen2-VL test checks the clear error; with torchvision it captions."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest

pytest.importorskip("transformers")

from keye.data.captioners import CaptionerError, ClipRef, build_captioner  # noqa: E402

CHAT = (
    "{% for m in messages %}<s>{{ m['role'] }}: {% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% elif c['type'] == 'text' %}{{ c['text'] }}"
    "{% endif %}{% endfor %}{% endif %}</s>{% endfor %}{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


def byte_tokenizer(specials: list[str], **kw):
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}, merges=[]))
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kw)


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory) -> Path:
    import torch
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    out = tmp_path_factory.mktemp("tiny-llava")
    tok = byte_tokenizer(
        ["<pad>", "<s>", "</s>", "<image>"],
        eos_token="</s>",
        pad_token="<pad>",
        bos_token="<s>",
        extra_special_tokens={"image_token": "<image>"},
    )
    ip = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    proc = LlavaProcessor(
        image_processor=ip,
        tokenizer=tok,
        chat_template=CHAT,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
        ),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(cfg).save_pretrained(out)
    proc.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("v") / "ramp.mp4"
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as c:
        st = c.add_stream("libx264", rate=4)
        st.width, st.height, st.pix_fmt = 84, 56, "yuv420p"
        for i in range(16):
            frame = av.VideoFrame.from_ndarray(
                rng.integers(0, 255, (56, 84, 3), dtype=np.uint8), format="rgb24"
            )
            frame.pts = i
            for p in st.encode(frame):
                c.mux(p)
        for p in st.encode(None):
            c.mux(p)
    return path


def test_local_vlm_directory_captions_clips(llava_dir: Path, video: Path) -> None:
    cap = build_captioner(
        {"backend": "hf", "model_dir": str(llava_dir), "max_frames": 4, "fps": 2.0, "max_new_tokens": 6}
    )
    clips = [ClipRef(f"c{i}", str(video), 2.0 * i, 2.0 * i + 2.0, 4.0, 84, 56, "ramp") for i in range(2)]
    recs = cap.caption(clips)
    assert [r.clip_id for r in recs] == ["c0", "c1"]
    for r in recs:
        assert (r.backend, r.model, r.prompt_version) == ("hf", llava_dir.name, "v1")
        assert r.ok and r.caption and r.meta["parsed_as"] == "text" and 1 <= r.meta["new_tokens"] <= 6
        assert r.meta["frame_times"] == [0.0, 0.5, 1.0, 1.5]
    # the prompt really carried 4 images: each <image> expands to (28/14)^2 = 4 tokens in the model input
    from keye.data.captioners.base import render_prompt
    from keye.data.captioners.hf_local import build_chat

    text = cap._processor.apply_chat_template(
        build_chat([0.0, 0.5, 1.0, 1.5], render_prompt(cap.prompt, clips[0])),
        add_generation_prompt=True,
        tokenize=False,
    )
    assert text.count("<0.5 seconds><image>") == 1
    n_text = len(cap._processor.tokenizer(text)["input_ids"])
    assert recs[0].meta["prompt_tokens"] == n_text + 4 * 3
    again = cap.caption(clips[:1])[0]
    assert again.caption == recs[0].caption  # greedy decoding is deterministic


def test_unusable_directories_raise_clear_errors(tmp_path: Path, video: Path) -> None:
    clip = ClipRef("c", str(video), 0.0, 1.0, 4.0, 84, 56)
    with pytest.raises(CaptionerError, match="no config.json"):
        build_captioner({"backend": "hf", "model_dir": str(tmp_path)}).caption([clip])


def test_qwen2_vl_directory(tmp_path: Path, video: Path) -> None:
    import importlib.util

    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    specials = [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|image_pad|>",
        "<|video_pad|>",
    ]
    tok = byte_tokenizer(specials, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    ids = {s: tok.convert_tokens_to_ids(s) for s in specials}
    cfg = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            rope_scaling={"type": "mrope", "mrope_section": [4, 2, 2]},
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=1,
            embed_dim=32,
            hidden_size=32,
            num_heads=2,
            mlp_ratio=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(cfg).save_pretrained(tmp_path)
    tok.chat_template = CHAT.replace("<image>", "<|vision_start|><|image_pad|><|vision_end|>")
    tok.save_pretrained(tmp_path)
    clip = ClipRef("c", str(video), 0.0, 2.0, 4.0, 84, 56)
    cap = build_captioner({"backend": "hf", "model_dir": str(tmp_path), "max_frames": 2, "max_new_tokens": 4})
    if importlib.util.find_spec("torchvision") is None:
        with pytest.raises(CaptionerError, match="cannot build the processor"):
            cap.caption([clip])
    else:  # pragma: no cover - depends on the install
        from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor

        Qwen2VLProcessor(
            image_processor=Qwen2VLImageProcessor(), tokenizer=tok, chat_template=tok.chat_template
        ).save_pretrained(tmp_path)
        (rec,) = cap.caption([clip])
        assert rec.ok and rec.caption
