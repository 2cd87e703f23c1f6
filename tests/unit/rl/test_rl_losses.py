"""GRPO-family losses and advantages against hand-computed small cases."""

import math

import pytest
import torch

from keye.rl.advantages import group_advantages, overlong_penalty, zero_variance_groups
from keye.rl.losses import agg_loss, completion_mask, kl_k3, policy_loss, truncated_importance_weights


def _lp(ratios):
    """(logprobs, old_logprobs) [1, n] whose per-token ratio is `ratios`."""
    old = torch.full((1, len(ratios)), -1.0)
    return old + torch.log(torch.tensor([ratios])), old


def test_ppo_clip_higher_edges_positive_and_negative_advantage():
    ratios = [0.5, 0.8, 1.0, 1.28, 1.5]
    lp, old = _lp(ratios)
    mask = torch.ones(1, 5)
    # A > 0: -min(r, clip(r, 0.8, 1.28)) per token -> [-0.5, -0.8, -1, -1.28, -1.28]
    out = policy_loss(lp, old, torch.tensor([1.0]), mask, loss_agg_mode="token-sum")
    assert out.loss.item() == pytest.approx(-(0.5 + 0.8 + 1.0 + 1.28 + 1.28), abs=1e-5)
    # A < 0: max(r, clip(r)) -> [0.8, 0.8, 1, 1.28, 1.5]
    out = policy_loss(lp, old, torch.tensor([-1.0]), mask, loss_agg_mode="token-sum")
    assert out.loss.item() == pytest.approx(0.8 + 0.8 + 1.0 + 1.28 + 1.5, abs=1e-5)
    # clip fraction (away from the edges, where float rounding decides): A > 0 clips r > 1.28, A < 0 clips r < 0.8
    lp6, old6 = _lp([0.5, 0.9, 1.0, 1.1, 1.5, 2.0])
    pos = policy_loss(lp6, old6, torch.tensor([1.0]), torch.ones(1, 6))
    neg = policy_loss(lp6, old6, torch.tensor([-1.0]), torch.ones(1, 6))
    assert pos.clip_fraction.item() == pytest.approx(2 / 6) and neg.clip_fraction.item() == pytest.approx(
        1 / 6
    )
    # symmetric PPO clip 0.2 / 0.2 instead: 1.28 is clipped to 1.2
    out = policy_loss(lp, old, torch.tensor([1.0]), mask, clip_ratio_high=0.2, loss_agg_mode="token-sum")
    assert out.loss.item() == pytest.approx(-(0.5 + 0.8 + 1.0 + 1.2 + 1.2), abs=1e-5)


def test_gradient_is_zero_exactly_where_the_clip_is_active():
    lp, old = _lp([0.5, 1.0, 1.5])
    lp = lp.clone().requires_grad_(True)
    policy_loss(lp, old, torch.tensor([1.0]), torch.ones(1, 3), loss_agg_mode="token-sum").loss.backward()
    # d(-r)/dlogp = -r where unclipped; 0 where the clipped branch is the max
    assert torch.allclose(lp.grad, torch.tensor([[-0.5, -1.0, 0.0]]), atol=1e-6)


def test_dual_clip_bounds_negative_advantage_loss():
    lp, old = _lp([4.0, 2.0])
    out = policy_loss(
        lp, old, torch.tensor([-1.0]), torch.ones(1, 2), clip_ratio_c=3.0, loss_agg_mode="token-sum"
    )
    assert out.loss.item() == pytest.approx(3.0 + 2.0, abs=1e-5)
    with pytest.raises(ValueError, match="clip_ratio_c"):
        policy_loss(lp, old, torch.tensor([-1.0]), torch.ones(1, 2), clip_ratio_c=1.0)


def test_loss_aggregation_modes_by_hand():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [9.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1, 1], [1, 0, 0], [0, 0, 0]])  # the third answer is empty
    assert agg_loss(loss, mask, "token-mean").item() == pytest.approx(10 / 4)
    assert agg_loss(loss, mask, "token-sum").item() == pytest.approx(10)
    assert agg_loss(loss, mask, "seq-mean-token-sum").item() == pytest.approx((6 + 4) / 2)
    assert agg_loss(loss, mask, "seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)
    assert agg_loss(loss, mask, "seq-mean-token-sum-norm").item() == pytest.approx(10 / (3 * 3))
    assert agg_loss(loss, mask, "seq-mean-token-sum-norm", max_response_length=5).item() == pytest.approx(
        10 / 15
    )
    with pytest.raises(ValueError, match="loss_agg_mode"):
        agg_loss(loss, mask, "mean")


def test_token_mean_weighs_long_answers_more_than_seq_mean():
    lp = torch.zeros(2, 4, requires_grad=True)
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 0, 0, 0]])
    adv = torch.tensor([1.0, 1.0])
    policy_loss(lp, lp.detach(), adv, mask, loss_agg_mode="token-mean").loss.backward()
    assert torch.allclose(lp.grad, -mask / 5)  # every token 1/5
    lp.grad = None
    policy_loss(lp, lp.detach(), adv, mask, loss_agg_mode="seq-mean-token-mean").loss.backward()
    assert torch.allclose(lp.grad, -torch.tensor([[1 / 8] * 4, [1 / 2, 0, 0, 0]]))  # each answer 1/2, split


