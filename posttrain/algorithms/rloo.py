"""RLOO: REINFORCE with the leave-one-out baseline (Kool et al. 2019; Ahmadian et al. 2024, "Back to
Basics"), the GRPO loop with another advantage estimator:

    A_i = r_i − 1/(G−1) Σ_{j≠i} r_j,     r_i = score_i − β Σ_t KL_t   (KL in the reward, k1 by default)

One optimizer step per rollout batch (ratio ≡ 1: the plain policy gradient); the log-prob terms are
summed over each sequence's tokens and averaged over sequences (``seq_mean_token_sum``: the gradient of
the sequence log-probability, as in Ahmadian et al. 2024 and TRL's RLOOTrainer; ``loss.aggregation``
chooses another). Everything else (rollouts, rewards, truncation policy, logging) is
``grpo.run``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from posttrain.algorithms.grpo import GRPOConfig
from posttrain.algorithms.grpo import run as _run
from posttrain.config import opt
from posttrain.rollouts.config import KLConfig, RolloutConfig


@dataclass
class RLOOConfig(GRPOConfig):
    variant: Literal["rloo"] = opt("rloo", "Fixed: the leave-one-out estimator (see grpo.VARIANTS['rloo']).",
                                   "TRL RLOOTrainer: β 0.05, KL in the reward")
    rollout: RolloutConfig = opt(factory=lambda: RolloutConfig(group_size=4),
                                 help="Prompts and sampling (G >= 2 for the leave-one-out baseline).")
    kl: KLConfig = opt(factory=lambda: KLConfig(estimator="k1"),
                       help="KL to the reference, subtracted from the reward (k1 summed over tokens).")


def run(cfg: RLOOConfig) -> dict:
    return _run(cfg, command="rloo")
