"""On-policy distillation: the student samples, the teacher scores the student's own tokens, and the
per-token reverse KL to the teacher is the reward (Agarwal et al. 2024, GKD; Thinking Machines 2025;
veRL's on-policy distillation).

Each step samples ``group_size`` completions for each of ``prompts_per_step`` prompts from the student,
computes the student's and the teacher's log-probs of every sampled token (no-grad forwards), and
trains on the per-token advantages of :func:`posttrain.advantages.distillation_advantages`:

    r_t = log π_T(y_t) − log π_s(y_t),   A_t = Σ_k γ^k r_{t+k}   (γ = 0 by default: A_t = r_t)
    L   = −Σ_t A_t · ρ_t / Σ_t 1   (the clipped surrogate over tokens; ρ ≡ 1 with one update per batch)

optionally plus ``task_weight`` × the task reward's group-normalised advantage (GRPO's) on every token.
Unlike SFT on the teacher's samples (off-policy distillation), the student learns on the states it
reaches itself, where the teacher says how it would have continued. Student and teacher must share a
tokenizer: the teacher scores the student's token ids as they are.

The teacher is a local model (``teacher.name_or_path``, loaded frozen next to the student) or one or more
OpenAI-compatible servers (``teacher_server``: ``posttrain serve`` or ``vllm serve``), which score each
step's prompt + completion token ids through vLLM's ``prompt_logprobs`` extension of ``/v1/completions``
(:meth:`ServerRolloutEngine.score`: requests of ``train.micro_batch_size`` sequences, the
``rollout.server_*`` timeouts and retries). Server prompt log-probs are the raw ``log_softmax(logits)``
(vLLM applies no temperature to them), while the local teacher scores at the student's sampling
temperature, so a server teacher needs ``rollout.temperature=1`` (refused otherwise); then both give
the same numbers.

The tokenizer check: a local teacher's vocabulary is compared with the student's entry by entry. A
server has no tokenizer to load and neither API reports one (``/v1/models`` names the model only), so
at start-up every server scores a probe, the student's tokens of a mixed text plus 64 ids spread over
the student's whole vocabulary (its last id included), and returns each token's text (``decoded_token``):
an id beyond the server's vocabulary (HTTP 400), or more than a tenth of the probed tokens decoding
differently from the student's tokenizer, is refused. This catches a different vocabulary, not two
tokenizers that differ in a few entries; ``decoded_token`` is compared with the token's decoded text or
its vocabulary piece (what vLLM versions return), leading spaces aside.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from posttrain.advantages import distillation_advantages, expand_to_tokens, group_advantages
from posttrain.config import LoraConfig, ModelConfig, opt
from posttrain.config_checks import refuse_set
from posttrain.engines import sharding
from posttrain.engines.loop import save_final
from posttrain.engines.runlog import say
from posttrain.engines.server_engine import ServerRolloutEngine
from posttrain.errors import ConfigError, ServiceError
from posttrain.models.forward import policy_logp_fn, ref_logp_fn, token_forward
from posttrain.models.loading import load_policy, tokenizer_for
from posttrain.models.reference import frozen_reference
from posttrain.rewards.combine import check_reward_config, default_reward
from posttrain.rollouts.config import KLConfig, RLTrainConfig, RolloutConfig, ShapingConfig, refuse_environment
from posttrain.rollouts.experience import fill_invalid, minibatches
from posttrain.rollouts.metrics import kl_metrics, merge_update_metrics
from posttrain.rollouts.online import (end_rl_step, finish_online, online_setup, pg_recipe, policy_gradient_terms,
                                      sampling_policy)

SOURCES = ("Agarwal et al. 2024 (GKD: on-policy, reverse KL); Thinking Machines 2025 'On-Policy Distillation' "
           "(per-token reverse KL as the advantage, discount 0)")


@dataclass
class DistillLossConfig:
    clip_low: float = opt(0.2, "ε_low of the clipped surrogate (matters only with ppo_epochs > 1).")
    clip_high: float = opt(0.2, "ε_high of the clipped surrogate.")
    aggregation: Literal["token_mean", "seq_mean_token_mean"] = opt(
        "token_mean", "Per-token losses averaged over all tokens (every token's KL counts alike) or per "
        "sequence first.", "Thinking Machines 2025: token mean")
    ppo_epochs: int = opt(1, "Passes over each batch (one optimizer step per minibatch).")
    entropy_coef: float = opt(0.0, "Entropy bonus coefficient (0 = off).")

    def validate(self) -> None:
        if self.ppo_epochs < 1 or self.clip_low <= 0 or self.clip_high <= 0:
            raise ConfigError("loss.ppo_epochs must be >= 1 and the clip ranges > 0", where="loss")


@dataclass
class DistillConfig:
    compares_logps: ClassVar[bool] = True  # config_checks.resolve_dropout: model.dropout=auto is off
    model: ModelConfig = opt(factory=ModelConfig, help="The student (usually an SFT model's final/).")
    teacher: ModelConfig = opt(factory=lambda: ModelConfig(name_or_path=""),
                               help="The teacher: a causal LM with the student's tokenizer (or teacher_server).")
    teacher_server: list[str] = opt([], "Instead of a local teacher: base URL(s) of OpenAI-compatible servers "
                                    "serving it (posttrain serve, or vllm serve), e.g. http://127.0.0.1:8001/v1; "
                                    "they score the student's tokens with vLLM's prompt_logprobs, each step's "
                                    "sequences shared between them. Needs rollout.temperature=1; timeouts and "
                                    "retries are rollout.server_timeout_s / server_retries.",
                                    "vLLM's prompt_logprobs (/v1/completions)")
    lora: LoraConfig = opt(factory=LoraConfig, help="LoRA adapters on the student.")
    rollout: RolloutConfig = opt(factory=lambda: RolloutConfig(prompts_per_step=16, group_size=4),
                                 help="Prompts and the student's sampling.")
    gamma: float = opt(0.0, "Discount of the per-token reverse-KL rewards: 0 = each token's own (lower "
                       "variance), 1 = reward-to-go (the exact gradient of the sequence's reverse KL).", SOURCES)
    reward: list[str] = opt([], "Task reward(s), scored and logged every step and mixed in with task_weight "
                            "(empty: builtin_correct on the built-in task's prompts).")
    reward_weights: list[float] = opt([], "One weight per reward (empty = all 1.0).")
    task_weight: float = opt(0.0, "Weight of the task reward's group-normalised advantage added to every "
                             "token's distillation advantage (0 = pure distillation).")
    shaping: ShapingConfig = opt(factory=lambda: ShapingConfig(overlong_buffer=0),
                                 help="Truncation policy for the task reward.")
    kl: KLConfig = opt(factory=lambda: KLConfig(beta=0.0, placement="loss", track=False),
                       help="KL to the initial student (off by default: the teacher is the anchor).")
    loss: DistillLossConfig = opt(factory=DistillLossConfig, help="The surrogate and its aggregation.")
    train: RLTrainConfig = opt(factory=lambda: RLTrainConfig(lr=1e-5, schedule="constant", warmup_ratio=0.0,
                                                             max_steps=100, log_every=1),
                               help="Optimisation; batch sizes count rollouts.")
    task_eval_prompts: int = opt(64, "Built-in task: held-out prompts for accuracy / gold reward.")
    task_eval_samples: int = opt(4, "Built-in task: samples per held-out prompt (temperature 1).")

    def __post_init__(self):
        self.reward = default_reward(self.reward, self.rollout.prompts, "builtin_correct")

    def validate(self) -> None:
        refuse_environment(self.rollout, "distill")
        if not self.teacher.name_or_path and not self.teacher_server:
            raise ConfigError("distillation needs a teacher", where="teacher.name_or_path",
                              fix="teacher.name_or_path=<a causal LM with the student's tokenizer>, or "
                                  "teacher_server=<URL of a server serving it, e.g. http://127.0.0.1:8001/v1>")
        refuse_set(self, "teacher", ("dropout",), "the teacher is frozen: it scores in eval mode, without dropout")
        if self.teacher_server:
            refuse_set(self, "teacher", ("dtype", "attn_implementation", "revision", "trust_remote_code"),
                       "teacher_server serves the teacher (load options belong to its server)")
        if self.kl.placement == "reward":
            raise ConfigError("distill's per-token advantages come from the teacher; a KL to the initial student goes "
                              "in the loss", where="kl.placement", fix="kl.placement=loss (the default)")
        if self.teacher.name_or_path and self.teacher_server:
            raise ConfigError(f"both teacher.name_or_path ({self.teacher.name_or_path}) and teacher_server are set; "
                              "the teacher is either a local model or a server", where="teacher_server",
                              fix="remove one of them (teacher.name_or_path= or teacher_server=[])")
        for url in self.teacher_server:
            if not url.startswith(("http://", "https://")):
                raise ConfigError(f"teacher_server: {url!r} is not an http(s) URL", where="teacher_server",
                                  fix="e.g. teacher_server=http://127.0.0.1:8001/v1")
        if self.teacher_server and self.rollout.temperature != 1:
            raise ConfigError(f"a teacher server reports raw log-probs (log_softmax of the logits; vLLM's prompt "
                              f"log-probs ignore temperature), but a local teacher would score the student's "
                              f"tokens at rollout.temperature={self.rollout.temperature}", where="rollout.temperature",
                              fix="set rollout.temperature=1.0, or use a local teacher (teacher.name_or_path)")
        if not 0 <= self.gamma <= 1:
            raise ConfigError(f"gamma must be in [0, 1], got {self.gamma}", where="gamma")
        if self.task_weight < 0:
            raise ConfigError("task_weight must be >= 0", where="task_weight")
        if self.task_weight and self.rollout.group_size < 2:
            raise ConfigError("the task advantage is group-normalised and needs rollout.group_size >= 2",
                              where="rollout.group_size")
        check_reward_config(self.reward, self.reward_weights, self.rollout.prompts)


def check_same_tokenizer(student_cfg: ModelConfig, teacher_cfg: ModelConfig) -> None:
    """The teacher scores the student's token ids, so the two vocabularies must be the same."""
    s, t = tokenizer_for(student_cfg), tokenizer_for(teacher_cfg)
    if s.get_vocab() != t.get_vocab():
        diff = len(set(s.get_vocab().items()) ^ set(t.get_vocab().items()))
        raise ConfigError(f"the student ({student_cfg.name_or_path}) and the teacher ({teacher_cfg.name_or_path}) "
                          f"have different tokenizers ({diff} vocabulary entries differ), so the teacher cannot "
                          "score the student's tokens", where="teacher.name_or_path",
                          fix="use a teacher of the student's model family (same tokenizer), or SFT the student on "
                              "the teacher's samples (off-policy distillation: best-of-n or collect, then sft)")


