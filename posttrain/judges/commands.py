"""``posttrain judge`` and ``posttrain cai``: configs and run functions.

``judge`` reads pairs (a preference file such as the labeling app's export, or a file with a prompt
and two response columns), judges them pairwise in both orders or grades each response, and writes
``judgments.jsonl`` and ``summary.json`` (win rate, ties, swap-inconsistency, unparseable, and
agreement with the human labels when the input has them).

``cai`` runs constitutional critique → revision chains with a policy backend and writes ``sft.jsonl``
and AI-labelled ``preferences.jsonl`` (see :mod:`posttrain.judges.cai`).
"""

from __future__ import annotations

import json
import os
import random
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from posttrain.config import opt, save_config
from posttrain.data.chat import split_implicit_prompt
from posttrain.data.formats import load_records, read_rows
from posttrain.data.records import ReadOptions
from posttrain.errors import ConfigError, DataError, ModelError
from posttrain.judges.backends import backend_from_spec, parse_spec
from posttrain.judges.cai import ai_preference_pairs, critique_revision_chains
from posttrain.judges.constitution import load_constitution
from posttrain.judges.grading import Criterion, grade, outcome_from_grades, summarize_grades
from posttrain.judges.pairwise import Pair, PairJudgment, human_agreement, judge_pairs, summarize

# ----------------------------------------------------------------------------- shared


@dataclass
class BackendOptions:
    api_key_env: str = opt("OPENAI_API_KEY", "Environment variable holding the API key for openai: "
                           "backends (unset = send no key).")
    timeout_s: float = opt(120.0, "Per-request timeout for openai: backends, seconds.")
    max_retries: int = opt(3, "Retries on HTTP 429/5xx, timeouts and connection errors (exponential "
                           "backoff).")
    concurrency: int = opt(4, "Parallel requests to an openai: backend.")
    batch_size: int = opt(8, "Conversations per generate call for an hf: backend.")

    def validate(self) -> None:
        for key in ("max_retries", "concurrency", "batch_size"):
            if getattr(self, key) < (0 if key == "max_retries" else 1):
                raise ConfigError(f"backend.{key} is out of range: {getattr(self, key)}",
                                  where=f"backend.{key}")
        if self.timeout_s <= 0:
            raise ConfigError("backend.timeout_s must be positive", where="backend.timeout_s")


def _make_backend(spec: str, opts: BackendOptions, seed: int):
    return backend_from_spec(spec, api_key=os.environ.get(opts.api_key_env) or None,
                             timeout=opts.timeout_s, max_retries=opts.max_retries,
                             concurrency=opts.concurrency, batch_size=opts.batch_size, seed=seed)


def _check_spec(spec: str, key: str) -> None:
    try:
        parse_spec(spec)
    except ConfigError as e:
        raise ConfigError(e.what, where=key, fix=e.fix) from None


def _run_dir(output_dir: str, command: str, cfg) -> Path:
    out = Path(output_dir.format(command=command, time=time.strftime("%Y%m%d-%H%M%S")))
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml", command=command)
    return out


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _backend_stats(backend) -> dict:
    truncated = getattr(backend, "truncated_prompts", None)
    return {} if truncated is None else {"truncated_prompts": truncated}


# ----------------------------------------------------------------------------- judge


