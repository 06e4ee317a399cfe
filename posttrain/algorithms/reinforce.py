"""REINFORCE with a baseline (Williams 1992; rlhf-book ch. 6), the GRPO loop with another estimator:

    ∇J = E[ Σ_t (R − b) ∇ log π_θ(a_t | s_t) ],   b = mean reward of the batch,
    R = score − β Σ_t KL_t   (KL in the reward, k1 by default)

Each prompt is sampled once by default (group_size 1): the baseline is shared by the whole batch,
not per prompt as in RLOO/GRPO. One optimizer step per batch; token terms summed per sequence and
averaged over sequences (``seq_mean_token_sum``, the sequence log-probability's gradient).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from posttrain.algorithms.grpo import GRPOConfig
from posttrain.algorithms.grpo import run as _run
from posttrain.config import opt
from posttrain.rollouts.config import KLConfig, RolloutConfig


@dataclass
class ReinforceConfig(GRPOConfig):
    variant: Literal["reinforce"] = opt("reinforce", "Fixed: batch-mean baseline (grpo.VARIANTS['reinforce']).",
                                        "rlhf-book ch. 6 REINFORCE")
    rollout: RolloutConfig = opt(factory=lambda: RolloutConfig(prompts_per_step=64, group_size=1),
                                 help="Prompts and sampling (one sample per prompt by default).")
    kl: KLConfig = opt(factory=lambda: KLConfig(estimator="k1"),
                       help="KL to the reference, subtracted from the reward (k1 summed over tokens).")


def run(cfg: ReinforceConfig) -> dict:
    return _run(cfg, command="reinforce")
