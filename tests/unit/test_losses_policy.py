"""Policy losses: aggregation (the RLHF book's worked example), PPO clip cases, GSPO, CISPO, KL, value."""

import functools
import math

import pytest
import torch

from posttrain.errors import ConfigError
from posttrain.losses.policy import (AGGREGATIONS, POLICY_LOSSES, aggregate, cispo_loss, explained_variance,
                                     get_policy_loss, gspo_loss, kl_penalty_in_loss, ppo_clip_loss,
                                     truncated_is_weight, value_loss)

F64 = torch.float64


# ----------------------------------------------------------------------------- aggregation


def test_aggregation_hand_values():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=F64)
    m = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert aggregate(x, m, "seq_mean_token_mean").item() == pytest.approx(3.25, abs=1e-12)  # (1.5 + 5)/2
    assert aggregate(x, m, "token_mean").item() == pytest.approx(3.6, abs=1e-12)  # 18/5
    assert aggregate(x, m, "seq_mean_token_sum_norm").item() == pytest.approx(3.0, abs=1e-12)  # 18/(2·3)
    assert aggregate(x, m, "seq_mean_token_sum_norm", max_len=4).item() == pytest.approx(2.25, abs=1e-12)  # 18/8
    assert aggregate(x, m, "seq_mean_token_sum").item() == pytest.approx(9.0, abs=1e-12)  # 18/2 (RLOO)
    assert set(AGGREGATIONS) == {"seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm", "seq_mean_token_sum"}
    with pytest.raises(ConfigError, match="token_mean"):
        aggregate(x, m, "mean")


def test_rlhf_book_worked_example():
    # Lambert, RLHF book ch. 6 "Loss Aggregation": ratio = 1 (with grad), advantages = 2, lengths 4 and 7, L_max 7.
    masks = torch.tensor([[1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
    advs = torch.full((2, 7), 2.0)

    def grad(fn):
        ratio = torch.ones(2, 7, requires_grad=True)
        fn(ratio).backward()
        return ratio.grad

    # per sequence: A / (B |a_i|) = 2/(2·4) = 0.25 on short-sequence tokens, 2/(2·7) = 0.1429 on long ones
    g = grad(lambda r: aggregate(r * advs, masks, "seq_mean_token_mean"))
    torch.testing.assert_close(g[0], torch.tensor([0.25] * 4 + [0.0] * 3), rtol=0, atol=1e-7)
    torch.testing.assert_close(g[1], torch.full((7,), 1 / 7), rtol=0, atol=1e-7)
    # fixed length: A / (B L_max) = 2/14 = 0.1429 on every valid token
    g = grad(lambda r: aggregate(r * advs, masks, "seq_mean_token_sum_norm", max_len=7))
    torch.testing.assert_close(g, masks * (1 / 7), rtol=0, atol=1e-7)
    # per token (the book's snippet aggregates the bare ratio): 1/11 = 0.0909 on every valid token
    g = grad(lambda r: aggregate(r, masks, "token_mean"))
    torch.testing.assert_close(g, masks * (1 / 11), rtol=0, atol=1e-7)
    # the book's forward values: per-sequence means [2, 2]; fixed-length sums/7 = [8/7, 2]
    assert aggregate(advs, masks, "seq_mean_token_mean").item() == pytest.approx(2.0, abs=1e-7)
    assert aggregate(advs, masks, "seq_mean_token_sum_norm").item() == pytest.approx((8 / 7 + 2) / 2, abs=1e-7)


# ----------------------------------------------------------------------------- PPO


RATIOS = [1.5, 0.5, 1.1, 0.5, 1.5]
ADVS = [1.0, -1.0, 2.0, 1.0, -1.0]


def _ppo_inputs():
    old = torch.tensor([[-1.0] * 5 + [float("nan")]], dtype=F64)
    logp = torch.tensor([[-1.0 + math.log(x) for x in RATIOS] + [float("inf")]], dtype=F64, requires_grad=True)
    adv = torch.tensor([ADVS + [float("nan")]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])  # the last token is padding full of junk: no nan may leak
    return logp, old, adv, mask


def test_ppo_clip_cases_by_hand():
    logp, old, adv, mask = _ppo_inputs()
    loss, m = ppo_clip_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.2, aggregation="token_mean")
    # token: ρ,   A  -> −min(ρA, clip(ρ)A)                       ∂/∂logp (before /5)
    # 0:   1.5, +1 -> −min(1.5, 1.2) = −1.2   clipped above       0
    # 1:   0.5, −1 -> −min(−0.5, −0.8) = 0.8  clipped below       0
    # 2:   1.1, +2 -> −2.2                    inside              −ρA = −2.2
    # 3:   0.5, +1 -> −min(0.5, 0.8) = −0.5   below but A > 0     −0.5
    # 4:   1.5, −1 -> −min(−1.5, −1.2) = 1.5  above but A < 0     +1.5
    # token mean: (−1.2 + 0.8 − 2.2 − 0.5 + 1.5)/5 = −0.32
    assert loss.item() == pytest.approx(-0.32, abs=1e-12)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.0, -0.44, -0.1, 0.3, 0.0]], dtype=F64),
                               rtol=0, atol=1e-12)
    assert m["clip_frac"].item() == pytest.approx(0.4, abs=1e-12)  # tokens 0 and 1
    assert m["ratio_mean"].item() == pytest.approx(5.1 / 5, abs=1e-12)
    assert m["ratio_max"].item() == pytest.approx(1.5, abs=1e-12)
    assert m["ratio_min"].item() == pytest.approx(0.5, abs=1e-12)
    # k3 = (ρ − 1) − log ρ: 0.0945349, 0.1931472, 0.0046898, 0.1931472, 0.0945349 -> mean 0.1160108
    k3 = sum((r - 1) - math.log(r) for r in RATIOS) / 5
    assert m["approx_kl"].item() == pytest.approx(k3, abs=1e-12)
    assert all(not v.requires_grad and v.dim() == 0 for v in m.values())


