"""Supervised fine-tuning (instruction tuning): next-token NLL on the assistant tokens.

    L(θ) = − (1/N) Σ_{sequences} Σ_{t trained} log π_θ(x_t | x_<t)

N counts the trained tokens of the whole optimizer step (all micro-batches, all processes), so a
long answer weighs by its tokens and accumulation does not change the gradient (RLHF book ch. 4;
the token-level normalisation TRL and open-instruct use). System and user turns are masked; every
assistant turn of a multi-turn conversation is trained. The examples of a micro-batch are packed into one
row, each attending to itself only (no compute on padding; ``data.batching``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from posttrain.config import DataConfig, LoraConfig, ModelConfig, TrainConfig, opt
from posttrain.config_checks import refuse_set
from posttrain.data.batching import StepSampler, collate, shard
from posttrain.data.chat import encode_sft, truncation_counts
from posttrain.data.formats import load_train_eval
from posttrain.engines import sharding
from posttrain.engines.loop import Throughput, between_steps, eval_loss, finish, initial_eval, save_final
from posttrain.engines.runlog import MetricsLogger, Progress
from posttrain.engines.train import TrainEngine, make_run_dir
from posttrain.losses.sft import nll_loss
from posttrain.models.forward import position_logps
from posttrain.models.loading import load_policy, tokenizer_for
from posttrain.rollouts.task_eval import builtin_task_eval


@dataclass
class SFTConfig:
    model: ModelConfig = opt(factory=ModelConfig, help="Policy to fine-tune.")
    lora: LoraConfig = opt(factory=LoraConfig, help="LoRA adapters (off = full fine-tuning).")
    data: DataConfig = opt(factory=DataConfig, help="SFT data (messages, prompt/completion or text).")
    train: TrainConfig = opt(factory=lambda: TrainConfig(lr=1e-3, epochs=3.0, schedule="cosine"),
                             help="Optimisation; SFT defaults suit the tiny model (real models: "
                                  "lr 1e-5..5e-5).")
    packing: bool = opt(True, "Pack each micro-batch into one row without padding, every sequence "
                        "attending to itself only (sdpa; eager works, slower); off = one padded row per example.",
                        "docs/data.md (Packing); benchmarks/sft.py")
    task_eval: bool = opt(True, "When data.train is the built-in task, sample held-out prompts and "
                          "report the gold reward and accuracy.")
    task_eval_prompts: int = opt(64, "Held-out prompts for the built-in task's metrics.")
    task_eval_samples: int = opt(4, "Samples per held-out prompt (temperature 1).")

    def validate(self) -> None:
        refuse_set(self, "data", ("format", "prompt_from", "scores_as_margin"), "it shapes how preference data is read, "
                   "and sft reads conversations and prompt/completion records")


def sft_loss(model, batch: dict, n_tokens: torch.Tensor):
    """NLL over trained tokens / the step's trained-token count; also token accuracy. The LM head runs
    only at positions that predict a trained token (``models.forward.position_logps``: fused with the
    log-softmax for Llama/Qwen-style models, so no [tokens, vocab] logits exist for the batch)."""
    mask = target_mask(batch)
    rows, cols = mask.bool().nonzero(as_tuple=True)
    L = batch["input_ids"].shape[1]
    lp, hits = position_logps(model, batch, rows * L + cols, batch["input_ids"][rows, cols + 1], return_hits=True)
    logp = lp.new_zeros(mask.shape).index_put((rows, cols), lp)
    loss, metrics = nll_loss(logp, mask, num_items=n_tokens)
    metrics["token_accuracy"] = hits.sum() / mask.sum().clamp(min=1)
    return loss, metrics


def target_mask(batch: dict) -> torch.Tensor:
    """[R, L-1]: position t predicts token t+1 when that token is trained and in the same sequence
    (in a packed row the first token of a sequence is never predicted from its neighbour)."""
    same = batch["seq_index"][:, 1:] == batch["seq_index"][:, :-1]
    return (batch["loss_mask"][:, 1:].bool() & same).float()


def count_tokens(batch: dict) -> torch.Tensor:
    return target_mask(batch).sum()


def run(cfg: SFTConfig) -> dict:
    # ---- data first: bad rows stop the run before any model loads
    d = cfg.data
    train_rows, eval_rows = load_train_eval(d, "sft")
    if not eval_rows:
        print("sft: no held-out data, so no evaluation loss (set data.eval=FILE or data.eval_fraction=0.05)",
              file=sys.stderr)
    run_dir = make_run_dir(cfg.train, "sft", cfg)
    tokenizer = tokenizer_for(cfg.model)
    train_ex = [encode_sft(tokenizer, r, d.max_length) for r in train_rows]
    counts = truncation_counts(train_ex)
    train_ex = [e for e in train_ex if e.n_trained > 0]
    eval_ex = [e for e in (encode_sft(tokenizer, r, d.max_length) for r in eval_rows) if e.n_trained]

    # ---- model and runtime
    with sharding.empty_loading(cfg.train):  # under FSDP built on meta on every process but 0
        model = load_policy(cfg.model, cfg.lora)
    sampler = StepSampler(len(train_ex), cfg.train.batch_size, cfg.train.seed,
                          lengths=None if cfg.packing else [len(e) for e in train_ex])
    total = cfg.train.max_steps or max(1, int(cfg.train.epochs * sampler.steps_per_epoch))
    engine = TrainEngine(model, cfg.train, total, run_dir)
    logger = MetricsLogger(run_dir, enabled=engine.is_main, report_to=cfg.train.report_to, config=cfg)
    extra = engine.maybe_resume()
    if extra is not None:
        logger.truncate_after(engine.step_count)
    pad = tokenizer.pad_token_id

    def micro_batches(step: int) -> list[dict]:
        parts = shard(sampler.batch(step), engine.rank, engine.world_size, cfg.train.micro_batch_size)
        return [collate([train_ex[i] for i in p], packing=cfg.packing, pad_id=pad) for p in parts]

    def evaluate() -> dict[str, float]:
        out = eval_loss(engine, eval_ex, sft_loss, count_tokens, pad, cfg.packing,
                        cfg.train.micro_batch_size)
        if cfg.task_eval and cfg.data.train.startswith("builtin:"):
            out.update(builtin_task_eval(engine.unwrapped, tokenizer, cfg.task_eval_prompts,
                                         cfg.task_eval_samples, seed=cfg.train.seed))
        return out

    # ---- loop
    progress = Progress(total, "sft", cfg.train.progress)
    clock = Throughput()
    summary: dict = {**counts, "train_examples": len(train_ex), "eval_examples": len(eval_ex),
                     "world_size": engine.world_size, "strategy": engine.strategy, "total_steps": total,
                     "sharded_load": engine.loaded}
    initial_eval(engine, logger, summary, evaluate)
    while engine.step_count < total:
        batches = micro_batches(engine.step_count)
        metrics = engine.step(batches, sft_loss, count_tokens)
        n_tok = sum(int((b["seq_index"] >= 0).sum()) for b in batches) * engine.world_size
        n_pad = sum(int(b["n_pad"]) for b in batches)
        clock.add(n_tok)
        step = engine.step_count
        if step % cfg.train.log_every == 0 or step == total:
            row = {f"train/{k}": v for k, v in metrics.items()}
            row.update({"tokens_per_s": clock.rate(), "padding_frac": n_pad / max(1, n_pad + n_tok / engine.world_size)})
            logger.log(step, row)
            progress.update(step, f"loss {row['train/loss']:.3f}  {row['tokens_per_s']:.0f} tok/s")
        between_steps(engine, cfg.train, step, total, evaluate, logger, {"data_step": step})
    progress.close()
    return finish(engine, logger, run_dir, summary, evaluate, engine.step_count,
                  save=lambda: save_final(engine, tokenizer, run_dir, cfg.lora))