_PROBE = "The quick brown fox jumps over 13 lazy dogs: 7 + 35 = 42?\n  Café, naïve, 日本語 — {\"ok\": [1, 2]}"


def check_server_tokenizer(client: ServerRolloutEngine, tokenizer) -> None:
    """Every teacher server must decode the student's token ids as the student does (module docstring)."""
    n = len(tokenizer)
    ids = tokenizer.encode(_PROBE, add_special_tokens=False) + [round(i * (n - 1) / 63) for i in range(64)]
    try:
        per_server = client.prompt_logprobs([[ids[0], *ids]], batch_size=1, every_server=True)
    except ServiceError as e:
        if "answered HTTP 4" not in e.what:
            raise
        raise ConfigError(f"a teacher server refused the student's token ids 0..{n - 1}: {e.what}",
                          where="teacher_server", fix="serve a teacher with the student's tokenizer") from None
    for s, (lps,) in zip(client.servers, per_server):
        seen, differ = 0, []
        for t, entry in zip(ids, lps[1:]):
            got = ((entry or {}).get(str(t)) or {}).get("decoded_token")
            if got is None:
                continue
            text, seen = tokenizer.decode([t]), seen + 1
            if got not in (text, tokenizer.convert_ids_to_tokens(t)) and got.lstrip(" ") != text.lstrip(" "):
                differ.append(f"{t}: {text!r} here, {got!r} there")
        if not seen:
            say(f"teacher_server {s.url} returns no decoded_token: its vocabulary cannot be checked")
        elif len(differ) * 10 > seen:
            raise ConfigError(f"the teacher server {s.url} ({s.model}) decodes {len(differ)} of {seen} probed token "
                              f"ids differently from the student's tokenizer ({'; '.join(differ[:3])}), so it cannot "
                              "score the student's tokens", where="teacher_server",
                              fix="serve a teacher of the student's model family (same tokenizer)")


