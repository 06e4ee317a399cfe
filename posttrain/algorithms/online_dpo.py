"""Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback"): each step
the current policy samples two responses per prompt, a labeler prefers one, and a DPO-family loss
(``posttrain.losses.direct``, the offline ``dpo`` command's pure functions) updates on those pairs at
once, so the preferences are always about the policy's own outputs.

    y_1, y_2 ~ π_θ(·|x);   (y_c, y_r) = the pair ordered by the labeler's score s(x, y)
    L = −log σ( β log π_θ(y_c|x)/π_ref(y_c|x) − β log π_θ(y_r|x)/π_ref(y_r|x) )        (``loss=dpo``)

The labeler is any reward spec (``reward``): a reward model (``rm:<path>``), a verifier, the built-in
task's gold annotator (``builtin_gold``), or ``module:function`` wrapping a judge; the response with the
higher score is chosen. A tie, or a response the labeler could not score, drops the pair (counted:
``online_dpo/ties_frac``). The reference is the initial policy (LoRA: the base with the adapters off).
Sampling, scoring, the reference forward, checkpoints, resuming and evaluation are the online RL
loop's (``rollouts.online``); only the loss differs from GRPO.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import ClassVar

import torch

from posttrain.config import LoraConfig, ModelConfig, opt
from posttrain.config_checks import refuse_set
from posttrain.engines.loop import save_final
from posttrain.errors import ConfigError
from posttrain.losses.direct import DIRECT_LOSSES, get_direct_loss, needs_reference
from posttrain.models.forward import to_layout, token_forward
from posttrain.models.loading import load_policy
from posttrain.rewards.combine import check_reward_config, default_reward
from posttrain.rollouts.config import KLConfig, RLTrainConfig, RolloutConfig, ShapingConfig, refuse_environment
from posttrain.rollouts.metrics import merge_update_metrics
from posttrain.rollouts.online import end_rl_step, finish_online, online_setup, sampling_policy

SOURCE = "Guo et al. 2024 (OAIF): two samples per prompt from the current policy, labelled, DPO at once"


@dataclass
class OnlineDPOLossConfig:
    ppo_epochs: int = opt(1, "Passes over each step's pairs (one optimizer step per minibatch).", SOURCE)

    def validate(self) -> None:
        if self.ppo_epochs < 1:
            raise ConfigError("loss.ppo_epochs must be >= 1", where="loss.ppo_epochs")


@dataclass
class OnlineDPOConfig:
    compares_logps: ClassVar[bool] = True  # config_checks.resolve_dropout: model.dropout=auto is off
    model: ModelConfig = opt(factory=ModelConfig, help="Policy to train (usually an SFT model's final/); also "
                                                       "the reference.")
    lora: LoraConfig = opt(factory=LoraConfig, help="LoRA adapters (the reference is the base model).")
    rollout: RolloutConfig = opt(factory=lambda: RolloutConfig(prompts_per_step=32, group_size=2),
                                 help="Prompts and sampling; group_size is 2 (one pair per prompt).")
    reward: list[str] = opt([], "The labeler: reward function(s) scoring each response; the higher is chosen. "
                            "rm:<path> | builtin_gold | builtin_correct | module:function (empty: builtin_gold on "
                            "the built-in task).", SOURCE)
    reward_weights: list[float] = opt([], "One weight per reward (empty = all 1.0).")
    objective: str = opt("dpo", f"Direct-alignment loss: {', '.join(DIRECT_LOSSES)} (posttrain.losses.direct).")
    beta: float = opt(0.1, "β of the loss.", "Guo et al. 2024: β 0.1")
    loss_args: dict[str, float] = opt({}, "Extra hyper-parameters of the loss, e.g. {label_smoothing: 0.1}.")
    shaping: ShapingConfig = opt(factory=lambda: ShapingConfig(overlong_buffer=0),
                                 help="Truncation policy: with truncated=mask a cut-off response is not labelled.")
    kl: KLConfig = opt(factory=lambda: KLConfig(beta=0.0, placement="loss", track=True),
                       help="The reference the loss needs; kl.ref_model sets another one. β lives in `beta`.")
    loss: OnlineDPOLossConfig = opt(factory=OnlineDPOLossConfig, help="Passes over each step's pairs.")
    train: RLTrainConfig = opt(factory=lambda: RLTrainConfig(lr=5e-6, schedule="constant", warmup_ratio=0.0,
                                                             max_steps=100, log_every=1),
                               help="Optimisation; batch sizes count responses (2 per pair).")
    task_eval_prompts: int = opt(64, "Built-in task: held-out prompts for accuracy / gold reward.")
    task_eval_samples: int = opt(4, "Built-in task: samples per held-out prompt (temperature 1).")

    def __post_init__(self):
        self.reward = default_reward(self.reward, self.rollout.prompts, "builtin_gold")

    def validate(self) -> None:
        refuse_environment(self.rollout, "online-dpo")
        if self.rollout.group_size != 2:
            raise ConfigError(f"online DPO labels one pair per prompt, got rollout.group_size="
                              f"{self.rollout.group_size}", where="rollout.group_size", fix="rollout.group_size=2")
        get_direct_loss(self.objective)
        if self.beta <= 0:
            raise ConfigError("beta must be > 0", where="beta")
        if self.rollout.temperature != 1.0:
            raise ConfigError("DPO's implicit reward is log π_θ/π_ref of the untempered policy; log-probs of a "
                              f"tempered one (rollout.temperature={self.rollout.temperature}) would train another "
                              "objective", where="rollout.temperature", fix="rollout.temperature=1.0")
        check_reward_config(self.reward, self.reward_weights, self.rollout.prompts)
        refuse_set(self, "kl", ("beta", "placement", "estimator", "controller", "target", "horizon"),
                   f"online DPO's loss holds its own KL term ({self.objective}, β = beta)", "set beta instead")
        refuse_set(self, "rollout", ("correction", "tis_cap"), "they correct policy-gradient updates, and online DPO "
                   "trains on labelled pairs")


def label_pairs(scores: torch.Tensor, valid: torch.Tensor) -> tuple[list[int], int]:
    """Rows (2k, 2k+1) are prompt k's pair. Returns the rows reordered (chosen, rejected) for every pair
    the labeler separates, and the number of pairs dropped (a tie, or a response it could not score)."""
    order, dropped = [], 0
    for k in range(len(scores) // 2):
        a, b = 2 * k, 2 * k + 1
        if not (valid[a] and valid[b]) or scores[a] == scores[b]:
            dropped += 1
            continue
        order += [a, b] if scores[a] > scores[b] else [b, a]
    return order, dropped


def pair_batches(n_pairs: int, n_minibatches: int, micro_pairs: int, epochs: int, seed: int):
    """Per optimizer step, micro-batches of row indices, pairs kept whole (chosen then rejected)."""
    rng = random.Random(seed)
    for _ in range(epochs):
        pairs = list(range(n_pairs))
        rng.shuffle(pairs)
        bounds = [round(k * n_pairs / n_minibatches) for k in range(n_minibatches + 1)]
        for a, b in zip(bounds[:-1], bounds[1:]):
            if b > a:
                mb = pairs[a:b]
                yield [[r for p in mb[s:s + micro_pairs] for r in (2 * p, 2 * p + 1)]
                       for s in range(0, len(mb), micro_pairs)]


def make_loss(cfg: OnlineDPOConfig):
    fn, kw = get_direct_loss(cfg.objective), {"beta": cfg.beta, **cfg.loss_args}

    def loss_fn(model, mb, total):
        out = token_forward(model, mb, 1.0)
        mask = mb["mask"]
        seq_logp = (to_layout(out["logp"], out["seq"], out["j"], *mask.shape) * mask).sum(1).view(-1, 2)
        lengths = mask.sum(1).view(-1, 2)
        ref = (mb["ref_logp"] * mask).sum(1).view(-1, 2) if "ref_logp" in mb else None
        loss, metrics = fn(seq_logp[:, 0], seq_logp[:, 1], None if ref is None else ref[:, 0],
                           None if ref is None else ref[:, 1], chosen_lengths=lengths[:, 0],
                           rejected_lengths=lengths[:, 1], **kw)
        return loss * (mask.shape[0] / 2 / total), metrics

    return loss_fn, lambda mb: torch.tensor(mb["mask"].shape[0] / 2)


def run(cfg: OnlineDPOConfig) -> dict:
    if not needs_reference(get_direct_loss(cfg.objective)):
        cfg.kl.track = False  # simpo / orpo: no reference model is loaded
    o = online_setup(cfg, "online-dpo", lambda tokenizer: load_policy(cfg.model, cfg.lora))
    engine, plan = o.engine, o.plan
    loss_fn, count_fn = make_loss(cfg)
    micro_pairs = max(1, plan.micro // 2)

    # ---- loop: two samples per prompt -> the labeler orders each pair -> DPO on the pairs
    row: dict = {}
    while o.step < o.n_steps:
        t0 = time.perf_counter()
        with sampling_policy(o):
            exp = o.maker.make(o.step, ref=o.ref_fn, need_old=False, micro=plan.micro)
        m = exp.metrics
        order, dropped = label_pairs(exp.scores, exp.valid)
        m["online_dpo/pairs"] = float(len(order) // 2)
        m["online_dpo/ties_frac"] = dropped / max(len(exp) // 2, 1)
        if order:
            pairs = exp.select(order)
            gap = (pairs.scores[0::2] - pairs.scores[1::2])
            m["online_dpo/score_gap"] = float(gap.mean())
            t1 = time.perf_counter()
            steps = [engine.step([pairs.micro_batch(idx) for idx in mbs], loss_fn, count_fn)
                     for mbs in pair_batches(len(order) // 2, min(plan.minibatches, len(order) // 2), micro_pairs,
                                             cfg.loss.ppo_epochs, cfg.train.seed * 7919 + o.step)]
            m.update(merge_update_metrics(steps))
            m["train_s"] = time.perf_counter() - t1
        row = end_rl_step(o, m, len(exp), t0)
    o.summary["last_step"] = row
    return finish_online(o, save=lambda: save_final(engine, o.tokenizer, o.run_dir, cfg.lora))