@dataclass
class JudgeConfig:
    input: str = opt("builtin:preferences", "Pairs to judge: a preference file/dataset (prompt, "
                     "chosen, rejected; optional tie, annotator: the labeling app's export) or a "
                     "file with a prompt and two response columns (see input_kind).")
    input_kind: Literal["auto", "preference", "pairs"] = opt(
        "auto", "'preference' (chosen/rejected, human labels used for agreement), 'pairs' (prompt + "
        "a_column + b_column, no labels), or 'auto' (preference when the first row has chosen and "
        "rejected).")
    a_column: str = opt("response_a", "Column of response A when input_kind is pairs.")
    b_column: str = opt("response_b", "Column of response B when input_kind is pairs.")
    max_pairs: int | None = opt(64, "Judge at most this many (distinct) pairs; null = all.")
    judge: str = opt("hf:tiny", "Judge backend: hf:<model path or hub id> or "
                     "openai:<base_url>#<model> (e.g. openai:http://127.0.0.1:8000/v1#tiny).")
    backend: BackendOptions = opt(factory=BackendOptions, help="Backend connection options.")
    mode: Literal["pairwise", "grade"] = opt(
        "pairwise", "pairwise: the judge picks A, B or tie; grade: each response gets a 1-10 score "
                    "and the higher wins.", "MT-Bench (Zheng et al. 2023)")
    both_orders: bool = opt(True, "Judge each pair in both presentation orders; disagreement counts "
                            "as a tie and as swap-inconsistent.", "MT-Bench; Arena-Hard")
    logprobs: bool = opt(False, "Pairwise only: read P(A), P(B), P(tie) from the judge's first "
                         "token instead of parsing generated text.", "AlpacaEval weighted judges")
    constitution: str | None = opt(None, "Constitution file whose principles become judging criteria "
                                   "(pairwise) or rubric items (grade).")
    criteria: list[str] = opt([], "Extra criteria in plain words, added to the constitution's.")
    max_tokens: int = opt(512, "Judge reply budget (reasoning + verdict).")
    temperature: float = opt(0.0, "Judge sampling temperature; 0 = greedy.", "MT-Bench: temperature 0")
    tie_margin: float = opt(0.1, "Grade mode: score differences up to this are ties.",
                            "MT-Bench single-mode pairs")
    seed: int = opt(0, "Seed for which response of a preference pair is shown as A, and for sampling.")
    max_unparseable: float = opt(0.5, "Fail (exit 2, files kept) when more than this share of pairs got no "
                                 "parseable verdict: such a run measures the judge's format, not the responses.")
    output_dir: str = opt("runs/{command}", "Run directory; {command} and {time} are filled in.")

    def validate(self) -> None:
        _check_spec(self.judge, "judge")
        if self.mode == "grade" and self.logprobs:
            raise ConfigError("logprobs=true is for pairwise judging only", where="logprobs",
                              fix="set mode=pairwise or logprobs=false")
        if self.max_pairs is not None and self.max_pairs < 1:
            raise ConfigError("max_pairs must be at least 1 (or null for all)", where="max_pairs")
        if self.max_tokens < 1 or self.temperature < 0 or self.tie_margin < 0:
            raise ConfigError("max_tokens must be >= 1, temperature and tie_margin >= 0",
                              where="max_tokens/temperature/tie_margin")
        if self.constitution is not None:
            load_constitution(self.constitution)


@dataclass
class _Item:
    """One distinct pair to judge and the human labels given to it (a/b/tie, one per annotator)."""

    prompt: str | list[dict]
    a: str | list[dict]
    b: str | list[dict]
    human: list[str]
    annotators: list[str | None]


def _content(value):
    """A single assistant message (from the implicit-prompt form) as its text."""
    return value["content"] if isinstance(value, dict) else value


def load_judge_items(cfg: JudgeConfig) -> tuple[list[_Item], bool]:
    """The distinct pairs to judge, and whether they carry human labels.

    Preference rows that show the same two responses to the same prompt (several annotators) are
    judged once. Which response is shown as A is a seeded coin flip per pair: with chosen always
    in slot A, the human labels would be nearly all one class and κ would say little."""
    kind = cfg.input_kind
    if kind == "auto":
        first = read_rows(cfg.input)[0][:1]
        row = first[0] if first and isinstance(first[0], dict) else {}
        kind = "preference" if "chosen" in row and "rejected" in row else "pairs"
    if kind == "pairs":
        return _load_plain_pairs(cfg), False
    rows = load_records(cfg.input, "preference", options=ReadOptions(prefix=None))
    rng = random.Random(cfg.seed)
    items: dict[str, _Item] = {}
    for row in rows:
        prompt, chosen, rejected = row.get("prompt"), row["chosen"], row["rejected"]
        if prompt is None:
            prompt, chosen, rejected = split_implicit_prompt(chosen, rejected)
        chosen, rejected = _content(chosen), _content(rejected)
        key = json.dumps([prompt, sorted([json.dumps(chosen), json.dumps(rejected)])])
        if key not in items:
            if cfg.max_pairs is not None and len(items) >= cfg.max_pairs:
                continue
            a, b = (chosen, rejected) if rng.random() < 0.5 else (rejected, chosen)
            items[key] = _Item(prompt, a, b, [], [])
        item = items[key]
        label = "tie" if row.get("tie") else ("a" if json.dumps(chosen) == json.dumps(item.a) else "b")
        item.human.append(label)
        item.annotators.append(row.get("annotator"))
    return list(items.values()), True


def _load_plain_pairs(cfg: JudgeConfig) -> list[_Item]:
    rows, name = read_rows(cfg.input)
    rows = rows[:cfg.max_pairs] if cfg.max_pairs is not None else rows
    items = []
    for i, row in enumerate(rows, 1):
        for key in ("prompt", cfg.a_column, cfg.b_column):
            value = row.get(key) if isinstance(row, dict) else None
            if not (isinstance(value, list) or (isinstance(value, str) and value.strip())):
                raise DataError(f"{key}: missing or empty", where=f"{name}:{i}",
                                fix="set a_column/b_column to your response columns, or use a "
                                    "preference file (prompt, chosen, rejected)")
        items.append(_Item(row["prompt"], row[cfg.a_column], row[cfg.b_column], [], []))
    if not items:
        raise DataError("no pairs found", where=name)
    return items


