"""The built-in task's rewards as reward functions: ``builtin_correct`` (verifiable) and ``builtin_gold``
(the hidden gold reward). Used by the demo and tests; a user's own prompts need their own reward.
"""

from __future__ import annotations

from typing import Any, Callable

from posttrain.tasks.builtin import gold_reward, is_correct


def builtin_correct(prompts: list, completions: list, **_: Any) -> list[float]:
    """Built-in task, verifiable: 1 if the stated numbers are exactly the solution, else 0."""
    return [float(is_correct(_text(p), c)) for p, c in zip(prompts, completions)]


def builtin_gold(prompts: list, completions: list, **_: Any) -> list[float]:
    """Built-in task, the hidden gold reward in [-0.3, 1] (positional accuracy minus a filler cost)."""
    return [gold_reward(_text(p), c) for p, c in zip(prompts, completions)]


def _text(prompt) -> str:
    """A prompt string, or the last user turn of a message list."""
    if isinstance(prompt, list):
        users = [m["content"] for m in prompt if m.get("role") == "user"]
        return users[-1] if users else ""
    return prompt


BUILTIN_REWARDS: dict[str, Callable] = {"builtin_correct": builtin_correct, "builtin_gold": builtin_gold}