def test_gspo_sequence_ratio_value_gradient_and_clip():
    old = torch.tensor([[-1.0, -2.0, -3.0]])
    lp = (old + torch.tensor([[0.1, 0.3, 5.0]])).requires_grad_(True)
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the third token is padding: it must not enter the mean
    s = math.exp(0.2)
    out = policy_loss(
        lp,
        old,
        torch.tensor([1.0]),
        mask,
        importance_sampling_level="sequence",
        clip_ratio_low=10.0,
        clip_ratio_high=10.0,
    )
    assert out.loss.item() == pytest.approx(-s, abs=1e-5)
    assert out.ratio_mean.item() == pytest.approx(s, abs=1e-5)  # every token carries the sequence ratio
    out.loss.backward()
    assert torch.allclose(lp.grad, torch.tensor([[-s / 2, -s / 2, 0.0]]), atol=1e-6)  # d(-exp(mean))/dlogp_t
    lp.grad = None
    out = policy_loss(
        lp,
        old,
        torch.tensor([1.0]),
        mask,
        importance_sampling_level="sequence",
        clip_ratio_low=3e-4,
        clip_ratio_high=4e-4,
    )
    assert out.loss.item() == pytest.approx(-(1 + 4e-4), abs=1e-6) and out.clip_fraction.item() == 1.0
    out.loss.backward()
    assert lp.grad.abs().max().item() == 0.0


def test_k3_kl_by_hand_and_in_the_loss():
    lp = torch.log(torch.tensor([[0.5, 0.5]]))
    ref = torch.log(torch.tensor([[0.25, 0.5]]))
    k3 = kl_k3(lp, ref)
    assert k3[0, 0].item() == pytest.approx(0.5 - math.log(0.5) - 1, abs=1e-6) and k3[0, 1].item() == 0.0
    out = policy_loss(lp, lp, torch.tensor([0.0]), torch.ones(1, 2), ref_logprobs=ref, kl_coef=0.1)
    assert out.loss.item() == pytest.approx(0.1 * k3.mean().item(), abs=1e-6)
    assert out.kl.item() == pytest.approx(k3.mean().item(), abs=1e-6)


def test_truncated_importance_weights():
    trainer = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    sampler = torch.log(torch.tensor([[0.2, 0.3, 0.4]]))  # rho = 3, 1, 0.25
    mask = torch.ones(1, 3)
    w = truncated_importance_weights(trainer, sampler, mask, threshold=2.0)
    assert torch.allclose(w, torch.tensor([[2.0, 1.0, 0.25]]))
    w = truncated_importance_weights(trainer, sampler, mask, mode="mask", threshold=2.0)
    assert torch.allclose(w, torch.tensor([[0.0, 1.0, 0.0]]))  # outside [1/2, 2] -> 0
    w = truncated_importance_weights(trainer, sampler, mask, level="sequence", threshold=2.0)
    assert torch.allclose(w, torch.full((1, 3), 0.75))  # 3 * 1 * 0.25
    out = policy_loss(
        trainer, trainer, torch.tensor([1.0]), mask, rollout_is_weights=w, loss_agg_mode="token-sum"
    )
    assert out.loss.item() == pytest.approx(-3 * 0.75, abs=1e-5)


def test_group_advantages_by_hand_and_edge_cases():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 2.0])
    g = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2])  # group 1 all equal, group 2 a single sample
    a = group_advantages(r, g, "group")
    std = math.sqrt(1 / 3)  # unbiased std of [1, 0, 0, 1]
    assert torch.allclose(a[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-6), atol=1e-5)
    assert a[4:].abs().max().item() == 0.0  # all-equal group and a singleton: no signal, no NaN
    assert torch.allclose(group_advantages(r, g, "none")[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    batch_std = r.std().item()
    assert torch.allclose(
        group_advantages(r, g, "batch")[:4],
        torch.tensor([0.5, -0.5, -0.5, 0.5]) / (batch_std + 1e-6),
        atol=1e-5,
    )
    assert zero_variance_groups(r, g).tolist() == [False] * 4 + [True] * 4
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(r, g, "std")
    assert group_advantages(torch.zeros(0), torch.zeros(0, dtype=torch.long)).numel() == 0


def test_overlong_penalty():
    lens = torch.tensor([3, 6, 8, 10])
    assert overlong_penalty(lens, 10, 4, 1.0).tolist() == [0.0, 0.0, -0.5, -1.0]
    assert overlong_penalty(lens, 10, 4, 0.5).tolist() == [0.0, 0.0, -0.25, -0.5]
    with pytest.raises(ValueError):
        overlong_penalty(lens, 10, 0)


def test_empty_and_truncated_answers_in_the_loss():
    mask = completion_mask([3, 0, 2], 3, truncated=[True, False, False], mask_truncated_completions=True)
    assert mask.tolist() == [[0, 0, 0], [0, 0, 0], [1, 1, 0]]
    lp = torch.zeros(3, 3, requires_grad=True)
    out = policy_loss(
        lp, lp.detach(), torch.tensor([1.0, -1.0, 2.0]), mask, loss_agg_mode="seq-mean-token-mean"
    )
    assert out.loss.item() == pytest.approx(-2.0)  # only the third answer counts
    out.loss.backward()
    assert lp.grad[:2].abs().max().item() == 0.0 and torch.isfinite(lp.grad).all()
    none = policy_loss(lp, lp.detach(), torch.ones(3), torch.zeros(3, 3))  # nothing to learn from at all
    assert none.loss.item() == 0.0 and math.isfinite(none.clip_fraction.item())
