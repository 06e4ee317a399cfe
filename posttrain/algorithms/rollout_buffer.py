"""Experience for online RL, shared by GRPO / Dr.GRPO / DAPO / GSPO / CISPO, RLOO, REINFORCE and PPO.

One step of experience, top to bottom (:meth:`ExperienceMaker.make`):

1. a batch of prompts (a pure function of ``(seed, step)``, so resume replays nothing);
2. ``group_size`` rollouts per prompt from the rollout engine (token ids in, token ids + log-probs out);
3. rewards: every reward function scores the decoded completions; ``None`` means "does not apply"
   (the weighted sum runs over the functions that apply; a sample no function applies to is left out
   of the loss); truncated responses are scored, penalised or masked (``shaping.truncated``), and the
   DAPO soft overlong penalty can be added;
4. the trainer recomputes log-probs of the sampled tokens in one packed, no-grad forward per model:
   the policy (π_old, only when a batch gets more than one optimizer step), the reference (for KL)
   and the value model (PPO). The mean |rollout log-prob − trainer log-prob| is logged
   (``logprob_gap``): engines in another dtype, vLLM kernels or top-p sampling show up there;
5. the algorithm turns scores into advantages (a function picked once from a registry).

:func:`minibatches` then walks the batch for several epochs in shuffled minibatches; the loss sees
importance ratios π_θ/π_old against the stored π_old. Everything per token is kept *completion
aligned*, ``[N, T]`` with ``T`` the longest completion, so the pure loss functions (which take
``[B, T]`` tensors and a mask) apply unchanged; the forward itself runs on packed rows
(:func:`token_forward`), and the language-model head is applied only at completion positions.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch

from posttrain.advantages import zero_variance_groups
from posttrain.config import TrainConfig, opt
from posttrain.errors import ConfigError, DataError

# ----------------------------------------------------------------------------- config blocks


@dataclass
class RolloutConfig:
    prompts: str = opt("builtin:prompts", "Prompt-only data ({prompt} plus any columns passed to the "
                       "reward functions): a file, a datasets name, or builtin:prompts.")
    columns: dict[str, str] = opt({}, "Column mapping from your names to ours, e.g. {question: prompt}.")
    split: str = opt("train", "Split to read from a datasets name/path.")
    format: Literal["auto", "hh", "plain"] = opt("auto", "How prompt strings are read: auto detects Anthropic HH "
                                                 "transcripts ('\\n\\nHuman: ...\\n\\nAssistant:'); hh requires "
                                                 "them; plain reads every string as it is.")
    max_prompts: int | None = opt(None, "Use only the first N prompts.")
    eval_prompts: str | None = opt(None, "Held-out prompts scored with the same reward at eval steps "
                                   "(the built-in task is evaluated with its own held-out set anyway).")
    prompts_per_step: int = opt(16, "Prompts sampled per RL step (per step, across processes).",
                                "rlhf-book code: 4 prompts x 8 rollouts per step; TRL generation batch")
    group_size: int = opt(8, "Rollouts per prompt (G). Group-relative advantages need G >= 2.",
                          "TRL num_generations=8; DeepSeekMath G=64")
    max_new_tokens: int = opt(24, "Longest completion; longer ones are cut (finish_reason=length).",
                              "built-in task answers are ~10 tokens")
    max_prompt_tokens: int = opt(512, "A longer prompt is an error (no silent truncation).")
    temperature: float = opt(1.0, "Sampling temperature; the trainer divides its logits by it too, so "
                             "ratios and KL refer to the distribution that was sampled.",
                             "TRL GRPO default 1.0; TRL issue #4159")
    top_p: float = opt(1.0, "Nucleus sampling mass (1 = off).")
    top_k: int = opt(0, "Top-k sampling (0 = off).")
    stop_strings: list[str] = opt([], "Extra strings that end a completion (EOS always does).")
    engine_dtype: Literal["auto", "model", "bfloat16"] = opt(
        "auto", "Compute dtype of the rollout engine's fast path. auto: bfloat16 for an fp32 model on a CPU "
        "with native bf16 matmuls (AVX-512 bf16 or AMX; ~1.4x faster decoding, log-prob gap ~2e-3 "
        "nats/token, corrected by rollout.correction), else the model's dtype. model: exact (same "
        "numbers as the trainer). The trainer always recomputes log-probs in the model's dtype.",
        "ENVIRONMENT.md decoding levers; benchmarks/generate.py")
    correction: Literal["tis", "none"] = opt(
        "tis", "Rollout-mismatch correction: tis weights each token's policy-gradient term by "
        "min(π_old/π_rollout, rollout.tis_cap) (truncated importance sampling; 1 for an exact engine); "
        "none ignores the mismatch.",
        "TRL vllm_importance_sampling_correction=True; Yao et al. 2025; rlhf-book ch. 6")
    tis_cap: float = opt(2.0, "C of truncated importance sampling.", "Open Instruct C=2")
    compile: bool = opt(False, "torch.compile the rollout engine's decode step (seconds per new shape).")

    def validate(self) -> None:
        for key in ("prompts_per_step", "group_size", "max_new_tokens", "max_prompt_tokens"):
            if getattr(self, key) < 1:
                raise ConfigError(f"rollout.{key} must be >= 1, got {getattr(self, key)}", where=f"rollout.{key}")
        if self.temperature <= 0:
            raise ConfigError("rollout.temperature must be > 0 for RL (greedy samples have no policy "
                              "gradient)", where="rollout.temperature", fix="use e.g. rollout.temperature=1.0")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"rollout.top_p must be in (0, 1], got {self.top_p}", where="rollout.top_p")
        if self.tis_cap <= 0:
            raise ConfigError(f"rollout.tis_cap must be > 0, got {self.tis_cap}", where="rollout.tis_cap",
                              fix="use e.g. rollout.tis_cap=2.0, or rollout.correction=none")


@dataclass
class ShapingConfig:
    truncated: Literal["score", "penalize", "mask"] = opt(
        "score", "Responses cut at max_new_tokens: 'score' them like any other, 'penalize' (their reward "
        "becomes truncation_penalty; only finished responses are scored), or 'mask' (left out of the loss).",
        "rlhf-book ch. 6 (score at EOS, penalise truncation); DAPO overlong filtering; TRL default scores all")
    truncation_penalty: float = opt(-1.0, "Reward of a truncated response when truncated=penalize.",
                                    "TRL PPO missing_eos_penalty")
    overlong_buffer: int | None = opt(None, "DAPO soft overlong penalty: the last N tokens before "
                                      "max_new_tokens ramp a penalty from 0 to overlong_penalty (0 = off; "
                                      "null = the algorithm's default: DAPO a quarter of max_new_tokens, "
                                      "others off).", "DAPO (Yu et al. 2025): 4096 of 20480")
    overlong_penalty: float = opt(1.0, "Largest soft overlong penalty.", "DAPO")
    clip: float | None = opt(None, "Clip the total reward to [-clip, clip] (null = off).")

    def validate(self) -> None:
        if self.overlong_buffer is not None and self.overlong_buffer < 0:
            raise ConfigError("shaping.overlong_buffer must be >= 0", where="shaping.overlong_buffer")
        if self.clip is not None and self.clip <= 0:
            raise ConfigError("shaping.clip must be positive or null", where="shaping.clip")


@dataclass
class KLConfig:
    beta: float | None = opt(None, "KL coefficient β (initial value with the adaptive controller); "
                             "null = the algorithm's default.")
    estimator: Literal["k1", "k2", "k3"] = opt("k3", "Per-token estimator of KL(π_θ‖π_ref), r = π_ref/π_θ: "
                                               "k1 = −log r, k2 = ½(log r)², k3 = r − 1 − log r.",
                                               "Schulman 2020; DeepSeekMath uses k3 in the loss")
    placement: Literal["reward", "loss"] | None = opt(None, "'loss': β·KL added to the loss per token "
                                                      "(GRPO); 'reward': subtracted from the reward (PPO, "
                                                      "RLOO); null = the algorithm's default.")
    controller: Literal["fixed", "adaptive"] = opt("fixed", "'adaptive' moves β toward target KL.",
                                                   "Ziegler et al. 2019")
    target: float = opt(6.0, "Adaptive controller: target KL per sequence (nats).", "Ziegler et al. 2019")
    horizon: int = opt(10000, "Adaptive controller: horizon in samples.", "Ziegler et al. 2019")
    track: bool = opt(True, "Compute the reference log-probs and log `kl` even when β = 0 (costs one "
                      "no-grad forward of the reference per step; off = no reference model is loaded).")
    ref_model: str | None = opt(None, "Reference model path (null = the initial policy; with LoRA the "
                                "base model with adapters disabled).")

    def validate(self) -> None:
        if self.beta is not None and self.beta < 0:
            raise ConfigError("kl.beta must be >= 0", where="kl.beta")
        if self.target <= 0 or self.horizon <= 0:
            raise ConfigError("kl.target and kl.horizon must be positive", where="kl")
        if self.placement == "loss" and self.estimator == "k1" and (self.beta is None or self.beta > 0):
            raise ConfigError("k1 in the loss has zero expected gradient (E_π[∇log π] = 0), so it regularises "
                              "nothing (docs/math.md, KL placement)", where="kl.estimator",
                              fix="use kl.estimator=k3 (GRPO: forward-KL gradient) or k2 (reverse-KL gradient) "
                                  "in the loss, or kl.placement=reward with k1 (PPO/RLOO)")


@dataclass
class RLTrainConfig(TrainConfig):
    """TrainConfig whose batch sizes count rollouts and are derived when left null."""

    batch_size: int | None = opt(None, "Rollouts per optimizer step (one minibatch); null = all rollouts "
                                 "of the RL step (one optimizer step per epoch over the batch).")
    micro_batch_size: int | None = opt(None, "Rollouts per forward/backward per process; null = the whole "
                                       "minibatch (no accumulation).")
    epochs: float = opt(1.0, "Passes over the prompt set; ignored if max_steps (RL steps) is set.")
    max_steps: int | None = opt(None, "RL steps (rollout batches) to run; overrides epochs.")

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be positive, got {self.lr}", where="train.lr")
        for key in ("batch_size", "micro_batch_size"):
            v = getattr(self, key)
            if v is not None and v <= 0:
                raise ConfigError(f"train.{key} must be positive or null, got {v}", where=f"train.{key}")
        for key in ("log_every", "keep_checkpoints"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"train.{key} must be positive", where=f"train.{key}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError("train.warmup_ratio must be in [0, 1)", where="train.warmup_ratio")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ConfigError("train.max_steps must be positive", where="train.max_steps")
        if self.epochs <= 0:
            raise ConfigError("train.epochs must be positive", where="train.epochs")


@dataclass(frozen=True)
class BatchPlan:
    """Sizes derived from the config: rollouts per step, minibatches, micro-batches."""

    prompts_per_process: int
    rollouts: int  # per RL step, this process
    minibatches: int  # optimizer steps per epoch over the batch
    micro: int  # rollouts per forward/backward


def plan_batches(rollout: RolloutConfig, train: RLTrainConfig, world: int = 1) -> BatchPlan:
    """prompts_per_step × group_size = rollouts per step; train.batch_size of them per optimizer step.
    Impossible combinations raise an error naming values that work."""
    P, G = rollout.prompts_per_step, rollout.group_size
    if P % world:
        ok = [p for p in range(world, 4 * P + 1, world)][:6]
        raise ConfigError(f"rollout.prompts_per_step={P} cannot be split over {world} processes",
                          where="rollout.prompts_per_step", fix=f"use a multiple of {world}, e.g. {ok}")
    total = P * G
    bs = train.batch_size or total
    if total % bs:
        ok = [d for d in range(1, total + 1) if total % d == 0]
        raise ConfigError(f"train.batch_size={bs} does not divide the {total} rollouts of a step "
                          f"(prompts_per_step {P} x group_size {G})", where="train.batch_size",
                          fix=f"use one of {ok}, or change rollout.prompts_per_step")
    local_mb = bs // world if bs % world == 0 else None
    if local_mb is None:
        raise ConfigError(f"train.batch_size={bs} cannot be split over {world} processes",
                          where="train.batch_size", fix=f"use a multiple of {world}")
    micro = train.micro_batch_size or local_mb
    if local_mb % micro:
        ok = [d for d in range(1, local_mb + 1) if local_mb % d == 0]
        raise ConfigError(f"train.micro_batch_size={micro} does not divide the {local_mb} rollouts of a "
                          f"minibatch per process", where="train.micro_batch_size", fix=f"use one of {ok}")
    return BatchPlan(P // world, total // world, total // bs, micro)


# ----------------------------------------------------------------------------- rewards


def builtin_correct(prompts: list, completions: list, **_: Any) -> list[float]:
    """Built-in task, verifiable: 1 if the stated numbers are exactly the solution, else 0."""
    from posttrain.tasks.builtin import is_correct

    return [float(is_correct(_text(p), c)) for p, c in zip(prompts, completions)]


def builtin_gold(prompts: list, completions: list, **_: Any) -> list[float]:
    """Built-in task, the hidden gold reward in [-0.3, 1] (positional accuracy minus a filler cost)."""
    from posttrain.tasks.builtin import gold_reward

    return [gold_reward(_text(p), c) for p, c in zip(prompts, completions)]


def _text(prompt) -> str:
    """A prompt string, or the last user turn of a message list."""
    if isinstance(prompt, list):
        users = [m["content"] for m in prompt if m.get("role") == "user"]
        return users[-1] if users else ""
    return prompt


BUILTIN_REWARDS: dict[str, Callable] = {"builtin_correct": builtin_correct, "builtin_gold": builtin_gold}


def _fn_name(fn, spec: str) -> str:
    """The name a reward is logged under (``reward/<name>``): rm for a reward model, else the
    reward's own name (``posttrain.rewards.reward_name``)."""
    if spec.startswith("rm:"):
        return "rm"
    from posttrain.rewards import reward_name

    return reward_name(fn)


