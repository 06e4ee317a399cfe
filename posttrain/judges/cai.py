"""Constitutional AI (Bai et al. 2022, "Constitutional AI: Harmlessness from AI Feedback"; RLHF book
ch. 12): self-critique and revision chains for SFT data, and principle-conditioned AI preference labels.

Supervised stage, for each prompt x::

    y⁰ ~ π(· | x)
    for round i = 1..n, with principle c_i drawn from the constitution:
        critique_i ~ π(· | x, y⁰, …, critique request of c_i)
        y^i        ~ π(· | x, y⁰, …, critique_i, revision request of c_i)

Every request sees the whole conversation so far. The SFT record is (x, yⁿ).

Preference stage: a judge compares y⁰ with yⁿ under a freshly drawn principle, in both orders
(see :mod:`posttrain.judges.pairwise`); the preferred one becomes ``chosen``. Ties (including
swap-inconsistent pairs), unparseable verdicts and identical responses give no pair; each is counted.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Sequence

from posttrain.judges.backends import ChatBackend
from posttrain.judges.constitution import Principle, sample_principles
from posttrain.judges.pairwise import Pair, PairJudgment, judge_pairs


@dataclass
class Chain:
    """One prompt's critique → revision history."""

    prompt: str | list[dict]
    initial: str
    critiques: list[str] = field(default_factory=list)
    revisions: list[str] = field(default_factory=list)
    principles: list[str] = field(default_factory=list)  # principle name per round

    @property
    def final(self) -> str:
        return self.revisions[-1] if self.revisions else self.initial

    def sft_record(self) -> dict:
        return {"prompt": self.prompt, "completion": self.final, "critiques": self.critiques,
                "principles": self.principles, "initial": self.initial,
                "revisions": self.revisions, "source": "cai"}


def _user_turns(prompt: str | list[dict]) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def critique_revision_chains(policy: ChatBackend, prompts: Sequence[str | list[dict]],
                             principles: Sequence[Principle], *, rounds: int, rng: random.Random,
                             max_tokens: int = 256, temperature: float = 0.7) -> list[Chain]:
    """Run the supervised CAI loop for every prompt; each step is one batched policy call."""
    convs = [_user_turns(p) for p in prompts]
    initial = policy.complete(convs, max_tokens=max_tokens, temperature=temperature)
    chains = [Chain(p, y) for p, y in zip(prompts, initial)]
    convs = [c + [{"role": "assistant", "content": y}] for c, y in zip(convs, initial)]
    drawn = [sample_principles(list(principles), rounds, rng) for _ in prompts]
    for r in range(rounds):
        asks = [c + [{"role": "user", "content": d[r].critique}] for c, d in zip(convs, drawn)]
        critiques = policy.complete(asks, max_tokens=max_tokens, temperature=temperature)
        convs = [a + [{"role": "assistant", "content": t}] for a, t in zip(asks, critiques)]
        asks = [c + [{"role": "user", "content": d[r].revision}] for c, d in zip(convs, drawn)]
        revisions = policy.complete(asks, max_tokens=max_tokens, temperature=temperature)
        convs = [a + [{"role": "assistant", "content": t}] for a, t in zip(asks, revisions)]
        for chain, d, crit, rev in zip(chains, drawn, critiques, revisions):
            chain.principles.append(d[r].name)
            chain.critiques.append(crit)
            chain.revisions.append(rev)
    return chains


@dataclass
class LabelCounts:
    pairs: int = 0  # records written
    ties: int = 0  # judged equal, or the two orders disagreed
    swap_inconsistent: int = 0  # subset of ties
    unparseable: int = 0
    identical: int = 0  # revision equals the initial response: nothing to compare


def ai_preference_pairs(judge: ChatBackend, chains: Sequence[Chain], principles: Sequence[Principle],
                        *, rng: random.Random, both_orders: bool = True, logprobs: bool = False,
                        max_tokens: int = 512, temperature: float = 0.0
                        ) -> tuple[list[dict], LabelCounts, list[PairJudgment]]:
    """Principle-conditioned comparison of each chain's initial response (a) with its final revision
    (b); returns preference records, the counts of skipped pairs, and the raw judgments."""
    counts = LabelCounts()
    drawn = [sample_principles(list(principles), 1, rng)[0] for _ in chains]
    todo = [(c, p) for c, p in zip(chains, drawn) if c.final.strip() != c.initial.strip()]
    counts.identical = len(chains) - len(todo)
    pairs = [Pair(c.prompt, c.initial, c.final, [p.criterion]) for c, p in todo]
    judgments = judge_pairs(judge, pairs, both_orders=both_orders, logprobs=logprobs,
                            max_tokens=max_tokens, temperature=temperature) if pairs else []
    records = []
    for (chain, principle), j in zip(todo, judgments):
        if j.winner is None:
            counts.unparseable += 1
            continue
        if j.winner == "tie":
            counts.ties += 1
            counts.swap_inconsistent += j.consistent is False
            continue
        chosen, rejected = (chain.initial, chain.final) if j.winner == "a" else (chain.final, chain.initial)
        records.append({"prompt": chain.prompt, "chosen": chosen, "rejected": rejected, "source": "cai",
                        "principle": principle.name, "chosen_is_revision": j.winner == "b",
                        "verdicts": j.verdicts,
                        "prob_chosen": None if j.prob_a is None else
                        (j.prob_a if j.winner == "a" else 1 - j.prob_a)})
    counts.pairs = len(records)
    return records, counts, judgments
