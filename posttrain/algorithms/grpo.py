"""Group-relative policy optimisation and its variants: GRPO, Dr. GRPO, DAPO, GSPO, CISPO.

Each RL step samples ``G`` completions for each of ``prompts_per_step`` prompts, scores them, and
turns the group's rewards into advantages broadcast to every token (rlhf-book ch. 6):

    GRPO      A_i = (r_i − mean r_group) / std r_group;  L = −1/G Σ_i 1/|a_i| Σ_t min(ρ A, clip(ρ) A) + β KL
              (Shao et al. 2024, DeepSeekMath; KL k3 in the loss, β 0.04)
    Dr. GRPO  A_i = r_i − mean r_group; per-token sum / L_max (no length or std bias; Liu et al. 2025)
    DAPO      clip-higher ε_low 0.2 / ε_high 0.28, token-level mean, dynamic sampling (groups with
              equal rewards dropped and refilled), soft overlong penalty (Yu et al. 2025)
    GSPO      sequence-level ratio (π_θ/π_old)^{1/|a|} clipped at 3e-4/4e-4 (Zheng et al. 2025)
    CISPO     clipped, stop-gradient IS weight on every token's log-prob (MiniMax-M1 2025)

``variant`` picks, once at start-up, the loss function (``POLICY_LOSSES``), the advantage estimator
(:data:`ADVANTAGES`) and the loss aggregation, plus their defaults; any of them can be overridden.
RLOO and REINFORCE (``rloo.py``, ``reinforce.py``) are this loop with another estimator.

ρ = π_θ/π_old is measured against the trainer's own log-probs taken right after sampling; with one
optimizer step per batch (the default) π_old = π_θ, that forward is skipped, and ρ ≡ 1 (the gradient
is then the plain policy gradient A ∇log π). KL to the reference goes in the loss (GRPO) or is
subtracted from the reward before the advantages (RLOO), per ``kl.placement``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from posttrain.advantages import (expand_to_tokens, group_advantages, group_scale, reinforce_advantages,
                                  rloo_advantages, turn_credit_advantages)
from posttrain.config import LoraConfig, ModelConfig, opt
from posttrain.engines.loop import save_final
from posttrain.errors import ConfigError
from posttrain.kl import get_kl_estimator
from posttrain.models.forward import policy_logp_fn, token_forward
from posttrain.models.loading import load_policy
from posttrain.rewards.combine import check_reward_config, default_reward
from posttrain.rollouts.config import (AsyncConfig, KLConfig, RayConfig, RLTrainConfig, RolloutConfig,
                                       ShapingConfig, check_environment_reward, check_launcher)
from posttrain.rollouts.experience import fill_invalid, minibatches
from posttrain.rollouts.metrics import kl_metrics, merge_update_metrics, sequence_kl
from posttrain.rollouts.online import (PGRecipe, end_rl_step, finish_online, online_setup, pg_recipe,
                                      policy_gradient_terms, sampling_policy)

Aggregation = Literal["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm", "seq_mean_token_sum"]

# variant -> defaults for every field it decides (None fields of the config are filled from here)
VARIANTS: dict[str, dict] = {
    "grpo": dict(policy_loss="ppo", advantage="group_std", aggregation="seq_mean_token_mean",
                 clip_low=0.2, clip_high=0.2, beta=0.04, placement="loss", dynamic_sampling=False, overlong=0.0),
    "dr_grpo": dict(policy_loss="ppo", advantage="group_mean", aggregation="seq_mean_token_sum_norm",
                    clip_low=0.2, clip_high=0.2, beta=0.0, placement="loss", dynamic_sampling=False, overlong=0.0),
    "dapo": dict(policy_loss="ppo", advantage="group_std", aggregation="token_mean", clip_low=0.2,
                 clip_high=0.28, beta=0.0, placement="loss", dynamic_sampling=True, overlong=0.25),
    "gspo": dict(policy_loss="gspo", advantage="group_std", aggregation="seq_mean_token_mean", clip_low=3e-4,
                 clip_high=4e-4, beta=0.0, placement="loss", dynamic_sampling=False, overlong=0.0),
    "cispo": dict(policy_loss="cispo", advantage="group_std", aggregation="token_mean", clip_low=1.0,
                  clip_high=4.0, beta=0.0, placement="loss", dynamic_sampling=False, overlong=0.0),
    "rloo": dict(policy_loss="ppo", advantage="rloo", aggregation="seq_mean_token_sum", clip_low=0.2,
                 clip_high=0.2, beta=0.05, placement="reward", dynamic_sampling=False, overlong=0.0),
    "reinforce": dict(policy_loss="ppo", advantage="batch_mean", aggregation="seq_mean_token_sum", clip_low=0.2,
                      clip_high=0.2, beta=0.05, placement="reward", dynamic_sampling=False, overlong=0.0),
}
VARIANT_SOURCES = ("GRPO: Shao et al. 2024 (β 0.04, ε 0.2); Dr.GRPO: Liu et al. 2025 (β 0); DAPO: Yu et al. "
                   "2025 (ε 0.2/0.28, overlong buffer 4096 of 20480 tokens -> a quarter of the budget); GSPO: "
                   "Zheng et al. 2025 (ε 3e-4/4e-4); CISPO: MiniMax-M1 2025 (no lower clip), TRL docs (ε_max 5); "
                   "RLOO: Ahmadian et al. 2024 and TRL RLOOTrainer (β 0.05, KL in the reward, sum over tokens "
                   "and mean over sequences)")


def _advantage_registry():
    return {
        "group_std": lambda r, G: group_advantages(r, G, scale_by_std=True),
        "group_mean": lambda r, G: group_advantages(r, G, scale_by_std=False),
        "rloo": rloo_advantages,
        "batch_mean": lambda r, G: reinforce_advantages(r, r.mean()),
    }


ADVANTAGE_NAMES = ("group_std", "group_mean", "rloo", "batch_mean")


@dataclass
class PolicyLossConfig:
    policy_loss: Literal["ppo", "gspo", "cispo"] | None = opt(
        None, "Policy loss from posttrain.losses.policy.POLICY_LOSSES: ppo (clipped surrogate), gspo "
              "(sequence ratio), cispo (clipped stop-gradient IS weight); null = the variant's.")
    advantage: Literal["group_std", "group_mean", "rloo", "batch_mean"] | None = opt(
        None, "group_std (GRPO), group_mean (Dr.GRPO), rloo (leave-one-out), batch_mean (REINFORCE with "
              "the batch-mean baseline); null = the variant's.")
    aggregation: Aggregation | None = opt(
        None, "How per-token losses become one number: seq_mean_token_mean (GRPO), token_mean (DAPO), "
              "seq_mean_token_sum_norm (Dr.GRPO: per-sequence sum / max_new_tokens), seq_mean_token_sum "
              "(RLOO/REINFORCE: per-sequence sum); null = the variant's.",
        "rlhf-book ch. 6 loss aggregation")
    clip_low: float | None = opt(None, "ε_low: ratios below 1 − ε_low are clipped; null = the variant's.")
    clip_high: float | None = opt(None, "ε_high: ratios above 1 + ε_high are clipped; null = the variant's.")
    ppo_epochs: int = opt(1, "Passes over each rollout batch (each pass = train.batch_size-sized "
                          "minibatches, one optimizer step each).", "TRL num_iterations=1; DAPO 16 steps")
    entropy_coef: float = opt(0.0, "Entropy bonus coefficient (0 = off).", "TRL GRPO default 0")
    turn_credit: Literal["episode", "reward_to_go"] | None = opt(
        None, "Multi-turn episodes with a reward per turn: reward_to_go = a token is not credited with the "
              "rewards of earlier turns (advantages.turn_credit_advantages); episode = every token gets the "
              "episode's advantage. Equal when only the last turn is rewarded. null = reward_to_go, episode "
              "for gspo (its ratio is per sequence).", "rlhf-book ch. 6 (reward-to-go)")

    def validate(self) -> None:
        if self.ppo_epochs < 1:
            raise ConfigError("loss.ppo_epochs must be >= 1", where="loss.ppo_epochs")
        for k in ("clip_low", "clip_high"):
            v = getattr(self, k)
            if v is not None and v <= 0:
                raise ConfigError(f"loss.{k} must be positive", where=f"loss.{k}")


@dataclass
class GRPOConfig:
    compares_logps: ClassVar[bool] = True  # config_checks.resolve_dropout: model.dropout=auto is off
    variant: Literal["grpo", "dr_grpo", "dapo", "gspo", "cispo"] = opt(
        "grpo", "Algorithm variant: fills every null field below with its defaults (VARIANTS).", VARIANT_SOURCES)
    model: ModelConfig = opt(factory=ModelConfig, help="Policy to train (usually an SFT model's final/).")
    lora: LoraConfig = opt(factory=LoraConfig, help="LoRA adapters (the reference is then the base "
                                                    "model with adapters disabled).")
    rollout: RolloutConfig = opt(factory=RolloutConfig, help="Prompts and sampling.")
    reward: list[str] = opt([], "Reward functions: builtin_correct | builtin_gold | rm:<path> | exact_match | "
                            "math | code | module:function (several = weighted sum over those that apply; None = "
                            "does not apply). Empty: builtin_correct on the built-in task's prompts; with your own "
                            "prompts a reward must be given.")
    reward_weights: list[float] = opt([], "One weight per reward (empty = all 1.0).")
    shaping: ShapingConfig = opt(factory=ShapingConfig, help="Truncation policy, overlong penalty, clip.")
    kl: KLConfig = opt(factory=KLConfig, help="KL regularisation toward the reference policy.")
    loss: PolicyLossConfig = opt(factory=PolicyLossConfig, help="Policy loss, advantages, aggregation.")
    dynamic_sampling: bool | None = opt(None, "Drop groups whose rewards are all equal and sample more "
                                        "prompts to refill the batch (null = the variant's).", "DAPO §3.2")
    max_sample_rounds: int = opt(3, "Dynamic sampling: most generation rounds per step.")
    train: RLTrainConfig = opt(factory=lambda: RLTrainConfig(lr=1e-5, schedule="constant", warmup_ratio=0.0,
                                                             max_steps=200, log_every=1),
                               help="Optimisation; batch sizes count rollouts.", )
    task_eval_prompts: int = opt(64, "Built-in task: held-out prompts for accuracy / gold reward.")
    task_eval_samples: int = opt(4, "Built-in task: samples per held-out prompt (temperature 1).")
    launcher: Literal["local", "ray"] = opt(
        "local", "local: sampling and training in this process (or its torchrun ranks); ray: rollout workers as "
        "Ray actors (ray.*), weights sent to them after every update, optionally asynchronous (async.*).",
        "OpenRLHF, veRL, open-instruct: a single controller driving Ray actors")
    ray: RayConfig = opt(factory=RayConfig, help="launcher=ray: cluster, workers, resources, timeouts.")
    async_: AsyncConfig = opt(factory=AsyncConfig, help="Asynchronous RL (launcher=ray): bounded staleness.")

    def __post_init__(self):
        resolve_variant(self, self.variant)
        if not self.rollout.environment:  # an environment gives its own reward
            self.reward = default_reward(self.reward, self.rollout.prompts, "builtin_correct")

    def validate(self) -> None:
        check_launcher(self)
        if not check_environment_reward(self):
            check_reward_config(self.reward, self.reward_weights, self.rollout.prompts)
        if self.loss.advantage in ("group_std", "rloo") and self.rollout.group_size < 2:
            raise ConfigError(f"advantage {self.loss.advantage} needs rollout.group_size >= 2, got "
                              f"{self.rollout.group_size}", where="rollout.group_size",
                              fix="use group_size >= 2, or loss.advantage=batch_mean")
        if self.dynamic_sampling and self.loss.advantage == "batch_mean":
            raise ConfigError("dynamic sampling drops groups with equal rewards; with a batch-mean baseline "
                              "there are no groups", where="dynamic_sampling", fix="dynamic_sampling=false")
        if self.max_sample_rounds < 1:
            raise ConfigError("max_sample_rounds must be >= 1", where="max_sample_rounds")
        if self.loss.policy_loss == "gspo" and self.loss.aggregation != "seq_mean_token_mean":
            raise ConfigError("GSPO's ratio is per sequence, so its loss is a mean over sequences",
                              where="loss.aggregation", fix="loss.aggregation=seq_mean_token_mean")


def resolve_variant(cfg, variant: str) -> None:
    """Fill the config's null fields from ``VARIANTS[variant]`` (run once, at construction)."""
    d = VARIANTS[variant]
    for k in ("policy_loss", "advantage", "aggregation", "clip_low", "clip_high"):
        if getattr(cfg.loss, k) is None:
            setattr(cfg.loss, k, d[k])
    if cfg.kl.beta is None:
        cfg.kl.beta = d["beta"]
    if cfg.kl.placement is None:
        cfg.kl.placement = d["placement"]
    if cfg.dynamic_sampling is None:
        cfg.dynamic_sampling = d["dynamic_sampling"]
    if cfg.shaping.overlong_buffer is None:
        cfg.shaping.overlong_buffer = int(d["overlong"] * cfg.rollout.max_new_tokens)
    if cfg.loss.turn_credit is None:
        cfg.loss.turn_credit = "episode" if cfg.loss.policy_loss == "gspo" else "reward_to_go"


