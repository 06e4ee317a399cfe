"""Advantage estimators: GAE and returns (token level), group baselines (sequence level), DAPO helpers.

Token-level functions take ``[B, T]`` tensors where each row holds one sequence and ``mask`` marks
its valid (response) tokens. Masked positions are *skipped*: the trajectory is the row's valid tokens
in order, so left padding, right padding and masked holes (e.g. tool output inside a response) all
work, and masked positions come back as 0. A packed row holding several sequences must be split
first (the scan would otherwise carry value from one sequence into the previous one).

Sequence-level functions take ``[N]`` rewards with N = prompts × G, the G samples of a prompt
contiguous (``rewards.view(-1, G)`` is one prompt per row).
"""

from __future__ import annotations

import math

import torch

from posttrain.errors import ConfigError

__all__ = ["gae", "discounted_returns", "distillation_advantages", "turn_credit_advantages", "group_scale",
           "group_advantages", "rloo_advantages", "reinforce_advantages",
           "zero_variance_groups", "overlong_penalty", "best_of_n_kl", "expand_to_tokens"]


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 2:
        raise ConfigError(f"expected [B, T] tensors of one shape, got {shapes}")


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016, "High-Dimensional Continuous Control
    Using Generalized Advantage Estimation"):

        δ_t = r_t + γ V(s_{t+1}) − V(s_t),   Â_t = Σ_{l≥0} (γλ)^l δ_{t+l} = δ_t + γλ Â_{t+1}

    with V(s) = 0 after the last valid token (the episode ends at EOS). Returns
    (advantages, returns) with returns = advantages + values (the value-function targets; with
    λ = 1 they are the Monte-Carlo returns). Shapes: rewards, values, mask [B, T] (per-token rewards,
    e.g. the sequence reward on the last token minus a per-token KL); both outputs [B, T], 0 where
    masked. A backward scan over T, vectorised over B.
    """
    _check_same_shape(rewards=rewards, values=values, mask=mask)
    valid = mask.bool()
    values = values.detach()  # targets and advantages carry no gradient into the critic
    zero = torch.zeros_like(rewards[:, 0])
    next_value, next_adv = zero, zero  # V and Â of the next *valid* token (0 past the end)
    adv = torch.zeros_like(rewards)
    for t in range(rewards.shape[1] - 1, -1, -1):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a_t = delta + gamma * lam * next_adv
        v = valid[:, t]
        adv[:, t] = torch.where(v, a_t, zero)
        # A masked token is skipped: the carry passes through it unchanged.
        next_value = torch.where(v, values[:, t], next_value)
        next_adv = torch.where(v, a_t, next_adv)
    returns = torch.where(valid, adv + values, torch.zeros_like(adv))
    return adv, returns


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Reward-to-go G_t = Σ_{k≥0} γ^k r_{t+k} = r_t + γ G_{t+1} over the valid tokens of each row.

    Shapes: rewards, mask [B, T]; returns [B, T], 0 where masked (masked tokens are skipped).
    """
    _check_same_shape(rewards=rewards, mask=mask)
    valid = mask.bool()
    zero = torch.zeros_like(rewards[:, 0])
    carry = zero
    out = torch.zeros_like(rewards)
    for t in range(rewards.shape[1] - 1, -1, -1):
        g_t = rewards[:, t] + gamma * carry
        v = valid[:, t]
        out[:, t] = torch.where(v, g_t, zero)
        carry = torch.where(v, g_t, carry)
    return out


def distillation_advantages(student_logp: torch.Tensor, teacher_logp: torch.Tensor, mask: torch.Tensor,
                            gamma: float = 0.0) -> torch.Tensor:
    """On-policy distillation: per-token advantages from the reverse KL to a teacher on the student's own
    samples y ~ π_s (Agarwal et al. 2024, GKD; Thinking Machines 2025, "On-Policy Distillation").

        r_t = log π_T(y_t | y_<t) − log π_s(y_t | y_<t)          (one-sample estimate of −KL(π_s‖π_T) at t)
        A_t = Σ_{k≥0} γ^k r_{t+k}                                (γ = 0: A_t = r_t, the per-token form)

    Σ_t r_t estimates −KL(π_s‖π_T) of the whole sequence; with γ = 1, E[Σ_t A_t ∇log π_s(y_t)] is its exact
    gradient, and γ = 0 (Thinking Machines' choice) drops the future terms: lower variance, slightly
    biased. Both log-probs are detached inputs. Shapes [B, T]; 0 where masked.
    """
    _check_same_shape(student_logp=student_logp, teacher_logp=teacher_logp, mask=mask)
    rewards = (teacher_logp - student_logp) * mask
    return rewards if gamma == 0 else discounted_returns(rewards, mask, gamma)


