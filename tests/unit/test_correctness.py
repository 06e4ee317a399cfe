"""Correctness bugs found by checking the RL math against TRL and the papers; each test failed before its fix.

- zero-variance groups must get A = 0 exactly (fp32 rounding of the group mean used to leak a same-sign
  advantage), also when a member is masked out;
- RLOO / REINFORCE sum the log-prob terms over tokens and average over sequences (Ahmadian et al. 2024);
- the KL estimators' gradients depend on where they are placed (checked by Monte Carlo); k1 in the loss
  regularises nothing and is refused;
- a huge log-ratio on a token whose clipped (constant) branch is taken gives a finite loss and gradient;
- the policy losses compute in fp32 whatever their input dtype.
"""

import math

import pytest
import torch

from posttrain.advantages import group_advantages, zero_variance_groups
from posttrain.losses.policy import aggregate, cispo_loss, gspo_loss, ppo_clip_loss

# ----------------------------------------------------------------------------- zero-variance groups


@pytest.mark.parametrize("value", [0.7, 0.1, 3.14159, -12.345678, 1234.567])
def test_equal_rewards_give_exactly_zero_advantage(value):
    rewards = torch.full((16,), value, dtype=torch.float32)  # two groups of 8, every reward equal
    for scale in (True, False):
        adv = group_advantages(rewards, 8, scale_by_std=scale)
        assert adv.dtype == torch.float32 and torch.equal(adv, torch.zeros(16))
    assert zero_variance_groups(rewards, 8).all()


def test_a_masked_member_does_not_make_a_group_look_non_constant():
    from posttrain.rollouts.experience import fill_invalid

    scores = torch.tensor([0.7, 0.7, 0.7, -5.0, 0.2, 0.9, 0.2, 0.2])
    valid = torch.tensor([True, True, True, False, True, True, True, True])
    assert zero_variance_groups(scores, 4, valid).tolist() == [True, False]
    filled = fill_invalid(scores, valid, 4)
    adv = group_advantages(filled, 4)
    assert torch.equal(adv[:4], torch.zeros(4)) and adv[4:].abs().sum() > 0


# ----------------------------------------------------------------------------- RLOO / REINFORCE aggregation


def test_rloo_and_reinforce_sum_over_tokens_and_average_over_sequences():
    from posttrain.algorithms.grpo import VARIANTS

    per_token = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert aggregate(per_token, mask, "seq_mean_token_sum") == pytest.approx((6.0 + 4.0) / 2)
    for name in ("rloo", "reinforce"):
        assert VARIANTS[name]["aggregation"] == "seq_mean_token_sum"


# ----------------------------------------------------------------------------- KL placement x estimator


def _mc_kl_gradients(n: int = 400_000, seed: int = 0) -> dict[str, torch.Tensor]:
    """Monte-Carlo gradients w.r.t. the policy logits of a 5-way categorical of each placement x estimator,
    with actions sampled from π_θ (as in RL: no gradient through the sampling)."""
    from posttrain.kl import get_kl_estimator

    g = torch.Generator().manual_seed(seed)
    theta = torch.tensor([0.3, -0.2, 1.1, 0.0, -0.7], dtype=torch.float64, requires_grad=True)
    ref = torch.log_softmax(torch.tensor([0.0, 0.5, 0.2, -0.4, 0.3], dtype=torch.float64), 0)
    logp_all = torch.log_softmax(theta, 0)
    x = torch.multinomial(logp_all.exp().detach(), n, replacement=True, generator=g)
    logp, ref_logp = logp_all[x], ref[x]
    out = {}
    for k in ("k1", "k2", "k3"):
        est = get_kl_estimator(k)(logp, ref_logp)
        (grad_loss,) = torch.autograd.grad(est.mean(), theta, retain_graph=True)
        # in the reward: r = −β·k, a REINFORCE term −k · log π (the estimate itself carries no gradient)
        (grad_reward,) = torch.autograd.grad((est.detach() * logp).mean(), theta, retain_graph=True)
        out[f"loss/{k}"], out[f"reward/{k}"] = grad_loss, grad_reward
    p = logp_all.exp()
    rev = torch.autograd.grad((p * (logp_all - ref)).sum(), theta, retain_graph=True)[0]  # ∇ KL(π‖ref)
    fwd = torch.autograd.grad((ref.exp() * (ref - logp_all)).sum(), theta)[0]  # ∇ KL(ref‖π)
    out["reverse"], out["forward"] = rev, fwd
    return out