# ----------------------------------------------------------------------------- the loss


def make_loss(recipe: PGRecipe, kl_coef):
    """loss_fn(model, micro_batch, total) -> (sum / total, metrics) for the recipe chosen at start-up,
    and its count_fn (``recipe.count``)."""
    estimator = get_kl_estimator(recipe.kl_estimator)

    def loss_fn(model, mb, total):
        out = token_forward(model, mb, recipe.temperature, want_entropy=True)
        old = mb["old_logp"] if "old_logp" in mb else None
        loss, _, metrics, logp = policy_gradient_terms(recipe, out, mb, old, kl_coef.value)
        mask = mb["mask"]
        if old is None:  # one update per batch: this forward is the pre-update policy
            with torch.no_grad():
                denom = mask.sum().clamp(min=1)
                metrics["logprob_gap"] = ((logp.detach() - mb["rollout_logp"]).abs() * mask).sum() / denom
                if "ref_logp" in mb:
                    lp, ref = logp.detach(), mb["ref_logp"]
                    metrics["kl/per_token"] = (estimator(lp, ref) * mask).sum() / denom
                    metrics["kl"] = ((lp - ref) * mask).sum() / (mask.sum(1) > 0).sum().clamp(min=1)
        return loss * (recipe.count(mb) / total), metrics

    return loss_fn, recipe.count


