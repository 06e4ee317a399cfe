"""Single-answer grading: the judge scores one response from 1 to 10 and ends with ``[[score]]``.

With a rubric, each criterion is scored in its own judge call (one number per call parses far more
reliably than several in one reply) and the response's score is the mean of the parsed criterion
scores::

    score = (1/|C_parsed|) Σ_{c ∈ C_parsed} s_c

Two graded responses become a pair outcome as in MT-Bench's single mode: a tie when
``|s_a − s_b| ≤ tie_margin`` (0.1 there), otherwise the higher score wins.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Sequence

from posttrain.judges.backends import ChatBackend
from posttrain.judges.pairwise import Outcome, as_text

PROMPT_VERSION = "posttrain-grade-v1"
MIN_SCORE, MAX_SCORE = 1.0, 10.0

_SYSTEM = (
    "You are a careful evaluator. Rate how well the assistant's response serves the user{focus} on "
    "a scale from 1 (useless or harmful) to 10 (could not be better). Judge substance, not length. "
    "Give a short justification, then end with the rating in double brackets, for example [[6]].")


@dataclass(frozen=True)
class Criterion:
    name: str
    description: str


OVERALL = Criterion("overall", "")


def grading_messages(prompt: str | list[dict], response: str | list[dict],
                     criterion: Criterion = OVERALL) -> list[dict]:
    focus = f", judging only this criterion: {criterion.description}" if criterion.description else ""
    user = (f"[Request]\n{as_text(prompt)}\n\n[Response]\n{as_text(response)}\n\n"
            "Your rating ([[1]] to [[10]]):")
    return [{"role": "system", "content": _SYSTEM.format(focus=focus)},
            {"role": "user", "content": user}]


_SCORE = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*(?:/\s*10\s*)?\]\]")


def parse_score(text: str | None) -> float | None:
    """The last ``[[n]]`` (also ``[[n/10]]``) in the text when 1 ≤ n ≤ 10; otherwise None.

    An out-of-range last score is not replaced by an earlier one: it shows the judge did not follow
    the format, which is what the unparseable count is for."""
    if not text:
        return None
    found = _SCORE.findall(text)
    if not found:
        return None
    value = float(found[-1])
    return value if MIN_SCORE <= value <= MAX_SCORE else None


@dataclass
class Grade:
    score: float | None  # mean of the parsed criterion scores; None when none parsed
    scores: dict[str, float | None]  # per criterion
    raw: dict[str, str] = field(default_factory=dict)

    @property
    def unparseable(self) -> int:
        """How many criterion scores could not be parsed."""
        return sum(v is None for v in self.scores.values())

    def to_dict(self) -> dict:
        return asdict(self)


def grade(backend: ChatBackend, items: Sequence[tuple[str | list[dict], str | list[dict]]],
          criteria: Sequence[Criterion] = (), *, max_tokens: int = 512,
          temperature: float = 0.0) -> list[Grade]:
    """Grade each (prompt, response) on every criterion (or once overall) in one batched call."""
    crits = list(criteria) or [OVERALL]
    messages = [grading_messages(p, r, c) for p, r in items for c in crits]
    texts = backend.complete(messages, max_tokens=max_tokens, temperature=temperature)
    grades = []
    for i in range(len(items)):
        chunk = texts[i * len(crits):(i + 1) * len(crits)]
        scores = {c.name: parse_score(t) for c, t in zip(crits, chunk)}
        parsed = [s for s in scores.values() if s is not None]
        grades.append(Grade(sum(parsed) / len(parsed) if parsed else None, scores,
                            {c.name: t for c, t in zip(crits, chunk)}))
    return grades


def outcome_from_grades(a: Grade, b: Grade, tie_margin: float = 0.1) -> Outcome | None:
    if a.score is None or b.score is None:
        return None
    if abs(a.score - b.score) <= tie_margin:
        return "tie"
    return "a" if a.score > b.score else "b"


def summarize_grades(grades: Sequence[Grade]) -> dict:
    scored = [g.score for g in grades if g.score is not None]
    return {"graded": len(grades), "scored": len(scored),
            "mean_score": sum(scored) / len(scored) if scored else None,
            "unparseable_items": len(grades) - len(scored),
            "unparseable_scores": sum(g.unparseable for g in grades),
            "scores_asked": sum(len(g.scores) for g in grades),
            "prompt_version": PROMPT_VERSION}
