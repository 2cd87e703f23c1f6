"""`keye serve` with OpenAI `tools`: the official `openai` client gets `tool_calls` (finish_reason "tool_calls")
from a tiny model taught one call, sends the call and the tool's answer back as assistant / tool messages, and is
answered 400 for what is not supported."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")

from keye.data.tokenizer import encode_chat, train_bpe  # noqa: E402
from keye.model import build_model, save_checkpoint  # noqa: E402

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "frames",
            "description": "look again",
            "parameters": {
                "type": "object",
                "properties": {"start": {"type": "number"}, "end": {"type": "number"}},
                "required": ["start"],
            },
        },
    }
]
QUESTION = "When does the bar move?"


def taught_checkpoint(d):
    """A tiny model trained (~100 steps, ~20 s) to answer QUESTION, with TOOLS offered, by one frames call."""
    torch.manual_seed(0)
    tok = train_bpe(
        [f'{QUESTION} <tool_call>\n{{"name": "frames", "arguments": {{"start": 1.0}}}}\n</tool_call> ok']
        * 10,
        320,
        1,
    )
    model = build_model("tiny", vocab_size=tok.vocab_size, image_token_id=tok.image_id, seed=0)
    conv = [
        {"role": "user", "content": QUESTION},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "frames", "arguments": {"start": 1}}}],
        },
    ]
    enc = encode_chat(tok, conv, tools=TOOLS)
    ids, labels = torch.from_numpy(enc.ids), torch.from_numpy(enc.labels)
    opt = torch.optim.AdamW(model.parameters(), lr=4e-3)
    for _ in range(200):  # ~100 steps (~20 s on one core) bring the loss under 0.01
        loss = model(input_ids=ids, labels=labels).loss
        if float(loss.detach()) < 0.005:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    ckpt = save_checkpoint(model.eval(), d / "tool-ckpt")
    tok.save(ckpt)
    return ckpt


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    ckpt = taught_checkpoint(tmp_path_factory.mktemp("serve-tools"))
    torch.set_num_threads(before)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "keye.cli", "serve", str(ckpt), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            if proc.poll() is not None:
                raise RuntimeError(f"keye serve exited: {proc.stdout.read().decode()}")
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            raise RuntimeError("keye serve did not come up in 30 s")
        yield openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0), ckpt.name
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_tools_in_tool_calls_out_with_the_official_client(server):
    client, name = server
    r = client.chat.completions.create(
        model=name,
        messages=[{"role": "user", "content": QUESTION}],
        tools=TOOLS,
        max_tokens=40,
        temperature=0.0,
    )
    (choice,) = r.choices
    assert choice.finish_reason == "tool_calls", choice.message.content
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "frames" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"start": 1}
    assert not choice.message.content
    # the same question without tools is plain text: the call came from the tools block in the prompt
    plain = client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": QUESTION}], max_tokens=40, temperature=0.0
    )
    assert plain.choices[0].finish_reason != "tool_calls" and plain.choices[0].message.tool_calls is None
    # tool_choice "none": the call stays text
    none = client.chat.completions.create(
        model=name,
        messages=[{"role": "user", "content": QUESTION}],
        tools=TOOLS,
        tool_choice="none",
        max_tokens=40,
        temperature=0.0,
    )
    assert none.choices[0].message.tool_calls is None and "<tool_call>" in none.choices[0].message.content


def test_the_call_and_the_tool_answer_go_back_as_messages(server):
    client, name = server
    first = client.chat.completions.create(
        model=name,
        messages=[{"role": "user", "content": QUESTION}],
        tools=TOOLS,
        max_tokens=40,
        temperature=0.0,
    )
    msg = first.choices[0].message
    history = [
        {"role": "user", "content": QUESTION},
        msg.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": "the bar moves at 1.5 seconds"},
    ]
    r = client.chat.completions.create(
        model=name, messages=history, tools=TOOLS, max_tokens=5, temperature=0.0, logprobs=True
    )
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # the prompt holds the call as the model wrote it and the tool answer inside a tool_response block
    prompt = httpx.post(
        str(client.base_url) + "chat/completions",
        json={"model": name, "messages": history, "tools": TOOLS, "max_tokens": 1},
    ).json()["prompt_token_ids"]
    assert len(prompt) > first.usage.prompt_tokens + 10


def test_unsupported_tool_requests_are_400(server):
    client, name = server
    with pytest.raises(openai.BadRequestError, match="tool_choice"):
        client.chat.completions.create(
            model=name,
            messages=[{"role": "user", "content": QUESTION}],
            tools=TOOLS,
            tool_choice="required",
            max_tokens=4,
        )
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(
            model=name,
            messages=[{"role": "user", "content": QUESTION}],
            tools=[{"type": "function"}],
            max_tokens=4,
        )
    with pytest.raises(openai.BadRequestError, match="tool_calls"):
        client.chat.completions.create(
            model=name,
            messages=[
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "", "tool_calls": "x"},
            ],
            max_tokens=4,
        )
