"""Direct-alignment losses on 2-pair inputs computed by hand, plus the DPO/IPO identities."""

import inspect
import math

import pytest
import torch

from posttrain.errors import ConfigError
from posttrain.losses.direct import (DIRECT_LOSSES, cdpo_loss, dpo_loss, get_direct_loss, hinge_loss, ipo_loss,
                                     kto_loss, orpo_loss, robust_dpo_loss, simpo_loss)

F64 = torch.float64


def t(*xs):
    return torch.tensor(xs, dtype=F64)


def sp(x):  # softplus(x) = −log σ(−x)
    return math.log1p(math.exp(x))


def sig(x):
    return 1 / (1 + math.exp(-x))


# ρ_c = [−1 − (−1.5), −2 − (−1.2)] = [0.5, −0.8]; ρ_r = [−3 − (−2), −1 − (−2)] = [−1, 1]
# h = ρ_c − ρ_r = [1.5, −1.8]
C, R, RC, RR = t(-1.0, -2.0), t(-3.0, -1.0), t(-1.5, -1.2), t(-2.0, -2.0)
H = [1.5, -1.8]
BETA = 0.5


def test_dpo_at_reference_is_log2():
    x = t(-3.0, -7.5)
    loss, _ = dpo_loss(x, x + 1, x, x + 1, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-12)


def test_dpo_hand_values_and_metrics():
    loss, m = dpo_loss(C, R, RC, RR, beta=BETA)
    # z = β h = [0.75, −0.9]: (softplus(−0.75) + softplus(0.9)) / 2 = (0.3868528 + 1.2411538) / 2
    assert loss.item() == pytest.approx((sp(-0.75) + sp(0.9)) / 2, abs=1e-12)
    assert m["rewards/chosen"].item() == pytest.approx(BETA * (0.5 - 0.8) / 2, abs=1e-12)  # −0.075
    assert m["rewards/rejected"].item() == pytest.approx(BETA * (-1 + 1) / 2, abs=1e-12)  # 0
    assert m["rewards/margin"].item() == pytest.approx(BETA * (1.5 - 1.8) / 2, abs=1e-12)
    assert m["rewards/accuracy"].item() == 0.5  # 0.25 > −0.5 yes; −0.4 > 0.5 no
    assert m["logps/chosen"].item() == -1.5 and m["logps/rejected"].item() == -2.0
    assert all(not v.requires_grad and v.dim() == 0 for v in m.values())


def test_dpo_gradient_weight():
    g = torch.Generator().manual_seed(0)
    c, r, rc, rr = (torch.randn(6, generator=g, dtype=F64) - 3 for _ in range(4))
    c.requires_grad_(True)
    r.requires_grad_(True)
    loss, _ = dpo_loss(c, r, rc, rr, beta=0.3)
    loss.backward()
    # ∂L/∂log π(y_c) = −β σ(r̂_r − r̂_c) / N,  ∂L/∂log π(y_r) = +β σ(r̂_r − r̂_c) / N
    w = torch.sigmoid(0.3 * (r - rr) - 0.3 * (c - rc)).detach()
    torch.testing.assert_close(c.grad, -0.3 * w / 6, rtol=0, atol=1e-12)
    torch.testing.assert_close(r.grad, 0.3 * w / 6, rtol=0, atol=1e-12)


def test_cdpo_hand_values_and_reduces_to_dpo():
    loss, _ = cdpo_loss(C, R, RC, RR, beta=BETA, label_smoothing=0.1)
    expected = sum(0.9 * sp(-BETA * h) + 0.1 * sp(BETA * h) for h in H) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert cdpo_loss(C, R, RC, RR, beta=BETA, label_smoothing=0.0)[0].item() == \
        pytest.approx(dpo_loss(C, R, RC, RR, beta=BETA)[0].item(), abs=1e-12)
    with pytest.raises(ConfigError):
        cdpo_loss(C, R, RC, RR, beta=BETA, label_smoothing=0.7)


def test_robust_dpo_hand_values():
    loss, _ = robust_dpo_loss(C, R, RC, RR, beta=BETA, label_smoothing=0.2)
    # [(1 − ε) softplus(−z) − ε softplus(z)] / (1 − 2ε), z = β h
    expected = sum((0.8 * sp(-BETA * h) - 0.2 * sp(BETA * h)) / 0.6 for h in H) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert robust_dpo_loss(C, R, RC, RR, beta=BETA, label_smoothing=0.0)[0].item() == \
        pytest.approx(dpo_loss(C, R, RC, RR, beta=BETA)[0].item(), abs=1e-12)
    with pytest.raises(ConfigError):
        robust_dpo_loss(C, R, RC, RR, beta=BETA, label_smoothing=0.5)


