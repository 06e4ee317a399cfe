"""Simulated annotators for the built-in task: Bradley–Terry choices on the hidden gold reward.

An annotator with reliability β prefers response a over b with probability

    P(a ≻ b) = σ(β · (g(a) − g(b)))

where g is the gold reward; when |g(a) − g(b)| is below ``tie_below`` it reports a tie. Strength on
a 1..3 scale ("slightly", "clearly", "much" better) grows with |g(a) − g(b)|, like the Likert scales
of Anthropic HH and Llama 2 (RLHF book ch. 11). Several annotators of different reliability make the
noise of real labeling visible to agreement statistics and to the reward model.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from posttrain.tasks.builtin import gold_reward


@dataclass(frozen=True)
class SimulatedAnnotator:
    name: str
    beta: float  # reliability; larger = closer to the gold preference
    tie_below: float = 0.05

    def label(self, prompt: str, a: str, b: str, rng: random.Random) -> tuple[str, int]:
        """('a' | 'b' | 'tie', strength 1..3)."""
        d = gold_reward(prompt, a) - gold_reward(prompt, b)
        if abs(d) < self.tie_below:
            return "tie", 0
        p_a = 1 / (1 + math.exp(-self.beta * d))
        choice = "a" if rng.random() < p_a else "b"
        strength = 3 if abs(d) > 0.5 else 2 if abs(d) > 0.2 else 1
        return choice, strength


DEFAULT_POOL = (SimulatedAnnotator("careful", 30.0), SimulatedAnnotator("average", 10.0),
                SimulatedAnnotator("hasty", 3.0))


def label_pairs(pairs: list[tuple[str, str, str]], pool=DEFAULT_POOL, per_pair: int = 1,
                seed: int = 0) -> list[dict]:
    """Label (prompt, a, b) triples; each pair goes to ``per_pair`` distinct annotators drawn at
    random. Returns preference records with ties kept (``tie: true``) and strength as ``margin``."""
    rng = random.Random(seed)
    out = []
    for prompt, a, b in pairs:
        for annotator in rng.sample(list(pool), per_pair):
            choice, strength = annotator.label(prompt, a, b, rng)
            chosen, rejected = (b, a) if choice == "b" else (a, b)
            out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "tie": choice == "tie",
                        "margin": float(strength), "annotator": annotator.name, "source": "simulated"})
    return out
