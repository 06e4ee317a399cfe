"""Best-of-N: rejection sampling into an SFT dataset, and best-of-N as an inference-time baseline
(rlhf-book ch. 9; Gao et al. 2023).

For M prompts, N completions each are sampled from the policy and scored by the reward (a reward
model ``rm:<path>``, a verifier, ...). Selection (ch. 9's two strategies):

    per_prompt   S(R) = [argmax_j r_ij]_i                 one completion per prompt
    top_k        S_K(R) = argsort(R.flatten())[-K:]       the K best overall (i = k // N, j = k mod N)

writes ``selected.jsonl`` ({prompt, completion, reward}; SFT's prompt/completion format, so
``posttrain sft data.train=<run>/selected.jsonl`` trains on it, or ``finetune=true`` does it here) and
``samples.jsonl`` (every sample with its scores).

As a baseline, best-of-n for each n in ``baseline_n`` is evaluated without training: the expected
reward of the proxy-best of n samples (the unbiased order-statistics estimate over all n-subsets of
the N), its analytic KL to the policy, log n − (n−1)/n, and on the built-in task the gold reward and
accuracy of that same proxy-selected sample (proxy vs gold shows over-optimisation of a learned RM).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

import numpy as np

from posttrain.advantages import best_of_n_kl
from posttrain.commands import load_command
from posttrain.config import DataConfig, ModelConfig, TrainConfig, opt
from posttrain.config_checks import refuse_set, refuse_top
from posttrain.engines.loop import write_summary
from posttrain.engines.rollout import sample_texts
from posttrain.engines.train import make_run_dir
from posttrain.errors import ConfigError
from posttrain.evaluation.stats import best_of_n_expected
from posttrain.models.loading import load_policy, tokenizer_for
from posttrain.rewards.builtin import _text
from posttrain.rewards.combine import check_reward_config, combine_rewards, default_reward, load_rewards
from posttrain.rollouts.config import RolloutConfig, refuse_environment
from posttrain.rollouts.experience import load_prompt_records, make_engine
from posttrain.rollouts.task_eval import builtin_task_eval
from posttrain.tasks import builtin


@dataclass
class BestOfNConfig:
    model: ModelConfig = opt(factory=ModelConfig, help="Policy that writes the candidates.")
    rollout: RolloutConfig = opt(factory=lambda: RolloutConfig(prompts="builtin:prompts", max_prompts=256,
                                                               prompts_per_step=32, group_size=16),
                                 help="Prompts (max_prompts of them), N = group_size samples each, "
                                      "prompts_per_step per generation call.")
    reward: list[str] = opt([], "Scorer(s): rm:<path> | builtin_gold | builtin_correct | exact_match | math | "
                            "module:function (weighted sum). Empty: builtin_gold on the built-in task's prompts; "
                            "with your own prompts a reward must be given.")
    reward_weights: list[float] = opt([], "One weight per reward (empty = all 1.0).")
    selection: Literal["per_prompt", "top_k"] = opt("per_prompt", "Best per prompt, or the top K overall.",
                                                    "rlhf-book ch. 9")
    top_k: int | None = opt(None, "K for selection=top_k (null = the number of prompts).")
    min_reward: float | None = opt(None, "Drop selected samples scoring below this (null = keep all).")
    baseline_n: list[int] = opt([1, 2, 4, 8, 16], "n values of the inference-time best-of-n baseline "
                                "(each <= N).", "Gao et al. 2023 BoN curves")
    finetune: bool = opt(False, "Run SFT on the selected data afterwards (into <run>/sft).")
    train: TrainConfig = opt(factory=lambda: TrainConfig(lr=1e-4, epochs=2.0, batch_size=16, micro_batch_size=16),
                             help="Output directory and seed; optimisation of the optional SFT stage.")

    def __post_init__(self):
        self.reward = default_reward(self.reward, self.rollout.prompts, "builtin_gold")

    def validate(self) -> None:
        refuse_environment(self.rollout, "best-of-n")
        check_reward_config(self.reward, self.reward_weights, self.rollout.prompts)
        N = self.rollout.group_size
        bad = [n for n in self.baseline_n if not 1 <= n <= N]
        if bad:
            raise ConfigError(f"baseline_n {bad} must lie in [1, N={N}]", where="baseline_n",
                              fix=f"use values up to rollout.group_size={N}, or raise group_size")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError("top_k must be >= 1", where="top_k")
        if self.selection == "per_prompt":
            refuse_top(self, ("top_k",), "selection=per_prompt keeps each prompt's best (top_k is K of selection=top_k)")
        if not self.finetune:  # then train.* only names the run directory and seeds the sampling
            used = ("output_dir", "seed", "overwrite", "threads")
            refuse_set(self, "train", [f.name for f in fields(self.train) if f.name not in used],
                       "finetune is false: best-of-n samples and selects, and trains nothing",
                       "add finetune=true to train on the selection, or remove it")
        default = RolloutConfig()
        for key in ("correction", "tis_cap"):  # training options: best-of-n has no policy gradient
            if getattr(self.rollout, key) != getattr(default, key):
                raise ConfigError(f"rollout.{key} corrects policy-gradient updates; best-of-n makes none",
                                  where=f"rollout.{key}", fix=f"remove rollout.{key}")


def select(rewards: list[list[float]], how: str, k: int | None = None) -> list[tuple[int, int]]:
    """(prompt i, sample j) pairs chosen from an [M][N] reward table (NaN = unscored, never chosen)."""
    M = len(rewards)
    if how == "per_prompt":
        out = []
        for i, row in enumerate(rewards):
            scored = [(r, -j) for j, r in enumerate(row) if not math.isnan(r)]
            if scored:
                out.append((i, -max(scored)[1]))  # ties: the first sample
        return out
    N = len(rewards[0]) if M else 0
    flat = [(r, -(i * N + j)) for i, row in enumerate(rewards) for j, r in enumerate(row) if not math.isnan(r)]
    top = sorted(flat, reverse=True)[: (k or M)]
    return sorted(divmod(-idx, N) for _, idx in top)


def run(cfg: BestOfNConfig) -> dict:
    records = load_prompt_records(cfg.rollout)
    rewards = load_rewards(cfg.reward, cfg.reward_weights)
    run_dir = make_run_dir(cfg.train, "best-of-n", cfg)
    tokenizer = tokenizer_for(cfg.model)
    model = load_policy(cfg.model)
    engine = make_engine(model, tokenizer, cfg.rollout, cfg.model.name_or_path)
    N, B = cfg.rollout.group_size, cfg.rollout.prompts_per_step

    texts: list[str] = []
    for s in range(0, len(records), B):  # generation in chunks of prompts_per_step prompts
        texts += sample_texts(model, tokenizer, [r["prompt"] for r in records[s:s + B]], N,
                              cfg.rollout.max_new_tokens, cfg.rollout.temperature, cfg.train.seed + s, engine,
                              top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k, stop_strings=cfg.rollout.stop_strings)
    rep = [r for r in records for _ in range(N)]
    prompts = [r["prompt"] for r in rep]
    columns = {k: [r.get(k) for r in rep] for k in records[0] if k != "prompt"}
    raw = {name: list(fn(prompts, texts, **columns)) for name, fn, _ in rewards}
    total, valid = combine_rewards(raw, {name: w for name, _, w in rewards})
    proxy = np.where(valid.numpy(), total.numpy(), np.nan).reshape(len(records), N)
    is_builtin = cfg.rollout.prompts.startswith("builtin:")
    gold = (np.array([builtin.gold_reward(_text(p), t) for p, t in zip(prompts, texts)]).reshape(-1, N)
            if is_builtin else None)
    correct = (np.array([float(builtin.is_correct(_text(p), t)) for p, t in zip(prompts, texts)]).reshape(-1, N)
               if is_builtin else None)

    # ---- selection -> SFT data
    chosen = select(proxy.tolist(), cfg.selection, cfg.top_k)
    if cfg.min_reward is not None:
        chosen = [(i, j) for i, j in chosen if proxy[i, j] >= cfg.min_reward]
    with (run_dir / "selected.jsonl").open("w") as f:
        for i, j in chosen:
            f.write(json.dumps({"prompt": records[i]["prompt"], "completion": texts[i * N + j],
                                "reward": float(proxy[i, j])}) + "\n")
    with (run_dir / "samples.jsonl").open("w") as f:
        for k, t in enumerate(texts):
            row = {"prompt": prompts[k], "completion": t, "reward": None if np.isnan(proxy.flat[k]) else float(proxy.flat[k]),
                   **{f"reward/{n}": v[k] for n, v in raw.items()}}
            if gold is not None:
                row["gold"] = float(gold.flat[k])
            f.write(json.dumps(row) + "\n")

    # ---- inference-time baseline: best-of-n for each n
    ok = ~np.isnan(proxy).any(axis=1)  # prompts with every sample scored
    curve = []
    for n in cfg.baseline_n:
        pt = {"n": n, "kl": best_of_n_kl(n), "proxy": float(best_of_n_expected(proxy[ok], n).mean())}
        if gold is not None:
            pt["gold"] = float(best_of_n_expected(gold[ok], n, select_by=proxy[ok]).mean())
            pt["accuracy"] = float(best_of_n_expected(correct[ok], n, select_by=proxy[ok]).mean())
        curve.append(pt)
    sel = np.array([proxy[i, j] for i, j in chosen])
    summary = {"prompts": len(records), "samples_per_prompt": N, "selection": cfg.selection,
               "selected": len(chosen), "proxy_mean_all": float(np.nanmean(proxy)),
               "proxy_mean_selected": float(sel.mean()) if len(sel) else float("nan"), "best_of_n": curve,
               "selected_path": str(run_dir / "selected.jsonl")}
    if gold is not None:
        summary["gold_mean_all"] = float(gold.mean())
        summary["gold_mean_selected"] = float(np.mean([gold[i, j] for i, j in chosen])) if chosen else float("nan")
        summary["accuracy_all"] = float(correct.mean())
        summary["accuracy_selected"] = float(np.mean([correct[i, j] for i, j in chosen])) if chosen else float("nan")

    if cfg.finetune and chosen:
        train = TrainConfig(**{**cfg.train.__dict__, "output_dir": str(run_dir / "sft")})
        data = DataConfig(train=str(run_dir / "selected.jsonl"), eval=None, max_length=cfg.rollout.max_prompt_tokens
                          + cfg.rollout.max_new_tokens + 8)
        sft_config, sft_run = load_command("sft")  # a second command, through the registry
        res = sft_run(sft_config(model=cfg.model, data=data, train=train, task_eval=False))
        summary["finetune"] = {"run_dir": res["run_dir"]}
        if is_builtin:  # the built-in task's held-out metrics before and after
            tuned = load_policy(cfg.model, None, name_or_path=str(Path(res["run_dir"]) / "final"))
            summary["finetune"]["initial"] = builtin_task_eval(model, tokenizer, seed=cfg.train.seed)
            summary["finetune"]["final"] = builtin_task_eval(tuned, tokenizer, seed=cfg.train.seed)
    write_summary(run_dir, summary)
    gold_text = (f"; gold {summary['gold_mean_all']:.3f} -> {summary['gold_mean_selected']:.3f} (selected)"
                 if gold is not None else "")
    print(f"best-of-n: {len(records)} prompts x {N} samples; proxy {summary['proxy_mean_all']:.3f} -> "
          f"{summary['proxy_mean_selected']:.3f} (selected){gold_text}\n  selected.jsonl {run_dir / 'selected.jsonl'}"
          f"\n  summary.json   {run_dir / 'summary.json'}", flush=True)
    summary["run_dir"] = str(run_dir)
    return summary
