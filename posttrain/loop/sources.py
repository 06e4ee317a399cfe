"""Feedback sources of the loop: who labels a round's chosen pairs.

Every source answers the same two calls, so the loop mixes them by share:

- ``request(round_, pairs)``: hand the pairs over (idempotent: a pair id already requested is never
  sent again, also after a restart; the source keeps what it needs under its ``state_dir``);
- ``collect(round_, pair_ids, wait)`` -> the labels available now for those pairs (all of them when
  ``wait``, up to the source's quota or deadline), each a :data:`Label` dict.

A **pair** is ``{"pair_id", "round", "prompt", "a", "b", "model"}`` (``model``: the policy that sampled
both responses). A **label** is ``{"label_id", "pair_id", "round", "choice": "a"|"b"|"tie", "strength",
"annotator", "source", "source_version"}``; ``label_id`` is unique and stable (a label collected twice
after a restart is the same label, deduplicated by the loop).

Built in: ``simulated`` (the built-in task's annotators, Bradley–Terry on the hidden gold reward) and
``judge`` (a scorer: a reward model, a verifier or ``builtin_gold`` prefers the higher-scoring response)
and ``llm_judge`` (a pairwise LLM judge, both presentation orders). The labeling app is
``posttrain.loop.app_source``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any, Protocol

Pair = dict[str, Any]
Label = dict[str, Any]


class FeedbackSource(Protocol):
    name: str

    def request(self, round_: int, pairs: list[Pair]) -> None: ...

    def collect(self, round_: int, pair_ids: list[str], wait: bool = True) -> list[Label]: ...

    def status(self, round_: int) -> dict: ...


def pair_id(round_: int, prompt: Any, a: str, b: str) -> str:
    """A stable id of a candidate pair: the same round, prompt and responses give the same id."""
    return hashlib.sha256(json.dumps([round_, prompt, a, b], ensure_ascii=False).encode()).hexdigest()[:16]


def label_id(source: str, annotator: str, pid: str, k: int = 0) -> str:
    return f"{source}:{annotator}:{pid}:{k}"


class SimulatedSource:
    """The built-in task's simulated annotators (``posttrain.tasks.annotators``): each pair goes to
    ``per_pair`` annotators drawn from the pool, seeded by the pair id (a restart draws the same)."""

    version = "builtin-annotators-1"

    def __init__(self, name: str = "simulated", per_pair: int = 1, seed: int = 0, pool=None):
        from posttrain.tasks import annotators

        self.name, self.per_pair, self.seed = name, per_pair, seed
        self.pool = list(pool or annotators.DEFAULT_POOL)
        self.pairs: dict[str, Pair] = {}

    def request(self, round_: int, pairs: list[Pair]) -> None:
        self.pairs.update({p["pair_id"]: p for p in pairs})

    def collect(self, round_: int, pair_ids: list[str], wait: bool = True) -> list[Label]:
        out = []
        for pid in pair_ids:
            p = self.pairs[pid]
            rng = random.Random(f"{self.seed}:{pid}")
            for k, ann in enumerate(rng.sample(self.pool, self.per_pair)):
                choice, strength = ann.label(p["prompt"], p["a"], p["b"], rng)
                out.append({"label_id": label_id(self.name, ann.name, pid, k), "pair_id": pid, "round": round_,
                            "choice": choice, "strength": strength, "annotator": ann.name, "source": self.name,
                            "source_version": self.version})
        return out

    def status(self, round_: int) -> dict:
        return {"requested": len(self.pairs), "labelled": len(self.pairs) * self.per_pair}


class JudgeSource:
    """A judge from a scorer (any reward spec: ``rm:<path>``, ``builtin_gold``, ``module:function``):
    both presentation orders are scored; a pair whose scores are equal is a tie. Pointwise scorers
    cannot be swayed by the order, so both orders agree by construction; a pairwise LLM judge (which
    can) is ``posttrain judge``'s, wrapped with ``module:function``."""

    def __init__(self, reward: str, name: str = "judge"):
        from posttrain.rewards.combine import load_rewards

        self.name, self.spec = name, reward
        (_, self.fn, _), = load_rewards([reward], [])
        self.version = reward
        self.pairs: dict[str, Pair] = {}

    def request(self, round_: int, pairs: list[Pair]) -> None:
        self.pairs.update({p["pair_id"]: p for p in pairs})

    def collect(self, round_: int, pair_ids: list[str], wait: bool = True) -> list[Label]:
        ps = [self.pairs[pid] for pid in pair_ids]
        if not ps:
            return []
        sa = self.fn([p["prompt"] for p in ps], [p["a"] for p in ps])
        sb = self.fn([p["prompt"] for p in ps], [p["b"] for p in ps])
        out = []
        for p, a, b in zip(ps, sa, sb):
            if a is None or b is None:
                continue  # the scorer does not apply: no label (the pair stays unlabelled)
            choice = "tie" if a == b else "a" if a > b else "b"
            out.append({"label_id": label_id(self.name, self.spec, p["pair_id"]), "pair_id": p["pair_id"],
                        "round": round_, "choice": choice, "strength": None, "annotator": self.spec,
                        "source": self.name, "source_version": self.version, "score_gap": float(a - b)})
        return out

    def status(self, round_: int) -> dict:
        return {"requested": len(self.pairs)}