def test_ppo_clip_higher_is_asymmetric():
    logp, old, adv, mask = _ppo_inputs()
    loss, _ = ppo_clip_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.6, aggregation="token_mean")
    # token 0 (ρ = 1.5 < 1.6) is no longer clipped: −1.5 instead of −1.2
    assert loss.item() == pytest.approx((-1.5 + 0.8 - 2.2 - 0.5 + 1.5) / 5, abs=1e-12)
    loss.backward()
    assert logp.grad[0, 0].item() == pytest.approx(-1.5 / 5, abs=1e-12)


def test_ppo_dual_clip():
    old = torch.zeros(1, 2, dtype=F64)
    logp = torch.tensor([[math.log(5.0), math.log(2.0)]], dtype=F64, requires_grad=True)
    adv = torch.tensor([[-1.0, -1.0]], dtype=F64)
    loss, m = ppo_clip_loss(logp, old, adv, torch.ones(1, 2), clip_low=0.2, clip_high=0.2, dual_clip=3.0,
                            aggregation="seq_mean_token_mean")
    # token 0: −min(−5, −1.2) = 5, capped by −cA = 3 (no gradient); token 1: −min(−2, −1.2) = 2, under the cap
    assert loss.item() == pytest.approx((3 + 2) / 2, abs=1e-12)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 1.0]], dtype=F64), rtol=0, atol=1e-12)
    assert m["dual_clip_frac"].item() == 0.5
    with pytest.raises(ConfigError):
        ppo_clip_loss(logp, old, adv, torch.ones(1, 2), clip_low=0.2, clip_high=0.2, aggregation="token_mean",
                      dual_clip=0.5)


def test_ppo_on_policy_gradient_is_vanilla_policy_gradient():
    # ρ = 1 everywhere: the gradient is −A/N per token, for every aggregation's normaliser
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(3, 4, generator=g, dtype=F64).requires_grad_(True)
    adv = torch.randn(3, 4, generator=g, dtype=F64)
    loss, m = ppo_clip_loss(logp, logp.detach(), adv, torch.ones(3, 4), clip_low=0.2, clip_high=0.2,
                            aggregation="token_mean")
    loss.backward()
    torch.testing.assert_close(logp.grad, -adv / 12, rtol=0, atol=1e-12)
    assert m["clip_frac"].item() == 0.0 and m["approx_kl"].item() == 0.0


# ----------------------------------------------------------------------------- GSPO


