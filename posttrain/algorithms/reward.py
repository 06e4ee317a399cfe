"""Reward modelling: a scalar head on a causal-LM backbone, trained on preferences.

Bradley–Terry (RLHF book ch. 5; Ouyang et al. 2022):

    L = −log σ(r(x, y_c) − r(x, y_r) − m)          m = margin_scale · margin   (Llama 2 margin loss)

Ties (``tie: true``) use the soft target ½: −½ log σ(Δ) − ½ log σ(−Δ), which pulls the two scores
together; they are counted (``summary["ties"]``), never dropped and never scored as wins.
K-wise rankings ({"prompt", "responses", "ranking"}; rank 1 = best) train either every ordered pair of
a prompt together, each prompt's loss averaged over its C(K,2) pairs (``loss=kwise``, InstructGPT), or
the Plackett–Luce likelihood of the ranking (``loss=plackett_luce``, Starling). ``center_coef`` adds
the reward-centering term coef · (r_c + r_r)² (Eisenstein et al. 2023; TRL recommends 0.01).

Every response of a micro-batch goes through ONE packed forward of the backbone; the head is applied
only at each sequence's last non-pad token (``models.heads``), the token the Hugging Face classifier
reads, so ``final/`` loads with ``AutoModelForSequenceClassification`` and scores identically.
Each loss function returns a batch *mean*; it is multiplied by (records in this micro-batch / records
in the whole optimizer step), which turns it into sum / total — exact under accumulation and DDP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from posttrain.config import DataConfig, LoraConfig, ModelConfig, TrainConfig, opt
from posttrain.data.batching import StepSampler, shard
from posttrain.data.formats import load_train_eval
from posttrain.data.preference import (
    batch_records,
    by_slot,
    count_records,
    encode_pair,
    encode_ranking,
    is_ranking,
    truncation_counts,
)
from posttrain.engines import sharding
from posttrain.engines.loop import finish, initial_eval, record_steps
from posttrain.engines.runlog import MetricsLogger, Progress
from posttrain.engines.train import TrainEngine, make_run_dir
from posttrain.errors import ConfigError
from posttrain.evaluation.eval_reward import evaluate_scores, score_encoded
from posttrain.losses import reward as L
from posttrain.models.heads import load_reward_model, save_reward_model, sequence_rewards
from posttrain.models.loading import tokenizer_for
from posttrain.rewards.reward_model import RewardModelScorer

LOSSES = ("bradley_terry", "kwise", "plackett_luce")


@dataclass
class RewardConfig:
    model: ModelConfig = opt(factory=ModelConfig, help="Backbone: any causal LM with a "
                             "ForSequenceClassification class, or a saved reward model to continue.")
    lora: LoraConfig = opt(factory=LoraConfig, help="LoRA on the backbone (the head trains in full; "
                           "final/ holds merged weights).")
    data: DataConfig = opt(factory=lambda: DataConfig(train="builtin:preferences", eval=None),
                           help="Preference pairs {prompt, chosen, rejected[, margin, tie]} or K-wise "
                                "rankings {prompt, responses, ranking}.")
    train: TrainConfig = opt(factory=lambda: TrainConfig(lr=5e-4, epochs=2.0, schedule="linear", batch_size=32,
                                                         micro_batch_size=32),
                             help="Optimisation; defaults suit the tiny model (real models: lr 1e-5..1e-4, "
                                  "one epoch — RMs overfit after one pass, InstructGPT).")
    loss: Literal["bradley_terry", "kwise", "plackett_luce"] = opt(
        "bradley_terry", "bradley_terry (pairs), kwise (all pairs of a ranking kept together) or "
        "plackett_luce (ranking likelihood). Pairs are rankings of two, so kwise/plackett_luce accept them.",
        "RLHF book ch. 5")
    margin_scale: float = opt(1.0, "Factor on the `margin`/`strength` column in the BT loss "
                              "(0 ignores it).", "Llama 2 (Touvron et al. 2023)")
    center_coef: float = opt(0.0, "Reward-centering coefficient on (r_c + r_r)^2 (0 = off; 0.01 "
                             "recommended when scores should stay near 0).", "Eisenstein et al. 2023; TRL")
    eval_holdout: int = opt(0, "With data.eval null, hold out the last N training records for evaluation.")
    packing: bool = opt(True, "Pack responses into rows with isolated attention (no compute on padding).")
    shared_prompt: bool = opt(True, "Compute each record's prompt once for all its responses (packed "
                              "layout where a response attends to the prompt and itself only). Needs packing.")

    def validate(self) -> None:
        if self.loss not in LOSSES:  # the Literal check runs first; kept for programmatic configs
            raise ConfigError(f"unknown loss '{self.loss}'", where="loss", fix=f"choose one of {LOSSES}")
        if self.margin_scale < 0 or self.center_coef < 0:
            raise ConfigError("margin_scale and center_coef must be >= 0", where="margin_scale/center_coef")
        if self.shared_prompt and not self.packing:
            raise ConfigError("shared_prompt needs packing (the shared layout is a packed row)", where="shared_prompt",
                              fix="set shared_prompt=false, or packing=true")
        if self.eval_holdout < 0:
            raise ConfigError("eval_holdout must be >= 0", where="eval_holdout")


# ----------------------------------------------------------------------------- loss


def ranked_metrics(rewards: torch.Tensor, ranks: torch.Tensor) -> dict[str, torch.Tensor]:
    """Over every strictly ordered pair (rank_i < rank_j) of each record: strict accuracy, mean
    margin, mean better/worse score. Ties and empty slots are excluded."""
    better = (ranks[:, :, None] < ranks[:, None, :]) & torch.isfinite(ranks)[:, None, :]
    diff = rewards[:, :, None] - rewards[:, None, :]
    n = better.sum().clamp(min=1)
    hi = rewards[:, :, None].expand_as(diff)
    lo = rewards[:, None, :].expand_as(diff)
    return {"accuracy": ((diff > 0) & better).sum() / n, "margin": (diff * better).sum() / n,
            "chosen": (hi * better).sum() / n, "rejected": (lo * better).sum() / n}


def make_loss_fn(cfg: RewardConfig, pad_id: int):
    """The loss picked once from ``cfg.loss``: (model, batch, total) -> (sum/total loss, metrics)."""
    def loss_fn(model, batch, total):
        r = by_slot(sequence_rewards(model, batch, pad_id), batch)  # [N, K]
        ranks, n = batch["ranks"], batch["n_records"]
        valid = torch.isfinite(ranks)
        if cfg.loss == "bradley_terry":
            tie = batch["tie"]
            target = torch.where(tie, 0.5, 1.0)
            margin = torch.where(tie, 0.0, batch["margin"] * cfg.margin_scale)
            loss, _ = L.bradley_terry_loss(r[:, 0], r[:, 1], margin=margin, target=target)
        elif cfg.loss == "kwise":
            loss, _ = L.kwise_pairwise_loss(r, ranks.masked_fill(~valid, 0.0), valid)
        else:  # plackett_luce: the observed order, best first (ties broken by position)
            order = torch.argsort(ranks.masked_fill(~valid, float("inf")), dim=1, stable=True)
            loss, _ = L.plackett_luce_loss(r, order, valid)
        metrics = ranked_metrics(r.detach(), ranks)
        if cfg.center_coef:
            if r.shape[1] == 2:
                center, _ = L.reward_centering_loss(r[:, 0], r[:, 1], cfg.center_coef)
            else:  # K-wise: the sum of a record's scores plays the role of r_c + r_r
                center, _ = L.reward_centering_loss((r * valid).sum(1), torch.zeros_like(r[:, 0]), cfg.center_coef)
            metrics["center_loss"] = center.detach()
            loss = loss + center
        metrics["loss"] = loss.detach()
        # the loss functions return batch means; n/total makes every micro-batch contribute sum/total
        return loss * (n / total), metrics

    return loss_fn


# ----------------------------------------------------------------------------- command


def load_split(cfg, rankings: bool = True) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows) from cfg.data (train/eval/eval_fraction) and cfg.eval_holdout."""
    return load_train_eval(cfg.data, "preference", eval_holdout=cfg.eval_holdout, allow_rankings=rankings)