class LLMJudgeSource:
    """A pairwise LLM judge (``posttrain.judges.pairwise``: a local model ``hf:PATH`` or a server
    ``openai:URL#MODEL``), each pair judged in both presentation orders. Orders that disagree make a
    tie, counted as swap-inconsistent (``consistent: false`` on the label); an unparseable verdict gives
    no label. In logprob mode ``prob_a`` (P(a better), mean over the orders) is kept too."""

    def __init__(self, spec: dict, name: str = "llm_judge", seed: int = 0):
        from posttrain.judges.backends import backend_from_spec
        from posttrain.judges.pairwise import PROMPT_VERSION

        self.name, self.spec, self.logprobs = name, spec["backend"], bool(spec.get("logprobs", False))
        key = os.environ.get(spec["api_key_env"]) if spec.get("api_key_env") else None
        self.backend = backend_from_spec(self.spec, api_key=key, seed=seed)
        self.version = f"{self.spec} {PROMPT_VERSION}" + (" logprobs" if self.logprobs else "")
        self.pairs: dict[str, Pair] = {}

    def request(self, round_: int, pairs: list[Pair]) -> None:
        self.pairs.update({p["pair_id"]: p for p in pairs})

    def collect(self, round_: int, pair_ids: list[str], wait: bool = True) -> list[Label]:
        from posttrain.judges.pairwise import Pair as JudgePair
        from posttrain.judges.pairwise import judge_pairs

        ps = [self.pairs[pid] for pid in pair_ids]
        js = judge_pairs(self.backend, [JudgePair(p["prompt"], p["a"], p["b"]) for p in ps], logprobs=self.logprobs)
        return [{"label_id": label_id(self.name, self.spec, p["pair_id"]), "pair_id": p["pair_id"], "round": round_,
                 "choice": j.winner, "strength": None, "annotator": self.spec, "source": self.name,
                 "source_version": self.version, "consistent": j.consistent, "prob_a": j.prob_a}
                for p, j in zip(ps, js) if j.winner is not None]

    def status(self, round_: int) -> dict:
        return {"requested": len(self.pairs)}


JUDGES = ("judge", "llm_judge")  # sources that label instantly, and can calibrate against people


def make_source(spec: dict, state_dir: Path, seed: int) -> FeedbackSource:
    kind = spec.get("kind")
    if kind == "simulated":
        return SimulatedSource(spec.get("name", "simulated"), int(spec.get("per_pair", 1)), seed)
    if kind == "judge":
        return JudgeSource(spec["reward"], spec.get("name", "judge"))
    if kind == "llm_judge":
        return LLMJudgeSource(spec, spec.get("name", "llm_judge"), seed)
    if kind == "app":
        from posttrain.loop.app_source import AppSource

        return AppSource(spec, state_dir)
    from posttrain.errors import ConfigError

    raise ConfigError(f"unknown feedback source kind {kind!r}", where="sources",
                      fix="kind: simulated | judge | llm_judge | app")