# ----------------------------------------------------------------------------- the loop


def run(cfg: GRPOConfig, command: str = "grpo") -> dict:
    def refuse_dynamic_sampling_under_ddp(engine):
        if engine.world_size > 1 and cfg.dynamic_sampling:
            raise ConfigError("dynamic sampling keeps a different number of rollouts on each process, which "
                              "DDP cannot step together", where="dynamic_sampling", fix="dynamic_sampling=false")

    advantage_fn = _advantage_registry()[cfg.loss.advantage]
    recipe = pg_recipe(cfg)
    o = online_setup(cfg, command, lambda tokenizer: load_policy(cfg.model, cfg.lora),
                     check_engine=refuse_dynamic_sampling_under_ddp)
    engine, plan, G = o.engine, o.plan, cfg.rollout.group_size
    # π_old differs from π_θ after the first update, and a KL in the reward needs log π_old
    need_old = o.updates > 1 or recipe.kl_in_reward
    loss_fn, count_fn = make_loss(recipe, o.kl_ctl)
    o.summary["variant"] = getattr(cfg, "variant", command)

    # ---- loop: sample -> score -> advantages -> (epochs x minibatches) optimizer steps
    row: dict = {}
    while o.step < o.n_steps:
        t0 = time.perf_counter()
        with sampling_policy(o) as policy:
            exp = o.maker.make(o.step, policy=policy_logp_fn(policy, recipe.temperature), ref=o.ref_fn,
                               need_old=need_old, dynamic_sampling=cfg.dynamic_sampling,
                               max_rounds=cfg.max_sample_rounds, micro=plan.micro)
        m = exp.metrics
        if len(exp):
            scores = exp.scores
            if exp.old_logp is not None and exp.ref_logp is not None:
                m.update(kl_metrics(exp, recipe.kl_estimator))
            if recipe.kl_in_reward:  # r − β Σ_t KL_t, before the baseline (RLOO, REINFORCE)
                scores = scores - o.kl_ctl.value * sequence_kl(exp, recipe.kl_estimator)
            group = len(exp) if cfg.loss.advantage == "batch_mean" else G  # whose mean stands in
            filled = fill_invalid(scores, exp.valid, group)
            adv = advantage_fn(filled, G)
            if exp.token_rewards is not None and cfg.loss.turn_credit == "reward_to_go":  # per-turn rewards
                scale = group_scale(filled, G) if cfg.loss.advantage == "group_std" else None
                exp.advantages = turn_credit_advantages(adv, exp.token_rewards, exp.mask, scale)
            else:
                exp.advantages = expand_to_tokens(adv, exp.mask)
            t1 = time.perf_counter()
            steps = []
            for _, micro_idx in minibatches(len(exp), plan.minibatches, cfg.loss.ppo_epochs, plan.micro,
                                            seed=cfg.train.seed * 7919 + o.step, group_size=G):
                mbs = [exp.micro_batch(idx) for idx in micro_idx]
                steps.append(engine.step(mbs, loss_fn, count_fn))
            m.update(merge_update_metrics(steps))
            m["train_s"] = time.perf_counter() - t1
        row = end_rl_step(o, m, len(exp), t0)
    o.summary["last_step"] = row
    return finish_online(o, save=lambda: save_final(engine, o.tokenizer, o.run_dir, cfg.lora))