def run(cfg: RewardConfig) -> dict:
    # ---- data first: bad rows stop the run before any model loads
    train_rows, eval_rows = load_split(cfg)
    ranking = is_ranking(train_rows)
    if ranking and cfg.loss == "bradley_terry":
        raise ConfigError("the data holds K-wise rankings, which the pairwise bradley_terry loss cannot use",
                          where="loss", fix="set loss=kwise (InstructGPT) or loss=plackett_luce")
    run_dir = make_run_dir(cfg.train, "reward", cfg)
    tokenizer = tokenizer_for(cfg.model)
    pad = tokenizer.pad_token_id
    enc = encode_ranking if ranking else encode_pair
    train_enc = [enc(tokenizer, r, cfg.data.max_length) for r in train_rows]
    eval_enc = [(encode_ranking if is_ranking(eval_rows) else encode_pair)(tokenizer, r, cfg.data.max_length)
                for r in eval_rows]
    n_ties = sum(e.tie for e in train_enc)
    n_margin = sum(e.margin != 0 for e in train_enc)
    if cfg.loss != "bradley_terry" and n_margin and cfg.margin_scale:
        raise ConfigError(f"{n_margin} records carry a margin, which only the bradley_terry loss uses",
                          where="margin_scale", fix="set loss=bradley_terry, or margin_scale=0 to ignore margins")
    tied_rankings = sum(len(set(e.ranks)) < len(e.ranks) for e in train_enc)
    if cfg.loss == "plackett_luce" and tied_rankings:
        raise ConfigError(f"{tied_rankings} records hold ties, which the Plackett–Luce likelihood cannot "
                          f"express", where="loss", fix="use loss=kwise (ties train with target 0.5) or "
                                                        "bradley_terry for pairs")

    # ---- model and runtime
    with sharding.empty_loading(cfg.train):  # under FSDP built on meta on every process but 0
        model = load_reward_model(cfg.model, pad_token_id=pad, lora=cfg.lora)
    sampler = StepSampler(len(train_enc), cfg.train.batch_size, cfg.train.seed)
    total = cfg.train.max_steps or max(1, int(cfg.train.epochs * sampler.steps_per_epoch))
    engine = TrainEngine(model, cfg.train, total, run_dir)
    logger = MetricsLogger(run_dir, enabled=engine.is_main, report_to=cfg.train.report_to, config=cfg)
    if engine.maybe_resume() is not None:
        logger.truncate_after(engine.step_count)
    loss_fn = make_loss_fn(cfg, pad)

    def micro_batches(step: int) -> list[dict]:
        parts = shard(sampler.batch(step), engine.rank, engine.world_size, cfg.train.micro_batch_size)
        return [batch_records([train_enc[i] for i in p], shared_prompt=cfg.shared_prompt, packing=cfg.packing,
                              pad_id=pad) for p in parts]

    def evaluate() -> dict:
        if not eval_enc:
            return {}
        scorer = RewardModelScorer(engine.unwrapped, tokenizer, max_length=cfg.data.max_length,
                                   batch_tokens=4096, packing=cfg.packing)
        with engine.autocast():
            rewards = score_encoded(scorer, eval_enc)
        return evaluate_scores(eval_enc, rewards)

    def flat(d: dict) -> dict:
        out = {k: v for k, v in d.items() if not isinstance(v, dict)}
        for name, s in d.get("subsets", {}).items():
            out[f"subset/{name}/accuracy"] = s["accuracy"]
        return out

    # ---- loop
    summary: dict = {"train_records": len(train_enc), "eval_records": len(eval_enc), "ties": n_ties,
                     **truncation_counts(train_enc),
                     "tied_rankings": tied_rankings, "records_with_margin": n_margin, "loss": cfg.loss,
                     "world_size": engine.world_size, "strategy": engine.strategy, "total_steps": total,
                     "sharded_load": engine.loaded}
    if n_ties and engine.is_main:
        print(f"reward: {n_ties} tie record(s) train with target 0.5 (not wins); "
              f"{len(train_enc) - n_ties} strict preferences")
    initial_eval(engine, logger, summary, evaluate, flat)
    summary["pairs_per_s"] = record_steps(
        engine, cfg.train, total, micro_batches, loss_fn, count_records, logger,
        Progress(total, "reward", cfg.train.progress), evaluate, rate_key="pairs_per_s", flatten=flat,
        describe=lambda row: f"loss {row['train/loss']:.3f} acc {row['train/accuracy']:.2f}")
    return finish(engine, logger, run_dir, summary, evaluate, engine.step_count, flatten=flat,
                  save=lambda: save_reward_model(engine.unwrapped, tokenizer, run_dir / "final"))
