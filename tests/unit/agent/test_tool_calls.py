"""The tool-call format: the chat template renders tool calls and tool responses (and every prompt without them
exactly as before), and the parser turns each kind of broken call into an error for the model, never an exception."""

from __future__ import annotations

import hashlib
import json

import pytest

from keye.agent.tool_calls import ToolCall, ToolCallError, error_text, parse_tool_calls, validate_arguments
from keye.data.tokenizer import encode_chat, render_chat, train_bpe

CORPUS = [
    "Describe the video: a red bar moves left. The event happens in 1.0 - 2.0 seconds. "
    "<think>count</think> <answer>B</answer>"
] * 8
CONVS = [
    [{"role": "user", "content": "What colour is the bar?"}],
    [
        {"role": "system", "content": "You are a video assistant."},
        {
            "role": "user",
            "content": [
                {"type": "video", "frames": [{"time": 0.0, "tokens": 4}, {"time": 0.5, "tokens": 4}]},
                {"type": "text", "text": "When does it move?"},
            ],
        },
        {"role": "assistant", "content": "<think>look</think> <answer>1.0 - 2.0 seconds</answer>"},
    ],
    [
        {"role": "user", "content": [{"type": "image", "tokens": 6}, {"type": "text", "text": "Describe"}]},
        {"role": "assistant", "content": "a red bar", "no_loss": True},
        {"role": "user", "content": "and then?"},
        {"role": "assistant", "content": "it moves left"},
    ],
]
# sha256 of render_chat + encode_chat (ids, loss mask, visual runs) of CONVS on main at f6e06e1, before tool use was
# added to the template: the default pipeline's prompts (and so its numbers) must not move by a byte.
GOLDEN = "1940a2cd8ee8d9d3ec5c09d2c915f45da6dd67867a132afd062fa53480dc33a2"