def load_rewards(specs: list[str], weights: list[float]) -> list[tuple[str, Callable, float]]:
    """(name, callable, weight) for every reward spec: builtin_correct | builtin_gold | rm:<path> |
    any spec :func:`posttrain.rewards.resolve_reward` knows (exact_match, math, module:function)."""
    if not specs:
        raise ConfigError("no reward given", where="reward", fix="e.g. reward=builtin_correct")
    weights = list(weights) or [1.0] * len(specs)
    out, seen = [], set()
    for spec, w in zip(specs, weights):
        if spec in BUILTIN_REWARDS:
            fn = BUILTIN_REWARDS[spec]
        elif spec.startswith("rm:"):
            from posttrain.rewards.reward_model import RewardModelScorer

            fn = RewardModelScorer(spec[3:], where="reward")
        else:
            from posttrain.rewards import resolve_reward

            fn = resolve_reward(spec)
        name = spec if spec in BUILTIN_REWARDS else _fn_name(fn, spec)
        while name in seen:
            name += "_"
        seen.add(name)
        out.append((name, fn, float(w)))
    return out


def check_reward_config(specs: list[str], weights: list[float]) -> None:
    if weights and len(weights) != len(specs):
        raise ConfigError(f"{len(weights)} reward_weights for {len(specs)} rewards", where="reward_weights",
                          fix=f"give {len(specs)} weights (or none for all 1.0)")
    if not specs:
        raise ConfigError("no reward given", where="reward", fix="e.g. reward=builtin_correct")


