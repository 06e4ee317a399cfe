"""Direct alignment losses: preference optimisation without a separate reward model or RL.

Paired losses share one signature, so an algorithm picks one from ``DIRECT_LOSSES`` at start-up:

    fn(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta,
       chosen_lengths=None, rejected_lengths=None, <the loss's own hyper-parameters>) -> (loss, metrics)

Inputs are [N] *sequence* log-probs, log π(y | x) = Σ_t log π(y_t | x, y_<t) over response tokens;
lengths are [N] response token counts. The loss is the mean over the N pairs. Notation:

    ρ_c = log π_θ(y_c|x) − log π_ref(y_c|x),   ρ_r = likewise for y_r   (log-ratios)
    h  = ρ_c − ρ_r,                            z = β h                   (DPO logit)

Every paired loss reports, as detached scalars: "rewards/chosen", "rewards/rejected" (mean implicit
reward, β ρ unless the function says otherwise), "rewards/margin" (their mean difference),
"rewards/accuracy" (share of pairs with chosen reward > rejected), "logps/chosen", "logps/rejected"
(mean sequence log-probs).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from posttrain.errors import ConfigError

__all__ = ["dpo_loss", "cdpo_loss", "robust_dpo_loss", "ipo_loss", "hinge_loss", "simpo_loss", "orpo_loss",
           "kto_loss", "DIRECT_LOSSES", "get_direct_loss", "needs_reference", "reference_free"]

Metrics = dict[str, torch.Tensor]


def _metrics(reward_c: torch.Tensor, reward_r: torch.Tensor, logp_c: torch.Tensor, logp_r: torch.Tensor) -> Metrics:
    with torch.no_grad():
        out = {"rewards/chosen": reward_c.mean(), "rewards/rejected": reward_r.mean(),
               "rewards/margin": (reward_c - reward_r).mean(),
               "rewards/accuracy": (reward_c > reward_r).to(reward_c.dtype).mean(),
               "logps/chosen": logp_c.mean(), "logps/rejected": logp_r.mean()}
    return {k: v.detach() for k, v in out.items()}


def _log_ratios(name: str, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps):
    if ref_chosen_logps is None or ref_rejected_logps is None:
        raise ConfigError(f"loss '{name}' needs reference log-probs, got None",
                          fix="compute reference log-probs (precompute or live), or use simpo/orpo")
    return chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps


def _check_smoothing(name: str, eps: float, upper: float, closed: bool) -> None:
    ok = 0.0 <= eps <= upper if closed else 0.0 <= eps < upper
    if not ok:
        bound = f"<= {upper}" if closed else f"< {upper}"
        raise ConfigError(f"{name}: label_smoothing must be >= 0 and {bound}, got {eps}",
                          where="loss_args.label_smoothing")


def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, *, beta: float, chosen_lengths: torch.Tensor | None = None,
             rejected_lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, Metrics]:
    """Direct Preference Optimization (Rafailov et al. 2023, "Direct Preference Optimization: Your
    Language Model is Secretly a Reward Model", eq. 7):

        L_DPO = −E[ log σ( β log π_θ(y_c|x)/π_ref(y_c|x) − β log π_θ(y_r|x)/π_ref(y_r|x) ) ] = −E[log σ(β h)]

    Gradient (eq. in §4): ∂L/∂ log π_θ(y_c|x) = −β σ(r̂_r − r̂_c) / N with r̂ = β ρ, so pairs the
    implicit reward already orders correctly get small weight. Shapes: [N] each; lengths unused.
    """
    rho_c, rho_r = _log_ratios("dpo", chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    loss = -F.logsigmoid(beta * (rho_c - rho_r)).mean()
    return loss, _metrics(beta * rho_c, beta * rho_r, chosen_logps, rejected_logps)


def cdpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
              ref_rejected_logps: torch.Tensor, *, beta: float, chosen_lengths: torch.Tensor | None = None,
              rejected_lengths: torch.Tensor | None = None,
              label_smoothing: float = 0.1) -> tuple[torch.Tensor, Metrics]:
    """Conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences and relationship to IPO"):
    each label is flipped with probability ε, so the target is the expected DPO loss

        L_cDPO = (1 − ε) · (−log σ(β h)) + ε · (−log σ(−β h))

    The minimiser is finite (σ(β h) = 1 − ε) instead of h → ∞. ε = 0 is DPO. Default ε = 0.1 (the
    RLHF book's direct-alignment config). Shapes: [N] each; lengths unused.
    """
    _check_smoothing("cdpo", label_smoothing, 0.5, closed=True)
    rho_c, rho_r = _log_ratios("cdpo", chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    z = beta * (rho_c - rho_r)
    eps = label_smoothing
    loss = (-(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)).mean()
    return loss, _metrics(beta * rho_c, beta * rho_r, chosen_logps, rejected_logps)


def robust_dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
                    ref_rejected_logps: torch.Tensor, *, beta: float, chosen_lengths: torch.Tensor | None = None,
                    rejected_lengths: torch.Tensor | None = None,
                    label_smoothing: float = 0.1) -> tuple[torch.Tensor, Metrics]:
    """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO: Aligning Language Models with Noisy
    Feedback"): an unbiased estimate of the clean-label DPO loss when labels flip with known
    probability ε < ½,

        L_rDPO = [ (1 − ε) · (−log σ(β h)) − ε · (−log σ(−β h)) ] / (1 − 2ε)

    Unlike cDPO it is not bounded below per pair (the −ε term rewards large |h|). ε = 0 is DPO.
    Shapes: [N] each; lengths unused.
    """
    _check_smoothing("robust", label_smoothing, 0.5, closed=False)
    rho_c, rho_r = _log_ratios("robust", chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    z = beta * (rho_c - rho_r)
    eps = label_smoothing
    loss = ((-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)).mean()
    return loss, _metrics(beta * rho_c, beta * rho_r, chosen_logps, rejected_logps)


def ipo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, *, beta: float, chosen_lengths: torch.Tensor | None = None,
             rejected_lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, Metrics]:
    """Identity Preference Optimisation (Azar et al. 2023, "A General Theoretical Paradigm to
    Understand Learning from Human Preferences", §5), with τ = ``beta``:

        L_IPO = E[ (h − 1/(2τ))² ],   h = log π_θ(y_c)/π_ref(y_c) − log π_θ(y_r)/π_ref(y_r)

    A regression of the (unscaled) log-ratio difference onto 1/(2τ): it stops at a finite margin
    even for deterministic preferences. Sequence log-probs are used as given (summed; TRL averages
    them per token for IPO — pass averaged log-probs for that behaviour). Shapes: [N] each.
    """
    rho_c, rho_r = _log_ratios("ipo", chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    loss = ((rho_c - rho_r - 1.0 / (2.0 * beta)) ** 2).mean()
    return loss, _metrics(beta * rho_c, beta * rho_r, chosen_logps, rejected_logps)


def hinge_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
               ref_rejected_logps: torch.Tensor, *, beta: float, chosen_lengths: torch.Tensor | None = None,
               rejected_lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, Metrics]:
    """SLiC-style hinge loss on the log-ratio difference (Zhao et al. 2023, "SLiC-HF"), in the
    reference-normalised form of Liu et al. 2023, "Statistical Rejection Sampling Improves Preference Optimization":

        L_hinge = E[ max(0, 1 − β h) ]

    Pairs whose β-scaled margin exceeds 1 get no gradient. Shapes: [N] each; lengths unused.
    """
    rho_c, rho_r = _log_ratios("hinge", chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    loss = torch.relu(1.0 - beta * (rho_c - rho_r)).mean()
    return loss, _metrics(beta * rho_c, beta * rho_r, chosen_logps, rejected_logps)


def _need_lengths(name: str, chosen_lengths, rejected_lengths):
    if chosen_lengths is None or rejected_lengths is None:
        raise ConfigError(f"loss '{name}' normalises by response length: pass chosen_lengths and rejected_lengths")
    # An empty response has log-prob 0; dividing by 1 instead of 0 keeps its average at 0.
    return chosen_lengths.clamp(min=1), rejected_lengths.clamp(min=1)


def reference_free(fn):
    """Mark a registered loss as needing no reference log-probs (its ``ref_*`` inputs are ignored):
    the property the commands read to skip the reference model."""
    fn.needs_reference = False
    return fn


def needs_reference(fn) -> bool:
    return getattr(fn, "needs_reference", True)


@reference_free
def simpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor,
               ref_chosen_logps: torch.Tensor | None = None, ref_rejected_logps: torch.Tensor | None = None, *,
               beta: float, chosen_lengths: torch.Tensor | None = None,
               rejected_lengths: torch.Tensor | None = None, gamma: float = 0.5) -> tuple[torch.Tensor, Metrics]:
    """Simple Preference Optimization (Meng et al. 2024, "SimPO: Simple Preference Optimization with a
    Reference-Free Reward"), reference-free:

        L_SimPO = −E[ log σ( β/|y_c| log π_θ(y_c|x) − β/|y_r| log π_θ(y_r|x) − γ ) ]

    The implicit reward is the length-normalised β/|y| log π_θ(y|x) (reported as rewards/*).
    SimPO's β is an order of magnitude above DPO's (the paper uses β ≈ 2–2.5); γ defaults to 0.5
    (TRL's ``simpo_gamma``). Reference log-probs are ignored (pass None). Lengths are required.
    """
    len_c, len_r = _need_lengths("simpo", chosen_lengths, rejected_lengths)
    reward_c = beta * chosen_logps / len_c
    reward_r = beta * rejected_logps / len_r
    loss = -F.logsigmoid(reward_c - reward_r - gamma).mean()
    return loss, _metrics(reward_c, reward_r, chosen_logps, rejected_logps)


_LOG_HALF = -math.log(2.0)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − eˣ) for x < 0, accurate everywhere (Mächler 2012, "Accurately computing log(1 − exp(−|a|))"):
    log1p(−eˣ) for x < −log 2, log(−expm1(x)) closer to 0. Each branch only sees inputs where it is
    finite, so the unused branch cannot put a nan into the gradient."""
    near = x > _LOG_HALF
    far_x = torch.where(near, torch.full_like(x, -1.0), x)
    near_x = torch.where(near, x, torch.full_like(x, -1.0))
    return torch.where(near, torch.log(-torch.expm1(near_x)), torch.log1p(-torch.exp(far_x)))


@reference_free
def orpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor,
              ref_chosen_logps: torch.Tensor | None = None, ref_rejected_logps: torch.Tensor | None = None, *,
              beta: float, chosen_lengths: torch.Tensor | None = None,
              rejected_lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, Metrics]:
    """Odds Ratio Preference Optimization (Hong et al. 2024, "ORPO: Monolithic Preference Optimization
    without Reference Model"), reference-free:

        P(y|x) = exp( (1/|y|) log π_θ(y|x) )          (per-token geometric mean probability)
        odds(y|x) = P / (1 − P),   log odds = ℓ − log(1 − e^ℓ),  ℓ = (1/|y|) log π_θ(y|x)
        L_ORPO = E[ −ℓ_c ] + λ · E[ −log σ( log odds(y_c|x) − log odds(y_r|x) ) ]

    λ is ``beta`` (as in TRL's ORPOConfig; the paper uses λ = 0.1): one knob, no extra
    hyper-parameter. ℓ is capped just below 0 so a response with probability 1 keeps finite odds.
    Metrics: rewards/* are the log-odds (the quantity the odds-ratio term compares; λ weights the
    term rather than scaling it), plus "nll" = E[−ℓ_c] and "log_odds_ratio" = E[log odds_c − log odds_r].
    Reference log-probs are ignored (pass None). Lengths are required.
    """
    len_c, len_r = _need_lengths("orpo", chosen_lengths, rejected_lengths)
    cap = -1e-6  # ℓ = 0 would make 1 − P = 0
    avg_c = (chosen_logps / len_c).clamp(max=cap)
    avg_r = (rejected_logps / len_r).clamp(max=cap)
    log_odds_c = avg_c - _log1mexp(avg_c)
    log_odds_r = avg_r - _log1mexp(avg_r)
    nll = -avg_c.mean()
    ratio_term = -F.logsigmoid(log_odds_c - log_odds_r).mean()
    loss = nll + beta * ratio_term
    metrics = _metrics(log_odds_c, log_odds_r, chosen_logps, rejected_logps)
    metrics["nll"] = nll.detach()
    metrics["log_odds_ratio"] = (log_odds_c - log_odds_r).mean().detach()
    return loss, metrics


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor,
             kl_ref: torch.Tensor, *, beta: float, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> tuple[torch.Tensor, Metrics]:
    """Kahneman–Tversky Optimization (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect
    Theoretic Optimization"), for unpaired
    thumbs-up / thumbs-down data:

        r(x, y) = log π_θ(y|x) / π_ref(y|x),   z₀ = KL(π_θ(y'|x) ‖ π_ref(y'|x))
        v(x, y) = λ_D σ(β (r − z₀))  if y is desirable
                  λ_U σ(β (z₀ − r))  if y is undesirable
        L_KTO = E[ λ_y − v(x, y) ]

    z₀ (``kl_ref``) is a scalar the caller estimates from mismatched pairs (y' from another x); it is
    detached (no gradient flows through the reference point, as in the paper) and clamped at 0 (a KL
    is ≥ 0; a noisy batch estimate may not be). Shapes: policy_logps, ref_logps [N]; desirable [N]
    bool; kl_ref scalar. Metrics: rewards/chosen and rewards/rejected = mean β r over desirable and
    undesirable examples (0 when a batch has none), rewards/margin their difference, logps/chosen
    and logps/rejected likewise, "kl" = z₀.
    """
    good = desirable.bool()
    z0 = torch.as_tensor(kl_ref, dtype=policy_logps.dtype, device=policy_logps.device).detach().clamp(min=0)
    r = policy_logps - ref_logps
    v = torch.where(good, desirable_weight * torch.sigmoid(beta * (r - z0)),
                    undesirable_weight * torch.sigmoid(beta * (z0 - r)))
    lam = torch.where(good, torch.full_like(r, desirable_weight), torch.full_like(r, undesirable_weight))
    loss = (lam - v).mean()
    with torch.no_grad():
        n_good = good.sum().clamp(min=1)
        n_bad = (~good).sum().clamp(min=1)
        zero = torch.zeros_like(r)
        reward = beta * r
        chosen = torch.where(good, reward, zero).sum() / n_good
        rejected = torch.where(good, zero, reward).sum() / n_bad
        metrics = {"rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margin": chosen - rejected,
                   "logps/chosen": torch.where(good, policy_logps, zero).sum() / n_good,
                   "logps/rejected": torch.where(good, zero, policy_logps).sum() / n_bad,
                   "kl": z0}
    return loss, {k: v.detach() for k, v in metrics.items()}


DirectLoss = Callable[..., tuple[torch.Tensor, Metrics]]

DIRECT_LOSSES: dict[str, DirectLoss] = {
    "dpo": dpo_loss,
    "cdpo": cdpo_loss,
    "robust": robust_dpo_loss,
    "ipo": ipo_loss,
    "hinge": hinge_loss,
    "simpo": simpo_loss,
    "orpo": orpo_loss,
}


def get_direct_loss(name: str) -> DirectLoss:
    """The paired direct-alignment loss registered under ``name``."""
    try:
        return DIRECT_LOSSES[name]
    except KeyError:
        raise ConfigError(f"unknown direct-alignment loss '{name}'", where="loss",
                          fix=f"choose one of: {', '.join(DIRECT_LOSSES)}") from None
