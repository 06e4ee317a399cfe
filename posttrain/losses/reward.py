"""Reward-model losses: pairwise Bradley–Terry (with margin and ties), K-wise pairs, Plackett–Luce,
and the reward-centering regulariser.

Rewards are scalars r_θ(x, y) from a reward head; F.logsigmoid / softplus keep every term finite
for large reward differences (−log σ(d) = softplus(−d)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from posttrain.errors import ConfigError

__all__ = ["bradley_terry_loss", "kwise_pairwise_loss", "plackett_luce_loss", "reward_centering_loss"]


def _safe_mean(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    # Mean over the kept entries; 0 (not nan) when there are none, without a host sync.
    keep = keep.bool()
    return torch.where(keep, x, torch.zeros_like(x)).sum() / keep.sum().clamp(min=1)


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor,
                       margin: torch.Tensor | float | None = None,
                       target: torch.Tensor | float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley–Terry preference loss (Bradley & Terry 1952; InstructGPT, Ouyang et al. 2022, eq. 1),
    with the Llama 2 margin (Touvron et al. 2023, §3.2.2, eq. 2) and a soft target:

        d_i = r_θ(x, y_c) − r_θ(x, y_r) − m_i
        L = (1/N) Σ_i −[ t_i log σ(d_i) + (1 − t_i) log σ(−d_i) ]

    t = 1 (default) is the usual −log σ(r_c − r_r − m). t = 0.5 is a tie: the likelihood of half a
    win each way, minimised at d = 0, so a tie pulls the two rewards together and is never scored
    as a win. Use m = 0 for ties (a margin would shift the tie's optimum to r_c − r_r = m).

    Shapes: r_chosen, r_rejected [N]; margin, target [N] or scalars. Returns (loss, metrics):
    "accuracy" share of non-tie pairs (t ≠ 0.5) ranked the labelled way, i.e. r_c > r_r when t > 0.5
    (0 if there are none); "margin" mean(r_c − r_r); "chosen" mean r_c; "rejected" mean r_r.
    """
    diff = r_chosen - r_rejected
    d = diff if margin is None else diff - margin
    if target is None:
        loss = -F.logsigmoid(d).mean()
        decided = torch.ones_like(diff, dtype=torch.bool)
        correct = diff > 0
    else:
        t = torch.as_tensor(target, dtype=d.dtype, device=d.device)
        loss = -(t * F.logsigmoid(d) + (1 - t) * F.logsigmoid(-d)).mean()
        t = t.expand_as(diff)
        decided = t != 0.5
        correct = (diff > 0) == (t > 0.5)
    with torch.no_grad():
        metrics = {"accuracy": _safe_mean(correct.to(diff.dtype), decided),
                   "margin": diff.mean(), "chosen": r_chosen.mean(), "rejected": r_rejected.mean()}
    return loss, {k: v.detach() for k, v in metrics.items()}


