"""Policy-gradient losses for online RL (PPO, GRPO, DAPO, Dr. GRPO, GSPO, CISPO), the value loss, and the
loss aggregations that distinguish several of them.

Inputs are [B, T] per-token tensors over the response tokens: ``logp`` = log π_θ(a_t|s_t) (with
gradient), ``old_logp`` = log π_θ_old(a_t|s_t) from the policy that sampled the batch (no gradient),
``advantages`` already broadcast to tokens (``expand_to_tokens`` or GAE), ``mask`` 1 on valid
tokens. The per-token importance ratio is ρ_t = π_θ(a_t|s_t) / π_θ_old(a_t|s_t).

Each loss is −(objective), aggregated by ``aggregation`` (see ``aggregate``), and returns
(loss, metrics) with detached scalar metrics:
    clip_frac   share of valid tokens whose gradient the clip removed (or, for CISPO, whose weight it changed)
    ratio_mean / ratio_max / ratio_min   of the importance ratio over valid tokens
    approx_kl   mean k3 estimate of KL(π_old ‖ π_θ) over valid tokens: (ρ − 1) − log ρ
Masked positions may hold any finite or infinite value: they are selected away before use.
Every loss computes in fp32 (or fp64 when given fp64), whatever its inputs' dtype: GSPO's 3e-4 clip band
is finer than bf16 resolves. A log-ratio so large that exp overflows is harmless on tokens whose
clipped (constant) branch is taken: their log-ratio is capped before exp (:func:`_capped_log_ratio`).
``is_weight`` (optional, [B, T], no gradient) multiplies every token's term before aggregation: the
rollout-mismatch correction of :func:`truncated_is_weight`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from posttrain.errors import ConfigError
from posttrain.kl import get_kl_estimator
from posttrain.masked import masked_sum, masked_var

__all__ = ["aggregate", "AGGREGATIONS", "ppo_clip_loss", "gspo_loss", "cispo_loss", "kl_penalty_in_loss",
           "truncated_is_weight",
           "value_loss", "explained_variance", "POLICY_LOSSES", "get_policy_loss"]

Metrics = dict[str, torch.Tensor]

# ----------------------------------------------------------------------------- aggregation


def _seq_mean_token_mean(per_token: torch.Tensor, mask: torch.Tensor, max_len: int | None) -> torch.Tensor:
    lengths = mask.bool().sum(-1).clamp(min=1).to(per_token.dtype)
    return (masked_sum(per_token, mask, dim=-1) / lengths).mean()


def _token_mean(per_token: torch.Tensor, mask: torch.Tensor, max_len: int | None) -> torch.Tensor:
    return masked_sum(per_token, mask) / mask.bool().sum().clamp(min=1).to(per_token.dtype)


def _seq_mean_token_sum(per_token: torch.Tensor, mask: torch.Tensor, max_len: int | None) -> torch.Tensor:
    return masked_sum(per_token, mask) / per_token.shape[0]


def _seq_mean_token_sum_norm(per_token: torch.Tensor, mask: torch.Tensor, max_len: int | None) -> torch.Tensor:
    length = per_token.shape[-1] if max_len is None else max_len
    return masked_sum(per_token, mask) / (per_token.shape[0] * length)


AGGREGATIONS: dict[str, Callable[[torch.Tensor, torch.Tensor, int | None], torch.Tensor]] = {
    "seq_mean_token_mean": _seq_mean_token_mean,          # GRPO
    "token_mean": _token_mean,                            # DAPO
    "seq_mean_token_sum_norm": _seq_mean_token_sum_norm,  # Dr. GRPO
    "seq_mean_token_sum": _seq_mean_token_sum,            # RLOO / REINFORCE
}


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str, max_len: int | None = None) -> torch.Tensor:
    """Reduce a per-token loss ℓ_{i,t} [B, T] to a scalar (Lambert, "RLHF", ch. 6, Loss Aggregation):

        "seq_mean_token_mean"     1/B Σ_i 1/|a_i| Σ_t ℓ_{i,t}        per sequence (GRPO, Shao et al. 2024)
        "token_mean"              Σ_{i,t} ℓ_{i,t} / Σ_i |a_i|        per token (DAPO, Yu et al. 2025)
        "seq_mean_token_sum_norm" 1/B Σ_i 1/L_max Σ_t ℓ_{i,t}        fixed length (Dr. GRPO, Liu et al. 2025)
        "seq_mean_token_sum"      1/B Σ_i Σ_t ℓ_{i,t}                sequence log-prob (RLOO, Ahmadian et al. 2024;
                                                                     REINFORCE; TRL's RLOOTrainer)

    |a_i| = valid tokens of row i; L_max = ``max_len`` (the generation budget, constant over training)
    or T when None. Per sequence gives tokens of short responses more weight; token mean and the
    fixed-length sum weight every token equally; the plain sum is the REINFORCE gradient of the whole
    sequence's log-probability (its scale grows with response length). Normalisers are local to this batch: under gradient accumulation per-token
    means of micro-batches are not the per-token mean of the step. A row with no valid token counts
    as a sequence with loss 0.
    """
    try:
        fn = AGGREGATIONS[mode]
    except KeyError:
        raise ConfigError(f"unknown loss aggregation '{mode}'", where="aggregation",
                          fix=f"choose one of: {', '.join(AGGREGATIONS)}") from None
    return fn(per_token, mask, max_len)


# ----------------------------------------------------------------------------- helpers


def _check_clip(clip_low: float, clip_high: float) -> None:
    if not 0.0 <= clip_low <= 1.0 or clip_high < 0.0:
        raise ConfigError(f"need 0 <= clip_low <= 1 and clip_high >= 0, got clip_low={clip_low}, "
                          f"clip_high={clip_high}", where="clip_low/clip_high")


def _fp32(*xs: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Half-precision floating inputs -> fp32 (the gradient flows back to the original dtype)."""
    return [x.float() if x is not None and x.is_floating_point() and x.element_size() < 4 else x for x in xs]


def _capped_log_ratio(log_ratio: torch.Tensor, advantages: torch.Tensor, clip_low: float, clip_high: float,
                      dual_clip: float | None = None) -> torch.Tensor:
    """``log_ratio`` with the tokens whose objective is constant (A = 0; A > 0 above 1 + ε_high; A < 0
    below 1 − ε_low, or above c with the dual clip) capped just past their clip point, detached.

    Their value is unchanged (the clip returns the same constant) and they carry no gradient either
    way; without the cap exp(log ρ) overflows to inf above ~88 (fp32) and inf · 0 makes the gradient NaN."""
    with torch.no_grad():
        hi = math.log1p(clip_high)
        const = (advantages == 0) | ((advantages > 0) & (log_ratio > hi))
        if clip_low < 1.0:
            const |= (advantages < 0) & (log_ratio < math.log1p(-clip_low))
        top = hi
        if dual_clip is not None:
            const |= (advantages < 0) & (log_ratio > math.log(dual_clip))
            top = max(top, math.log(dual_clip))
        capped = log_ratio.detach().clamp(max=top + 1.0)
    return torch.where(const, capped, log_ratio)


def _zero_masked(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    # Replaces padding by 0 *before* exp/log so a garbage value there cannot become inf·0 = nan.
    return torch.where(valid, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _ratio_metrics(log_ratio: torch.Tensor, valid: torch.Tensor) -> Metrics:
    with torch.no_grad():
        ratio = torch.exp(log_ratio)
        inf = torch.tensor(float("inf"), dtype=ratio.dtype, device=ratio.device)
        return {"ratio_mean": _token_mean(ratio, valid, None),
                "ratio_max": torch.where(valid, ratio, -inf).amax(),
                "ratio_min": torch.where(valid, ratio, inf).amin(),
                "approx_kl": _token_mean(torch.expm1(log_ratio) - log_ratio, valid, None)}


def _clipped_objective(ratio: torch.Tensor, advantages: torch.Tensor, clip_low: float, clip_high: float,
                       dual_clip: float | None, valid: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
    """Per-token −min(ρA, clip(ρ, 1−ε_low, 1+ε_high)A) (optionally dual-clipped) and clip fractions."""
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    with torch.no_grad():
        # The min picks the clipped (constant) branch: ρ above 1+ε with A > 0, below 1−ε with A < 0.
        cut = ((ratio > 1.0 + clip_high) & (advantages > 0)) | ((ratio < 1.0 - clip_low) & (advantages < 0))
        metrics = {"clip_frac": _token_mean(cut.to(ratio.dtype), valid, None)}
    if dual_clip is not None:
        # Dual clip (Ye et al. 2020): for A < 0 the objective is also bounded below by c·A, so a
        # huge ratio on a bad token cannot produce an unbounded update.
        bound = -dual_clip * advantages
        dual = (advantages < 0) & (per_token > bound)
        per_token = torch.where(advantages < 0, torch.minimum(per_token, bound), per_token)
        with torch.no_grad():
            metrics["dual_clip_frac"] = _token_mean(dual.to(ratio.dtype), valid, None)
    return per_token, metrics


# ----------------------------------------------------------------------------- policy losses


def ppo_clip_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                  clip_low: float, clip_high: float, aggregation: str,
                  max_len: int | None = None, dual_clip: float | None = None,
                  is_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, Metrics]:
    """PPO clipped surrogate (Schulman et al. 2017, "Proximal Policy Optimization Algorithms", eq. 7),
    with DAPO's decoupled clip range (Yu et al. 2025, §3.1 "Clip-Higher"):

        L = −agg_t[ min( ρ_t A_t, clip(ρ_t, 1 − ε_low, 1 + ε_high) A_t ) ],   ρ_t = π_θ(a_t|s_t)/π_old(a_t|s_t)

    A > 0 and ρ > 1 + ε_high, or A < 0 and ρ < 1 − ε_low: the term is constant (no gradient).
    Otherwise it is ρA with gradient ρA ∇log π. GRPO is this loss with group advantages and
    aggregation "seq_mean_token_mean"; DAPO uses "token_mean" and ε_high = 0.28; Dr. GRPO uses
    "seq_mean_token_sum_norm". ``dual_clip`` = c > 1 adds the dual clip of Ye et al. 2020 ("Mastering
    Complex Control in MOBA Games with Deep RL"): for A < 0 the loss is min(·, −cA).
    Shapes: all inputs [B, T]. Returns (loss, metrics; see the module docstring).
    """
    _check_clip(clip_low, clip_high)
    if dual_clip is not None and dual_clip <= 1.0:
        raise ConfigError(f"dual_clip must be > 1, got {dual_clip}", where="dual_clip")
    logp, old_logp, advantages, is_weight = _fp32(logp, old_logp, advantages, is_weight)
    valid = mask.bool()
    log_ratio = _zero_masked(logp - old_logp, valid)
    advantages = _zero_masked(advantages, valid)
    ratio = torch.exp(_capped_log_ratio(log_ratio, advantages, clip_low, clip_high, dual_clip))
    per_token, metrics = _clipped_objective(ratio, advantages, clip_low, clip_high, dual_clip, valid)
    if is_weight is not None:
        per_token = per_token * is_weight.detach()
    loss = aggregate(per_token, valid, aggregation, max_len)
    metrics.update(_ratio_metrics(log_ratio.detach(), valid))
    return loss, metrics


def gspo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
              clip_low: float, clip_high: float, aggregation: str,
              max_len: int | None = None,
              is_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, Metrics]:
    """Group Sequence Policy Optimization (Zheng et al. 2025, "GSPO"), token-level form (GSPO-token):

        s_i = (π_θ(y_i|x) / π_old(y_i|x))^{1/|y_i|} = exp( 1/|y_i| Σ_t log ρ_{i,t} )
        s_{i,t} = sg[s_i] · π_θ(y_{i,t}|·) / sg[π_θ(y_{i,t}|·)]         (value s_i, gradient s_i ∇log π_θ)
        L = −1/G Σ_i 1/|y_i| Σ_t min( s_{i,t} A_{i,t}, clip(s_{i,t}, 1 − ε_low, 1 + ε_high) A_{i,t} )

    The ratio, and hence the clip, is per sequence; with a sequence advantage broadcast to tokens this
    equals sequence-level GSPO. The paper's ε = (3e-4, 4e-4) (sequence ratios sit far closer to 1 than
    token ratios) is the ``gspo`` variant's default; the hyper-parameters here are required, so the
    variant table is their one source. Metrics are over valid tokens, each carrying its sequence's s_i.
    Shapes: all inputs [B, T].
    """
    _check_clip(clip_low, clip_high)
    logp, old_logp, advantages, is_weight = _fp32(logp, old_logp, advantages, is_weight)
    valid = mask.bool()
    log_ratio = _zero_masked(logp - old_logp, valid)
    advantages = _zero_masked(advantages, valid)
    lengths = valid.sum(-1).clamp(min=1).to(log_ratio.dtype)
    seq_log_ratio = log_ratio.sum(-1) / lengths  # log s_i, [B]
    # Value s_i at every token, gradient s_i · ∇ log π_θ(y_{i,t}) (the "sg" construction).
    tok = _zero_masked(logp - logp.detach(), valid)
    log_s = seq_log_ratio.detach()[:, None] + tok
    ratio = torch.exp(_capped_log_ratio(log_s, advantages, clip_low, clip_high))
    per_token, metrics = _clipped_objective(ratio, advantages, clip_low, clip_high, None, valid)
    if is_weight is not None:
        per_token = per_token * is_weight.detach()
    loss = aggregate(per_token, valid, aggregation, max_len)
    metrics.update(_ratio_metrics(log_s.detach(), valid))
    metrics["approx_kl"] = _ratio_metrics(log_ratio.detach(), valid)["approx_kl"]  # token-level k3
    return loss, metrics


def cispo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
               clip_low: float, clip_high: float, aggregation: str,
               max_len: int | None = None,
               is_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, Metrics]:
    """Clipped IS-weight Policy Optimization (MiniMax 2025, "MiniMax-M1: Scaling Test-Time Compute
    Efficiently with Lightning Attention"):

        L = −1/Σ_i|a_i| Σ_{i,t} sg( clip(ρ_{i,t}, 1 − ε_low, 1 + ε_high) ) · A_{i,t} · log π_θ(a_{i,t}|s_{i,t})

    The importance weight is clipped and detached, but every token keeps its gradient (PPO's clip
    would zero it). The paper sets no lower bound (ε_low large) and tunes ε_high; the ``cispo`` variant
    uses ε_low = 1 (weights ≥ 0, i.e. no lower clip) and ε_high = 4. "clip_frac" counts tokens whose
    weight was clipped. Shapes: all inputs [B, T].
    """
    _check_clip(clip_low, clip_high)
    logp, old_logp, advantages, is_weight = _fp32(logp, old_logp, advantages, is_weight)
    valid = mask.bool()
    log_ratio = _zero_masked(logp - old_logp, valid)
    advantages = _zero_masked(advantages, valid)
    with torch.no_grad():
        ratio = torch.exp(log_ratio)
        weight = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
        cut = (ratio > 1.0 + clip_high) | (ratio < 1.0 - clip_low)
    per_token = -weight * advantages * _zero_masked(logp, valid)
    if is_weight is not None:
        per_token = per_token * is_weight.detach()
    loss = aggregate(per_token, valid, aggregation, max_len)
    metrics = {"clip_frac": _token_mean(cut.to(ratio.dtype), valid, None)}
    metrics.update(_ratio_metrics(log_ratio.detach(), valid))
    return loss, metrics


def truncated_is_weight(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor,
                        cap: float = 2.0) -> tuple[torch.Tensor, Metrics]:
    """Truncated importance sampling for the rollout engine's mismatch (TIS; Yao et al. 2025, "Your
    Efficient RL Framework Secretly Brings You Off-Policy RL Training"; rlhf-book ch. 6):

        w_t = min( π_old(a_t|s_t) / π_rollout(a_t|s_t), C ),   log-ratio clamped to [−10, 10]

    π_old is the trainer's probability before the update (what the PPO ratio ρ_t refers to);
    π_rollout is the probability the engine sampled a_t with (another dtype, other kernels). The
    objective becomes E[min(ρA, clip(ρ)A) · w]: the policy gradient of samples that came from
    π_rollout, re-weighted towards π_old, with C bounding the variance (Open Instruct uses C = 2).
    With an exact engine w = 1. Shapes: [B, T] each. Returns (w [B, T], 1 where masked, no
    gradient; metrics ``tis/weight_mean`` and ``tis/capped_frac`` over valid tokens)."""
    if cap <= 0:
        raise ConfigError(f"the TIS cap must be positive, got {cap}", where="rollout.tis_cap")
    old_logp, rollout_logp = _fp32(old_logp, rollout_logp)
    valid = mask.bool()
    with torch.no_grad():
        log_w = _zero_masked(old_logp - rollout_logp, valid).clamp(-10.0, 10.0)
        raw = torch.exp(log_w)
        w = raw.clamp(max=cap)
        metrics = {"tis/weight_mean": _token_mean(w, valid, None),
                   "tis/capped_frac": _token_mean((raw > cap).to(w.dtype), valid, None)}
    return w, metrics


def kl_penalty_in_loss(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                       estimator: str = "k3") -> torch.Tensor:
    """Per-token KL(π_θ ‖ π_ref) estimate to add to the loss as β · aggregate(·) (GRPO, Shao et al.
    2024, uses k3: π_ref/π_θ − log(π_ref/π_θ) − 1). The gradient flows through ``logp`` only
    (for k3: (1 − π_ref/π_θ) ∇log π_θ). Shapes: [B, T] each; returns [B, T], 0 where masked."""
    logp, ref_logp = _fp32(logp, ref_logp)
    valid = mask.bool()
    est = get_kl_estimator(estimator)
    return _zero_masked(est(_zero_masked(logp, valid), _zero_masked(ref_logp, valid)), valid)


POLICY_LOSSES: dict[str, Callable[..., tuple[torch.Tensor, Metrics]]] = {
    "ppo": ppo_clip_loss,
    "gspo": gspo_loss,
    "cispo": cispo_loss,
}


def get_policy_loss(name: str) -> Callable[..., tuple[torch.Tensor, Metrics]]:
    """The policy loss registered under ``name`` ("ppo", "gspo" or "cispo")."""
    try:
        return POLICY_LOSSES[name]
    except KeyError:
        raise ConfigError(f"unknown policy loss '{name}'", where="policy_loss",
                          fix=f"choose one of: {', '.join(POLICY_LOSSES)}") from None


# ----------------------------------------------------------------------------- value function


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 − Var[R − V] / Var[R] over valid tokens (detached scalar): 1 = perfect critic, 0 = no better
    than predicting the mean return, < 0 = worse. nan when the returns have zero variance (or fewer
    than 2 valid tokens)."""
    with torch.no_grad():
        valid = mask.bool()
        return (1.0 - masked_var(returns - values, valid) / masked_var(returns, valid)).detach()


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, *,
               clip: float | None = None, aggregation: str = "token_mean",
               max_len: int | None = None) -> tuple[torch.Tensor, Metrics]:
    """Critic regression loss with optional PPO value clipping (Schulman et al. 2017 baselines code;
    Huang et al. 2022, "The 37 Implementation Details of Proximal Policy Optimization"):

        V_clip = V_old + clip(V − V_old, −c, c)
        L = agg_t[ ½ max( (V − R)², (V_clip − R)² ) ]          (½ (V − R)² when clip is None)

    Shapes: values (with gradient), old_values (from the rollout), returns (targets, e.g. GAE
    returns), mask: [B, T]. Metrics: "value_clip_frac" share of valid tokens where the clipped error
    is the larger (their gradient is 0), "explained_variance" of the current values.
    """
    valid = mask.bool()
    values, old_values, returns = (_zero_masked(x, valid) for x in _fp32(values, old_values, returns))
    err = (values - returns) ** 2
    if clip is None:
        per_token = 0.5 * err
        frac = torch.zeros((), dtype=values.dtype, device=values.device)
    else:
        if clip <= 0:
            raise ConfigError(f"value clip must be positive or None, got {clip}", where="value_clip")
        v_clip = old_values + (values - old_values).clamp(-clip, clip)
        err_clip = (v_clip - returns) ** 2
        per_token = 0.5 * torch.maximum(err, err_clip)
        with torch.no_grad():
            frac = _token_mean((err_clip > err).to(values.dtype), valid, None)
    loss = aggregate(per_token, valid, aggregation, max_len)
    return loss, {"value_clip_frac": frac.detach(), "explained_variance": explained_variance(values, returns, valid)}
