"""Direct alignment from preference pairs: DPO and its family, chosen once by ``loss``.

DPO (Rafailov et al. 2023; RLHF book ch. 8), with h = β[(log π(y_c|x) − log π_ref(y_c|x)) −
(log π(y_r|x) − log π_ref(y_r|x))]:

    L_DPO = −log σ(h)

The other losses of the registry (``posttrain.losses.direct.DIRECT_LOSSES``): ``cdpo`` (label
smoothing ε), ``robust`` (rDPO, unbiased under label noise ε), ``ipo`` ((h/β − 1/(2β))², Azar et al.
2023), ``hinge`` (SLiC), and the reference-free ``simpo`` (length-normalised log-probs with a target
margin γ, Meng et al. 2024) and ``orpo`` (NLL + odds-ratio term, Hong et al. 2024). Extra loss
hyper-parameters go in ``loss_args`` and are checked against the loss function's signature.

Efficiency: chosen and rejected of a micro-batch run in ONE packed forward (``pairs.collate_responses``);
log-probs are gathered (``token_logps``), never a full [B, T, V] log-softmax; reference log-probs are
precomputed once and cached (``reference.py``), so training holds one model. Each loss returns a batch
mean, which is scaled by (pairs in this micro-batch / pairs in the optimizer step) so accumulation and
DDP give the gradient of one big batch. With ``shared_prompt`` (default) the prompt of a pair is
computed once for both responses (``pairs.collate_shared``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from posttrain.config import DataConfig, LoraConfig, ModelConfig, TrainConfig, opt
from posttrain.data.batching import StepSampler, shard
from posttrain.data.formats import load_train_eval
from posttrain.data.preference import (
    batch_records,
    count_records,
    encode_pair,
    micro_batches_of,
    truncation_counts,
)
from posttrain.engines import sharding
from posttrain.engines.loop import TrainEngineAutocast, finish, initial_eval, record_steps, save_final
from posttrain.engines.runlog import MetricsLogger, Progress
from posttrain.engines.train import TrainEngine, make_run_dir
from posttrain.errors import ConfigError
from posttrain.models.loading import tokenizer_for
from posttrain.models.preference import make_loss_fn, pair_eval, resolve_reference, validate_direct
from posttrain.models.reference import attach_reference, attach_reference_in_order, policy_with_reference
from posttrain.rollouts.task_eval import task_metrics


@dataclass
class DPOConfig:
    compares_logps: ClassVar[bool] = True  # config_checks.resolve_dropout: model.dropout=auto is off
    model: ModelConfig = opt(factory=ModelConfig, help="Policy to train (usually an SFT model); also the "
                             "reference unless ref_model is set.")
    lora: LoraConfig = opt(factory=LoraConfig, help="LoRA adapters; the reference is then the same model "
                           "with adapters disabled (no second copy).")
    data: DataConfig = opt(factory=lambda: DataConfig(train="builtin:preferences", eval=None),
                           help="Preference pairs {prompt, chosen, rejected} (strings or messages; "
                                "implicit-prompt conversations allowed).")
    train: TrainConfig = opt(factory=lambda: TrainConfig(lr=5e-5, epochs=1.0, schedule="linear", batch_size=32,
                                                         micro_batch_size=32),
                             help="Optimisation; defaults suit the tiny model (real models: lr 5e-7..1e-6, "
                                  "TRL/Tulu 3).")
    loss: str = opt("dpo", "Direct-alignment loss: dpo, cdpo, robust, ipo, hinge, simpo, orpo.",
                    "posttrain.losses.direct.DIRECT_LOSSES")
    beta: float = opt(0.1, "β: strength of the implicit KL constraint (SimPO: reward scale, ~2; ORPO: "
                      "odds-ratio weight λ).", "Rafailov et al. 2023; TRL default 0.1")
    loss_args: dict[str, float] = opt({}, "Extra hyper-parameters of the chosen loss, e.g. {label_smoothing: "
                                      "0.1} for cdpo/robust, {gamma: 0.5} for simpo (names per the loss).")
    nll_weight: float = opt(0.0, "Add nll_weight x the chosen responses' per-token NLL to the loss (RPO); "
                            "counters likelihood displacement (chosen and rejected log-probs both falling). "
                            "0 = the loss alone; ORPO has its own NLL term.",
                            "Pang et al. 2024 (RPO, alpha = 1); TRL loss_type ['sigmoid', 'sft']")
    reference: Literal["auto", "precompute", "live", "none"] = opt(
        "auto", "precompute: one cached inference pass, then the reference is freed; live: computed each "
        "step; none: reference-free losses. auto = none for simpo/orpo, else precompute.",
        "TRL precompute_ref_log_probs; RLHF book ch. 8")
    ref_model: str | None = opt(None, "Reference model path (default: model.name_or_path).")
    ref_cache_dir: str | None = opt(None, "Where precomputed reference log-probs are cached (default "
                                    "$POSTTRAIN_CACHE/ref_logps).")
    eval_holdout: int = opt(0, "With data.eval null, hold out the last N training pairs for evaluation.")
    packing: bool = opt(True, "Pack sequences into rows with isolated attention (no compute on padding).")
    shared_prompt: bool = opt(True, "Compute each record's prompt once for all its responses (packed "
                              "layout where a response attends to the prompt and itself only). Needs packing.")
    task_eval: bool = opt(True, "When data.train is the built-in task, sample held-out prompts and report "
                          "the gold reward, accuracy and KL to the reference.")
    task_eval_prompts: int = opt(64, "Held-out prompts for the built-in task's metrics.")
    task_eval_samples: int = opt(4, "Samples per held-out prompt (temperature 1).")

    def validate(self) -> None:
        validate_direct(self.loss, self.beta, self.loss_args, self.reference)
        if self.nll_weight < 0:
            raise ConfigError(f"nll_weight must be >= 0, got {self.nll_weight}", where="nll_weight")
        if self.nll_weight and self.loss == "orpo":
            raise ConfigError("orpo already contains an NLL term on the chosen responses", where="nll_weight",
                              fix="leave nll_weight=0 with loss=orpo")
        if self.shared_prompt and not self.packing:
            raise ConfigError("shared_prompt needs packing (the shared layout is a packed row)", where="shared_prompt",
                              fix="set shared_prompt=false, or packing=true")
        if self.eval_holdout < 0:
            raise ConfigError("eval_holdout must be >= 0", where="eval_holdout")


# ----------------------------------------------------------------------------- loss


# ----------------------------------------------------------------------------- shared setup


# ----------------------------------------------------------------------------- command


def run(cfg: DPOConfig) -> dict:
    # ---- data first: bad rows stop the run before any model loads
    train_rows, eval_rows = load_train_eval(cfg.data, "preference", eval_holdout=cfg.eval_holdout)
    ties = sum(bool(r.get("tie")) for r in train_rows)
    train_rows = [r for r in train_rows if not r.get("tie")]
    eval_rows = [r for r in eval_rows if not r.get("tie")]
    if ties:
        print(f"dpo: {ties} tie record(s) carry no preference direction and are not trained (reported as "
              f"ties_skipped)")
    run_dir = make_run_dir(cfg.train, "dpo", cfg)
    tokenizer = tokenizer_for(cfg.model)
    pad = tokenizer.pad_token_id
    train_enc = [encode_pair(tokenizer, r, cfg.data.max_length) for r in train_rows]
    eval_enc = [encode_pair(tokenizer, r, cfg.data.max_length) for r in eval_rows]
    reference = resolve_reference(cfg.reference, cfg.loss)
    ref_path = cfg.ref_model or cfg.model.name_or_path

    # ---- the policy and its reference (a precomputed reference pass runs before the policy loads; under FSDP
    # the models are built on meta on every process but 0 and the pass runs once the policy is sharded)
    model, tables, _, ref_info, live, later = policy_with_reference(
        {"train": train_enc, "eval": eval_enc}, reference=reference, ref_path=ref_path, model_cfg=cfg.model,
        lora=cfg.lora, cache_dir=cfg.ref_cache_dir, pad_id=pad, autocast=TrainEngineAutocast(cfg.train),
        empty=(sharding.loads_empty(cfg.train), sharding.loads_empty(cfg.train, frozen=True)),
        defer=sharding.shards(cfg.train))

    sampler = StepSampler(len(train_enc), cfg.train.batch_size, cfg.train.seed)
    total = cfg.train.max_steps or max(1, int(cfg.train.epochs * sampler.steps_per_epoch))
    engine = TrainEngine(model, cfg.train, total, run_dir)
    if later is not None:
        tables, _, ref_info = later(engine.model, sharding.reference_pass(engine))
    if live is not None and live.model is not None:  # whole on every process, or sharded like the policy
        live.model = engine.frozen(live.model, "reference", holder=live)
    logger = MetricsLogger(run_dir, enabled=engine.is_main, report_to=cfg.train.report_to, config=cfg)
    if engine.maybe_resume() is not None:
        logger.truncate_after(engine.step_count)
    loss_fn = make_loss_fn(cfg.loss, cfg.beta, cfg.loss_args, live, cfg.nll_weight)
    kw = dict(shared_prompt=cfg.shared_prompt, packing=cfg.packing, pad_id=pad)

    def micro_batches(step: int) -> list[dict]:
        parts = shard(sampler.batch(step), engine.rank, engine.world_size, cfg.train.micro_batch_size)
        return [attach_reference(batch_records([train_enc[i] for i in p], **kw), tables["train"], p)
                for p in parts]

    eval_batches = attach_reference_in_order(micro_batches_of(eval_enc, cfg.train.micro_batch_size, **kw),
                                             tables["eval"])

    def evaluate(initial: bool = False) -> dict:
        out = pair_eval(engine.unwrapped, eval_batches, loss_fn, engine.autocast)
        if cfg.task_eval and cfg.data.train.startswith("builtin:"):
            out.update(task_metrics(cfg, engine, tokenizer, live, ref_path, initial))
        return out

    # ---- loop
    summary: dict = {**truncation_counts(train_enc), "loss": cfg.loss, "beta": cfg.beta, "reference": reference,
                     "reference_cache": ref_info, "train_pairs": len(train_enc), "eval_pairs": len(eval_enc),
                     "ties_skipped": ties, "world_size": engine.world_size, "strategy": engine.strategy,
                     "frozen": engine.frozen_summary(), "total_steps": total, "sharded_load": engine.loaded}
    initial_eval(engine, logger, summary, lambda: evaluate(initial=True))
    summary["pairs_per_s"] = record_steps(
        engine, cfg.train, total, micro_batches, loss_fn, count_records, logger,
        Progress(total, cfg.loss, cfg.train.progress), evaluate, rate_key="pairs_per_s",
        describe=lambda row: f"loss {row['train/loss']:.3f} acc {row.get('train/rewards/accuracy', 0):.2f}")
    return finish(engine, logger, run_dir, summary, evaluate, engine.step_count,
                  save=lambda: save_final(engine, tokenizer, run_dir, cfg.lora))