def test_ipo_hand_values():
    loss, _ = ipo_loss(C, R, RC, RR, beta=BETA)
    # target 1/(2β) = 1: ((1.5 − 1)² + (−1.8 − 1)²)/2 = (0.25 + 7.84)/2 = 4.045
    assert loss.item() == pytest.approx(4.045, abs=1e-12)


def test_ipo_minimum_at_half_inverse_beta():
    beta = 0.25  # optimum h = 1/(2β) = 2
    c = t(-1.0).requires_grad_(True)
    loss, _ = ipo_loss(c, t(-3.0), t(0.0), t(0.0), beta=beta)  # h = −1 − (−3) = 2
    loss.backward()
    assert loss.item() == 0.0 and c.grad.item() == 0.0
    for shift in (-0.1, 0.1):  # either side is worse
        assert ipo_loss(c.detach() + shift, t(-3.0), t(0.0), t(0.0), beta=beta)[0].item() > 0


def test_hinge_hand_values():
    loss, _ = hinge_loss(C, R, RC, RR, beta=BETA)
    # relu(1 − 0.75) = 0.25; relu(1 + 0.9) = 1.9; mean 1.075
    assert loss.item() == pytest.approx(1.075, abs=1e-12)
    c = t(0.0).requires_grad_(True)
    loss, _ = hinge_loss(c, t(-10.0), t(0.0), t(0.0), beta=BETA)  # β h = 5 > 1: no loss, no gradient
    loss.backward()
    assert loss.item() == 0.0 and c.grad.item() == 0.0


def test_simpo_reference_free_hand_values():
    # β/|y| log π: chosen 2·[−4/2, −6/3] = [−4, −4]; rejected 2·[−9/3, −2/1] = [−6, −4]
    # logits − γ = [2 − 0.5, 0 − 0.5] -> (softplus(−1.5) + softplus(0.5)) / 2 = 0.5877452
    loss, m = simpo_loss(t(-4.0, -6.0), t(-9.0, -2.0), None, None, beta=2.0,
                         chosen_lengths=t(2.0, 3.0), rejected_lengths=t(3.0, 1.0), gamma=0.5)
    assert loss.item() == pytest.approx((sp(-1.5) + sp(0.5)) / 2, abs=1e-12)
    assert m["rewards/chosen"].item() == -4.0 and m["rewards/rejected"].item() == -5.0
    assert m["rewards/accuracy"].item() == 0.5  # −4 > −6 yes; −4 > −4 no
    with pytest.raises(ConfigError, match="lengths"):
        simpo_loss(t(-4.0), t(-9.0), None, None, beta=2.0)


def test_orpo_reference_free_hand_values():
    # pair 1: avg log p_c = log 0.5 (odds 1), avg log p_r = log 0.2 (odds 0.25): OR = 4
    # pair 2: avg log p_c = log 0.8 (odds 4), avg log p_r = log 0.9 (odds 9): OR = 4/9
    # −log σ(log OR) = log(1 + 1/OR): log 1.25 = 0.2231436, log 3.25 = 1.1786550
    # NLL = −(log 0.5 + log 0.8)/2 = 0.4581454;  loss = NLL + λ · mean, λ = β = 0.1
    chosen = t(2 * math.log(0.5), 4 * math.log(0.8))
    rejected = t(3 * math.log(0.2), 1 * math.log(0.9))
    loss, m = orpo_loss(chosen, rejected, None, None, beta=0.1, chosen_lengths=t(2.0, 4.0),
                        rejected_lengths=t(3.0, 1.0))
    nll = -(math.log(0.5) + math.log(0.8)) / 2
    ratio = (math.log(1.25) + math.log(3.25)) / 2
    assert loss.item() == pytest.approx(nll + 0.1 * ratio, abs=1e-12)
    assert m["nll"].item() == pytest.approx(nll, abs=1e-12)
    assert m["rewards/chosen"].item() == pytest.approx((0.0 + math.log(4)) / 2, abs=1e-12)  # log odds
    assert m["rewards/rejected"].item() == pytest.approx((math.log(0.25) + math.log(9)) / 2, abs=1e-12)