def server_teacher_logp(client: ServerRolloutEngine, exp, micro: int) -> torch.Tensor:
    """The server teacher's log-probs of the sampled tokens, [N, T] aligned with ``exp.mask`` (rows
    without a token in the loss are not sent)."""
    out = torch.zeros(exp.mask.shape)
    rows = exp.mask.any(1).nonzero().flatten().tolist()
    scored = client.score([exp.prompt_ids[i] for i in rows], [exp.completion_ids[i] for i in rows], micro)
    for i, lp in zip(rows, scored):
        out[i, :len(lp)] = torch.tensor(lp)
    return out


def distill_metrics(student_logp: torch.Tensor, teacher_logp: torch.Tensor, mask: torch.Tensor) -> dict:
    """distill/reverse_kl: Σ m (log π_s − log π_T) / Σ m, the per-token reverse KL estimate on the
    student's samples; distill/reverse_kl_seq: its sum per sequence, averaged over sequences."""
    d = (student_logp - teacher_logp) * mask
    rows = (mask.sum(1) > 0).sum().clamp(min=1)
    return {"distill/reverse_kl": float(d.sum() / mask.sum().clamp(min=1)),
            "distill/reverse_kl_seq": float(d.sum() / rows)}


def run(cfg: DistillConfig) -> dict:
    client = None
    if cfg.teacher_server:
        client = ServerRolloutEngine(cfg.teacher_server, timeout_s=cfg.rollout.server_timeout_s,
                                     retries=cfg.rollout.server_retries, sync_weights=False)
    try:
        if client is None:
            check_same_tokenizer(cfg.model, cfg.teacher)
        else:
            check_server_tokenizer(client, tokenizer_for(cfg.model))
        return _run(cfg, client)
    finally:
        if client is not None:
            client.close()