FRAMES = {
    "type": "function",
    "function": {
        "name": "frames",
        "description": "look again at a time range of the video",
        "parameters": {
            "type": "object",
            "properties": {
                "start": {"type": "number", "minimum": 0},
                "end": {"type": "number", "minimum": 0},
                "fps": {"type": "number", "minimum": 0.1, "maximum": 8},
            },
            "required": ["start", "end"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [FRAMES]


@pytest.fixture(scope="module")
def tok():
    return train_bpe(
        CORPUS + ['<tool_call> {"name": "frames", "arguments": {"start": 1.5}} </tool_call>'], 300, 1
    )


def test_prompts_without_tools_render_byte_identically_to_before():
    tok = train_bpe(CORPUS, 300, 1)
    h = hashlib.sha256()
    for conv in CONVS:
        for gen in (False, True):
            h.update(render_chat(conv, add_generation_prompt=gen).encode())
            enc = encode_chat(tok, conv, add_generation_prompt=gen)
            h.update(enc.ids.tobytes())
            h.update(enc.loss_mask.tobytes())
            h.update(json.dumps(enc.visual_runs).encode())
    assert h.hexdigest() == GOLDEN


def test_tool_calls_and_responses_render_in_the_qwen_hermes_form(tok):
    conv = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "When does the bar move?"},
        {
            "role": "assistant",
            "content": "Let me look.",
            "tool_calls": [
                {
                    "type": "function",
                    "function": {"name": "frames", "arguments": '{"start": 1.0, "end": 2.0}'},
                }
            ],
        },
        {
            "role": "tool",
            "content": [
                {"type": "video", "frames": [{"time": 1.0, "tokens": 4}, {"time": 1.5, "tokens": 4}]},
                {"type": "text", "text": "2 frames"},
            ],
        },
        {"role": "tool", "content": "second result"},
        {"role": "assistant", "content": "<answer>1.0 - 2.0 seconds</answer>"},
    ]
    text = render_chat(conv, tools=TOOLS)
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    # each tool on one line as name, description, its arguments' schemas and required (no OpenAI wrapper)
    assert (
        '\n<tools>\n{"name": "frames", "description": "look again at a time range of the video", "arguments": '
        '{"start": {"type": "number", "minimum": 0}, "end": {"type": "number", "minimum": 0}, "fps": {"type": '
        '"number", "minimum": 0.1, "maximum": 8}}, "required": ["start", "end"]}\n</tools>\n'
    ) in text
    assert "additionalProperties" not in text and '"type": "function"' not in text
    assert (
        '<|im_start|>assistant\nLet me look.\n<tool_call>\n{"name": "frames", "arguments": {"start": 1.0, '
        '"end": 2.0}}\n</tool_call><|im_end|>\n'
    ) in text
    # both tool responses share one user turn, the frames inside the first
    assert "<|im_start|>user\n<tool_response>\n<|frame_start|><|time_start|>1.0 seconds" in text
    assert "2 frames\n</tool_response>\n<tool_response>\nsecond result\n</tool_response><|im_end|>\n" in text
    enc = encode_chat(tok, conv, tools=TOOLS)
    assert enc.ids.tolist() == tok.encode(text)  # encode_chat stays equal to encode(render_chat(...))
    assert len(enc.visual_runs) == 2
    # loss on the assistant turns (tool-call text included), never on tool responses or the tool block
    lossy = tok.decode(enc.ids[enc.loss_mask].tolist(), skip_special_tokens=False)
    assert (
        "<tool_call>" in lossy and "Let me look." in lossy and "<answer>1.0 - 2.0 seconds</answer>" in lossy
    )
    assert "tool_response" not in lossy and "second result" not in lossy and "# Tools" not in lossy
    # without a system message the tool block becomes one
    assert render_chat(conv[1:2], tools=TOOLS).startswith("<|im_start|>system\n# Tools\n")


def test_a_good_call_parses_with_its_text_and_arguments():
    text = 'I should look again.\n<tool_call>\n{"name": "frames", "arguments": {"start": 1, "end": 2.5}}\n</tool_call>'
    turn = parse_tool_calls(text, TOOLS)
    assert turn.content == "I should look again."
    assert turn.calls == [ToolCall("frames", {"start": 1, "end": 2.5}, id="call_0")]
    # arguments given as a JSON string (the OpenAI wire form) are accepted too
    turn = parse_tool_calls(
        '<tool_call>{"name": "frames", "arguments": "{\\"start\\": 0, \\"end\\": 1}"}</tool_call>', TOOLS
    )
    assert turn.calls[0] == ToolCall("frames", {"start": 0, "end": 1}, id="call_0")
    assert parse_tool_calls("<answer>B</answer>", TOOLS).calls == []


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ('<tool_call>{"name": "frames", "arguments": {"start": 1,}}</tool_call>', "not valid JSON"),
        ("<tool_call>not json at all</tool_call>", "not valid JSON"),
        ('<tool_call>["frames"]</tool_call>', "must be a JSON object"),
        (
            '<tool_call>{"name": "zoom", "arguments": {}}</tool_call>',
            "unknown tool 'zoom'; available: ['frames']",
        ),
        (
            '<tool_call>{"name": "frames", "arguments": {"start": 1}}</tool_call>',
            "missing required argument 'end'",
        ),
        (
            '<tool_call>{"name": "frames", "arguments": {"start": "one", "end": 2}}</tool_call>',
            "must be of type number",
        ),
        (
            '<tool_call>{"name": "frames", "arguments": {"start": 0, "end": 2, "zoom": 4}}</tool_call>',
            "unexpected argument(s) ['zoom']",
        ),
        (
            '<tool_call>{"name": "frames", "arguments": {"start": 0, "end": 2, "fps": 99}}</tool_call>',
            "must be <= 8",
        ),
        ('<tool_call>{"name": "frames", "arguments": [1, 2]}</tool_call>', "must be a JSON object"),
        (
            '<tool_call>{"name": "frames", "arguments": {"start": true, "end": 2}}</tool_call>',
            "must be of type number",
        ),
        (
            '<tool_call>{"name": "frames", "arguments": {"start": 0, "end": 1}}',
            "not closed with </tool_call>",
        ),
    ],
)
def test_every_broken_call_becomes_an_error_for_the_model(text, expect):
    turn = parse_tool_calls("thinking... " + text, TOOLS)
    (call,) = turn.calls
    assert isinstance(call, ToolCallError), call
    assert expect in call.message
    msg = error_text(call)
    assert msg.startswith("Error: ") and expect in msg


def test_several_calls_keep_their_order_and_ids():
    ok = '<tool_call>{"name": "frames", "arguments": {"start": 0, "end": 1}}</tool_call>'
    bad = "<tool_call>{oops</tool_call>"
    turn = parse_tool_calls(ok + bad + ok, TOOLS, id_prefix="t3")
    assert [type(c).__name__ for c in turn.calls] == ["ToolCall", "ToolCallError", "ToolCall"]
    assert [c.id for c in turn.calls] == ["t3_0", "t3_1", "t3_2"]


def test_schema_checker_accepts_what_fits():
    schema = FRAMES["function"]["parameters"]
    assert validate_arguments(schema, {"start": 0, "end": 3.5, "fps": 2}) == []
    assert validate_arguments({"type": "integer"}, 3.0) == []
    assert validate_arguments({"type": "integer"}, 3.5) != []
    assert validate_arguments({"type": "array", "items": {"type": "string"}}, ["a", 1]) == [
        "arguments[1] must be of type string, got int 1"
    ]