def test_orpo_log_odds_stable_near_probability_one():
    # avg log p = −1e-5 (float32): log odds = ℓ − log(1 − e^ℓ) ≈ −log(1e-5) = 11.5129
    c = torch.tensor([-1e-5], requires_grad=True)
    r = torch.tensor([-2.0])
    loss, m = orpo_loss(c, r, None, None, beta=1.0, chosen_lengths=torch.tensor([1.0]),
                        rejected_lengths=torch.tensor([1.0]))
    x = -1e-5
    exact = x - math.log(-math.expm1(x))
    assert m["rewards/chosen"].item() == pytest.approx(exact, abs=1e-4)
    loss.backward()
    assert torch.isfinite(c.grad).all()


def test_kto_hand_values():
    # r = log π/π_ref = [0.5, −0.5]; z₀ = 0.2; β = 1
    # desirable:   λ_D − λ_D σ(0.5 − 0.2) = 2 − 2σ(0.3)
    # undesirable: λ_U − λ_U σ(0.2 + 0.5) = 0.5 − 0.5σ(0.7)
    pol = t(-1.0, -2.0).requires_grad_(True)
    loss, m = kto_loss(pol, t(-1.5, -1.5), torch.tensor([True, False]), torch.tensor(0.2, dtype=F64),
                       beta=1.0, desirable_weight=2.0, undesirable_weight=0.5)
    expected = ((2 - 2 * sig(0.3)) + (0.5 - 0.5 * sig(0.7))) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert m["rewards/chosen"].item() == 0.5 and m["rewards/rejected"].item() == -0.5
    assert m["rewards/margin"].item() == 1.0 and m["kl"].item() == pytest.approx(0.2, abs=1e-12)
    assert m["logps/chosen"].item() == -1.0 and m["logps/rejected"].item() == -2.0
    loss.backward()
    # ∂/∂logp of the desirable term: −λ_D σ'(0.3)/N; of the undesirable term: +λ_U σ'(0.7)/N
    assert pol.grad[0].item() == pytest.approx(-2 * sig(0.3) * (1 - sig(0.3)) / 2, abs=1e-12)
    assert pol.grad[1].item() == pytest.approx(0.5 * sig(0.7) * (1 - sig(0.7)) / 2, abs=1e-12)


def test_kto_reference_point_is_detached_and_clamped():
    z = torch.tensor(-0.3, dtype=F64, requires_grad=True)
    pol = t(-1.0).requires_grad_(True)
    loss, m = kto_loss(pol, t(-1.0), torch.tensor([True]), z, beta=1.0)
    assert m["kl"].item() == 0.0  # a negative KL estimate is clamped to 0
    assert loss.item() == pytest.approx(0.5, abs=1e-12)  # 1 − σ(0)
    loss.backward()
    assert z.grad is None and pol.grad.item() == pytest.approx(-0.25, abs=1e-12)  # −σ'(0)


def test_registry_and_common_signature():
    assert list(DIRECT_LOSSES) == ["dpo", "cdpo", "robust", "ipo", "hinge", "simpo", "orpo"]
    lens = t(2.0, 3.0)
    for name, fn in DIRECT_LOSSES.items():
        assert get_direct_loss(name) is fn
        params = inspect.signature(fn).parameters
        assert not any(p.kind == p.VAR_KEYWORD for p in params.values())  # unknown hparams must error
        loss, m = fn(C, R, RC, RR, beta=BETA, chosen_lengths=lens, rejected_lengths=lens)
        assert loss.dim() == 0 and torch.isfinite(loss)
        assert {"rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy",
                "logps/chosen", "logps/rejected"} <= set(m)
    with pytest.raises(ConfigError, match="dpo, cdpo, robust, ipo, hinge, simpo, orpo"):
        get_direct_loss("dpoo")
    with pytest.raises(ConfigError, match="reference"):
        dpo_loss(C, R, None, None, beta=0.1)


def test_runs_on_meta_tensors_so_no_host_sync():
    x = torch.randn(4, device="meta", requires_grad=True)
    n = torch.ones(4, device="meta")
    for fn in DIRECT_LOSSES.values():
        fn(x, x, x.detach(), x.detach(), beta=0.1, chosen_lengths=n, rejected_lengths=n)[0].backward()
    kto_loss(x, x.detach(), n.bool(), torch.tensor(0.1, device="meta"), beta=0.1)[0].backward()