def _criteria(cfg: JudgeConfig) -> list[tuple[str, str]]:
    """(name, text) of every judging criterion: the constitution's, then the config's own."""
    out = []
    if cfg.constitution:
        out += [(p.name, p.criterion) for p in load_constitution(cfg.constitution)]
    out += [(f"criterion_{i}", text) for i, text in enumerate(cfg.criteria)]
    return out


def run_judge(cfg: JudgeConfig) -> dict:
    items, labelled = load_judge_items(cfg)  # data problems stop the run before a model loads
    run_dir = _run_dir(cfg.output_dir, "judge", cfg)
    backend = _make_backend(cfg.judge, cfg.backend, cfg.seed)
    criteria = _criteria(cfg)
    extra: dict = {}
    if cfg.mode == "pairwise":
        pairs = [Pair(it.prompt, it.a, it.b, [text for _, text in criteria]) for it in items]
        judgments = judge_pairs(backend, pairs, both_orders=cfg.both_orders, logprobs=cfg.logprobs,
                                max_tokens=cfg.max_tokens, temperature=cfg.temperature)
        details = [j.to_dict() for j in judgments]
    else:
        rubric = [Criterion(name, text) for name, text in criteria]
        grades = grade(backend, [(it.prompt, r) for it in items for r in (it.a, it.b)], rubric,
                       max_tokens=cfg.max_tokens, temperature=cfg.temperature)
        ga, gb = grades[0::2], grades[1::2]
        judgments = [PairJudgment(outcome_from_grades(x, y, cfg.tie_margin), {}, None)
                     for x, y in zip(ga, gb)]
        details = [{"winner": j.winner, "grade_a": x.to_dict(), "grade_b": y.to_dict()}
                   for j, x, y in zip(judgments, ga, gb)]
        extra["grades_a"], extra["grades_b"] = summarize_grades(ga), summarize_grades(gb)
    rows = [{"prompt": it.prompt, "response_a": it.a, "response_b": it.b, **d,
             **({"human": it.human, "annotators": it.annotators} if labelled else {})}
            for it, d in zip(items, details)]
    _write_jsonl(run_dir / "judgments.jsonl", rows)
    summary = {"judge": cfg.judge, "mode": cfg.mode, "both_orders": cfg.both_orders,
               "logprobs": cfg.logprobs, "input": cfg.input, **summarize(judgments), **extra,
               **_backend_stats(backend)}
    if cfg.mode == "grade":
        summary["prompt_version"] = extra["grades_a"]["prompt_version"]
    if labelled:
        judge_labels = [j.winner for j, it in zip(judgments, items) for _ in it.human]
        human_labels = [h for it in items for h in it.human]
        summary["human"] = human_agreement(judge_labels, human_labels)
        summary["human"]["labels"] = len(human_labels)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if hasattr(backend, "close"):
        backend.close()
    rate = summary.get("unparseable_rate") or 0.0
    print(f"judge {cfg.judge}: {summary.get('pairs', len(judgments))} pairs, unparseable {rate:.0%}"
          + (f", human agreement {summary['human']['agreement']:.3f}"
             if labelled and summary["human"].get("agreement") is not None else "")
          + f"; judgments.jsonl and summary.json in {run_dir}", flush=True)
    if rate > cfg.max_unparseable:
        raise ModelError(f"{rate:.0%} of the pairs got no parseable verdict from the judge {cfg.judge} (more than "
                         f"max_unparseable={cfg.max_unparseable}), so its labels say little", where="judge",
                         fix=f"read the replies in {run_dir / 'judgments.jsonl'}; use a stronger judge, a larger "
                             "max_tokens, or logprobs=true (a verdict read from token probabilities)")
    return {"run_dir": str(run_dir), **summary}


# ----------------------------------------------------------------------------- cai


