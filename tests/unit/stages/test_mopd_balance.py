"""mopd.balance_domains: every domain's prompts as often as the largest domain's, repeats with their own ids, the
originals kept first and nothing else changed."""

from collections import Counter

from keye.rl.rollouts import RolloutPrompt
from keye.stages.mopd import balanced


def _p(domain: str, i: int) -> RolloutPrompt:
    return RolloutPrompt([{"role": "user", "content": f"{domain} {i}"}], {"domain": domain}, f"{domain}-{i}")


def test_every_domain_as_often_as_the_largest():
    prompts = [_p("mcq", i) for i in range(7)] + [_p("caption", i) for i in range(3)] + [_p("grounding", 0)]
    out = balanced(prompts)
    assert Counter(p.reference["domain"] for p in out) == {"mcq": 7, "caption": 7, "grounding": 7}
    assert len({p.id for p in out}) == len(out)  # repeats are told apart
    captions = [p for p in out if p.reference["domain"] == "caption"]
    assert [p.id for p in captions[:3]] == ["caption-0", "caption-1", "caption-2"]
    assert [p.messages for p in captions] == [_p("caption", i % 3).messages for i in range(7)]
    assert [p.id for p in out if p.reference["domain"] == "mcq"] == [f"mcq-{i}" for i in range(7)]


def test_one_domain_is_left_as_it_is():
    prompts = [_p("mcq", i) for i in range(4)]
    assert [p.id for p in balanced(prompts)] == [p.id for p in prompts]
    assert balanced([]) == []
