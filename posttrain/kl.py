"""Monte-Carlo estimators of KL(π_θ ‖ π_ref) and the KL-coefficient controllers.

Convention (Schulman, "Approximating KL Divergence", 2020): tokens are sampled from π_θ, and

    r = π_ref(y) / π_θ(y),   log r = ref_logp − logp.

Then KL(π_θ ‖ π_ref) = E_{y∼π_θ}[−log r], and

    k1 = −log r              unbiased, high variance, can be negative per sample
    k2 = ½ (log r)²          biased (its expectation is an f-divergence that matches KL to second
                             order), low variance, ≥ 0
    k3 = (r − 1) − log r     unbiased (E[r] = 1 under π_θ), ≥ 0, low variance

The direction matters: this is the *reverse* KL of the RLHF objective
max E[r(x, y)] − β KL(π_θ ‖ π_ref). Passing the arguments swapped (ratio π_θ/π_ref) still gives a
non-negative k3, but its mean is then not the KL of the samples' distribution (see the tests).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from posttrain.errors import ConfigError

__all__ = ["kl_k1", "kl_k2", "kl_k3", "KL_ESTIMATORS", "get_kl_estimator",
           "FixedKLController", "AdaptiveKLController"]


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = −log r = log π_θ(y) − log π_ref(y), elementwise (Schulman 2020).

    Shapes: logp, ref_logp [...] (log-probs of tokens sampled from π_θ); returns the same shape.
    """
    return logp - ref_logp


def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k2 = ½ (log r)² with log r = log π_ref(y) − log π_θ(y), elementwise (Schulman 2020)."""
    return 0.5 * (ref_logp - logp) ** 2


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 = (r − 1) − log r with r = π_ref(y)/π_θ(y), elementwise (Schulman 2020).

    r − 1 is computed as expm1(log r): near r = 1 (the usual case, policy close to the reference)
    exp(log r) − 1 cancels catastrophically and k3 ≈ ½(log r)² would be lost to rounding.
    Gradient w.r.t. logp: 1 − r. No clamping: a log-ratio above ≈88 (fp32) overflows to inf.
    """
    log_r = ref_logp - logp
    return torch.expm1(log_r) - log_r


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,
}


def get_kl_estimator(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The estimator ``fn(logp, ref_logp)`` registered under ``name`` ("k1", "k2" or "k3")."""
    try:
        return KL_ESTIMATORS[name]
    except KeyError:
        raise ConfigError(f"unknown KL estimator '{name}'", where="kl_estimator",
                          fix=f"choose one of: {', '.join(KL_ESTIMATORS)}") from None


class FixedKLController:
    """A constant KL coefficient β (the usual choice in modern RLHF)."""

    def __init__(self, value: float):
        self.value = float(value)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op; present so fixed and adaptive controllers are interchangeable."""


class AdaptiveKLController:
    """Adaptive β that steers the measured KL toward a target (Ziegler et al. 2019, "Fine-Tuning
    Language Models from Human Preferences"):

        e = clip(KL / KL_target − 1, −0.2, 0.2),   β ← β (1 + e · n_steps / horizon)

    ``current_kl`` is a host float (the logged per-step KL): the update runs once per optimizer step,
    outside the loss, so reading it costs one sync per step, not one per token.
    """

    def __init__(self, init_value: float, target: float, horizon: float):
        if target <= 0:
            raise ConfigError(f"adaptive KL target must be positive, got {target}", where="kl_target")
        if horizon <= 0:
            raise ConfigError(f"adaptive KL horizon must be positive, got {horizon}", where="kl_horizon")
        self.value = float(init_value)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