def test_gspo_hand_values():
    old = torch.zeros(2, 2, dtype=F64)
    # row 0: log ratios [0.1, −0.3] -> s = exp(−0.1) = 0.9048374, inside the clip
    # row 1: log ratios [0.5, 0.5]  -> s = exp(0.5) = 1.6487213 > 1.2 with A > 0: clipped to 1.2
    logp = torch.tensor([[0.1, -0.3], [0.5, 0.5]], dtype=F64, requires_grad=True)
    adv = torch.ones(2, 2, dtype=F64)
    loss, m = gspo_loss(logp, old, adv, torch.ones(2, 2), clip_low=0.2, clip_high=0.2, aggregation="seq_mean_token_mean")
    s = math.exp(-0.1)
    assert loss.item() == pytest.approx((-s - 1.2) / 2, abs=1e-12)
    loss.backward()
    # row 0: ∂/∂logp_t = −(1/B)(1/|y|) s A = −s/4 per token; row 1: 0
    torch.testing.assert_close(logp.grad, torch.tensor([[-s / 4, -s / 4], [0.0, 0.0]], dtype=F64),
                               rtol=0, atol=1e-12)
    assert m["clip_frac"].item() == 0.5


def test_gspo_clips_sequences_not_tokens():
    # log ratios [0.5, −0.5]: s = 1, so GSPO keeps both tokens; PPO clips the first token
    old = torch.zeros(1, 2, dtype=F64)
    logp = torch.tensor([[0.5, -0.5]], dtype=F64, requires_grad=True)
    loss, _ = gspo_loss(logp, old, torch.ones(1, 2, dtype=F64), torch.ones(1, 2), clip_low=0.2, clip_high=0.2, aggregation="seq_mean_token_mean")
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.5, -0.5]], dtype=F64), rtol=0, atol=1e-12)
    _, m = ppo_clip_loss(logp, old, torch.ones(1, 2, dtype=F64), torch.ones(1, 2), clip_low=0.2, clip_high=0.2,
                         aggregation="token_mean")
    assert m["clip_frac"].item() == 0.5


def test_gspo_token_form_equals_sequence_form():
    g = torch.Generator().manual_seed(1)
    logp0 = -torch.rand(4, 5, generator=g, dtype=F64)
    old = logp0 + 0.05 * torch.randn(4, 5, generator=g, dtype=F64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    a_seq = torch.randn(4, generator=g, dtype=F64)
    adv = a_seq[:, None].expand(4, 5)
    logp = logp0.clone().requires_grad_(True)
    loss, _ = gspo_loss(logp, old, adv, mask, clip_low=0.03, clip_high=0.04, aggregation="seq_mean_token_mean")
    loss.backward()
    # sequence level: −1/B Σ_i min(s_i A_i, clip(s_i) A_i), s_i = exp(mean_t log ρ_it)
    ref_p = logp0.clone().requires_grad_(True)
    s = torch.exp(((ref_p - old) * mask).sum(1) / mask.sum(1))
    ref = -torch.minimum(s * a_seq, s.clamp(0.97, 1.04) * a_seq).mean()
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), abs=1e-12)
    torch.testing.assert_close(logp.grad, ref_p.grad, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- CISPO


def test_cispo_hand_values():
    old = torch.full((1, 2), -1.0, dtype=F64)
    logp = torch.tensor([[-1.0 + math.log(1.5), -1.0 + math.log(0.5)]], dtype=F64, requires_grad=True)
    adv = torch.tensor([[1.0, -1.0]], dtype=F64)
    loss, m = cispo_loss(logp, old, adv, torch.ones(1, 2), clip_low=0.2, clip_high=0.2, aggregation="token_mean")
    # weights sg(clip(ρ)) = [1.2, 0.8]; per token −w A logp: −1.2·(−0.5945349) = 0.7134419,
    # −0.8·(−1)·(−1.6931472) = −1.3545177; token mean −0.3205379
    lp = [-1.0 + math.log(1.5), -1.0 + math.log(0.5)]
    assert loss.item() == pytest.approx((-1.2 * lp[0] + 0.8 * lp[1]) / 2, abs=1e-12)
    loss.backward()
    # unlike PPO, clipped tokens keep a gradient: −w A / N
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.6, 0.4]], dtype=F64), rtol=0, atol=1e-12)
    assert m["clip_frac"].item() == 1.0


def test_cispo_default_has_no_lower_bound():
    old = torch.zeros(1, 1, dtype=F64)
    logp = torch.tensor([[math.log(0.5)]], dtype=F64, requires_grad=True)
    loss, m = cispo_loss(logp, old, -torch.ones(1, 1, dtype=F64), torch.ones(1, 1), clip_low=1.0, clip_high=0.2,
                         aggregation="token_mean")
    loss.backward()
    assert logp.grad.item() == pytest.approx(0.5, abs=1e-12)  # weight ρ = 0.5 unclipped
    assert m["clip_frac"].item() == 0.0