def test_kl_gradient_of_each_placement_and_estimator_by_monte_carlo():
    g = _mc_kl_gradients()
    rev, fwd, tol = g["reverse"], g["forward"], 0.01
    assert g["loss/k1"].abs().max() < tol                     # k1 in the loss: no regularisation at all
    assert (g["loss/k2"] - rev).abs().max() < tol             # k2 in the loss: reverse KL
    assert (g["loss/k3"] - fwd).abs().max() < tol             # k3 in the loss (GRPO): forward KL
    assert (g["reward/k1"] - rev).abs().max() < tol           # k1 in the reward (PPO/RLOO): reverse KL
    assert (g["reward/k3"] - (rev - fwd)).abs().max() < tol   # k3 in the reward: reverse − forward
    assert rev.abs().max() > 0.05 and (rev - fwd).abs().max() > 0.05  # the checks can tell them apart


def test_k1_in_the_loss_is_refused():
    from posttrain.algorithms.grpo import GRPOConfig
    from posttrain.config import load_config
    from posttrain.errors import ConfigError

    with pytest.raises(ConfigError, match="k1 .*zero expected gradient"):
        load_config(GRPOConfig, None, ["kl.estimator=k1", "kl.placement=loss", "kl.beta=0.1"])
    load_config(GRPOConfig, None, ["kl.estimator=k1", "kl.placement=reward"])  # the PPO/RLOO choice
    load_config(GRPOConfig, None, ["kl.estimator=k1", "kl.placement=loss", "kl.beta=0"])  # tracked only


# ----------------------------------------------------------------------------- overflow


@pytest.mark.parametrize("loss_fn,kw", [(ppo_clip_loss, {}), (ppo_clip_loss, {"dual_clip": 3.0}),
                                         (gspo_loss, {})])
def test_huge_log_ratio_on_a_clipped_token_gives_finite_loss_and_gradient(loss_fn, kw):
    big = 299.0 if loss_fn is gspo_loss else 99.0  # log ρ = 100 (GSPO: the sequence mean): exp overflows fp32
    logp = torch.tensor([[-1.0, big, -2.0]], requires_grad=True)
    old = torch.tensor([[-1.1, -1.0, -2.0]])
    sign = -1.0 if "dual_clip" in kw else 1.0  # A > 0: the upper clip; A < 0 with a dual clip: the bound c·A
    adv = torch.full((1, 3), sign)
    mask = torch.ones(1, 3)
    loss, metrics = loss_fn(logp, old, adv, mask, clip_low=0.2, clip_high=0.2,
                            aggregation="token_mean", **kw)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    if loss_fn is ppo_clip_loss:
        assert logp.grad[0, 1] == 0.0  # the constant branch carries no gradient


def test_a_zero_advantage_token_with_a_huge_ratio_stays_finite():
    logp = torch.tensor([[95.0, -1.0]], requires_grad=True)
    loss, _ = ppo_clip_loss(logp, torch.tensor([[-1.0, -1.2]]), torch.tensor([[0.0, 1.0]]), torch.ones(1, 2),
                            clip_low=0.2, clip_high=0.2, aggregation="token_mean")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()


# ----------------------------------------------------------------------------- bf16 inputs


@pytest.mark.parametrize("loss_fn,clip", [(gspo_loss, (3e-4, 4e-4)), (ppo_clip_loss, (0.2, 0.28)),
                                          (cispo_loss, (1.0, 4.0))])
def test_policy_losses_compute_in_fp32_whatever_the_input_dtype(loss_fn, clip):
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(64, 24, generator=g) * 4 - 0.5
    logp = old + torch.randn(64, 24, generator=g) * 2e-3
    adv = torch.randn(64, 1, generator=g).expand(64, 24)
    mask = (torch.rand(64, 24, generator=g) > 0.1).float()
    kw = dict(clip_low=clip[0], clip_high=clip[1], aggregation="token_mean")
    lp16 = logp.to(torch.bfloat16).requires_grad_()
    loss16, m16 = loss_fn(lp16, old.to(torch.bfloat16), adv.to(torch.bfloat16), mask, **kw)
    lp32 = lp16.detach().float().requires_grad_()  # the same (bf16-rounded) numbers, given in fp32
    loss32, m32 = loss_fn(lp32, old.to(torch.bfloat16).float(), adv.to(torch.bfloat16).float(), mask, **kw)
    assert loss16.dtype == torch.float32
    assert loss16.item() == pytest.approx(loss32.item(), rel=1e-6, abs=1e-9)
    assert m16["clip_frac"].item() == pytest.approx(m32["clip_frac"].item(), abs=1e-7)
    loss16.backward()
    loss32.backward()
    assert torch.allclose(lp16.grad.float(), lp32.grad.to(torch.bfloat16).float(), rtol=1e-2, atol=1e-8)
    assert not math.isnan(loss16.item())
