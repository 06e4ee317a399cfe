"""KTO: alignment from unpaired thumbs-up / thumbs-down data (Ethayarajh et al. 2024).

With r(x, y) = log π(y|x) − log π_ref(y|x) and the reference point z₀ = max(0, KL estimate):

    L = E_desirable[λ_D (1 − σ(β (r − z₀)))] + E_undesirable[λ_U (1 − σ(β (z₀ − r)))]

z₀ is estimated, detached, from *mismatched* pairs: each record's prompt with another record's
completion, mean of log π(y'|x) − log π_ref(y'|x), clamped at 0 (the paper's estimator; TRL builds
the same mismatched set by shifting completions). The mismatch is fixed per dataset (a seeded
derangement), so the reference log-probs of the mismatched sequences are precomputed and cached with
the rest; the policy's are computed each step without gradient.

Data: {"prompt", "completion", "label": bool}; paired {"prompt", "chosen", "rejected"} data is
unpaired automatically (chosen -> desirable, rejected -> undesirable). Held-out *pairs* are scored with
the implicit reward β r (rewards/accuracy), as for DPO. λ_D n_D / (λ_U n_U) in [1, 4/3] is the
paper's recommended balance; the run reports it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from posttrain.config import DataConfig, LoraConfig, ModelConfig, TrainConfig, opt
from posttrain.data.batching import StepSampler, collate, shard
from posttrain.data.formats import load_records, load_train_eval, read_options
from posttrain.data.preference import (
    Encoded,
    by_slot,
    collate_responses,
    count_records,
    encode_pair,
    encode_unpaired,
    micro_batches_of,
    truncation_counts,
    unpair,
)
from posttrain.data.sources import read_source
from posttrain.engines import sharding
from posttrain.engines.loop import TrainEngineAutocast, finish, initial_eval, record_steps, save_final
from posttrain.engines.runlog import MetricsLogger, Progress
from posttrain.engines.train import TrainEngine, make_run_dir
from posttrain.errors import ConfigError, DataError
from posttrain.losses.direct import kto_loss
from posttrain.models.forward import sequence_logps
from posttrain.models.loading import tokenizer_for
from posttrain.models.preference import make_loss_fn as direct_loss_fn
from posttrain.models.preference import pair_eval
from posttrain.models.reference import attach_reference, attach_reference_in_order, policy_with_reference
from posttrain.rollouts.task_eval import task_metrics


@dataclass
class KTOConfig:
    compares_logps: ClassVar[bool] = True  # config_checks.resolve_dropout: model.dropout=auto is off
    model: ModelConfig = opt(factory=ModelConfig, help="Policy to train (usually an SFT model); also the "
                             "reference unless ref_model is set.")
    lora: LoraConfig = opt(factory=LoraConfig, help="LoRA adapters; the reference is then the same model "
                           "with adapters disabled.")
    data: DataConfig = opt(factory=lambda: DataConfig(train="builtin:preferences", eval=None),
                           help="Unpaired {prompt, completion, label} or paired {prompt, chosen, rejected} "
                                "(unpaired automatically). data.eval: held-out pairs.")
    train: TrainConfig = opt(factory=lambda: TrainConfig(lr=5e-5, epochs=1.0, schedule="linear", batch_size=32,
                                                         micro_batch_size=32),
                             help="Optimisation; defaults suit the tiny model (real models: lr 5e-7..5e-6).")
    beta: float = opt(0.1, "β: scale of the implicit reward.", "Ethayarajh et al. 2024; TRL default 0.1")
    desirable_weight: float = opt(1.0, "λ_D, weight of desirable examples.", "KTO paper")
    undesirable_weight: float = opt(1.0, "λ_U, weight of undesirable examples.", "KTO paper")
    nll_weight: float = opt(0.0, "Add nll_weight x the desirable completions' per-token NLL (as RPO does for "
                            "DPO): counters likelihood displacement. 0 = KTO alone.", "Pang et al. 2024 (RPO)")
    reference: Literal["auto", "precompute", "live"] = opt(
        "auto", "precompute (auto): one cached inference pass, reference freed; live: computed each step.")
    ref_model: str | None = opt(None, "Reference model path (default: model.name_or_path).")
    ref_cache_dir: str | None = opt(None, "Cache of precomputed reference log-probs (default "
                                    "$POSTTRAIN_CACHE/ref_logps).")
    eval_holdout: int = opt(0, "With data.eval null and paired data, hold out the last N pairs for evaluation.")
    packing: bool = opt(True, "Pack sequences into rows with isolated attention.")
    task_eval: bool = opt(True, "Built-in task: report gold reward, accuracy and KL of samples.")
    task_eval_prompts: int = opt(64, "Held-out prompts for the built-in task's metrics.")
    task_eval_samples: int = opt(4, "Samples per held-out prompt (temperature 1).")

    def validate(self) -> None:
        if self.beta <= 0:
            raise ConfigError(f"beta must be positive, got {self.beta}", where="beta")
        if self.desirable_weight <= 0 or self.undesirable_weight <= 0:
            raise ConfigError("desirable_weight and undesirable_weight must be positive",
                              where="desirable_weight/undesirable_weight")
        if self.nll_weight < 0:
            raise ConfigError(f"nll_weight must be >= 0, got {self.nll_weight}", where="nll_weight")
        if self.train.batch_size < 2:
            raise ConfigError("KTO's reference point needs at least 2 records per batch", where="train.batch_size")


def mismatched(encs: list, seed: int) -> list:
    """For record i, an Example of i's prompt with the completion of another record (a seeded
    derangement; a neighbour with the same prompt is skipped when possible)."""
    n = len(encs)
    order = list(range(n))
    random.Random(seed + 4242).shuffle(order)
    out = [None] * n
    for pos, i in enumerate(order):
        j = order[(pos + 1) % n]
        for step in range(2, min(n, 8)):
            if encs[j].prompt_ids != encs[i].prompt_ids:
                break
            j = order[(pos + step) % n]
        out[i] = Encoded(encs[i].prompt_ids, [encs[j].responses[0]]).example(0)
    return out


def load_unpaired(cfg: KTOConfig) -> tuple[list[dict], list[dict]]:
    """(unpaired training rows, held-out pairs)."""
    d = cfg.data
    first = next((r.value for r in read_source(d.train, d.split).rows if isinstance(r.value, dict)), {})
    first = {d.columns.get(k, k): v for k, v in first.items()}
    if "chosen" in first and "rejected" in first:
        pairs, held = load_train_eval(d, "preference", eval_holdout=cfg.eval_holdout)
        rows = unpair(pairs)
    else:
        if (cfg.eval_holdout or d.eval_fraction) and not d.eval_source():
            raise ConfigError("holding out evaluation records needs paired data (held-out pairs)",
                              where="eval_holdout" if cfg.eval_holdout else "data.eval_fraction",
                              fix="give data.eval=<pairs file> instead")
        opts = read_options(d)
        rows = load_records(d.train, "unpaired", columns=d.columns, split=d.split, max_rows=d.max_rows,
                            max_errors=d.max_errors, options=opts)
        source = d.eval_source()
        held = (load_records(source, "preference", columns=d.columns, max_errors=d.max_errors, options=opts)
                if source else [])
    if len({bool(r["label"]) for r in rows}) < 2:
        raise DataError("the training data has only one label; KTO needs desirable and undesirable examples",
                        where=d.train, fix="add records with the other label")
    return rows, [r for r in held if not r.get("tie")]


def make_loss_fn(cfg: KTOConfig, live=None):
    def loss_fn(model, batch, total):
        logp, ntok = sequence_logps(model, batch)
        pol = by_slot(logp, batch)[:, 0]
        kl_batch = batch["kl_batch"]
        with torch.no_grad():
            if live is not None:
                ref = by_slot(live.batch_logps(batch, model), batch)[:, 0]
                kl_ref = live.batch_logps(kl_batch, model)
            else:
                ref, kl_ref = batch["ref"][:, 0], batch["kl_ref"]
            kl_pol, _ = sequence_logps(model, kl_batch)
            z0 = (kl_pol - kl_ref).mean().clamp(min=0)  # detached reference point (per micro-batch)
        loss, metrics = kto_loss(pol, ref, batch["label"], z0, beta=cfg.beta,
                                 desirable_weight=cfg.desirable_weight, undesirable_weight=cfg.undesirable_weight)
        metrics = {k: v.detach() for k, v in metrics.items()}
        if cfg.nll_weight:  # mean over the batch of per-token NLL on desirable completions (0 on others)
            good = batch["label"].to(pol.dtype)
            nll = (-pol / by_slot(ntok, batch)[:, 0].clamp(min=1) * good).mean()
            metrics["nll"] = nll.detach()
            loss = loss + cfg.nll_weight * nll
        metrics.update(loss=loss.detach(), kl=z0)
        return loss * (batch["n_records"] / total), metrics  # batch mean -> share of sum/total

    return loss_fn


def run(cfg: KTOConfig) -> dict:
    rows, held = load_unpaired(cfg)
    run_dir = make_run_dir(cfg.train, "kto", cfg)
    tokenizer = tokenizer_for(cfg.model)
    pad = tokenizer.pad_token_id
    train_enc = [encode_unpaired(tokenizer, r, cfg.data.max_length) for r in rows]
    eval_enc = [encode_pair(tokenizer, r, cfg.data.max_length) for r in held]
    kl_exs = mismatched(train_enc, cfg.train.seed)
    n_d = sum(e.label for e in train_enc)
    balance = cfg.desirable_weight * n_d / (cfg.undesirable_weight * (len(train_enc) - n_d))
    reference = "precompute" if cfg.reference == "auto" else cfg.reference
    ref_path = cfg.ref_model or cfg.model.name_or_path

    # ---- the policy and its reference (the mismatched KL pairs' reference log-probs precomputed too; under
    # FSDP the models are built on meta on every process but 0 and the pass runs once the policy is sharded)
    model, tables, extras, ref_info, live, later = policy_with_reference(
        {"train": train_enc, "eval": eval_enc}, reference=reference, ref_path=ref_path, model_cfg=cfg.model,
        lora=cfg.lora, cache_dir=cfg.ref_cache_dir, pad_id=pad, autocast=TrainEngineAutocast(cfg.train),
        extra={"kl": kl_exs}, empty=(sharding.loads_empty(cfg.train), sharding.loads_empty(cfg.train, frozen=True)),
        defer=sharding.shards(cfg.train))

    sampler = StepSampler(len(train_enc), cfg.train.batch_size, cfg.train.seed)
    total = cfg.train.max_steps or max(1, int(cfg.train.epochs * sampler.steps_per_epoch))
    engine = TrainEngine(model, cfg.train, total, run_dir)
    if later is not None:
        tables, extras, ref_info = later(engine.model, sharding.reference_pass(engine))
    kl_table = extras.get("kl")
    if live is not None and live.model is not None:  # whole on every process, or sharded like the policy
        live.model = engine.frozen(live.model, "reference", holder=live)
    logger = MetricsLogger(run_dir, enabled=engine.is_main, report_to=cfg.train.report_to, config=cfg)
    if engine.maybe_resume() is not None:
        logger.truncate_after(engine.step_count)
    loss_fn = make_loss_fn(cfg, live)
    eval_fn = direct_loss_fn("dpo", cfg.beta, {}, live)  # implicit-reward metrics on held-out pairs
    kw = dict(packing=cfg.packing, pad_id=pad)

    def micro_batches(step: int) -> list[dict]:
        out = []
        for p in shard(sampler.batch(step), engine.rank, engine.world_size, cfg.train.micro_batch_size):
            b = attach_reference(collate_responses([train_enc[i] for i in p], **kw), tables["train"], p)
            b["kl_batch"] = collate([kl_exs[i] for i in p], **kw)
            if kl_table is not None:
                b["kl_ref"] = kl_table[p]
            out.append(b)
        return out

    eval_batches = attach_reference_in_order(micro_batches_of(eval_enc, cfg.train.micro_batch_size, **kw),
                                             tables["eval"])

    def evaluate(initial: bool = False) -> dict:
        out = pair_eval(engine.unwrapped, eval_batches, eval_fn, engine.autocast)
        if cfg.task_eval and cfg.data.train.startswith("builtin:"):
            out.update(task_metrics(cfg, engine, tokenizer, live, ref_path, initial))
        return out

    summary: dict = {**truncation_counts(train_enc), "beta": cfg.beta, "reference": reference, "reference_cache": ref_info,
                     "train_examples": len(train_enc), "desirable": n_d, "undesirable": len(train_enc) - n_d,
                     "weighted_balance": balance, "eval_pairs": len(eval_enc), "world_size": engine.world_size, "strategy": engine.strategy,
                     "frozen": engine.frozen_summary(), "total_steps": total, "sharded_load": engine.loaded}
    if not 1.0 <= balance <= 4 / 3 and engine.is_main:
        print(f"kto: λ_D·n_D / (λ_U·n_U) = {balance:.2f}, outside the paper's recommended [1, 4/3]; adjust "
              f"desirable_weight / undesirable_weight")
    initial_eval(engine, logger, summary, lambda: evaluate(initial=True))
    summary["examples_per_s"] = record_steps(
        engine, cfg.train, total, micro_batches, loss_fn, count_records, logger,
        Progress(total, "kto", cfg.train.progress), evaluate, rate_key="examples_per_s",
        describe=lambda row: f"loss {row['train/loss']:.3f} kl {row['train/kl']:.3f}")
    return finish(engine, logger, run_dir, summary, evaluate, engine.step_count,
                  save=lambda: save_final(engine, tokenizer, run_dir, cfg.lora))
