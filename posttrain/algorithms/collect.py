"""Collect preference data: sample response pairs from a policy and have them labeled.

    posttrain collect model.name_or_path=runs/sft/final prompts=builtin:prompts

For each prompt, ``k`` responses are sampled at ``temperature``; every distinct pair becomes a
comparison. Labels come from the built-in task's simulated annotators (Bradley–Terry on the hidden
gold reward, several reliabilities; ties kept) or are left for people: ``candidates.jsonl`` is in the
labeling app's import format (``posttrain label import``) either way. A held-out set labeled by the
gold reward itself (``heldout.jsonl``) measures reward models against the truth.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from posttrain.config import ModelConfig, opt
from posttrain.config_checks import refuse_top
from posttrain.data.formats import load_records
from posttrain.data.records import ReadOptions
from posttrain.engines.loop import write_summary
from posttrain.engines.rollout import sample_texts
from posttrain.engines.train import seed_everything
from posttrain.errors import ConfigError
from posttrain.models.loading import load_policy, tokenizer_for
from posttrain.tasks import annotators, builtin


@dataclass
class CollectConfig:
    model: ModelConfig = opt(factory=ModelConfig, help="Policy that writes the candidate responses.")
    prompts: str = opt("builtin:prompts", "Prompt-only data (a file, dataset or builtin:prompts).")
    n_prompts: int = opt(600, "Prompts to use (the first N).")
    k: int = opt(2, "Responses per prompt; all k(k-1)/2 pairs are compared.", "InstructGPT ranks K=4..9")
    temperature: float = opt(1.0, "Sampling temperature.")
    max_new_tokens: int = opt(32, "Longest response.")
    annotators: Literal["simulated", "none"] = opt(
        "simulated", "'simulated': the built-in task's annotators label every pair; 'none': only write "
        "candidates for people (posttrain label import) or a judge.")
    labels_per_pair: int = opt(1, "Distinct simulated annotators per pair (overlap).")
    heldout_prompts: int = opt(200, "Held-out prompts whose pairs are labeled by the gold reward "
                               "(built-in task only; 0 = none).")
    seed: int = opt(0, "Sampling and annotator seed.")
    output_dir: str = opt("runs/collect", "Where train.jsonl, heldout.jsonl, candidates.jsonl go.")

    def validate(self) -> None:
        if self.k < 2:
            raise ConfigError(f"k={self.k}: a comparison needs at least 2 responses", where="k", fix="k=2")
        if self.annotators == "none":
            refuse_top(self, ("labels_per_pair", "heldout_prompts"), "annotators=none writes unlabelled candidates")
        if self.annotators == "simulated" and not self.prompts.startswith("builtin:"):
            raise ConfigError("simulated annotators know only the built-in task's gold reward",
                              where="annotators", fix="use annotators=none for your own prompts")


def _sample_pairs(model, tokenizer, prompts: list[str], cfg: CollectConfig, seed: int) -> list[tuple[str, str, str]]:
    texts = sample_texts(model, tokenizer, prompts, cfg.k, cfg.max_new_tokens, cfg.temperature, seed)
    pairs = []
    for i, prompt in enumerate(prompts):
        group = texts[i * cfg.k:(i + 1) * cfg.k]
        pairs += [(prompt, a, b) for a, b in itertools.combinations(group, 2)]
    return pairs


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def run(cfg: CollectConfig) -> dict:
    rows = load_records(cfg.prompts, "prompt", options=ReadOptions(prefix=None))[: cfg.n_prompts]
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    tokenizer = tokenizer_for(cfg.model)
    model = load_policy(cfg.model)
    prompts = [r["prompt"] for r in rows]
    pairs = _sample_pairs(model, tokenizer, prompts, cfg, cfg.seed)
    identical = sum(a == b for _, a, b in pairs)
    pairs = [p for p in pairs if p[1] != p[2]]  # nothing to compare
    _write(out / "candidates.jsonl", [{"prompt": p, "responses": [{"text": a, "model": cfg.model.name_or_path},
                                                                  {"text": b, "model": cfg.model.name_or_path}]}
                                      for p, a, b in pairs])
    summary = {"pairs": len(pairs), "identical_pairs_skipped": identical}
    if cfg.annotators == "simulated":
        labels = annotators.label_pairs(pairs, per_pair=cfg.labels_per_pair, seed=cfg.seed)
        _write(out / "train.jsonl", labels)
        gold_agree = [builtin.gold_reward(r["prompt"], r["chosen"]) > builtin.gold_reward(r["prompt"], r["rejected"])
                      for r in labels if not r["tie"]]
        summary.update(labels=len(labels), ties=sum(r["tie"] for r in labels),
                       label_gold_agreement=sum(gold_agree) / max(1, len(gold_agree)))
        if cfg.heldout_prompts:
            held = [p.prompt for p in builtin.heldout_problems(cfg.heldout_prompts)]
            held_pairs = _sample_pairs(model, tokenizer, held, cfg, cfg.seed + 1)
            gold = []
            for p, a, b in held_pairs:
                ga, gb = builtin.gold_reward(p, a), builtin.gold_reward(p, b)
                if ga != gb:
                    gold.append({"prompt": p, "chosen": a if ga > gb else b, "rejected": b if ga > gb else a,
                                 "source": "gold"})
            _write(out / "heldout.jsonl", gold)
            summary["heldout_pairs"] = len(gold)
    write_summary(out, summary)
    print("collect: " + ", ".join(f"{k} {v}" for k, v in summary.items() if isinstance(v, (int, float)))
          + "".join(f"\n  {p.name:<16} {p}" for p in sorted(out.glob("*.json*"))), flush=True)
    summary["run_dir"] = str(out)
    return summary