# ----------------------------------------------------------------------------- KL in the loss


def test_truncated_is_weight_by_hand():
    # π_old / π_rollout per token: 0.5, e^0.1, 3 (capped at C = 2), e^20 (log clamped to 10, then capped); masked: 1
    old = torch.log(torch.tensor([[0.2, 0.4, 0.6, 0.9]], dtype=F64))
    rollout = torch.log(torch.tensor([[0.4, 0.4, 0.2, 0.9]], dtype=F64))
    rollout[0, 1] = old[0, 1] - 0.1
    rollout[0, 3] = old[0, 3] - 20.0
    mask = torch.tensor([[1, 1, 1, 0]])
    w, m = truncated_is_weight(old, rollout, mask, cap=2.0)
    assert w.tolist()[0] == pytest.approx([0.5, math.exp(0.1), 2.0, 1.0], abs=1e-12)
    assert m["tis/weight_mean"].item() == pytest.approx((0.5 + math.exp(0.1) + 2.0) / 3, abs=1e-12)
    assert m["tis/capped_frac"].item() == pytest.approx(1 / 3, abs=1e-12)
    mask[0, 3] = 1
    w, m = truncated_is_weight(old, rollout, mask, cap=5.0)
    assert w[0, 3].item() == 5.0 and m["tis/capped_frac"].item() == pytest.approx(0.25)  # e^10 > 5: capped
    with pytest.raises(ConfigError, match="cap"):
        truncated_is_weight(old, rollout, mask, cap=0.0)


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_is_weight_scales_each_tokens_term(name):
    """A token weight w multiplies that token's loss term and gradient; w = 1 changes nothing
    (on-policy ratios, so no clip interferes)."""
    torch.manual_seed(0)
    logp = (torch.randn(2, 3, dtype=F64) * 0.1 - 1).requires_grad_()
    old, adv, mask = logp.detach(), torch.tensor([[1.0] * 3, [-2.0] * 3], dtype=F64), torch.ones(2, 3)
    clip = {"ppo": (0.2, 0.2), "gspo": (3e-4, 4e-4), "cispo": (1.0, 0.2)}[name]
    fn = functools.partial(POLICY_LOSSES[name], clip_low=clip[0], clip_high=clip[1])
    base, _ = fn(logp, old, adv, mask, aggregation="token_mean")
    same, _ = fn(logp, old, adv, mask, aggregation="token_mean", is_weight=torch.ones(2, 3, dtype=F64))
    assert same.item() == base.item()
    w = torch.zeros(2, 3, dtype=F64)
    w[1, 2] = 3.0  # only one token left, three times over
    only, _ = fn(logp, old, adv, mask, aggregation="token_mean", is_weight=w)
    single = torch.zeros(2, 3)
    single[1, 2] = 1.0
    one, _ = fn(logp, old, adv, single, aggregation="token_mean")
    # token_mean over 6 tokens vs over 1: the weighted loss is 3 * (1/6) of the single-token loss
    assert only.item() == pytest.approx(3 / 6 * one.item(), rel=1e-12)
    g, = torch.autograd.grad(only, logp)
    assert g[0].abs().sum().item() == 0 and g[1, :2].abs().sum().item() == 0 and g[1, 2].item() != 0


def test_kl_penalty_in_loss_values_gradient_and_mask():
    logp = torch.tensor([[math.log(0.5), math.log(0.2), float("nan")]], dtype=F64, requires_grad=True)
    ref = torch.tensor([[math.log(0.25), math.log(0.2), 0.0]], dtype=F64)
    kl = kl_penalty_in_loss(logp, ref, torch.tensor([[1, 1, 0]]))
    # k3 with r = π_ref/π_θ = [0.5, 1]: (0.5 − 1) + log 2 = 0.1931472, 0, masked 0
    torch.testing.assert_close(kl, torch.tensor([[0.5 - 1 + math.log(2), 0.0, 0.0]], dtype=F64),
                               rtol=0, atol=1e-12)
    kl.sum().backward()
    # ∂k3/∂logp = 1 − r = [0.5, 0]
    torch.testing.assert_close(logp.grad, torch.tensor([[0.5, 0.0, 0.0]], dtype=F64), rtol=0, atol=1e-12)
    k1 = kl_penalty_in_loss(logp.detach(), ref, torch.tensor([[1, 1, 0]]), estimator="k1")
    assert k1[0, 0].item() == pytest.approx(math.log(2), abs=1e-12)
    with pytest.raises(ConfigError):
        kl_penalty_in_loss(logp, ref, torch.ones(1, 3), estimator="k5")


