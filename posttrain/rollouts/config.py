"""Config blocks and batch planning shared by the online RL commands (GRPO family, RLOO, REINFORCE, PPO).

``plan_batches`` derives every batch size from what the user gave and names the values that would
work when a combination is impossible; ``kl_controller`` builds the fixed or adaptive β once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from posttrain.config import TrainConfig, opt
from posttrain.errors import ConfigError
from posttrain.kl import AdaptiveKLController, FixedKLController


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
        "docs/rollout.md; benchmarks/generate.py")
    correction: Literal["tis", "none"] = opt(
        "tis", "Rollout-mismatch correction: tis weights each token's policy-gradient term by "
        "min(π_old/π_rollout, rollout.tis_cap) (truncated importance sampling; 1 for an exact engine); "
        "none ignores the mismatch.",
        "TRL vllm_importance_sampling_correction=True; Yao et al. 2025; rlhf-book ch. 6")
    tis_cap: float = opt(2.0, "C of truncated importance sampling.", "Open Instruct C=2")
    compile: bool = opt(False, "torch.compile the rollout engine's decode step (seconds per new shape).")
    engine: Literal["local", "vllm", "server"] = opt(
        "local", "Rollout engine: local = in-process sampling from the trained model itself (the fast decode "
        "path for Llama/Qwen2 on CPU, Hugging Face generate otherwise; no weight sync needed); vllm = vLLM on "
        "a CUDA GPU (pip install 'posttrain[vllm]'), the trainer's weights loaded into it after every update; "
        "server = the OpenAI-compatible completion servers in rollout.servers (posttrain serve, or vllm serve "
        "as docs/rollout.md shows), token ids in and out, the trainer's weights reloaded by every server "
        "after every update.", "TRL use_vllm / vllm_mode=server; OpenRLHF/veRL")
    vllm_kwargs: dict[str, Any] = opt({}, "Arguments for vllm.LLM with rollout.engine=vllm, e.g. "
                                      "{gpu_memory_utilization: 0.3, max_model_len: 2048}.")
    vllm_sleep: int = opt(0, "rollout.engine=vllm: vLLM's sleep level after every generation, so training on the "
                          "same GPU gets its memory back: 0 = stays awake; 1 = weights offloaded to CPU, KV cache "
                          "freed; 2 = weights discarded too (the trainer's are loaded before the next generation).",
                          "TRL vllm_enable_sleep_mode (level 2); vLLM docs, sleep mode")
    servers: list[str] = opt([], "Base URLs of the completion servers for rollout.engine=server, e.g. "
                             "[http://127.0.0.1:8001/v1, http://127.0.0.1:8002/v1]; each step's prompts are "
                             "split between them.")
    server_timeout_s: float = opt(300.0, "rollout.engine=server: longest wait for one server answer (a "
                                  "generation request or a weight reload); connecting gives up after 10 s.")
    server_retries: int = opt(2, "rollout.engine=server: retries of a request whose connection failed or that "
                              "got a 5xx answer (not of one that timed out), then the run stops with an error "
                              "naming the server.")
    environment: str | None = opt(None, "Multi-turn episodes against an environment instead of one completion per "
                                  "prompt: builtin:calc (the calculator tool; the built-in tool task's prompts are "
                                  "builtin:tool_prompts), builtin:python (a sandboxed Python tool instead), "
                                  "builtin:no_tools (the same task, tools refused), "
                                  "openenv:http://HOST:PORT (an OpenEnv environment server; posttrain[openenv]), or "
                                  "module:Class (reset(row) -> messages, step(action) -> Step). The environment "
                                  "gives the reward.", "docs/rl.md, multi-turn episodes")
    max_turns: int = opt(4, "Multi-turn: most policy turns per episode (then it ends, counted as truncated).")
    max_episode_tokens: int = opt(256, "Multi-turn: most tokens after the first prompt (sampled and observation "
                                  "tokens); then the episode ends, counted as truncated.")
    server_weights_dir: str | None = opt(None, "rollout.engine=server: directory the trainer writes its "
                                         "weights to after each update for the servers to load; they must be "
                                         "able to read it (same host or a shared filesystem). null = a new "
                                         "temporary directory.")

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
        if self.engine != "local" and self.compile:
            raise ConfigError("rollout.compile applies to the local engine only", where="rollout.compile",
                              fix=f"leave rollout.compile=false with rollout.engine={self.engine} (the engine "
                                  "compiles its own graphs, if any)")
        if self.vllm_sleep and self.engine != "vllm":
            raise ConfigError(f"rollout.vllm_sleep={self.vllm_sleep} is set but rollout.engine is {self.engine}",
                              where="rollout.vllm_sleep", fix="set rollout.engine=vllm, or rollout.vllm_sleep=0")
        if self.vllm_sleep not in (0, 1, 2) or "enable_sleep_mode" in self.vllm_kwargs:
            raise ConfigError(f"rollout.vllm_sleep must be 0, 1 or 2 (vLLM's sleep levels), got {self.vllm_sleep}"
                              if self.vllm_sleep not in (0, 1, 2) else "rollout.vllm_kwargs sets enable_sleep_mode, "
                              "which rollout.vllm_sleep sets", where="rollout.vllm_sleep",
                              fix="rollout.vllm_sleep=1 or 2 (and no enable_sleep_mode in rollout.vllm_kwargs)")
        if self.engine != "vllm" and self.vllm_kwargs:
            raise ConfigError(f"rollout.vllm_kwargs is set but rollout.engine is {self.engine}",
                              where="rollout.vllm_kwargs", fix="set rollout.engine=vllm, or remove rollout.vllm_kwargs")
        self._validate_servers()
        if self.environment is not None and (self.max_turns < 1 or self.max_episode_tokens < 1):
            raise ConfigError("rollout.max_turns and rollout.max_episode_tokens must be >= 1", where="rollout.max_turns")

    def _validate_servers(self) -> None:
        if self.engine == "server" and not self.servers:
            raise ConfigError("rollout.engine=server needs the servers' URLs", where="rollout.servers",
                              fix="start them (e.g. posttrain serve model.name_or_path=<policy> port=8001) and set "
                                  "rollout.servers=[http://127.0.0.1:8001/v1]")
        if self.engine != "server" and self.servers:
            raise ConfigError(f"rollout.servers is set but rollout.engine is {self.engine}", where="rollout.servers",
                              fix="set rollout.engine=server, or remove rollout.servers")
        for url in self.servers:
            if not str(url).startswith(("http://", "https://")):
                raise ConfigError(f"rollout.servers: {url!r} is not an http(s) URL", where="rollout.servers",
                                  fix="give base URLs such as http://127.0.0.1:8001/v1")
        if self.server_timeout_s <= 0:
            raise ConfigError(f"rollout.server_timeout_s must be > 0, got {self.server_timeout_s}",
                              where="rollout.server_timeout_s", fix="e.g. rollout.server_timeout_s=300")
        if self.server_retries < 0:
            raise ConfigError(f"rollout.server_retries must be >= 0, got {self.server_retries}",
                              where="rollout.server_retries")


@dataclass
class RayConfig:
    address: str | None = opt(None, "Ray cluster to join (ray.init address, e.g. auto on a node started with "
                              "`ray start`); null = start a local cluster for this run and stop it at the end.")
    rollout_workers: int = opt(2, "Rollout workers (Ray actors), each holding a rollout engine; a step's "
                               "prompts are split between them in order.")
    cpus_per_worker: float = opt(1.0, "Ray CPUs reserved per rollout worker (on CPU also its torch threads).")
    gpus_per_worker: float = opt(0.0, "Ray GPUs per rollout worker (0 on CPU; a fraction shares a GPU; "
                                  "rollout.engine=vllm needs > 0: each worker runs its own vLLM engine).")
    sync_timeout_s: float = opt(120.0, "Longest wait for a weight version to reach every rollout worker; then "
                                "the run stops with an error naming the worker (never a silent hang).")
    weight_sync: Literal["object_store", "collective"] = opt(
        "object_store", "How the learner's weights reach the rollout workers: object_store = through Ray's "
        "object store; collective = broadcast over a torch.distributed process group of the sender and the "
        "workers (gloo on CPU, NCCL when the weights and workers are on GPUs).")
    call_timeout_s: float = opt(600.0, "Longest wait for one worker's share of a step's generation (or, for a "
                                "reward worker, of its scoring).")
    max_restarts: int = opt(3, "Rollout workers restarted after dying, over the whole run (their prompts are "
                            "sent again); one more death stops the run.")
    learners: int = opt(1, "Training ranks. 1: the controller process trains. N > 1: N Ray actors form one "
                        "torch.distributed group (train.strategy ddp or fsdp, as under torchrun); rank 0 drives "
                        "the rollout workers.")
    cpus_per_learner: float = opt(1.0, "ray.learners > 1: Ray CPUs per learner actor (also its torch threads).")
    gpus_per_learner: float = opt(0.0, "ray.learners > 1: Ray GPUs per learner actor (1 on GPU nodes).")
    reward_workers: int = opt(0, "Reward workers (Ray actors), each building the run's rewards itself (a reward "
                              "model loads there); a step's completions are split between them in order and the "
                              "learner combines their raw scores as its own. 0 = the learner scores.")
    cpus_per_reward_worker: float = opt(1.0, "Ray CPUs reserved per reward worker (also its torch threads).")
    gpus_per_reward_worker: float = opt(0.0, "Ray GPUs per reward worker (a reward model on GPU: 1 or a fraction).")

    def validate(self) -> None:
        if self.rollout_workers < 1:
            raise ConfigError(f"ray.rollout_workers must be >= 1, got {self.rollout_workers}",
                              where="ray.rollout_workers")
        for key in ("cpus_per_worker", "sync_timeout_s", "call_timeout_s", "cpus_per_reward_worker"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"ray.{key} must be > 0", where=f"ray.{key}")
        if self.gpus_per_worker < 0 or self.max_restarts < 0 or self.gpus_per_learner < 0:
            raise ConfigError("ray.gpus_per_worker, ray.gpus_per_learner and ray.max_restarts must be >= 0",
                              where="ray")
        if self.learners < 1 or self.cpus_per_learner <= 0:
            raise ConfigError("ray.learners must be >= 1 and ray.cpus_per_learner > 0", where="ray.learners")
        if self.reward_workers < 0 or self.gpus_per_reward_worker < 0:
            raise ConfigError("ray.reward_workers and ray.gpus_per_reward_worker must be >= 0",
                              where="ray.reward_workers")


@dataclass
class AsyncConfig:
    max_staleness: int = opt(0, "k: the rollouts trained on at step t may come from the policy of step t-k "
                             "or newer; workers generate steps t+1..t+k while the learner trains on step t "
                             "(0 = synchronous). Needs launcher=ray; the rollout log-probs correct the lag "
                             "(rollout.correction=tis).", "AReaL, PipelineRL, open-instruct async: k = 1..4")

    def validate(self) -> None:
        if self.max_staleness < 0:
            raise ConfigError("async.max_staleness must be >= 0", where="async.max_staleness")


def refuse_environment(rollout: RolloutConfig, command: str) -> None:
    if rollout.environment:
        raise ConfigError(f"{command} does not run multi-turn episodes yet", where="rollout.environment",
                          fix="use grpo, rloo, reinforce or ppo with rollout.environment, or remove it")


def check_environment_reward(cfg) -> bool:
    """With ``rollout.environment`` the environment gives the reward, so a ``reward`` would be ignored:
    refused. Returns whether the run has an environment."""
    if cfg.rollout.environment and cfg.reward:
        raise ConfigError("with rollout.environment the environment gives the reward; reward would be ignored",
                          where="reward", fix="remove reward (or score inside the environment)")
    return bool(cfg.rollout.environment)


def check_launcher(cfg) -> None:
    """What ``launcher``, ``ray`` and ``async`` of an online RL config cannot do together."""
    if cfg.async_.max_staleness and cfg.launcher != "ray":
        raise ConfigError(f"async.max_staleness={cfg.async_.max_staleness} needs rollout workers beside the "
                          "learner, and launcher is local", where="async.max_staleness",
                          fix="set launcher=ray, or async.max_staleness=0")
    if cfg.async_.max_staleness and cfg.rollout.correction == "none":
        raise ConfigError("stale rollouts come from an older policy; without the correction the loss would "
                          "treat them as on-policy", where="rollout.correction",
                          fix="rollout.correction=tis (the default), or async.max_staleness=0")
    if cfg.ray.reward_workers:
        if cfg.launcher != "ray":
            raise ConfigError(f"ray.reward_workers={cfg.ray.reward_workers} are Ray actors, and launcher is local",
                              where="ray.reward_workers", fix="set launcher=ray, or ray.reward_workers=0")
        if cfg.rollout.environment:  # the environment scores each turn inside the episode
            raise ConfigError("with rollout.environment the environment gives the reward; reward workers would have "
                              "nothing to score", where="ray.reward_workers", fix="ray.reward_workers=0")
    if cfg.launcher == "ray":
        if cfg.rollout.environment and cfg.ray.learners > 1:  # ranks' episodes end at different turns
            raise ConfigError("multi-turn episodes with several Ray learners are not supported yet (each rank's "
                              "episodes end after a different number of turns, and the rollout requests of the "
                              "learner group are collective)", where="ray.learners",
                              fix="ray.learners=1 with rollout.environment")
        n, servers = cfg.ray.rollout_workers, len(cfg.rollout.servers)
        if cfg.rollout.engine == "server" and servers < n:  # worker i fronts servers i, i+n, ...
            raise ConfigError(f"launcher=ray with rollout.engine=server gives each of the ray.rollout_workers={n} "
                              f"workers its own servers from rollout.servers, which lists {servers}",
                              where="rollout.servers", fix=f"start more servers and list at least {n} in "
                              f"rollout.servers, or set ray.rollout_workers={servers}")
        if cfg.rollout.engine == "vllm":  # each worker runs its own vLLM engine on its GPU
            import torch

            if cfg.ray.address is None and not torch.cuda.is_available():  # the local cluster runs here
                raise ConfigError("rollout.engine=vllm needs a CUDA GPU, and none is visible (launcher=ray starts its "
                                  "Ray cluster on this machine)", where="rollout.engine",
                                  fix="use rollout.engine=local on this machine")
            if cfg.ray.gpus_per_worker <= 0:
                raise ConfigError("launcher=ray with rollout.engine=vllm runs a vLLM engine in each rollout worker, "
                                  "and ray.gpus_per_worker=0 hides every GPU from them", where="ray.gpus_per_worker",
                                  fix="ray.gpus_per_worker=1 (or a fraction to share a GPU, with "
                                      "rollout.vllm_kwargs={gpu_memory_utilization: ...} below that fraction)")
        try:
            import ray  # noqa: F401
        except ImportError as e:
            raise ConfigError("launcher=ray needs the ray package, which is not installed", where="launcher",
                              fix="pip install 'posttrain[ray]'") from e


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
    stop_without_signal: int = opt(10, "Stop (an error) after this many RL steps in a row without a learning "
                                   "signal (every reward in the batch equal or missing, or a zero gradient); "
                                   "a warning is printed at the first such step; 0 = never stop.")

    def validate(self) -> None:
        if self.stop_without_signal < 0:
            raise ConfigError("train.stop_without_signal must be >= 0", where="train.stop_without_signal")
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


def rl_steps(train: RLTrainConfig, n_prompts: int, prompts_per_step: int) -> int:
    return train.max_steps or max(1, int(train.epochs * n_prompts / prompts_per_step))


def kl_controller(cfg: KLConfig):
    if cfg.controller == "adaptive":
        return AdaptiveKLController(cfg.beta, cfg.target, cfg.horizon)
    return FixedKLController(cfg.beta)
