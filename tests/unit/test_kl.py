"""KL estimators k1/k2/k3 (values, direction, unbiasedness) and the KL controllers."""

import math

import pytest
import torch

from posttrain.errors import ConfigError
from posttrain.kl import (KL_ESTIMATORS, AdaptiveKLController, FixedKLController, get_kl_estimator, kl_k1, kl_k2,
                          kl_k3)

# π_θ (sampling policy) and π_ref on 4 outcomes, far enough apart that the two KL directions differ.
P = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
Q = torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=torch.float64)
KL_PQ = 0.5 * math.log(2) + 0.3 * math.log(1.2) + 0.15 * math.log(0.6) + 0.05 * math.log(0.2)  # 0.2441738
KL_QP = 0.25 * (math.log(0.5) + math.log(0.25 / 0.3) + math.log(0.25 / 0.15) + math.log(5))  # 0.3111989


def test_hand_values():
    # π_θ(y) = 0.5, π_ref(y) = 0.25: log r = log(0.25/0.5) = −0.6931472
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert kl_k1(logp, ref).item() == pytest.approx(0.6931472, abs=1e-6)  # −log r
    assert kl_k2(logp, ref).item() == pytest.approx(0.2402265, abs=1e-6)  # ½ · 0.6931472²
    assert kl_k3(logp, ref).item() == pytest.approx(0.1931472, abs=1e-6)  # (0.5 − 1) + 0.6931472


def test_k3_nonnegative_and_zero_at_equality():
    g = torch.Generator().manual_seed(0)
    a, b = 5 * torch.randn(1000, generator=g), 5 * torch.randn(1000, generator=g)
    assert (kl_k3(a, b) >= 0).all() and (kl_k2(a, b) >= 0).all()
    assert (kl_k3(a, a) == 0).all()


def test_k3_uses_expm1_near_zero():
    # log r = 1e-6: k3 = r − 1 − log r = x²/2 + x³/6 + … = 5.0000017e-13; naive exp(x) − 1 loses ~1e-16
    x = 1e-6
    logp, ref = torch.tensor([0.0], dtype=torch.float64), torch.tensor([x], dtype=torch.float64)
    exact = x ** 2 / 2 + x ** 3 / 6 + x ** 4 / 24
    assert abs(kl_k3(logp, ref).item() - exact) / exact < 1e-8
    naive = (torch.exp(ref - logp) - 1) - (ref - logp)
    assert abs(naive.item() - exact) / exact > 1e-6  # why expm1


def test_exact_expectations_under_pi_theta():
    # Σ_y π_θ(y) k(y) over all outcomes: k1 and k3 are unbiased for KL(π_θ ‖ π_ref)
    logp, ref = P.log(), Q.log()
    assert (P * kl_k1(logp, ref)).sum().item() == pytest.approx(KL_PQ, abs=1e-12)
    assert (P * kl_k3(logp, ref)).sum().item() == pytest.approx(KL_PQ, abs=1e-12)
    assert abs((P * kl_k2(logp, ref)).sum().item() - KL_PQ) > 0.01  # k2 is biased here


def test_monte_carlo_estimates_the_reverse_kl():
    g = torch.Generator().manual_seed(1234)
    y = torch.multinomial(P, 200_000, replacement=True, generator=g)  # samples from π_θ
    logp, ref = P.log()[y], Q.log()[y]
    for est in (kl_k1, kl_k3):
        k = est(logp, ref)
        se = k.std().item() / math.sqrt(k.numel())
        assert abs(k.mean().item() - KL_PQ) < 3 * se
        assert abs(k.mean().item() - KL_QP) > 10 * se  # the forward KL is a different number
    # the flipped ratio π_θ/π_ref (arguments swapped) is not an estimate of either direction
    flipped = kl_k3(ref, logp)
    se = flipped.std().item() / math.sqrt(flipped.numel())
    assert abs(flipped.mean().item() - KL_PQ) > 10 * se


def test_k2_close_to_kl_for_close_distributions():
    p = torch.tensor([0.26, 0.24, 0.25, 0.25], dtype=torch.float64)
    kl = (p * (p / Q).log()).sum().item()  # ≈ ½ Σ (p − q)²/q = 4.0e-4
    k2 = (p * kl_k2(p.log(), Q.log())).sum().item()
    assert abs(k2 - kl) < 0.02 * kl


def test_registry():
    assert set(KL_ESTIMATORS) == {"k1", "k2", "k3"}
    assert get_kl_estimator("k3") is kl_k3
    with pytest.raises(ConfigError, match="k1, k2, k3"):
        get_kl_estimator("k4")


def test_fixed_controller():
    c = FixedKLController(0.05)
    c.update(100.0, 1000)
    assert c.value == 0.05


def test_adaptive_controller_hand_values():
    c = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    c.update(6.6, 100)  # e = 6.6/6 − 1 = 0.1; β = 0.1 · (1 + 0.1 · 100/1000) = 0.101
    assert c.value == pytest.approx(0.101, abs=1e-12)
    c = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    c.update(9.0, 256)  # e = clip(0.5) = 0.2; β = 0.1 · (1 + 0.2 · 0.0256) = 0.100512
    assert c.value == pytest.approx(0.100512, abs=1e-12)
    c.update(3.0, 256)  # e = clip(−0.5) = −0.2; β = 0.100512 · (1 − 0.00512) = 0.09999738
    assert c.value == pytest.approx(0.100512 * 0.99488, abs=1e-12)
    with pytest.raises(ConfigError):
        AdaptiveKLController(0.1, target=0.0, horizon=10)