def kwise_pairwise_loss(rewards: torch.Tensor, ranks: torch.Tensor,
                        mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """K-wise comparisons as all their pairs (InstructGPT, Ouyang et al. 2022, eq. 1):

        L = (1/N) Σ_x 1/C(K_x, 2) Σ_{pairs (a, b) of x} −log σ(r_θ(x, y_a) − r_θ(x, y_b))

    where y_a is ranked better than y_b. A tied pair (equal ranks) uses the t = 0.5 form
    −½[log σ(d) + log σ(−d)]. Each prompt counts once however many candidates it has (its pairs are
    scaled by 1/C(K_x, 2), K_x its valid candidates); the mean is over prompts with K_x ≥ 2.

    Shapes: rewards, ranks, mask [N, K]; ranks 0 = best (any numeric dtype, equal = tie); mask marks
    valid candidates (padding may hold anything). Returns (loss, metrics): "accuracy" share of non-tie
    pairs with r_better > r_worse, "margin" mean r_better − r_worse over them.
    """
    if rewards.dim() != 2 or ranks.shape != rewards.shape or mask.shape != rewards.shape:
        raise ConfigError(f"expected rewards, ranks and mask of one shape [N, K], got "
                          f"{tuple(rewards.shape)}, {tuple(ranks.shape)}, {tuple(mask.shape)}")
    valid = mask.bool()
    # Padding may be nan/inf; zeroing it keeps every computed term finite (and its gradient 0).
    r = torch.where(valid, rewards, torch.zeros_like(rewards))
    diff = r[:, :, None] - r[:, None, :]  # [N, K, K]: r_a − r_b
    both = valid[:, :, None] & valid[:, None, :]
    better = both & (ranks[:, :, None] < ranks[:, None, :])  # a ranked above b
    k = rewards.shape[1]
    upper = torch.ones(k, k, dtype=torch.bool, device=rewards.device).triu(1)
    tie = both & (ranks[:, :, None] == ranks[:, None, :]) & upper  # each unordered tied pair once
    pair_loss = torch.where(better, F.softplus(-diff), torch.zeros_like(diff))
    pair_loss = pair_loss + torch.where(tie, 0.5 * (F.softplus(-diff) + F.softplus(diff)), torch.zeros_like(diff))
    n_pairs = (better.sum((1, 2)) + tie.sum((1, 2))).to(r.dtype)  # = C(K_x, 2)
    per_prompt = pair_loss.sum((1, 2)) / n_pairs.clamp(min=1)
    loss = _safe_mean(per_prompt, n_pairs > 0)
    with torch.no_grad():
        metrics = {"accuracy": _safe_mean((diff > 0).to(r.dtype), better), "margin": _safe_mean(diff, better)}
    return loss, {k: v.detach() for k, v in metrics.items()}


def plackett_luce_loss(rewards: torch.Tensor, order: torch.Tensor,
                       mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Plackett–Luce negative log-likelihood of a full ranking (Plackett 1975; Luce 1959; used for
    K-wise reward models by Starling, Zhu et al. 2023):

        P(σ | x) = Π_k exp r(x, y_{σ(k)}) / Σ_{j ≥ k} exp r(x, y_{σ(j)})
        L = (1/N) Σ_x −Σ_k [ r_{σ(k)} − logsumexp_{j ≥ k} r_{σ(j)} ]   (the last term is 0)

    Shapes: rewards [N, K]; order [N, K] candidate indices best → worst; mask [N, K] valid candidates,
    indexed like ``rewards`` (invalid candidates are left out of every sum wherever they sit in
    ``order``). The mean is over prompts with at least 2 valid candidates. With K = 2 this is the
    Bradley–Terry loss. Returns (loss, metrics): "accuracy" share of consecutive ranked pairs
    (σ(k), σ(k+1)) with r_{σ(k)} > r_{σ(k+1)}.
    """
    if rewards.dim() != 2 or order.shape != rewards.shape or mask.shape != rewards.shape:
        raise ConfigError(f"expected rewards, order and mask of one shape [N, K], got "
                          f"{tuple(rewards.shape)}, {tuple(order.shape)}, {tuple(mask.shape)}")
    order = order.long()
    valid = mask.bool().gather(1, order)
    s = rewards.gather(1, order)  # rewards in ranked order
    # A very negative finite fill (not −inf): exp underflows to 0 and no gradient turns into nan.
    fill = torch.finfo(s.dtype).min / 4
    s_in = torch.where(valid, s, torch.full_like(s, fill))
    suffix_lse = torch.logcumsumexp(s_in.flip(1), dim=1).flip(1)  # logsumexp_{j ≥ k}
    terms = torch.where(valid, s_in - suffix_lse, torch.zeros_like(s))
    n_valid = valid.sum(1)
    loss = _safe_mean(-terms.sum(1), n_valid >= 2)
    with torch.no_grad():
        # consecutive valid pairs in order: compact the valid rewards to the front first
        pos = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)
        sv = s.gather(1, pos)
        vv = valid.gather(1, pos)
        pairs = vv[:, :-1] & vv[:, 1:]
        acc = _safe_mean((sv[:, :-1] > sv[:, 1:]).to(s.dtype), pairs)
    return loss, {"accuracy": acc.detach()}


def reward_centering_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor,
                          coef: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Auxiliary loss that centres rewards near 0 (Eisenstein et al. 2023, "Helping or Herding?
    Reward Model Ensembles Mitigate but do not Eliminate Reward Hacking"):

        L = η · (1/N) Σ_i (r_θ(x, y_c) + r_θ(x, y_r))²

    BT is invariant to adding a constant per prompt; this pins the free offset so rewards from
    different prompts (and ensemble members) are comparable. Shapes: [N] each. Returns
    (loss, {"reward_sum": mean(r_c + r_r), detached}).
    """
    s = r_chosen + r_rejected
    return coef * (s ** 2).mean(), {"reward_sum": s.mean().detach()}
