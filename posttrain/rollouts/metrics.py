"""Rollout and KL metrics of one RL step (host floats, computed once per step), and how several
optimizer steps' metrics merge into one logged row. Every name is defined in docs/metrics.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from posttrain.advantages import zero_variance_groups
from posttrain.kl import get_kl_estimator

if TYPE_CHECKING:  # experience.py imports this module
    from posttrain.rollouts.experience import Experience


def group_std_zero_frac(scores: torch.Tensor, group_size: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Share of groups whose (valid) rewards are all equal: their group-relative advantage is 0."""
    if group_size < 2 or scores.numel() % group_size:
        return torch.tensor(float("nan"))
    return zero_variance_groups(scores, group_size, valid).float().mean()


def rollout_metrics(exp: Experience) -> dict[str, float]:
    """reward/*, response/* of one batch (host floats, once per step)."""
    if not len(exp):
        return {"reward/mean": float("nan"), "batch/rollouts": 0.0}
    s = exp.scores[exp.valid] if exp.valid.any() else exp.scores
    out = {"reward/mean": float(s.mean()), "reward/std": float(s.std()) if s.numel() > 1 else 0.0,
           "response/length_mean": float(exp.lengths.float().mean()),
           "response/truncated_frac": sum(f == "length" for f in exp.finish) / len(exp),
           "response/invalid_frac": float((~exp.valid).float().mean()), "batch/rollouts": float(len(exp))}
    for k, v in exp.components.items():
        ok = ~torch.isnan(v)
        if ok.any():
            out[f"reward/{k}"] = float(v[ok].mean())
    return out


def sequence_kl(exp: Experience, estimator: str) -> torch.Tensor:
    """[N] Σ_t KL_t of each rollout under π_old (the policy that sampled it) and the reference."""
    return (get_kl_estimator(estimator)(exp.old_logp, exp.ref_logp) * exp.mask).sum(1)


def kl_metrics(exp: Experience, estimator: str) -> dict[str, float]:
    """``kl``: mean over rollouts of Σ_t (log π − log π_ref) (the sequence KL, nats); ``kl/per_token``:
    the configured estimator's mean over tokens."""
    valid = exp.mask.sum(1) > 0
    if not valid.any():
        return {}
    seq = ((exp.old_logp - exp.ref_logp) * exp.mask).sum(1)
    tok = (get_kl_estimator(estimator)(exp.old_logp, exp.ref_logp) * exp.mask).sum() / exp.mask.sum()
    return {"kl": float(seq[valid].mean()), "kl/per_token": float(tok)}


_FIRST_ONLY = ("logprob_gap", "kl", "kl/per_token")


_RENAME = {"ratio_mean": "ratio/mean", "ratio_max": "ratio/max", "ratio_min": "ratio/min",
           "approx_kl": "approx_kl_old", "loss": "train/loss", "grad_norm": "train/grad_norm", "lr": "train/lr"}


def merge_update_metrics(steps: list[dict]) -> dict[str, float]:
    """One RL step's optimizer-step metrics -> one row: the mean over updates (``*max`` keys: the max;
    pre-update measurements such as ``logprob_gap``: the first update's)."""
    out: dict[str, float] = {}
    for k in steps[0]:
        vals = [float(s[k]) for s in steps if k in s]
        if k in _FIRST_ONLY:
            v = vals[0]
        elif k.endswith("max"):
            v = max(vals)
        elif k.endswith("min"):
            v = min(vals)
        else:
            v = sum(vals) / len(vals)
        out[_RENAME.get(k, k)] = v
    return out


def reduce_metrics(engine, m: dict[str, float]) -> dict[str, float]:
    """Average a step's host metrics over processes (one collective per step; no-op on one process)."""
    if engine.world_size == 1:
        return m
    keys = sorted(m)
    t = torch.tensor([float(m[k]) for k in keys], dtype=torch.float64, device=engine.device)
    t = engine.accelerator.reduce(t, reduction="mean")
    return dict(zip(keys, t.tolist()))