def combine_rewards(components: dict[str, list], weights: dict[str, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted sum over the functions that apply (None = does not apply), and which samples any
    function applied to. -> (total [N], valid [N] bool)."""
    names = list(components)
    n = len(components[names[0]]) if names else 0
    total = torch.zeros(n, dtype=torch.float64)
    valid = torch.zeros(n, dtype=torch.bool)
    for name in names:
        vals = components[name]
        if len(vals) != n:
            raise DataError(f"reward '{name}' returned {len(vals)} values for {n} completions",
                            where=f"reward {name}", fix="return one float (or None) per completion")
        for i, v in enumerate(vals):
            if v is None:
                continue
            v = float(v)
            if not math.isfinite(v):
                raise DataError(f"reward '{name}' returned {v} for completion {i}", where=f"reward {name}",
                                fix="return a finite float, or None where the reward does not apply")
            total[i] += weights[name] * v
            valid[i] = True
    return total.float(), valid


# ----------------------------------------------------------------------------- packed forwards


def collate_shared(prompts: list[list[int]], completions: list[list[int]]) -> dict[str, torch.Tensor]:
    """Pack rollouts into one row, computing a prompt shared by consecutive rollouts only once.

    Consecutive rollouts with the same prompt (a GRPO group) become one tree: the prompt, then each
    completion, where a completion token attends to the prompt and to its own earlier tokens only
    (``batching.pack_shared``: positions continue from the prompt's length, so every completion sees
    exactly what it would alone). A rollout whose prompt differs from its predecessor's starts a new
    tree. With G completions of C tokens after a P-token prompt, a group costs P + G·(C − 1) tokens
    instead of G·(P + C): the last completion token is only a target, never an input.

    Returns input_ids, position_ids [1, T], attn_layout, and per completion token k (flat, ordered by
    rollout then position): ``pred_row``/``pred_col`` (the position whose logits predict it: the
    prompt's last token for the first completion token), ``tgt_seq`` (rollout index in the given
    list), ``tgt_j`` (position in its completion), ``tgt_ids``; plus n_seqs, n_pad.
    """
    from posttrain.data.batching import pack_shared

    trees: list[tuple[list[int], list[int]]] = []  # (prompt, rollout indices)
    for i, p in enumerate(prompts):
        if trees and prompts[trees[-1][1][-1]] == p:
            trees[-1][1].append(i)
        else:
            trees.append((p, [i]))
    # a completion's last token predicts nothing and no later token attends to it: it is never an input
    packed = pack_shared([p for p, _ in trees], [[completions[i][:-1] for i in members] for _, members in trees])
    n = len(prompts)
    pred_col, tgt_j = [None] * n, [None] * n
    for t, (p, members) in enumerate(trees):
        prompt_end = packed["prompt_start"][t] + len(p) - 1
        for i, c0 in zip(members, packed["branch_start"][t]):
            C = len(completions[i])
            pred_col[i] = torch.cat([torch.tensor([prompt_end]), torch.arange(c0, c0 + C - 1)])
            tgt_j[i] = torch.arange(C)
    cols = torch.cat(pred_col)
    return {"input_ids": packed["input_ids"], "position_ids": packed["position_ids"],
            "attn_layout": packed["attn_layout"], "pred_row": torch.zeros_like(cols), "pred_col": cols,
            "tgt_seq": torch.cat([torch.full((len(completions[i]),), i) for i in range(n)]),
            "tgt_j": torch.cat(tgt_j), "tgt_ids": torch.cat([torch.tensor(completions[i]) for i in range(n)]),
            "n_seqs": torch.tensor(n), "n_pad": torch.tensor(packed["n_pad"])}


_HEAD_SLICE_ARCHS = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM")


def _base_lm(model):
    return model.get_base_model() if hasattr(model, "peft_config") else model


def token_forward(model, batch: dict, temperature: float = 1.0, want_hidden: bool = False,
                  want_logits: bool = False):
    """One forward of a causal LM over a :func:`collate_shared` batch. Returns a dict of completion-token tensors, flat over the
    batch's completion tokens: ``logp`` [K] (log π(token)/T-tempered), optional ``logits`` [K, V]
    (tempered) and ``hidden`` [K, H] (last hidden state before each token), plus the index tensors
    ``seq``/``j`` that place them in a ``[n, T]`` layout.

    For Llama/Qwen2/Qwen3/Mistral the LM head runs only on the K completion positions (the prompt's
    logits are never computed); other architectures run their full forward and index it."""
    from posttrain.logprobs import selective_log_softmax
    from posttrain.models.attention import model_inputs

    rows, cols, seq, j, targets = (batch[k] for k in ("pred_row", "pred_col", "tgt_seq", "tgt_j", "tgt_ids"))
    base = _base_lm(model)
    hidden = None
    if type(base).__name__ in _HEAD_SLICE_ARCHS:
        out = base.get_decoder()(**model_inputs(base, batch))
        hidden = out.last_hidden_state[rows, cols]
        logits = base.get_output_embeddings()(hidden)
    else:
        out = model(**model_inputs(model, batch), output_hidden_states=want_hidden)
        logits = out.logits[rows, cols]
        if want_hidden:
            hidden = out.hidden_states[-1][rows, cols]
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    res = {"logp": selective_log_softmax(logits, targets), "seq": seq, "j": j}
    if want_logits:
        res["logits"] = logits
    if want_hidden:
        res["hidden"] = hidden
    return res


def to_layout(flat: torch.Tensor, seq: torch.Tensor, j: torch.Tensor, n: int, T: int) -> torch.Tensor:
    """Flat per-token values [K] -> completion-aligned [n, T] (zeros elsewhere; differentiable)."""
    out = flat.new_zeros(n, T)
    return out.index_put((seq, j), flat)


def critic_values(critic, batch: dict) -> torch.Tensor:
    """Per-token values [K] from a separate value model (a ``*ForSequenceClassification``): its head
    applied to the hidden state that precedes each completion token."""
    from posttrain.models.attention import model_inputs
    from posttrain.models.heads import backbone_and_head

    backbone, head = backbone_and_head(critic)
    out = backbone(**model_inputs(critic, batch))
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return head(hidden[batch["pred_row"], batch["pred_col"]]).squeeze(-1).float()


# ----------------------------------------------------------------------------- experience


@dataclass
class Experience:
    """One RL step's rollouts with everything the loss needs. Per-token tensors are [N, T]."""

    prompts: list  # per rollout (repeated per group)
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    texts: list[str]
    finish: list[str]
    group_size: int
    scores: torch.Tensor  # [N] shaped total reward (before KL)
    valid: torch.Tensor  # [N] bool: enters the loss
    components: dict[str, torch.Tensor]  # raw reward per function, NaN where it did not apply
    mask: torch.Tensor  # [N, T] completion tokens of valid rollouts
    rollout_logp: torch.Tensor  # [N, T] from the rollout engine
    old_logp: torch.Tensor | None = None  # [N, T] trainer log-probs before the update (π_old)
    ref_logp: torch.Tensor | None = None  # [N, T]
    values: torch.Tensor | None = None  # [N, T] PPO critic
    advantages: torch.Tensor | None = None  # [N, T]
    returns: torch.Tensor | None = None  # [N, T] PPO value targets
    metrics: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.completion_ids)

    @property
    def lengths(self) -> torch.Tensor:
        return torch.tensor([len(c) for c in self.completion_ids])

    def select(self, idx: list[int]) -> "Experience":
        """The rollouts ``idx`` (e.g. the groups that survive dynamic sampling)."""
        t = torch.tensor(idx, dtype=torch.long)

        def pick(x):
            return None if x is None else x[t]

        return Experience([self.prompts[i] for i in idx], [self.prompt_ids[i] for i in idx],
                          [self.completion_ids[i] for i in idx], [self.texts[i] for i in idx],
                          [self.finish[i] for i in idx], self.group_size, self.scores[t], self.valid[t],
                          {k: v[t] for k, v in self.components.items()}, self.mask[t], self.rollout_logp[t],
                          pick(self.old_logp), pick(self.ref_logp), pick(self.values), pick(self.advantages),
                          pick(self.returns), dict(self.metrics))

    @staticmethod
    def concat(parts: list["Experience"]) -> "Experience":
        if len(parts) == 1:
            return parts[0]
        T = max(p.mask.shape[1] for p in parts)

        def cat(xs):
            if any(x is None for x in xs):
                return None
            return torch.cat([torch.nn.functional.pad(x, (0, T - x.shape[1])) if x.dim() == 2 else x for x in xs])

        first = parts[0]
        return Experience(sum((p.prompts for p in parts), []), sum((p.prompt_ids for p in parts), []),
                          sum((p.completion_ids for p in parts), []), sum((p.texts for p in parts), []),
                          sum((p.finish for p in parts), []), first.group_size,
                          torch.cat([p.scores for p in parts]), torch.cat([p.valid for p in parts]),
                          {k: torch.cat([p.components[k] for p in parts]) for k in first.components},
                          cat([p.mask for p in parts]), cat([p.rollout_logp for p in parts]),
                          cat([p.old_logp for p in parts]), cat([p.ref_logp for p in parts]),
                          cat([p.values for p in parts]), cat([p.advantages for p in parts]),
                          cat([p.returns for p in parts]), dict(first.metrics))

    def micro_batch(self, idx: list[int]) -> dict:
        """A packed training micro-batch of rollouts ``idx`` (a prompt shared by consecutive rollouts
        computed once, :func:`collate_shared`) plus their [n, T] per-token tensors."""
        batch = collate_shared([self.prompt_ids[i] for i in idx], [self.completion_ids[i] for i in idx])
        t = torch.tensor(idx, dtype=torch.long)
        for name in ("mask", "rollout_logp", "old_logp", "ref_logp", "values", "advantages", "returns"):
            x = getattr(self, name)
            if x is not None:
                batch[name] = x[t]
        batch["scores"] = self.scores[t]
        return batch


def group_std_zero_frac(scores: torch.Tensor, group_size: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Share of groups whose (valid) rewards are all equal: their group-relative advantage is 0."""
    if group_size < 2 or scores.numel() % group_size:
        return torch.tensor(float("nan"))
    return zero_variance_groups(scores, group_size, valid).float().mean()


class ExperienceMaker:
    """Makes :class:`Experience` for one RL step. The models are passed in: ``policy`` (the trained
    causal LM the rollout engine samples from), ``ref`` (a callable batch -> per-token log-probs, or
    None), ``critic`` (batch -> per-token values, or None)."""

    def __init__(self, *, tokenizer, engine, rollout: RolloutConfig, shaping: ShapingConfig,
                 rewards: list[tuple[str, Callable, float]], records: list[dict], seed: int,
                 plan: BatchPlan, rank: int = 0, world: int = 1):
        from posttrain.data.chat import encode_prompt

        self.tokenizer, self.engine, self.rollout, self.shaping = tokenizer, engine, rollout, shaping
        self.rewards, self.records, self.seed, self.plan = rewards, records, seed, plan
        self.rank, self.world = rank, world
        self.prompt_ids = []
        for i, r in enumerate(records):
            ids = encode_prompt(tokenizer, r["prompt"])
            if len(ids) > rollout.max_prompt_tokens:
                raise DataError(f"prompt {i + 1} has {len(ids)} tokens, more than rollout.max_prompt_tokens="
                                f"{rollout.max_prompt_tokens}", where=f"{rollout.prompts}:{i + 1}",
                                fix="raise rollout.max_prompt_tokens or shorten the prompt")
            self.prompt_ids.append(ids)
        from posttrain.data.batching import StepSampler

        self.sampler = StepSampler(len(records), rollout.prompts_per_step, seed)

    # ---- which prompts
    def prompt_indices(self, step: int, round_: int = 0) -> list[int]:
        """This process's prompts for RL step ``step`` (round > 0: extra draws for dynamic sampling)."""
        if round_ == 0:
            idx = self.sampler.batch(step)
        else:
            rng = random.Random((self.seed * 1_000_003 + step) * 101 + round_)
            idx = rng.sample(range(len(self.records)), self.rollout.prompts_per_step)
        per = len(idx) // self.world
        return idx[self.rank * per:(self.rank + 1) * per]

    # ---- steps 2-3: sample and score
    def sample(self, idx: list[int], seed: int) -> Experience:
        from posttrain.engines.rollout import SamplingParams

        ro, G = self.rollout, self.rollout.group_size
        params = SamplingParams(max_new_tokens=ro.max_new_tokens, temperature=ro.temperature, top_p=ro.top_p,
                                top_k=ro.top_k, stop_token_ids=[self.tokenizer.eos_token_id],
                                stop_strings=list(ro.stop_strings), seed=seed, n=G)
        t0 = time.perf_counter()
        outs = self.engine.generate([self.prompt_ids[i] for i in idx], params)
        t1 = time.perf_counter()
        recs = [self.records[i] for i in idx for _ in range(G)]
        texts = [self.tokenizer.decode(o.completion_ids, skip_special_tokens=True) for o in outs]
        finish = [o.finish_reason for o in outs]
        scores, valid, comps = self.score(recs, texts, [len(o.completion_ids) for o in outs], finish)
        T = max(len(o.completion_ids) for o in outs)
        mask = torch.zeros(len(outs), T)
        rlp = torch.zeros(len(outs), T)
        for i, o in enumerate(outs):
            mask[i, :len(o.completion_ids)] = 1.0
            rlp[i, :len(o.logprobs)] = torch.tensor(o.logprobs)
        mask = mask * valid[:, None].float()
        timing = {"gen_s": t1 - t0, "reward_s": time.perf_counter() - t1}
        return Experience([r["prompt"] for r in recs], [o.prompt_ids for o in outs],
                          [o.completion_ids for o in outs], texts, finish, G, scores, valid, comps, mask, rlp,
                          metrics=timing)

    def score(self, recs: list[dict], texts: list[str], lengths: list[int], finish: list[str]):
        """(shaped scores [N], valid [N], raw components {name: [N] with NaN}) for one batch."""
        prompts = [r["prompt"] for r in recs]
        columns = {k: [r.get(k) for r in recs] for k in recs[0] if k != "prompt"} if recs else {}
        raw, weights = {}, {}
        for name, fn, w in self.rewards:
            raw[name] = list(fn(prompts, texts, **columns))
            weights[name] = w
        truncated = torch.tensor([f == "length" for f in finish])
        if self.shaping.truncated == "penalize":  # only finished responses are scored
            raw = {k: [None if t else v for v, t in zip(vals, truncated.tolist())] for k, vals in raw.items()}
        total, valid = combine_rewards(raw, weights)
        if self.shaping.truncated == "penalize":
            total = torch.where(truncated, torch.tensor(self.shaping.truncation_penalty), total)
            valid = valid | truncated
        elif self.shaping.truncated == "mask":
            valid = valid & ~truncated
        if self.shaping.overlong_buffer:
            from posttrain.advantages import overlong_penalty

            pen = self.shaping.overlong_penalty * overlong_penalty(
                torch.tensor(lengths, dtype=torch.float32), self.rollout.max_new_tokens, self.shaping.overlong_buffer)
            raw["overlong"] = pen.tolist()
            total = total + pen
        if self.shaping.clip is not None:
            total = total.clamp(-self.shaping.clip, self.shaping.clip)
        comps = {k: torch.tensor([float("nan") if v is None else float(v) for v in vals]) for k, vals in raw.items()}
        return total, valid, comps

    # ---- step 4: trainer forwards
    @torch.no_grad()
    def forward_all(self, exp: Experience, fn: Callable[[dict], torch.Tensor], micro: int) -> torch.Tensor:
        """Apply ``fn(micro_batch) -> flat per-token values [K]`` over the batch in packed chunks -> [N, T]."""
        N, T = exp.mask.shape
        out = torch.zeros(N, T)
        for s in range(0, N, micro):
            idx = list(range(s, min(N, s + micro)))
            mb = exp.micro_batch(idx)
            flat, seq, j = fn(mb)
            out[idx[0]:idx[-1] + 1] = to_layout(flat.float().cpu(), seq.cpu(), j.cpu(), len(idx), T)
        return out

    def make(self, step: int, *, policy=None, ref=None, critic=None, need_old: bool,
             dynamic_sampling: bool = False, max_rounds: int = 1, micro: int = 64) -> Experience:
        """Steps 1-4 for RL step ``step``. ``policy``/``ref``/``critic`` are callables
        ``micro_batch -> (flat values, seq, j)``; π_old is computed only when ``need_old``."""
        parts, kept_groups, seen_groups, zero_frac = [], 0, 0, None
        G, want = self.rollout.group_size, self.plan.prompts_per_process
        for round_ in range(max_rounds if dynamic_sampling else 1):
            idx = self.prompt_indices(step, round_)
            exp = self.sample(idx, seed=(self.seed * 1_000_003 + step) * 131 + round_ * 7 + self.rank)
            groups = len(idx)
            seen_groups += groups
            if zero_frac is None:
                zero_frac = float(group_std_zero_frac(exp.scores, G, exp.valid))
            if dynamic_sampling:  # DAPO: keep groups whose valid rewards differ
                keep = (~zero_variance_groups(exp.scores, G, exp.valid)).nonzero().flatten().tolist()
                keep = keep[:want - kept_groups]
                exp = exp.select([k * G + i for k in keep for i in range(G)])
                kept_groups += len(keep)
            else:
                kept_groups += groups
            parts.append(exp)
            if kept_groups >= want:
                break
        timing = {k: sum(p.metrics[k] for p in parts) for k in ("gen_s", "reward_s")}
        exp = Experience.concat([p for p in parts if len(p)]) if any(len(p) for p in parts) else parts[0]
        t1 = time.perf_counter()
        if len(exp):
            if need_old and policy is not None:
                exp.old_logp = self.forward_all(exp, policy, micro)
            if ref is not None:
                exp.ref_logp = self.forward_all(exp, ref, micro)
            if critic is not None:
                exp.values = self.forward_all(exp, critic, micro)
        # metrics over everything sampled in round 0 is what the policy does; report the kept batch
        m = exp.metrics
        m.update(rollout_metrics(exp))
        m["reward/std_zero_frac"] = zero_frac if zero_frac is not None else float("nan")
        m.update(timing)
        m["forward_s"] = time.perf_counter() - t1
        for _, fn, _ in self.rewards:
            from posttrain.rewards import outcome_metrics

            m.update(outcome_metrics(fn))
        if dynamic_sampling:
            m["dynamic/kept_groups"] = float(kept_groups)
            m["dynamic/sampled_groups"] = float(seen_groups)
        if exp.old_logp is not None and len(exp):
            m["logprob_gap"] = float(masked_mean((exp.old_logp - exp.rollout_logp).abs(), exp.mask))
        return exp


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def rollout_metrics(exp: Experience) -> dict[str, float]:
    """reward/*, response/* of one batch (host floats, once per step)."""
    if not len(exp):
        return {"reward/mean": float("nan"), "batch/rollouts": 0.0}
    s = exp.scores[exp.valid] if exp.valid.any() else exp.scores
    out = {"reward/mean": float(s.mean()), "reward/std": float(s.std()) if s.numel() > 1 else 0.0,
           "response/length_mean": float(exp.lengths.float().mean()),
           "response/truncated_frac": sum(f == "length" for f in exp.finish) / len(exp),
           "response/invalid_frac": float((~exp.valid).float().mean()), "batch/rollouts": float(len(exp))}
    for k, v in exp.components.items():
        ok = ~torch.isnan(v)
        if ok.any():
            out[f"reward/{k}"] = float(v[ok].mean())
    return out


# ----------------------------------------------------------------------------- minibatches


def minibatches(n: int, n_minibatches: int, epochs: int, micro: int, seed: int, group_size: int = 1):
    """Yield (epoch, list of micro-batch index lists) for each optimizer step: every epoch a fresh
    seeded shuffle of the ``n`` rollouts, cut into ``n_minibatches`` near-equal minibatches. Groups of
    ``group_size`` consecutive rollouts are shuffled as units (their shared prompt is then computed
    once per micro-batch; the advantages are already fixed, so the order is all that changes)."""
    rng = random.Random(seed)
    G = group_size if group_size > 1 and n % group_size == 0 else 1
    for epoch in range(epochs):
        groups = list(range(n // G))
        if epochs * n_minibatches > 1:
            rng.shuffle(groups)
        order = [g * G + k for g in groups for k in range(G)]
        bounds = [round(k * n / n_minibatches) for k in range(n_minibatches + 1)]
        for a, b in zip(bounds[:-1], bounds[1:]):
            mb = order[a:b]
            if mb:
                yield epoch, [mb[s:s + micro] for s in range(0, len(mb), micro)]


# ----------------------------------------------------------------------------- setup helpers


def load_prompt_records(cfg: RolloutConfig) -> list[dict]:
    from posttrain.data.formats import load_records
    from posttrain.data.records import ReadOptions

    return load_records(cfg.prompts, "prompt", columns=cfg.columns, split=cfg.split, max_rows=cfg.max_prompts,
                        options=ReadOptions(format=cfg.format, prefix="rollout.", keys=("format",)))


def make_engine(model, tokenizer, cfg: RolloutConfig):
    from posttrain.engines.rollout import HFRolloutEngine

    return HFRolloutEngine(model, pad_token_id=tokenizer.pad_token_id, tokenizer=tokenizer,
                           compile=cfg.compile, dtype=engine_dtype(cfg.engine_dtype, model),
                           max_batch_size=max(128, cfg.group_size))


def engine_dtype(choice: str, model) -> torch.dtype | None:
    """The rollout engine's compute dtype for ``rollout.engine_dtype`` (None = the model's)."""
    if choice == "model":
        return None
    if choice == "bfloat16":
        return torch.bfloat16
    from posttrain.engines.fast_decode import unsupported_reason

    p = next(model.parameters())
    probe = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    native_bf16 = any(f is not None and f() for f in probe)  # private probes: absent means no
    fast = unsupported_reason(model) is None  # another dtype needs the fast decode path
    return torch.bfloat16 if p.device.type == "cpu" and p.dtype == torch.float32 and native_bf16 and fast else None


def rollout_is_weight(cfg: RolloutConfig, old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor):
    """(per-token weight or None, metrics) for ``rollout.correction``."""
    if cfg.correction == "none":
        return None, {}
    from posttrain.losses.policy import truncated_is_weight

    return truncated_is_weight(old_logp, rollout_logp, mask, cfg.tis_cap)


def load_reference(model_cfg, kl: KLConfig, lora_enabled: bool):
    """A frozen reference causal LM, or None with LoRA (the adapters are disabled instead)."""
    from posttrain.algorithms import common

    if lora_enabled and kl.ref_model is None:
        return None
    ref = common.load_policy(model_cfg, None, name_or_path=kl.ref_model)
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def ref_logp_fn(ref_model, policy, temperature: float):
    """micro_batch -> (flat ref log-probs, seq, j): a separate frozen model, or the LoRA policy with its
    adapters disabled."""
    def fn(mb):
        if ref_model is not None:
            out = token_forward(ref_model, mb, temperature)
        else:
            with policy.disable_adapter():
                out = token_forward(policy, mb, temperature)
        return out["logp"], out["seq"], out["j"]
    return fn


def policy_logp_fn(policy, temperature: float):
    def fn(mb):
        was = policy.training
        policy.eval()
        out = token_forward(policy, mb, temperature)
        policy.train(was)
        return out["logp"], out["seq"], out["j"]
    return fn


def rl_steps(train: RLTrainConfig, n_prompts: int, prompts_per_step: int) -> int:
    return train.max_steps or max(1, int(train.epochs * n_prompts / prompts_per_step))


def task_eval(model, tokenizer, engine, prompts_source: str, n_prompts: int, n_samples: int, seed: int,
              eval_records: list[dict] | None = None, rewards=None, max_new_tokens: int = 24) -> dict[str, float]:
    """Held-out metrics: the built-in task's accuracy / gold reward, and the mean reward on
    ``eval_records`` when given."""
    from posttrain.algorithms import common

    out: dict[str, float] = {}
    if prompts_source.startswith("builtin:"):
        out.update(common.builtin_task_eval(model, tokenizer, n_prompts, n_samples, seed=seed, engine=engine))
    if eval_records and rewards:
        texts = common.sample_texts(model, tokenizer, [r["prompt"] for r in eval_records], 1, max_new_tokens,
                                    1.0, seed + 29, engine)
        raw = {name: list(fn([r["prompt"] for r in eval_records], texts,
                             **{k: [r.get(k) for r in eval_records] for k in eval_records[0] if k != "prompt"}))
               for name, fn, _ in rewards}
        total, valid = combine_rewards(raw, {name: w for name, _, w in rewards})
        out["reward"] = float(total[valid].mean()) if valid.any() else float("nan")
    return out


def load_eval_records(cfg: RolloutConfig) -> list[dict]:
    from posttrain.data.formats import load_records
    from posttrain.data.records import ReadOptions

    opts = ReadOptions(format=cfg.format, prefix="rollout.", keys=("format",))
    return load_records(cfg.eval_prompts, "prompt", columns=cfg.columns, options=opts) if cfg.eval_prompts else []


def kl_controller(cfg: KLConfig):
    from posttrain.kl import AdaptiveKLController, FixedKLController

    if cfg.controller == "adaptive":
        return AdaptiveKLController(cfg.beta, cfg.target, cfg.horizon)
    return FixedKLController(cfg.beta)


def sequence_kl(exp: Experience, estimator: str) -> torch.Tensor:
    """[N] Σ_t KL_t of each rollout under π_old (the policy that sampled it) and the reference."""
    from posttrain.kl import get_kl_estimator

    return (get_kl_estimator(estimator)(exp.old_logp, exp.ref_logp) * exp.mask).sum(1)


def kl_metrics(exp: Experience, estimator: str) -> dict[str, float]:
    """``kl``: mean over rollouts of Σ_t (log π − log π_ref) (the sequence KL, nats); ``kl/per_token``:
    the configured estimator's mean over tokens."""
    from posttrain.kl import get_kl_estimator

    valid = exp.mask.sum(1) > 0
    if not valid.any():
        return {}
    seq = ((exp.old_logp - exp.ref_logp) * exp.mask).sum(1)
    tok = (get_kl_estimator(estimator)(exp.old_logp, exp.ref_logp) * exp.mask).sum() / exp.mask.sum()
    return {"kl": float(seq[valid].mean()), "kl/per_token": float(tok)}


def fill_invalid(scores: torch.Tensor, valid: torch.Tensor, group_size: int) -> torch.Tensor:
    """Rewards of samples left out of the loss are replaced by their group's mean valid reward, so they
    do not move the group baseline (their advantages are never used: their tokens are masked)."""
    if bool(valid.all()) or scores.numel() % group_size:
        return scores
    # fp64: the mean of equal valid rewards is then exactly that reward, so the group stays constant
    g, v = scores.view(-1, group_size).double(), valid.view(-1, group_size).double()
    mean = (g * v).sum(1, keepdim=True) / v.sum(1, keepdim=True).clamp(min=1)
    return torch.where(v.bool(), g, mean.expand_as(g)).reshape(-1).to(scores.dtype)


_FIRST_ONLY = ("logprob_gap", "kl", "kl/per_token")
_RENAME = {"ratio_mean": "ratio/mean", "ratio_max": "ratio/max", "ratio_min": "ratio/min",
           "approx_kl": "approx_kl_old", "loss": "train/loss", "grad_norm": "train/grad_norm", "lr": "train/lr"}


def merge_update_metrics(steps: list[dict]) -> dict[str, float]:
    """One RL step's optimizer-step metrics -> one row: the mean over updates (``*max`` keys: the max;
    pre-update measurements such as ``logprob_gap``: the first update's)."""
    out: dict[str, float] = {}
    for k in steps[0]:
        vals = [float(s[k]) for s in steps if k in s]
        if k in _FIRST_ONLY:
            v = vals[0]
        elif k.endswith("max"):
            v = max(vals)
        elif k.endswith("min"):
            v = min(vals)
        else:
            v = sum(vals) / len(vals)
        out[_RENAME.get(k, k)] = v
    return out


def reduce_metrics(engine, m: dict[str, float]) -> dict[str, float]:
    """Average a step's host metrics over processes (one collective per step; no-op on one process)."""
    if engine.world_size == 1:
        return m
    keys = sorted(m)
    t = torch.tensor([float(m[k]) for k in keys], dtype=torch.float64, device=engine.device)
    t = engine.accelerator.reduce(t, reduction="mean")
    return dict(zip(keys, t.tolist()))