def _run(cfg: DistillConfig, client: ServerRolloutEngine | None) -> dict:
    recipe = pg_recipe(cfg)
    o = online_setup(cfg, "distill", lambda tokenizer: load_policy(cfg.model, cfg.lora))
    engine, plan, G = o.engine, o.plan, cfg.rollout.group_size
    if client is None:
        with sharding.empty_loading(cfg.train, frozen=True):  # train.frozen=shard: on meta on every process but 0
            teacher = frozen_reference(cfg.teacher, cfg.teacher.name_or_path, False)
        sharded = engine.fsdp and cfg.train.frozen == "shard"  # then FSDP moves each unit to the device
        teacher = engine.frozen(teacher if sharded else teacher.to(engine.device), "teacher")
        teacher_fn = ref_logp_fn(teacher, None, cfg.rollout.temperature)
        o.summary["teacher"] = cfg.teacher.name_or_path
    else:
        o.summary["teacher"] = ", ".join(f"{s.model} at {s.url}" for s in client.servers)

    def loss_fn(model, mb, total):
        out = token_forward(model, mb, recipe.temperature, want_entropy=True)
        loss, _, metrics, _ = policy_gradient_terms(recipe, out, mb, mb.get("old_logp"), o.kl_ctl.value)
        return loss * (recipe.count(mb) / total), metrics

    # ---- loop: the student samples -> student and teacher log-probs -> per-token advantages -> update
    row: dict = {}
    while o.step < o.n_steps:
        t0 = time.perf_counter()
        with sampling_policy(o) as policy:
            exp = o.maker.make(o.step, policy=policy_logp_fn(policy, recipe.temperature), ref=o.ref_fn,
                               need_old=True, micro=plan.micro)
        m = exp.metrics
        if len(exp):
            t1 = time.perf_counter()
            teacher_logp = (o.maker.forward_all(exp, teacher_fn, plan.micro) if client is None
                            else server_teacher_logp(client, exp, plan.micro))
            m["teacher_s"] = time.perf_counter() - t1
            adv = distillation_advantages(exp.old_logp, teacher_logp, exp.mask, cfg.gamma)
            m.update(distill_metrics(exp.old_logp, teacher_logp, exp.mask))
            if exp.ref_logp is not None:  # kl.track or kl.beta > 0: `kl`, which the adaptive controller follows
                m.update(kl_metrics(exp, recipe.kl_estimator))
            if cfg.task_weight:
                task = group_advantages(fill_invalid(exp.scores, exp.valid, G), G, scale_by_std=True)
                adv = adv + cfg.task_weight * expand_to_tokens(task, exp.mask)
            exp.advantages = adv
            t2 = time.perf_counter()
            steps = []
            for _, micro_idx in minibatches(len(exp), plan.minibatches, cfg.loss.ppo_epochs, plan.micro,
                                            seed=cfg.train.seed * 7919 + o.step, group_size=G):
                steps.append(engine.step([exp.micro_batch(idx) for idx in micro_idx], loss_fn, recipe.count))
            m.update(merge_update_metrics(steps))
            m["train_s"] = time.perf_counter() - t2
        row = end_rl_step(o, m, len(exp), t0)
    o.summary["last_step"] = row
    return finish_online(o, save=lambda: save_final(engine, o.tokenizer, o.run_dir, cfg.lora))