@dataclass
class CAIConfig:
    prompts: str = opt("builtin:prompts", "Prompt records ({prompt} plus any columns): a file, a "
                       "datasets name, or builtin:prompts.")
    columns: dict[str, str] = opt({}, "Column mapping from your names to ours, e.g. {question: prompt}.")
    max_prompts: int | None = opt(16, "Use only the first N prompts; null = all.")
    policy: str = opt("hf:tiny", "Backend that writes responses, critiques and revisions "
                      "(hf:<model> or openai:<base_url>#<model>).")
    judge: str | None = opt(None, "Backend that labels initial-vs-revised pairs; null = the policy "
                            "backend (as in the CAI paper, the model labels its own outputs).")
    backend: BackendOptions = opt(factory=BackendOptions, help="Backend connection options.")
    constitution: str = opt("recipes/constitution.yaml", "Constitution file (YAML/JSON list of "
                            "principles with critique and revision requests).")
    rounds: int = opt(1, "Critique → revision rounds per prompt, each with a freshly drawn principle.",
                      "Bai et al. 2022 used up to 4")
    max_tokens: int = opt(256, "Budget for each response, critique and revision.")
    temperature: float = opt(0.7, "Policy sampling temperature.")
    preferences: bool = opt(True, "Also label initial-vs-final pairs with the judge (RLAIF data).")
    both_orders: bool = opt(True, "Judge each pair in both orders; disagreement -> tie (skipped).",
                            "MT-Bench")
    logprobs: bool = opt(False, "Label from the judge's A/B/C token probabilities instead of parsing "
                         "generated verdicts.", "Bai et al. 2022 (A/B token probabilities)")
    judge_max_tokens: int = opt(512, "Judge reply budget.")
    judge_temperature: float = opt(0.0, "Judge temperature; 0 = greedy.")
    seed: int = opt(0, "Seed for principle draws and sampling.")
    output_dir: str = opt("runs/{command}", "Run directory; {command} and {time} are filled in.")

    def validate(self) -> None:
        _check_spec(self.policy, "policy")
        if self.judge is not None:
            _check_spec(self.judge, "judge")
        if self.rounds < 1:
            raise ConfigError(f"rounds must be at least 1, got {self.rounds}", where="rounds")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ConfigError("max_prompts must be at least 1 (or null for all)", where="max_prompts")
        if self.max_tokens < 1 or self.judge_max_tokens < 1:
            raise ConfigError("max_tokens and judge_max_tokens must be at least 1", where="max_tokens")
        if self.temperature < 0 or self.judge_temperature < 0:
            raise ConfigError("temperatures must be >= 0", where="temperature")
        load_constitution(self.constitution)


def run_cai(cfg: CAIConfig) -> dict:
    principles = load_constitution(cfg.constitution)
    rows = load_records(cfg.prompts, "prompt", columns=cfg.columns, max_rows=cfg.max_prompts,
                        options=ReadOptions(prefix="", keys=()))
    run_dir = _run_dir(cfg.output_dir, "cai", cfg)
    rng = random.Random(cfg.seed)
    policy = _make_backend(cfg.policy, cfg.backend, cfg.seed)
    t0 = time.perf_counter()
    chains = critique_revision_chains(policy, [r["prompt"] for r in rows], principles,
                                      rounds=cfg.rounds, rng=rng, max_tokens=cfg.max_tokens,
                                      temperature=cfg.temperature)
    _write_jsonl(run_dir / "sft.jsonl", [c.sft_record() for c in chains])
    summary: dict = {"prompts": len(chains), "rounds": cfg.rounds, "sft_records": len(chains),
                     "principle_counts": _count(p for c in chains for p in c.principles),
                     "generate_s": round(time.perf_counter() - t0, 3)}
    if cfg.preferences:
        same = cfg.judge is None or cfg.judge == cfg.policy
        judge = policy if same else _make_backend(cfg.judge, cfg.backend, cfg.seed)
        t0 = time.perf_counter()
        records, counts, judgments = ai_preference_pairs(
            judge, chains, principles, rng=rng, both_orders=cfg.both_orders, logprobs=cfg.logprobs,
            max_tokens=cfg.judge_max_tokens, temperature=cfg.judge_temperature)
        _write_jsonl(run_dir / "preferences.jsonl", records)
        summary["preferences"] = {**vars(counts), "judge": cfg.judge or cfg.policy,
                                  "judge_s": round(time.perf_counter() - t0, 3),
                                  "judged": summarize(judgments) if judgments else None}
        if not same and hasattr(judge, "close"):
            judge.close()
    summary.update(_backend_stats(policy))
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if hasattr(policy, "close"):
        policy.close()
    print(f"cai: {len(chains)} critique-revision chains ({cfg.rounds} round(s))"
          + "".join(f"\n  {p.name:<16} {p}" for p in sorted(run_dir.glob("*.json*"))), flush=True)
    return {"run_dir": str(run_dir), **summary}


def _count(names) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for n in names:
        out[n] += 1
    return dict(out)
