"""``posttrain eval-reward``: how well a reward model orders held-out preference pairs.

Reported (RewardBench v1 conventions):

- ``accuracy`` — strict: (1/N) Σ 1[r(x, y⁺) > r(x, y⁻)] over non-tie pairs; equal scores are wrong.
- ``length_baseline`` — the "longer answer wins" rule on the same pairs (characters; equal lengths
  count ½). An RM that does not beat it may only be measuring length.
- ``margin`` — mean r(x, y⁺) − r(x, y⁻); ``chosen`` / ``rejected`` — mean scores.
- ``ece`` — expected calibration error of p = σ(r⁺ − r⁻) with 10 equal-width bins, each pair
  counted in both orders ((p, 1) and (1 − p, 0)) so over- and under-confidence both show.
- ``loss`` — mean Bradley–Terry loss −log σ(r⁺ − r⁻).
- per ``subset`` column: accuracy, length baseline and count.

Ties (``tie: true``) are counted and reported, never scored as wins. K-wise ranking files are
expanded into their strictly ordered pairs. The JSON goes to ``<output_dir>/eval_reward.json``; the
command prints the table and the paths it wrote.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from posttrain.config import ModelConfig, opt
from posttrain.data.preference import (
    encode_pair,
    encode_ranking,
    is_ranking,
    load_preference_rows,
    response_chars,
)
from posttrain.data.records import ReadOptions
from posttrain.engines.loop import write_summary
from posttrain.errors import ConfigError
from posttrain.evaluation import stats
from posttrain.rewards.reward_model import RewardModelScorer


@dataclass
class EvalRewardConfig:
    model: ModelConfig = opt(factory=lambda: ModelConfig(name_or_path=""),
                             help="The reward model: a `posttrain reward` final/ directory or any HF "
                                  "sequence classifier with one label.")
    data: str = opt("", "Held-out pairs {prompt, chosen, rejected[, subset, tie]} (RewardBench-style "
                    "file, datasets name, or builtin:...), or K-wise rankings.")
    split: str = opt("train", "Split of a datasets name/path.")
    columns: dict[str, str] = opt({}, "Column mapping from your names to ours.")
    format: Literal["auto", "hh", "plain"] = opt("auto", "How strings are read: auto detects Anthropic HH "
                                                 "transcripts; hh requires them; plain reads them as they are.")
    prompt_from: Literal["auto", "shared", "column"] = opt(
        "auto", "A pair's prompt when chosen/rejected are conversations sharing leading turns: those turns "
        "(auto/shared), or the prompt column with the conversations as whole responses (column).")
    max_rows: int | None = opt(None, "Evaluate only the first N records.")
    max_length: int = opt(1024, "Token budget per (prompt, response); longer ones are truncated like "
                          "training (prompt from the left first).")
    batch_tokens: int = opt(8192, "Tokens per forward pass (packed).")
    output_dir: str = opt("runs/{command}", "Where eval_reward.json and summary.json go; {command} and "
                          "{time} are filled in.")
    threads: int | None = opt(None, "torch intra-op threads (null = torch default).")

    def validate(self) -> None:
        if not self.model.name_or_path:
            raise ConfigError("no reward model given", where="model.name_or_path",
                              fix="posttrain eval-reward model.name_or_path=runs/reward/final data=FILE")
        if not self.data:
            raise ConfigError("no evaluation data given", where="data",
                              fix="data=FILE.jsonl with prompt, chosen, rejected (and optional subset)")


# ----------------------------------------------------------------------------- metrics


def _stats():
    try:
        return stats
    except ImportError:  # pragma: no cover - the evaluation layer ships with the package
        return None


def expand_pairs(encs: list, rewards: list[list[float]]) -> dict[str, list]:
    """Per record rewards -> flat pair arrays (chosen better); rankings give every strictly ordered
    pair; ties are kept apart (``tie`` flag)."""
    out: dict[str, list] = {k: [] for k in ("rc", "rr", "tie", "subset", "len_c", "len_r")}
    for e, r in zip(encs, rewards):
        K = len(e.responses)
        if e.tie:
            pairs = [(0, 1, True)]
        else:
            pairs = [(i, j, False) for i in range(K) for j in range(K) if e.ranks[i] < e.ranks[j]]
        for i, j, tie in pairs:
            out["rc"].append(r[i])
            out["rr"].append(r[j])
            out["tie"].append(tie)
            out["subset"].append(e.subset if e.subset is not None else "all")
            out["len_c"].append(response_chars(e.texts[i]))
            out["len_r"].append(response_chars(e.texts[j]))
    return out


def pair_report(rc: list[float], rr: list[float], tie: list[bool], subset: list[str] | None = None,
                len_c: list[int] | None = None, len_r: list[int] | None = None) -> dict:
    """Accuracy (strict), length baseline, margin, chosen/rejected means, BT loss, ECE (10 bins, both
    orders) and per-subset accuracy over non-tie pairs; ``ties`` counts the tie pairs left out."""
    stats = _stats()
    keep = [not t for t in tie]
    c = np.asarray([x for x, k in zip(rc, keep) if k], dtype=np.float64)
    r = np.asarray([x for x, k in zip(rr, keep) if k], dtype=np.float64)
    out: dict = {"pairs": len(c), "ties": int(sum(tie))}
    if len(c) == 0:
        return out
    subs = [s for s, k in zip(subset, keep) if k] if subset else None
    diff = c - r
    p = 1.0 / (1.0 + np.exp(-diff))
    out.update(margin=float(diff.mean()), chosen=float(c.mean()), rejected=float(r.mean()),
               loss=float(np.mean(np.logaddexp(0.0, -diff))))
    if stats is not None:
        acc = stats.pairwise_accuracy(c, r, subs)
        out["accuracy"] = acc["accuracy"]
        out["ece"] = stats.expected_calibration_error(np.concatenate([p, 1 - p]),
                                                      np.concatenate([np.ones_like(p), np.zeros_like(p)]), 10)
    else:
        out["accuracy"] = float((c > r).mean())
    if len_c is not None:
        lc = np.asarray([x for x, k in zip(len_c, keep) if k])
        lr = np.asarray([x for x, k in zip(len_r, keep) if k])
        out["length_baseline"] = (stats.length_baseline_accuracy(lc, lr) if stats is not None
                                  else float(np.mean((lc > lr) + 0.5 * (lc == lr))))
    if subs is not None and any(x != "all" for x in subs):
        per = {}
        for s in dict.fromkeys(subs):
            m = np.asarray([x == s for x in subs])
            per[s] = {"accuracy": float((c[m] > r[m]).mean()), "n": int(m.sum())}
            if len_c is not None:
                per[s]["length_baseline"] = float(np.mean((lc[m] > lr[m]) + 0.5 * (lc[m] == lr[m])))
        out["subsets"] = per
    return out


def evaluate_scores(encs: list, rewards: list[list[float]]) -> dict:
    d = expand_pairs(encs, rewards)
    return pair_report(d["rc"], d["rr"], d["tie"], d["subset"], d["len_c"], d["len_r"])


def score_encoded(scorer, encs: list) -> list[list[float]]:
    """Scores of every response of every record, in one packed pass per token budget."""
    flat = [e.example(k) for e in encs for k in range(len(e.responses))]
    scores = scorer.score_examples(flat).tolist()
    out, s = [], 0
    for e in encs:
        out.append(scores[s:s + len(e.responses)])
        s += len(e.responses)
    return out


def format_table(report: dict, title: str = "reward model") -> str:
    def f(x):
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"

    lines = [f"{title}: {report.get('pairs', 0)} pairs ({report.get('ties', 0)} ties left out)",
             f"{'subset':24} {'n':>6} {'accuracy':>9} {'longer wins':>12}",
             f"{'ALL':24} {report.get('pairs', 0):6d} {f(report.get('accuracy')):>9} "
             f"{f(report.get('length_baseline')):>12}"]
    for name, s in (report.get("subsets") or {}).items():
        lines.append(f"{name[:24]:24} {s['n']:6d} {f(s['accuracy']):>9} {f(s.get('length_baseline')):>12}")
    lines.append(f"margin {f(report.get('margin'))}   chosen {f(report.get('chosen'))}   rejected "
                 f"{f(report.get('rejected'))}   ECE {f(report.get('ece'))}   BT loss {f(report.get('loss'))}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command


def run(cfg: EvalRewardConfig) -> dict:
    opts = ReadOptions(format=cfg.format, prompt_from=cfg.prompt_from, prefix="",
                       keys=("format", "prompt_from"))
    rows = load_preference_rows(cfg.data, columns=cfg.columns, split=cfg.split, max_rows=cfg.max_rows, options=opts)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # refuses a model without a trained head (e.g. a causal LM) before the run directory exists
    scorer = RewardModelScorer(cfg.model.name_or_path, max_length=cfg.max_length, batch_tokens=cfg.batch_tokens,
                               dtype=cfg.model.dtype, where="model.name_or_path")
    out = Path(cfg.output_dir.format(command="eval-reward", time=time.strftime("%Y%m%d-%H%M%S")))
    out.mkdir(parents=True, exist_ok=True)
    enc = encode_ranking if is_ranking(rows) else encode_pair
    encs = [enc(scorer.tokenizer, r, cfg.max_length) for r in rows]
    t0 = time.perf_counter()
    rewards = score_encoded(scorer, encs)
    report = evaluate_scores(encs, rewards)
    report.update(model=cfg.model.name_or_path, data=cfg.data, records=len(rows),
                  score_s=time.perf_counter() - t0)
    (out / "eval_reward.json").write_text(json.dumps(report, indent=2))
    write_summary(out, {"eval": report})
    print(format_table(report, title=cfg.model.name_or_path))
    print(f"wrote {out / 'eval_reward.json'}\n      {out / 'summary.json'}\n"
          f"report: posttrain report {out}  (report.html, report.md)")
    report["run_dir"] = str(out)
    return report
