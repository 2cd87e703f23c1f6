"""`keye serve` as a MOPD teacher: vLLM's `prompt_logprobs` on /v1/completions (token-id prompt) and on chat with
`continue_final_message` / `echo`, asked through the official `openai` client (extra_body), equal to the
in-process scores of the same checkpoint; keye.rl.teachers.EndpointTeacher against it equals CheckpointTeacher."""

from __future__ import annotations

import httpx
import pytest
import torch

pytest.importorskip("openai")

from test_serve import _video, make_checkpoint  # noqa: E402,F401  (same directory)
from test_serve import server as _server_fixture  # noqa: E402

from keye.model.generate import Prompt  # noqa: E402
from keye.rl.policy import answer_logprobs  # noqa: E402
from keye.rl.rollouts import RolloutPrompt  # noqa: E402
from keye.rl.teachers import CheckpointTeacher, EndpointTeacher  # noqa: E402
from keye.serve.chat import ChatModel  # noqa: E402

server = _server_fixture


@pytest.fixture(autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def local(server):
    _, _, d, name = server
    return ChatModel.from_checkpoint(d / name, media_root=d)


def test_completions_prompt_logprobs_match_the_model(server, local):
    client, _, _, name = server
    ids = local.build_prompt([{"role": "user", "content": "when does the red bar move?"}]).input_ids.tolist()
    ids += local.tok.encode("in 1.0 - 2.0 seconds")
    resp = client.completions.create(model=name, prompt=ids, max_tokens=1, extra_body={"prompt_logprobs": 2})
    choice = resp.choices[0]
    got = choice.model_extra["prompt_logprobs"]
    assert len(got) == len(ids) and got[0] is None
    assert choice.model_extra["prompt_token_ids"] == ids
    with torch.no_grad():
        want = answer_logprobs(local.model, [Prompt(input_ids=ids[:1])], [ids[1:]], with_entropy=False)
    for j, tid in enumerate(ids[1:]):
        entry = got[j + 1]
        assert entry[str(tid)]["logprob"] == pytest.approx(float(want.logprobs[0, j]), abs=1e-4)
        ranks = sorted(v["rank"] for v in entry.values())
        assert ranks[:2] == [1, 2] and entry[str(tid)]["rank"] >= 1  # the top 2 plus the prompt's own token
        assert all(v["logprob"] <= 0 for v in entry.values())
    # max_tokens 0: scoring only; a text prompt is tokenized without the chat template
    only = httpx.post(
        f"{server[1]}/v1/completions",
        json={"model": name, "prompt": "in 1.0 - 2.0 seconds", "max_tokens": 0, "prompt_logprobs": 0},
    ).json()
    assert only["choices"][0]["token_ids"] == [] and len(only["choices"][0]["prompt_logprobs"]) == len(
        local.tok.encode("in 1.0 - 2.0 seconds")
    )


def test_chat_continue_final_message_scores_the_answer_under_the_frames(server, local):
    client, _, d, name = server
    video = {"type": "video_url", "video_url": {"url": str(d / "clip.mp4"), "end": 2.0}}
    messages = [{"role": "user", "content": [video, {"type": "text", "text": "when does it move?"}]}]
    answer = "in 1.0 - 2.0 seconds"
    resp = client.chat.completions.create(
        model=name,
        messages=[*messages, {"role": "assistant", "content": answer}],
        max_tokens=1,
        extra_body={
            "prompt_logprobs": 0,
            "continue_final_message": True,
            "add_generation_prompt": False,
            "echo": True,
        },
    )
    ids = resp.model_extra["prompt_token_ids"]
    got = resp.model_extra["prompt_logprobs"]
    ans = local.tok.encode(answer)
    assert ids[-len(ans) :] == ans and resp.choices[0].message.content.startswith(answer)  # echo
    base = local.build_prompt(messages)
    assert ids[: len(base.input_ids)] == base.input_ids.tolist()
    image_id = local.model.config.image_token_id
    assert all(e is None for t, e in zip(ids, got, strict=True) if t == image_id)  # frames are not predicted
    with torch.no_grad():
        want = answer_logprobs(local.model, [base], [ans], with_entropy=False).logprobs[0]
    tail = [got[len(ids) - len(ans) + j][str(t)]["logprob"] for j, t in enumerate(ans)]
    assert tail == pytest.approx(want.tolist(), abs=1e-4)
    bad = httpx.post(
        f"{server[1]}/v1/chat/completions",
        json={"model": name, "messages": messages, "add_generation_prompt": False},
    )
    assert bad.status_code == 400 and "continue_final_message" in bad.json()["error"]["message"]


@pytest.mark.parametrize("view", ["text", "video"])
def test_endpoint_teacher_equals_the_checkpoint_teacher(server, local, view):
    _, base, d, name = server
    endpoint = EndpointTeacher(base + "/v1", name, local, view=view, api_key_env=None)
    in_process = CheckpointTeacher(ChatModel.from_checkpoint(d / name, media_root=d), view=view)
    video = {"type": "video_url", "video_url": {"url": str(d / "clip.mp4"), "end": 2.0}}
    prompts = [
        RolloutPrompt(
            [{"role": "user", "content": [video, {"type": "text", "text": f"when does it move? {i}"}]}],
            {"domain": "grounding", "transcript": "a red bar\n[0.0 - 1.0 s] colours change"},
            id=f"q{i}",
        )
        for i in range(2)
    ]
    eos = local.tok.eos_id
    answers = [local.tok.encode("in 1.0 - 2.0 seconds") + [eos], local.tok.encode("a red bar")]
    got = endpoint.score(prompts, answers)
    want = in_process.score(prompts, answers)
    scored = got.mask.bool()
    if view == "text":  # token ids sent as they are: every token scored, the eos too
        assert scored.sum() == sum(len(a) for a in answers)
    else:  # chat re-renders the answer as text: the final eos is not part of it and stays unscored
        assert scored.sum() == sum(len(a) for a in answers) - 1 and not scored[0, len(answers[0]) - 1]
    assert torch.allclose(got.logprobs[scored], want.logprobs[scored], atol=1e-4)
    with pytest.raises(ValueError, match="checkpoint teacher"):
        endpoint.score(prompts, answers, full=True)