# ----------------------------------------------------------------------------- value


def test_value_loss_clipping_by_hand():
    values = torch.tensor([[1.0, 2.0, 0.0, 9.0]], dtype=F64, requires_grad=True)
    old = torch.tensor([[0.9, 1.0, 0.5, 0.0]], dtype=F64)
    returns = torch.tensor([[1.5, 1.0, 0.0, 0.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, m = value_loss(values, old, returns, mask, clip=0.2)
    # t0: inside the clip, V_clip = V: ½ (1 − 1.5)² = 0.125               ∂ = V − R = −0.5
    # t1: (2 − 1)² = 1 vs V_clip = 1.2: 0.04 -> ½ · 1 = 0.5                ∂ = V − R = 1
    # t2: (0 − 0)² = 0 vs V_clip = 0.3: 0.09 -> ½ · 0.09 = 0.045 (clipped)  ∂ = 0
    # token mean: (0.125 + 0.5 + 0.045)/3 = 0.2233333
    assert loss.item() == pytest.approx(0.67 / 3, abs=1e-12)
    loss.backward()
    torch.testing.assert_close(values.grad, torch.tensor([[-0.5 / 3, 1 / 3, 0.0, 0.0]], dtype=F64),
                               rtol=0, atol=1e-12)
    assert m["value_clip_frac"].item() == pytest.approx(1 / 3, abs=1e-12)
    unclipped, _ = value_loss(values, old, returns, mask, clip=None)
    assert unclipped.item() == pytest.approx((0.125 + 0.5 + 0.0) / 3, abs=1e-12)


def test_explained_variance_hand_value():
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0, 100.0]], dtype=F64)
    values = torch.tensor([[1.0, 2.0, 3.0, 3.0, -7.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    # residual [0, 0, 0, 1]: var 0.25; returns var 5/3 -> 1 − 0.25/(5/3) = 0.85
    assert explained_variance(values, returns, mask).item() == pytest.approx(0.85, abs=1e-12)
    assert explained_variance(returns, returns, mask).item() == 1.0


# the hyper-parameters the pure losses defaulted to before they became required keyword arguments
FORMER_DEFAULTS = {"ppo": dict(clip_low=0.2, clip_high=0.2, aggregation="token_mean"),
                   "gspo": dict(clip_low=3e-4, clip_high=4e-4, aggregation="seq_mean_token_mean"),
                   "cispo": dict(clip_low=1.0, clip_high=0.2, aggregation="token_mean")}


def test_registry_and_metrics_detached():
    assert POLICY_LOSSES == {"ppo": ppo_clip_loss, "gspo": gspo_loss, "cispo": cispo_loss}
    assert get_policy_loss("gspo") is gspo_loss
    with pytest.raises(ConfigError, match="ppo, gspo, cispo"):
        get_policy_loss("grpo")
    g = torch.Generator().manual_seed(2)
    logp = torch.randn(2, 3, generator=g, requires_grad=True)
    for name, fn in POLICY_LOSSES.items():
        loss, m = fn(logp, logp.detach() + 0.1, torch.randn(2, 3, generator=g), torch.ones(2, 3), **FORMER_DEFAULTS[name])
        assert loss.dim() == 0 and loss.requires_grad
        assert all(not v.requires_grad and v.dim() == 0 for v in m.values())


def test_runs_on_meta_tensors_so_no_host_sync():
    x = torch.randn(2, 3, device="meta", requires_grad=True)
    m = torch.ones(2, 3, device="meta")
    for name, fn in POLICY_LOSSES.items():
        fn(x, x.detach(), x.detach(), m, **FORMER_DEFAULTS[name])[0].backward()
    value_loss(x, x.detach(), x.detach(), m, clip=0.2)[0].backward()
    kl_penalty_in_loss(x, x.detach(), m).sum().backward()
    assert explained_variance(x, x, m).shape == ()