def turn_credit_advantages(seq_adv: torch.Tensor, token_rewards: torch.Tensor, mask: torch.Tensor,
                           scale: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-turn episodes with a reward per turn: a token is not credited with the rewards of the turns
    before it (causality: its action cannot change them), the reward-to-go form of the policy gradient.

        R_i = Σ_k r_{i,k}   (the episode's return, what the sequence estimator Â_i was computed from)
        E_{i,t} = Σ_{k<t} r_{i,k} = R_i − Σ_{k≥t} r_{i,k}   (rewards earned before token t)
        A_{i,t} = Â_i − E_{i,t} / s_i

    i.e. R_i replaced by the reward-to-go in the estimator's numerator, the baseline unchanged (every
    estimator here is linear in r_i: GRPO's (r − mean)/s with s the group std, Dr. GRPO's, RLOO's
    and REINFORCE's with s = 1). Turn rewards sit on each turn's last sampled token; with one reward
    at the end E = 0 and A_{i,t} = Â_i. Shapes: seq_adv [N], token_rewards and mask [N, T], scale
    [N] or None (1); returns [N, T], 0 where masked.
    """
    _check_same_shape(token_rewards=token_rewards, mask=mask)
    earned_before = (token_rewards * mask).sum(dim=1, keepdim=True) - discounted_returns(token_rewards, mask, 1.0)
    s = torch.ones_like(seq_adv) if scale is None else scale
    return (seq_adv[:, None] - earned_before / s[:, None]) * mask


def group_scale(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """[N] the divisor GRPO's advantage used for each sample: its group's std + eps, or 1 where the group
    is constant (its Â is 0 and the divisor would be eps). Shapes: rewards [N] -> [N]."""
    g = _groups(rewards, group_size, need=2).double()
    s = torch.where(zero_variance_groups(rewards, group_size)[:, None], torch.ones_like(g),
                    g.std(dim=1, keepdim=True) + eps)
    return s.reshape(-1).to(rewards.dtype)


def _groups(rewards: torch.Tensor, group_size: int, need: int = 1) -> torch.Tensor:
    if rewards.dim() != 1:
        raise ConfigError(f"rewards must be [N], got shape {tuple(rewards.shape)}")
    if group_size < need:
        raise ConfigError(f"group_size must be >= {need} here, got {group_size}", where="group_size")
    if rewards.numel() % group_size:
        raise ConfigError(f"{rewards.numel()} rewards do not split into groups of {group_size}",
                          where="group_size", fix="N must be prompts × group_size, samples of a prompt contiguous")
    return rewards.view(-1, group_size)


def group_advantages(rewards: torch.Tensor, group_size: int, scale_by_std: bool = True,
                     eps: float = 1e-6, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Group-relative advantages.

    GRPO (Shao et al. 2024, "DeepSeekMath", §4.1.2):   A_i = (r_i − mean(r_{1..G})) / (std(r_{1..G}) + eps)
    Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"), ``scale_by_std=False``:
                                                       A_i = r_i − mean(r_{1..G})

    std is the *sample* standard deviation (Bessel, divisor G − 1), as TRL's GRPOTrainer computes it
    with ``Tensor.std``; the paper does not say. A group whose rewards are all equal gets A = 0
    exactly (:func:`zero_variance_groups`, over the ``valid`` members when given): the statistics are
    computed in fp64, and such groups are zeroed, because an fp32 mean of equal values can be one
    rounding step off and ``/ (std + eps)`` would turn that into a same-sign advantage for the group.
    Shapes: rewards [N] (N = prompts × G, groups contiguous), valid [N] bool or None; returns [N] in
    the rewards' dtype.
    """
    g = _groups(rewards, group_size, need=2 if scale_by_std else 1).double()
    centred = g - g.mean(dim=1, keepdim=True)
    if scale_by_std:
        centred = centred / (g.std(dim=1, keepdim=True) + eps)
    flat = zero_variance_groups(rewards, group_size, valid)
    centred = centred.masked_fill(flat[:, None], 0.0)
    return centred.reshape(-1).to(rewards.dtype)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE Leave-One-Out (Kool et al. 2019, "Buy 4 REINFORCE Samples, Get a Baseline for Free!";
    Ahmadian et al. 2024, "Back to Basics"):

        A_i = r_i − 1/(G−1) Σ_{j≠i} r_j    ( = G/(G−1) · (r_i − mean r), the Dr. GRPO advantage rescaled)

    Shapes: rewards [N] (groups of ``group_size`` ≥ 2, contiguous); returns [N] (computed in fp64, so
    equal rewards give exactly 0).
    """
    g = _groups(rewards, group_size, need=2).double()
    others = (g.sum(dim=1, keepdim=True) - g) / (group_size - 1)
    return (g - others).reshape(-1).to(rewards.dtype)


def reinforce_advantages(rewards: torch.Tensor, baseline: torch.Tensor | float = 0.0) -> torch.Tensor:
    """REINFORCE with a baseline (Williams 1992): A = r − b. Shapes: rewards [N]; baseline scalar or
    broadcastable to [N] (e.g. a running mean of rewards); returns [N]."""
    return rewards - baseline


def zero_variance_groups(rewards: torch.Tensor, group_size: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """[N / G] bool: groups whose rewards are all equal (max == min, exactly), so every group-relative
    advantage is 0 and the group adds no policy gradient. DAPO's dynamic sampling (Yu et al. 2025,
    §3.2) drops them. With ``valid`` [N] bool only the valid members count (a group with fewer than
    two valid members is constant). This is the one definition every caller uses.
    Shapes: rewards [N]; returns [N / group_size]."""
    g = _groups(rewards, group_size)
    if valid is None:
        return g.amax(dim=1) == g.amin(dim=1)
    v = valid.view(-1, group_size).bool()
    inf = torch.tensor(float("inf"), dtype=g.dtype, device=g.device)
    hi = torch.where(v, g, -inf).amax(dim=1)
    lo = torch.where(v, g, inf).amin(dim=1)
    return (hi == lo) | (v.sum(dim=1) < 2)


def overlong_penalty(lengths: torch.Tensor, max_len: int, cache_len: int) -> torch.Tensor:
    """DAPO soft overlong punishment (Yu et al. 2025, "DAPO", §3.4), added to the task reward:

        R(L) = 0                              if L ≤ L_max − L_cache
             = ((L_max − L_cache) − L) / L_cache   if L_max − L_cache < L ≤ L_max
             = −1                             if L > L_max

    Shapes: lengths [N] (response token counts); returns [N] float (fp32 for integer lengths).
    """
    if not 0 < cache_len <= max_len:
        raise ConfigError(f"need 0 < cache_len <= max_len, got cache_len={cache_len}, max_len={max_len}",
                          where="overlong_cache_len")
    length = lengths.to(torch.get_default_dtype()) if not lengths.is_floating_point() else lengths
    start = max_len - cache_len
    ramp = (start - length) / cache_len
    return torch.where(length <= start, torch.zeros_like(length),
                       torch.where(length <= max_len, ramp, torch.full_like(length, -1.0)))


def best_of_n_kl(n: int) -> float:
    """KL(π_BoN ‖ π) of best-of-n sampling as usually quoted: log n − (n − 1)/n (Stiennon et al. 2020,
    "Learning to summarize from human feedback", appendix; Gao et al. 2023 use it to put BoN and RL on
    one KL axis). Beirami et al. 2024 show it is an upper bound, tight when rewards rarely tie."""
    if n < 1:
        raise ConfigError(f"best-of-n needs n >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def expand_to_tokens(adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Broadcast a sequence advantage to its tokens (the bandit framing): out[i, t] = A_i on valid
    tokens, 0 elsewhere. Shapes: adv [B], mask [B, T]; returns [B, T] in adv's dtype."""
    if adv.dim() != 1 or mask.dim() != 2 or adv.shape[0] != mask.shape[0]:
        raise ConfigError(f"expected adv [B] and mask [B, T], got {tuple(adv.shape)} and {tuple(mask.shape)}")
    full = adv[:, None].expand(mask.shape)
    return torch.where(mask.bool(), full, torch.zeros((), dtype=adv.dtype, device=adv.device))
