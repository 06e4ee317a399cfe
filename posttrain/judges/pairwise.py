"""Pairwise LLM-as-judge with position swap, and agreement of a judge with people.

The judge reads a request and two responses shown as A and B and ends with a verdict ``[[A]]``,
``[[B]]`` or ``[[C]]`` (tie). Judges favour a position, so each pair is judged in both orders
(MT-Bench's rule): the pair's outcome is the shared verdict when the two orders agree, and a tie when
they disagree, in which case the pair is *swap-inconsistent*. A verdict that cannot be parsed leaves
the pair without an outcome; it is counted, never guessed.

Aggregates (ties count half, as in MT-Bench's adjusted win rate and Arena's BT fits)::

    win_rate_a              = (W_a + ½ T) / N_judged
    swap_inconsistency_rate = #(orders disagree) / #(pairs with both verdicts parsed)
    unparseable_rate        = #(pairs with an unparseable verdict) / N_pairs

Logprob mode skips generation and reads the probabilities of the letters A, B, C as the judge's first
reply token (AlpacaEval's calibrated-judge idea). Per order, with p normalised over {A, B, C}::

    P(a) = p(slot of a) + ½ p(C)

and the pair's probability is the mean over the two orders (position bias cancels to first order).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Literal, Sequence

from posttrain.errors import ConfigError
from posttrain.judges.backends import ChatBackend, supports_choice_logprobs

Outcome = Literal["a", "b", "tie"]
PROMPT_VERSION = "posttrain-pairwise-v1"  # recorded in summaries: judge numbers depend on the prompt
ORDERS = ("ab", "ba")  # "ab": a shown as A; "ba": b shown as A
LETTERS = ("A", "B", "C")

_SYSTEM = (
    "You are an impartial evaluator. Read the user's request and two candidate responses, A and B, "
    "and decide which one serves the user better{criteria_clause}. Neither the order of the "
    "responses nor their length says anything about their quality. {answer_rule}")
_REASONED = ("Explain your reasoning in a few sentences, then end with your decision: [[A]] if A is "
             "better, [[B]] if B is better, or [[C]] for a tie.")
_LETTER_ONLY = ("Reply with one letter only: A if A is better, B if B is better, C for a tie.")


# ----------------------------------------------------------------------------- prompts


@dataclass
class Pair:
    """Two responses to one request; ``criteria`` condition the judgment (e.g. principles)."""

    prompt: str | list[dict]
    a: str | list[dict]
    b: str | list[dict]
    criteria: list[str] = field(default_factory=list)


def as_text(value: str | list[dict]) -> str:
    """A response or request as plain text: a message list becomes 'Role: content' lines, except a
    lone assistant message, which is just its content."""
    if isinstance(value, str):
        return value
    if len(value) == 1 and value[0].get("role") == "assistant":
        return str(value[0].get("content", ""))
    return "\n".join(f"{m.get('role', 'user').capitalize()}: {m.get('content', '')}" for m in value)


def pairwise_messages(pair: Pair, order: str = "ab", letter_only: bool = False) -> list[dict]:
    """The chat sent to the judge for one presentation order."""
    first, second = (pair.a, pair.b) if order == "ab" else (pair.b, pair.a)
    clause = " according to the criteria given" if pair.criteria else ""
    system = _SYSTEM.format(criteria_clause=clause,
                            answer_rule=_LETTER_ONLY if letter_only else _REASONED)
    parts = [f"[Request]\n{as_text(pair.prompt)}",
             f"[Response A]\n{as_text(first)}",
             f"[Response B]\n{as_text(second)}"]
    if pair.criteria:
        parts.append("[Criteria]\n" + "\n".join(f"- {c}" for c in pair.criteria))
    parts.append("Your answer (one letter):" if letter_only else "Your decision ([[A]], [[B]] or [[C]]):")
    return [{"role": "system", "content": system}, {"role": "user", "content": "\n\n".join(parts)}]


# ----------------------------------------------------------------------------- parsing


_VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]", re.IGNORECASE)


def parse_verdict(text: str | None) -> str | None:
    """'A', 'B' or 'C' from the *last* ``[[X]]`` in the text (a judge that changes its mind while
    reasoning ends with its final answer); None when there is none."""
    if not text:
        return None
    found = _VERDICT.findall(text)
    return found[-1].upper() if found else None


def verdict_outcome(verdict: str | None, order: str) -> Outcome | None:
    """Map a verdict about positions to an outcome about the original responses."""
    if verdict is None:
        return None
    if verdict == "C":
        return "tie"
    shown_first_is_a = order == "ab"
    return "a" if (verdict == "A") == shown_first_is_a else "b"


def combine(outcomes: Sequence[Outcome | None]) -> tuple[Outcome | None, bool | None]:
    """(winner, consistent) from the per-order outcomes: any unparseable -> (None, None); one order
    -> (its outcome, None); two orders -> the outcome if they agree, else ('tie', False)."""
    if any(o is None for o in outcomes) or not outcomes:
        return None, None
    if len(outcomes) == 1:
        return outcomes[0], None
    if len(set(outcomes)) == 1:
        return outcomes[0], True
    return "tie", False


# ----------------------------------------------------------------------------- judging


@dataclass
class PairJudgment:
    winner: Outcome | None  # None: some verdict could not be parsed
    verdicts: dict[str, str | None]  # per order, as the judge wrote it ("A"/"B"/"C")
    consistent: bool | None  # both orders agree; None unless both were parsed
    prob_a: float | None = None  # logprob mode: P(a better), ties half, mean over orders
    raw: dict[str, str] = field(default_factory=dict)  # judge text per order (generation mode)

    @property
    def unparseable(self) -> bool:
        return self.winner is None

    def to_dict(self) -> dict:
        return asdict(self)


def _letter_probs(logps: dict[str, float]) -> dict[str, float] | None:
    """Softmax over the letters' log-probs; None when none of them is possible."""
    finite = [v for v in logps.values() if math.isfinite(v)]
    if not finite:
        return None
    top = max(finite)
    w = {k: math.exp(v - top) if math.isfinite(v) else 0.0 for k, v in logps.items()}
    z = sum(w.values())
    return {k: v / z for k, v in w.items()}


