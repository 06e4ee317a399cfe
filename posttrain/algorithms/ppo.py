"""PPO with a learned critic and GAE (Schulman et al. 2017; Ziegler et al. 2019; InstructGPT; rlhf-book ch. 6).

Per RL step: sample one completion per prompt (``rollout.group_size``, 1 by default), score it with
the reward (a reward model ``rm:<path>``, a verifier, ...), and build per-token rewards

    r_t = −β KL_t (+ score on the last token),     KL_t from k1/k2/k3 of π_old vs π_ref

(``kl.placement=loss`` instead adds β·KL to the loss, as GRPO does). The critic gives V(s_t) before
each token; GAE(γ, λ) gives advantages and the critic's targets R_t = Â_t + V(s_t). Then
``loss.ppo_epochs`` passes of minibatches (``train.batch_size`` rollouts each) minimise

    L = PPO-clip(ρ, Â) + c_v · ½ max((V − R)², (V_clip − R)²) − c_H · H(π)

with ρ = π_θ/π_old against the log-probs taken right after sampling. The critic is a separate model
(a sequence-classification model whose head is read at every position), initialised from the policy
(fresh head) or from the reward model (InstructGPT, Tülu 3), or a linear head on the policy's own
backbone. Policy and critic are one module with one optimizer (as TRL's PPOTrainer did); the
critic's share of the gradient is set by ``value.coef``. Optional reward whitening (scale only) and
advantage whitening; an adaptive KL controller (Ziegler et al. 2019) steers β toward a target KL.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch
from safetensors.torch import save_file

from posttrain.advantages import gae
from posttrain.config import LoraConfig, ModelConfig, opt
from posttrain.errors import ConfigError
from posttrain.kl import get_kl_estimator
from posttrain.losses.policy import explained_variance, value_loss
from posttrain.masked import masked_whiten
from posttrain.models.forward import critic_values, policy_logp_fn, to_layout, token_forward
from posttrain.models.heads import load_reward_model, save_reward_model
from posttrain.models.loading import eval_mode, load_policy, save_pretrained
from posttrain.rewards.combine import check_reward_config, default_reward
from posttrain.rollouts.config import (AsyncConfig, KLConfig, RayConfig, RLTrainConfig, RolloutConfig,
                                       ShapingConfig, check_environment_reward, check_launcher)
from posttrain.rollouts.experience import minibatches
from posttrain.rollouts.metrics import kl_metrics, merge_update_metrics
from posttrain.rollouts.online import (PGRecipe, end_rl_step, finish_online, online_setup, pg_recipe,
                                      policy_gradient_terms, sampling_policy)


@dataclass
class ValueConfig:
    shared_backbone: bool = opt(False, "A linear value head on the policy's backbone (one forward, less "
                                "memory) instead of a separate critic model.")
    init: Literal["policy", "reward_model"] = opt(
        "policy", "Separate critic initialised from the policy with a fresh head, or from the reward "
        "model (the rm:<path> reward, or value.path).", "InstructGPT / Tülu 3 initialise it from the RM")
    path: str | None = opt(None, "Explicit critic initialisation (a causal LM or reward model path).")
    coef: float = opt(0.1, "c_v: weight of the value loss.", "TRL PPO vf_coef 0.1")
    clip: float | None = opt(0.2, "Value clipping range around the rollout's values (null = off).",
                             "TRL PPO cliprange_value 0.2")

    def validate(self) -> None:
        if self.shared_backbone and (self.init == "reward_model" or self.path):
            raise ConfigError("a value head on the policy's backbone cannot start from another model",
                              where="value.init", fix="value.shared_backbone=false, or value.init=policy")
        if self.coef < 0:
            raise ConfigError("value.coef must be >= 0", where="value.coef")


@dataclass
class PPOLossConfig:
    clip_low: float = opt(0.2, "ε_low of the clipped surrogate.", "Schulman et al. 2017")
    clip_high: float = opt(0.2, "ε_high of the clipped surrogate.", "Schulman et al. 2017")
    aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = opt(
        "token_mean", "How per-token losses (policy and value) become one number.", "TRL PPO (masked mean)")
    ppo_epochs: int = opt(4, "Passes over each rollout batch.", "TRL PPO num_ppo_epochs 4; Tülu 3")
    gamma: float = opt(1.0, "Discount.", "rlhf-book ch. 3 (bandit-style, γ = 1); TRL PPO")
    lam: float = opt(0.95, "GAE λ.", "TRL PPO lam 0.95")
    whiten_rewards: bool = opt(False, "Rescale the per-token rewards of a batch to unit variance "
                               "(mean kept).", "TRL PPO whiten_rewards False")
    whiten_advantages: bool = opt(True, "Normalise advantages over the batch's tokens.", "TRL PPO; CleanRL")
    entropy_coef: float = opt(0.0, "c_H: entropy bonus (0 = off).")

    def validate(self) -> None:
        if self.ppo_epochs < 1:
            raise ConfigError("loss.ppo_epochs must be >= 1", where="loss.ppo_epochs")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ConfigError("loss.gamma and loss.lam must be in [0, 1]", where="loss")


# the KL defaults of PPO (Ziegler et al. 2019; TRL PPOTrainer: β 0.05, per-token KL in the reward): one source
PPO_KL = {"beta": 0.05, "placement": "reward"}


@dataclass
class PPOConfig:
    compares_logps: ClassVar[bool] = True  # config_checks.resolve_dropout: model.dropout=auto is off
    model: ModelConfig = opt(factory=ModelConfig, help="Policy to train (usually an SFT model's final/).")
    lora: LoraConfig = opt(factory=LoraConfig, help="LoRA adapters on the policy.")
    rollout: RolloutConfig = opt(factory=lambda: RolloutConfig(prompts_per_step=64, group_size=1),
                                 help="Prompts and sampling (PPO needs no groups).")
    reward: list[str] = opt([], "Reward functions (rm:<path> for a trained reward model; builtin_gold, "
                            "builtin_correct, exact_match, math, module:function). Empty: builtin_gold on the "
                            "built-in task's prompts; with your own prompts a reward must be given.")
    reward_weights: list[float] = opt([], "One weight per reward (empty = all 1.0).")
    shaping: ShapingConfig = opt(factory=lambda: ShapingConfig(overlong_buffer=0),
                                 help="Truncation policy, overlong penalty, clip.")
    kl: KLConfig = opt(factory=lambda: KLConfig(beta=PPO_KL["beta"], estimator="k1", placement=PPO_KL["placement"]),
                       help="KL to the reference (per-token reward by default).")
    value: ValueConfig = opt(factory=ValueConfig, help="The critic.")
    loss: PPOLossConfig = opt(factory=PPOLossConfig, help="PPO loss, GAE, whitening.")
    train: RLTrainConfig = opt(factory=lambda: RLTrainConfig(lr=1e-5, schedule="constant", warmup_ratio=0.0,
                                                             max_steps=200, log_every=1),
                               help="Optimisation; batch sizes count rollouts.")
    task_eval_prompts: int = opt(64, "Built-in task: held-out prompts for accuracy / gold reward.")
    task_eval_samples: int = opt(4, "Built-in task: samples per held-out prompt (temperature 1).")

    launcher: Literal["local", "ray"] = opt(
        "local", "local: sampling and training in this process (or its torchrun ranks); ray: rollout workers as "
        "Ray actors (ray.*), weights sent to them after every update, optionally asynchronous (async.*).",
        "OpenRLHF, veRL, open-instruct: a single controller driving Ray actors")
    ray: RayConfig = opt(factory=RayConfig, help="launcher=ray: cluster, workers, resources, timeouts.")
    async_: AsyncConfig = opt(factory=AsyncConfig, help="Asynchronous RL (launcher=ray): bounded staleness.")

    def __post_init__(self):
        if not self.rollout.environment:  # an environment gives its own reward
            self.reward = default_reward(self.reward, self.rollout.prompts, "builtin_gold")
        if self.kl.beta is None:
            self.kl.beta = PPO_KL["beta"]
        if self.kl.placement is None:
            self.kl.placement = PPO_KL["placement"]
        if self.shaping.overlong_buffer is None:
            self.shaping.overlong_buffer = 0

    def validate(self) -> None:
        check_launcher(self)
        if not check_environment_reward(self):
            check_reward_config(self.reward, self.reward_weights, self.rollout.prompts)
        if self.value.init == "reward_model" and not self.value.path and not any(r.startswith("rm:") for r in self.reward):
            raise ConfigError("value.init=reward_model needs a reward model", where="value.init",
                              fix="use reward=rm:<path>, or give value.path")


class ActorCritic(torch.nn.Module):
    """The policy and its critic as one trainable module (one optimizer, one checkpoint)."""

    def __init__(self, policy, critic=None, v_head=None):
        super().__init__()
        self.policy, self.critic, self.v_head = policy, critic, v_head

    def values(self, mb: dict, out: dict | None = None) -> torch.Tensor:
        """Flat per-token values [K] (``out`` = the policy's token_forward with hidden states)."""
        if self.v_head is not None:
            if out is None:
                out = token_forward(self.policy, mb, want_hidden=True)
            return self.v_head(out["hidden"].float()).squeeze(-1)
        return critic_values(self.critic, mb)

    def empty_copy(self, build) -> "ActorCritic":
        """An unsharded actor-critic of the same shape (FSDP gathers its weights into it); ``build`` makes
        the empty copy of one part."""
        head = None if self.v_head is None else torch.nn.Linear(self.v_head.in_features, 1)
        return ActorCritic(build(self.policy), None if self.critic is None else build(self.critic), head)

    def forward(self, mb: dict, temperature: float = 1.0):
        """(policy token_forward dict with the entropy, flat values [K]) — one call, so a DDP wrapper
        around this module sees the whole computation."""
        out = token_forward(self.policy, mb, temperature, want_entropy=True, want_hidden=self.v_head is not None)
        return out, self.values(mb, out)


def build_actor_critic(cfg: PPOConfig, tokenizer) -> ActorCritic:
    policy = load_policy(cfg.model, cfg.lora)
    if cfg.value.shared_backbone:
        hidden = policy.config.hidden_size if hasattr(policy.config, "hidden_size") else policy.config.n_embd
        head = torch.nn.Linear(hidden, 1)
        torch.nn.init.zeros_(head.weight)  # V ≡ 0 at first: no early value gradient into the backbone
        torch.nn.init.zeros_(head.bias)
        return ActorCritic(policy, v_head=head)
    path = cfg.value.path
    if path is None and cfg.value.init == "reward_model":
        path = next(r[3:] for r in cfg.reward if r.startswith("rm:"))
    critic = load_reward_model(cfg.model, path or cfg.model.name_or_path, pad_token_id=tokenizer.pad_token_id)
    return ActorCritic(policy, critic=critic)


def make_loss(cfg: PPOConfig, recipe: PGRecipe, kl_coef):
    """loss_fn(model, micro_batch, total): the policy-gradient terms of the recipe + c_v · value loss."""
    V = cfg.value

    def loss_fn(model, mb, total):
        out, v_flat = model(mb, recipe.temperature)
        loss, pg, metrics, _ = policy_gradient_terms(recipe, out, mb, mb["old_logp"], kl_coef.value)
        n, T = mb["mask"].shape
        values = to_layout(v_flat, out["seq"], out["j"], n, T)
        vl, vm = value_loss(values, mb["values"], mb["returns"], mb["mask"], clip=V.clip,
                            aggregation=recipe.aggregation, max_len=recipe.max_len)
        loss = loss + V.coef * vl
        metrics.update(policy_loss=pg.detach(), value_loss=vl.detach(), value_clip_frac=vm["value_clip_frac"])
        return loss * (recipe.count(mb) / total), metrics

    return loss_fn, recipe.count


def advantages(exp, cfg: PPOConfig, kl_coef, kl_tok: torch.Tensor | None):
    """Per-token rewards (−β KL_t, + the score on the last token; in multi-turn episodes each turn's
    reward on its last sampled token) -> GAE advantages and returns. GAE skips the masked observation
    tokens, so an episode's trajectory is its sampled tokens in order."""
    mask = exp.mask
    rewards = torch.zeros_like(mask)
    if kl_tok is not None:
        rewards = rewards - kl_coef * kl_tok * mask
    if exp.token_rewards is not None:
        rewards = rewards + exp.token_rewards * exp.valid.float()[:, None]
    else:
        last = (exp.lengths - 1).clamp(min=0)
        rewards[torch.arange(len(exp)), last] += exp.scores * exp.valid.float()
    if cfg.loss.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    adv, returns = gae(rewards, exp.values, mask, cfg.loss.gamma, cfg.loss.lam)
    if cfg.loss.whiten_advantages and mask.sum() > 1:
        adv = masked_whiten(adv, mask)
    return adv, returns


def run(cfg: PPOConfig) -> dict:
    recipe = pg_recipe(cfg, policy_loss="ppo")
    o = online_setup(cfg, "ppo", lambda tokenizer: build_actor_critic(cfg, tokenizer), policy_of=lambda ac: ac.policy)
    engine, plan = o.engine, o.plan
    temp = recipe.temperature
    estimator = get_kl_estimator(recipe.kl_estimator)
    loss_fn, count_fn = make_loss(cfg, recipe, o.kl_ctl)

    def critic_of(ac: ActorCritic):
        def critic_fn(mb):
            with eval_mode(ac):
                out = token_forward(ac.policy, mb, temp, want_hidden=True) if ac.v_head is not None else None
                v = ac.values(mb, out)
            return v, mb["tgt_seq"], mb["tgt_j"]
        return critic_fn

    # ---- loop: sample -> score -> values -> GAE -> (epochs x minibatches) optimizer steps
    row: dict = {}
    while o.step < o.n_steps:
        t0 = time.perf_counter()
        with sampling_policy(o, lambda ac: ac.policy) as ac:  # under FSDP a gathered copy, freed after
            exp = o.maker.make(o.step, policy=policy_logp_fn(ac.policy, temp), ref=o.ref_fn, critic=critic_of(ac),
                               need_old=True, micro=plan.micro)
        m = exp.metrics
        kl_tok = None
        if exp.ref_logp is not None:
            m.update(kl_metrics(exp, recipe.kl_estimator))
            if recipe.kl_in_reward:
                kl_tok = estimator(exp.old_logp, exp.ref_logp)
        exp.advantages, exp.returns = advantages(exp, cfg, o.kl_ctl.value, kl_tok)
        m["explained_variance"] = float(explained_variance(exp.values, exp.returns, exp.mask))
        m["value/mean"] = float((exp.values * exp.mask).sum() / exp.mask.sum().clamp(min=1))
        t1 = time.perf_counter()
        steps = []
        for _, micro_idx in minibatches(len(exp), plan.minibatches, cfg.loss.ppo_epochs, plan.micro,
                                        seed=cfg.train.seed * 7919 + o.step):
            mbs = [exp.micro_batch(idx) for idx in micro_idx]
            steps.append(engine.step(mbs, loss_fn, count_fn))
        m.update(merge_update_metrics(steps))
        m["train_s"] = time.perf_counter() - t1
        row = end_rl_step(o, m, len(exp), t0)
    o.summary["last_step"] = row
    tokenizer, run_dir = o.tokenizer, o.run_dir

    def save():  # inside finish's gather: under FSDP the main process's whole copy
        ac, merge = engine.unwrapped, bool(cfg.lora.enabled and cfg.lora.merge_on_save)
        save_pretrained(ac.policy, tokenizer, Path(run_dir) / "final", merge_lora=merge)
        save_value(ac, tokenizer, Path(run_dir) / "value")

    return finish_online(o, save)


def save_value(ac: ActorCritic, tokenizer, out: Path) -> None:
    """The critic: a reward-model-format directory (separate critic) or the head's tensors (shared)."""
    if ac.critic is not None:
        save_reward_model(ac.critic, tokenizer, out)
    else:
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in ac.v_head.state_dict().items()}, str(out / "v_head.safetensors"))
