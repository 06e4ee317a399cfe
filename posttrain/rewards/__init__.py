"""Reward functions: plain callables ``f(prompts, completions, **columns) -> list[float | None]``.

See docs/rewards.md. Importing this package is cheap: math-verify loads in worker processes, and
the reward-model scorer (torch) loads on first use of ``RewardModelScorer``.
"""

from __future__ import annotations

from typing import Any

from posttrain.rewards.code import CodeResult, CodeTestsReward, extract_code, split_tests
from posttrain.rewards.combine import REWARD_FUNCTIONS, load_reward_function, resolve_reward, weighted_sum
from posttrain.rewards.math import MathVerifier, check_answer
from posttrain.rewards.verifiers import (EXTRACTORS, exact_match, extract_answer, format_reward, length_penalty,
                                         normalize_answer, outcome_metrics, regex_reward, reward_name)

__all__ = [
    "CodeResult", "CodeTestsReward", "EXTRACTORS", "MathVerifier", "REWARD_FUNCTIONS", "RewardModelScorer",
    "check_answer", "exact_match", "extract_answer", "extract_code", "format_reward", "length_penalty",
    "load_reward_function", "normalize_answer", "outcome_metrics", "regex_reward", "resolve_reward",
    "reward_name", "split_tests", "weighted_sum",
]


def __getattr__(name: str) -> Any:
    if name == "RewardModelScorer":  # needs torch: import on first use only
        from posttrain.rewards.reward_model import RewardModelScorer

        return RewardModelScorer
    raise AttributeError(f"module 'posttrain.rewards' has no attribute {name!r}")