def judge_pairs(backend: ChatBackend, pairs: Sequence[Pair], *, both_orders: bool = True,
                logprobs: bool = False, max_tokens: int = 512,
                temperature: float = 0.0) -> list[PairJudgment]:
    """Judge every pair (in both orders by default) with one batched backend call."""
    orders = ORDERS if both_orders else ORDERS[:1]
    jobs = [(i, o) for i in range(len(pairs)) for o in orders]
    if logprobs:
        if not supports_choice_logprobs(backend):
            raise ConfigError(f"backend {getattr(backend, 'name', backend)!r} cannot score choices",
                              where="logprobs", fix="turn logprob mode off or use an hf:/openai: backend")
        probs = [_letter_probs(backend.choice_logprobs(pairwise_messages(pairs[i], o, True), list(LETTERS)))
                 for i, o in jobs]
        verdicts = [max(p, key=p.get) if p else None for p in probs]
        texts = [""] * len(jobs)
    else:
        texts = backend.complete([pairwise_messages(pairs[i], o) for i, o in jobs],
                                 max_tokens=max_tokens, temperature=temperature)
        verdicts = [parse_verdict(t) for t in texts]
        probs = [None] * len(jobs)
    out = []
    for i in range(len(pairs)):
        idx = range(i * len(orders), (i + 1) * len(orders))  # jobs are pair-major
        winner, consistent = combine([verdict_outcome(verdicts[k], jobs[k][1]) for k in idx])
        p_a = [(p["A"] if jobs[k][1] == "ab" else p["B"]) + 0.5 * p["C"]
               for k in idx if (p := probs[k]) is not None]
        out.append(PairJudgment(
            winner=winner, verdicts={jobs[k][1]: verdicts[k] for k in idx}, consistent=consistent,
            prob_a=sum(p_a) / len(p_a) if p_a else None,
            raw={jobs[k][1]: texts[k] for k in idx} if not logprobs else {}))
    return out


def summarize(judgments: Sequence[PairJudgment]) -> dict:
    """Counts and rates (see the module docstring); rates are None when their denominator is 0."""
    n = len(judgments)
    winners = Counter(j.winner for j in judgments)
    judged = n - winners[None]
    both = [j for j in judgments if j.consistent is not None]
    inconsistent = sum(1 for j in both if not j.consistent)
    all_verdicts = [v for j in judgments for v in j.verdicts.values()]
    probs = [j.prob_a for j in judgments if j.prob_a is not None]
    return {
        "pairs": n, "judged": judged,
        "wins_a": winners["a"], "wins_b": winners["b"], "ties": winners["tie"],
        "win_rate_a": (winners["a"] + 0.5 * winners["tie"]) / judged if judged else None,
        "swap_inconsistent": inconsistent,
        "swap_inconsistency_rate": inconsistent / len(both) if both else None,
        "unparseable_pairs": winners[None],
        "unparseable_rate": winners[None] / n if n else None,
        "verdicts": len(all_verdicts),
        "unparseable_verdicts": sum(v is None for v in all_verdicts),
        "mean_prob_a": sum(probs) / len(probs) if probs else None,
        "prompt_version": PROMPT_VERSION,
    }


# ----------------------------------------------------------------------------- agreement with people


def _kappa(x: Sequence[str], y: Sequence[str]) -> float | None:
    """Cohen's κ = (p_o − p_e) / (1 − p_e), p_o = share of items where the raters agree and
    p_e = Σ_k p_x(k) p_y(k) (agreement expected from the marginals alone). None when p_e = 1
    (both raters used one and the same class throughout: κ is undefined)."""
    n = len(x)
    if n == 0:
        return None
    p_o = sum(a == b for a, b in zip(x, y)) / n
    cx, cy = Counter(x), Counter(y)
    p_e = sum(cx[k] * cy[k] for k in cx) / (n * n)
    if p_e >= 1.0:
        return None
    return (p_o - p_e) / (1 - p_e)


def cohens_kappa(x: Sequence[str], y: Sequence[str]) -> float | None:
    """Cohen's κ between two label sequences; uses the feedback package's implementation when it
    exists so the whole project reports one κ."""
    try:
        from posttrain.feedback.agreement import cohens_kappa as shared
    except ImportError:
        return _kappa(x, y)
    value = shared(list(x), list(y))
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def human_agreement(judge: Sequence[Outcome | None], human: Sequence[Outcome]) -> dict:
    """Judge vs human outcomes on the same pairs, ties as a class of their own ({a, b, tie}).

    agreement = (1/N) Σ 1[judge_i = human_i], κ as in :func:`_kappa`; N counts the pairs where the
    judge gave an outcome (unparseable ones are reported as ``skipped``)."""
    if len(judge) != len(human):
        raise ValueError("judge and human outcomes must cover the same pairs")
    kept = [(j, h) for j, h in zip(judge, human) if j is not None]
    xs, ys = [j for j, _ in kept], [h for _, h in kept]
    return {"n": len(kept), "skipped": len(judge) - len(kept),
            "agreement": sum(a == b for a, b in kept) / len(kept) if kept else None,
            "kappa": cohens_kappa(xs, ys) if kept else None}
