"""What every online RL loop shares, as plain functions the loops compose (no base trainer).

- :class:`PGRecipe`: every choice of a policy-gradient update, made ONCE from the config at start-up
  (loss function and clip range, aggregation and its count, KL placement and estimator, entropy
  bonus, rollout-mismatch correction). The loops read the recipe; no config flag is read twice.
- :func:`policy_gradient_terms`: the policy part of the loss of a micro-batch — the policy loss with
  the TIS weight, β·KL in the loss, the entropy bonus — shared by GRPO and PPO.
- :func:`online_setup` / :func:`end_rl_step`: the start of a run (data and rewards first, then the
  model, the train engine, the reference, the rollout engine, the experience maker, the KL controller,
  resume) and the end of each RL step (reduce across processes, KL controller, log, checkpoint and
  evaluate). What remains in an algorithm file is its own sample → score → advantage → update body.
"""

from __future__ import annotations

import atexit
import functools
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from posttrain.engines import sharding
from posttrain.engines.loop import between_steps, finish
from posttrain.engines.ray_learners import GroupRolloutEngine, GroupScorer, check_group
from posttrain.engines.runlog import MetricsLogger, Progress, say
from posttrain.engines.train import TrainEngine, make_run_dir
from posttrain.errors import ConfigError, TrainingError
from posttrain.losses.policy import aggregate, get_policy_loss, kl_penalty_in_loss
from posttrain.models.forward import ref_logp_fn, to_layout
from posttrain.models.loading import tokenizer_for
from posttrain.models.reference import frozen_reference
from posttrain.rewards.combine import load_rewards
from posttrain.rollouts.config import BatchPlan, RolloutConfig, kl_controller, plan_batches, rl_steps
from posttrain.rollouts.experience import (
    ExperienceMaker,
    load_eval_records,
    load_prompt_records,
    make_engine,
    rollout_is_weight,
)
from posttrain.rollouts.metrics import reduce_metrics
from posttrain.rollouts.task_eval import episode_eval, episode_eval_rows, task_eval

# ----------------------------------------------------------------------------- the recipe


@dataclass(frozen=True)
class PGRecipe:
    """The choices of a policy-gradient update (see the module docstring)."""

    policy_loss: Callable[..., tuple[torch.Tensor, dict]]
    clip_low: float
    clip_high: float
    aggregation: str
    max_len: int                 # L_max of the fixed-length aggregation: the generation budget
    temperature: float           # the trainer divides its logits by the sampling temperature too
    kl_in_loss: bool             # β·KL added to the loss (GRPO); else subtracted from the reward, or off
    kl_in_reward: bool
    kl_estimator: str
    entropy_coef: float
    rollout: RolloutConfig       # the rollout-mismatch correction (rollout.correction, rollout.tis_cap)

    def count(self, mb: dict) -> torch.Tensor:
        """What the aggregation averages over in a micro-batch: tokens for ``token_mean``, else rows (a
        rollout left out of the loss counts as a sequence with loss 0, as in ``aggregate``), so that
        Σ_micro aggregate · count / total is the step's aggregate exactly."""
        if self.aggregation == "token_mean":
            return mb["mask"].sum()
        return torch.tensor(float(mb["mask"].shape[0]))


def pg_recipe(cfg, policy_loss: str = "ppo") -> PGRecipe:
    """The recipe of a GRPO-family or PPO config (``cfg.loss``, ``cfg.kl``, ``cfg.rollout``)."""
    L, kl = cfg.loss, cfg.kl
    return PGRecipe(policy_loss=get_policy_loss(getattr(L, "policy_loss", None) or policy_loss),
                    clip_low=L.clip_low, clip_high=L.clip_high, aggregation=L.aggregation,
                    max_len=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
                    kl_in_loss=kl.placement == "loss" and kl.beta > 0,
                    kl_in_reward=kl.placement == "reward" and kl.beta > 0,
                    kl_estimator=kl.estimator, entropy_coef=L.entropy_coef, rollout=cfg.rollout)


def policy_gradient_terms(recipe: PGRecipe, out: dict, mb: dict, old_logp: torch.Tensor | None, kl_coef: float):
    """(loss, policy loss alone, metrics, logp [n, T]) of a micro-batch from the policy's
    ``token_forward`` output ``out`` (with the entropy): the policy loss weighted by the TIS correction,
    + β·KL when the KL goes in the loss, − c_H·entropy when the bonus is on. ``entropy`` is logged
    either way (its gradient flows only when the bonus is on)."""
    mask = mb["mask"]
    n, T = mask.shape
    logp = to_layout(out["logp"], out["seq"], out["j"], n, T)
    if old_logp is None:  # one update per batch: π_old is this very forward (ρ ≡ 1, the plain policy gradient)
        old_logp = logp.detach()
    is_w, tis_m = rollout_is_weight(recipe.rollout, old_logp, mb["rollout_logp"], mask)
    pg, m = recipe.policy_loss(logp, old_logp, mb["advantages"], mask, clip_low=recipe.clip_low,
                               clip_high=recipe.clip_high, aggregation=recipe.aggregation,
                               max_len=recipe.max_len, is_weight=is_w)
    loss = pg
    if recipe.kl_in_loss:
        kl_tok = kl_penalty_in_loss(logp, mb["ref_logp"], mask, recipe.kl_estimator)
        loss = loss + kl_coef * aggregate(kl_tok, mask, recipe.aggregation, recipe.max_len)
    ent = to_layout(out["entropy"] if recipe.entropy_coef else out["entropy"].detach(), out["seq"], out["j"], n, T)
    if recipe.entropy_coef:
        loss = loss - recipe.entropy_coef * aggregate(ent, mask, recipe.aggregation, recipe.max_len)
    metrics = {**m, **tis_m, "entropy": (ent.detach() * mask).sum() / mask.sum().clamp(min=1)}
    return loss, pg, metrics, logp


# ----------------------------------------------------------------------------- the run


@dataclass
class Online:
    """Everything an online loop holds between steps (built by :func:`online_setup`)."""

    cfg: object
    command: str
    run_dir: object
    tokenizer: object
    engine: TrainEngine
    plan: BatchPlan
    n_steps: int
    updates: int                 # optimizer steps per RL step
    ref_fn: Callable | None      # micro-batch -> reference log-probs, or None when no reference is needed
    gen: object                  # the rollout engine
    maker: ExperienceMaker
    kl_ctl: object
    logger: MetricsLogger
    progress: Progress
    step: int
    evaluate: Callable[[], dict]
    summary: dict
    flat_steps: int = 0          # RL steps in a row without a learning signal
    scorer: object = None        # launcher=ray with ray.reward_workers: the reward workers' client


def online_setup(cfg, command: str, build_model: Callable, policy_of: Callable = lambda m: m,
                 check_engine: Callable[[TrainEngine], None] | None = None) -> Online:
    """Data, rewards and run directory first (a bad row or reward spec stops the run before any model
    loads), then ``build_model(tokenizer)``, the train engine (``check_engine(engine)`` may refuse what
    its world size cannot do), the reference, the rollout engine, the experience maker and the KL
    controller; resumes from the newest checkpoint when asked. ``policy_of(unwrapped model)`` is the
    causal LM that samples (PPO's actor-critic holds it)."""
    records = load_prompt_records(cfg.rollout)
    eval_records = load_eval_records(cfg.rollout)
    rewards = load_rewards(cfg.reward, cfg.reward_weights) if cfg.reward else []  # [] = the environment's
    run_dir = make_run_dir(cfg.train, command, cfg)
    tokenizer = tokenizer_for(cfg.model)
    with sharding.empty_loading(cfg.train):  # under FSDP built on meta on every process but 0 (PPO: with its critic)
        model = build_model(tokenizer)
    n_steps = rl_steps(cfg.train, len(records), cfg.rollout.prompts_per_step)
    updates = cfg.loss.ppo_epochs * plan_batches(cfg.rollout, cfg.train).minibatches
    engine = TrainEngine(model, cfg.train, n_steps * updates, run_dir)
    if check_engine is not None:
        check_engine(engine)
    ray_cfg = cfg.ray if getattr(cfg, "launcher", "local") == "ray" else None
    if ray_cfg is not None:
        check_group(cfg, engine.world_size)
    plan = plan_batches(cfg.rollout, cfg.train, engine.world_size)
    temp = cfg.rollout.temperature
    need_ref = cfg.kl.beta > 0 or cfg.kl.track
    with sharding.empty_loading(cfg.train, frozen=True):
        ref_model = frozen_reference(cfg.model, cfg.kl.ref_model, cfg.lora.enabled) if need_ref else None
    if ref_model is not None:  # whole on every process, or sharded like the policy (train.frozen)
        ref_model = engine.frozen(ref_model, "reference")
    # FSDP: no whole model outside engine.gathered(); each step builds its engine around a gathered copy
    scorer = None
    if ray_cfg is not None:
        gen = remote_engine(engine, policy_of, tokenizer, cfg, ray_cfg)
        scorer = reward_workers(cfg, ray_cfg, engine)
    else:
        # FSDP: each step builds the engine around a gathered copy (sampling_policy), except vLLM, which loads
        # the checkpoint itself, once, and is sent the gathered weights after every update
        gen = None if rebuilt(engine, cfg) else rollout_engine(
            engine, lambda: None if engine.fsdp else policy_of(engine.unwrapped), tokenizer, cfg)
    maker = ExperienceMaker(tokenizer=tokenizer, engine=gen, rollout=cfg.rollout, shaping=cfg.shaping,
                            rewards=rewards, records=records, seed=cfg.train.seed, plan=plan,
                            rank=engine.rank, world=engine.world_size,
                            max_staleness=cfg.async_.max_staleness if ray_cfg else 0, last_step=n_steps,
                            score_raw=scorer)
    kl_ctl = kl_controller(cfg.kl)
    logger = MetricsLogger(run_dir, enabled=engine.is_main, report_to=cfg.train.report_to, config=cfg)
    extra, step = engine.maybe_resume(), 0
    if extra is not None:
        step, kl_ctl.value = extra["rl_step"], extra["kl_coef"]
        logger.truncate_after(step)

    def evaluate() -> dict[str, float]:
        p = policy_of(engine.unwrapped)  # under FSDP the main process's gathered copy
        g = (make_engine(p, tokenizer, cfg.rollout, cfg.model.name_or_path) if rebuilt(engine, cfg)
             else getattr(gen, "main_engine", gen))  # the ray learner group: rank 0's engine alone
        g.update_weights(p, version=o.step)  # version v = the weights after v RL steps
        if maker.env is not None:  # multi-turn: held-out episodes
            ro = cfg.rollout
            rows = episode_eval_rows(ro.prompts, eval_records, cfg.task_eval_prompts)
            return episode_eval(g, tokenizer, maker.env, rows, cfg.task_eval_samples, cfg.train.seed,
                                max_turns=ro.max_turns, max_tokens=ro.max_episode_tokens,
                                max_new_tokens=ro.max_new_tokens, save_to=run_dir / "episodes.jsonl",
                                step=o.step) if rows else {}
        return task_eval(p, tokenizer, g, cfg.rollout.prompts, cfg.task_eval_prompts, cfg.task_eval_samples,
                         cfg.train.seed, eval_records, rewards, cfg.rollout.max_new_tokens)

    summary = {"world_size": engine.world_size, "strategy": engine.strategy, "rl_steps": n_steps,
               "optimizer_steps_per_rl_step": updates, "launcher": getattr(cfg, "launcher", "local"),
               "rollouts_per_step": cfg.rollout.prompts_per_step * cfg.rollout.group_size,
               "frozen": engine.frozen_summary(), "sharded_load": engine.loaded}
    o = Online(cfg, command, run_dir, tokenizer, engine, plan, n_steps, updates,
               ref_logp_fn(ref_model, lambda: policy_of(engine.unwrapped), temp) if need_ref else None, gen, maker, kl_ctl, logger,
               Progress(n_steps, command, cfg.train.progress), step, evaluate, summary)
    o.scorer = scorer
    if step == 0:
        with engine.gathered():
            if engine.is_main:
                summary["initial"] = evaluate()
                logger.log(0, {f"eval/{k}": v for k, v in summary["initial"].items()})
    return o


def rollout_engine(engine: TrainEngine, model_of: Callable, tokenizer, cfg):
    """launcher=local: this process's rollout engine (``make_engine`` around ``model_of()``). With servers and
    several processes, the main process drives them for every process (a GroupRolloutEngine: one process
    reloads their weights, and each process's prompts go with the others' in one request)."""
    if cfg.rollout.engine == "server" and engine.world_size > 1:
        if cfg.rollout.environment:  # each process's episodes end after a different number of turns
            raise ConfigError("multi-turn episodes with several trainer processes and rollout.engine=server are "
                              "not supported yet (the main process sends every process's turn in one request, "
                              "and the processes' episodes end after different numbers of turns)",
                              where="rollout.environment", fix="train in one process, or use rollout.engine=local")
        inner = make_engine(model_of(), tokenizer, cfg.rollout, cfg.model.name_or_path) if engine.is_main else None
        return GroupRolloutEngine(inner, engine.rank, engine.world_size)
    return make_engine(model_of(), tokenizer, cfg.rollout, cfg.model.name_or_path)


def rebuilt(engine: TrainEngine, cfg) -> bool:
    """Whether the rollout engine is built around a gathered copy each time it samples (FSDP: no whole model
    outside ``engine.gathered()``), not once: not with Ray workers, nor with vLLM (a new vLLM per step would
    load the checkpoint again and hold a second engine's memory)."""
    return engine.fsdp and getattr(cfg, "launcher", "local") != "ray" and cfg.rollout.engine != "vllm"


@contextmanager
def sampling_policy(o: Online, policy_of: Callable = lambda m: m):
    """The trained model as this step's rollouts are sampled and scored (π_old, values) from it: the model
    itself, its rollout engine updated to the current weights; under FSDP an all-gathered copy on every
    process with a rollout engine built around ``policy_of(copy)``, both freed when the block ends."""
    with o.engine.gathered(everywhere=True):
        model = o.engine.unwrapped
        rebuild = rebuilt(o.engine, o.cfg)
        if rebuild:
            o.gen = o.maker.engine = rollout_engine(o.engine, lambda: policy_of(model), o.tokenizer, o.cfg)
        else:
            o.gen.update_weights(policy_of(model), version=o.step)
        try:
            yield model
        finally:
            if rebuild:
                o.gen = o.maker.engine = None


def remote_engine(engine: TrainEngine, policy_of: Callable, tokenizer, cfg, ray_cfg):
    """launcher=ray: the Ray rollout workers, started by the main process from its whole policy (under
    FSDP the gathered copy); with several learner ranks each rank sees them through a GroupRolloutEngine."""
    with engine.gathered():
        inner = (make_engine(policy_of(engine.unwrapped), tokenizer, cfg.rollout, cfg.model.name_or_path, ray_cfg)
                 if engine.is_main else None)
    if inner is not None:
        atexit.register(inner.close)  # the workers (and a cluster this run started) end with the run, even on errors
    if engine.world_size == 1:
        return inner
    return GroupRolloutEngine(inner, engine.rank, engine.world_size)


def reward_workers(cfg, ray_cfg, engine: TrainEngine):
    """launcher=ray with ray.reward_workers=N: N Ray actors that each build the run's rewards with the
    learner's builder (load_rewards) and score shares of each step; None = the learner scores. Several
    learner ranks score through rank 0's workers (a GroupScorer)."""
    if not ray_cfg.reward_workers:
        return None
    from posttrain.engines.ray_rewards import RayRewardWorkers  # optional package

    scorer = None
    if engine.is_main:
        scorer = RayRewardWorkers(functools.partial(load_rewards, list(cfg.reward), list(cfg.reward_weights)), ray_cfg)
        atexit.register(scorer.close)  # before the rollout engine's close at exit (atexit runs last in, first out)
    return scorer if engine.world_size == 1 else GroupScorer(scorer, engine.rank, engine.world_size)


def finish_online(o: Online, save: Callable) -> dict:
    """The end of an online run: :func:`finish` (final evaluation, save, summary), then the rollout
    engine stops; with launcher=ray the per-worker tables go to the console and summary.json."""
    o.progress.close()
    table = o.gen.worker_table() if hasattr(o.gen, "worker_table") else None
    if table:
        o.summary["rollout_workers"] = table
    scored = o.scorer.worker_table() if o.scorer is not None else None
    if scored:
        o.summary["reward_workers"] = scored
    out = finish(o.engine, o.logger, o.run_dir, o.summary, o.evaluate, o.step, save=save)
    if table:
        say("rollout workers:  " + "   ".join(f"#{r['worker']} {r['tokens']} tokens, {r['tokens_per_s']:.0f} "
                                               f"tokens/s, idle {r['idle_share']:.0%}" for r in table))
    if scored:
        say("reward workers:  " + "   ".join(f"#{r['worker']} {r['scored']} completions scored, busy "
                                              f"{r['busy_s']:.1f} s" for r in scored))
        o.scorer.close()
    if hasattr(o.gen, "close"):
        o.gen.close()
    return out


def end_rl_step(o: Online, m: dict, n_rollouts: int, t0: float) -> dict:
    """After RL step ``o.step``'s updates: count the step, reduce the metrics across processes, move
    the KL controller, log (every ``train.log_every`` steps and the last), checkpoint and evaluate when
    due. Returns the reduced metrics row."""
    o.step += 1
    m = reduce_metrics(o.engine, m)
    check_signal(o, m)
    if "kl" in m:
        o.kl_ctl.update(m["kl"], n_rollouts * o.engine.world_size)
    m["kl_coef"], m["step_s"] = o.kl_ctl.value, time.perf_counter() - t0
    if o.step % o.cfg.train.log_every == 0 or o.step == o.n_steps:
        o.logger.log(o.step, m)
        o.progress.update(o.step, f"reward {m.get('reward/mean', float('nan')):.3f}  kl {m.get('kl', 0.0):.3f}  "
                                  f"loss {m.get('train/loss', float('nan')):.3f}  {m['step_s']:.2f} s/step")
    between_steps(o.engine, o.cfg.train, o.step, o.n_steps, o.evaluate, o.logger,
                  {"rl_step": o.step, "kl_coef": o.kl_ctl.value})
    return m


def no_signal(m: dict) -> str | None:
    """Why an RL step carried no learning signal, or None: every reward of the batch equal (or none
    valid; not in distillation, whose signal is the reverse KL to the teacher), or a zero gradient norm."""
    std, invalid, grad = m.get("reward/std"), m.get("response/invalid_frac"), m.get("train/grad_norm")
    if m.get("distill/reverse_kl") and grad != 0.0:  # distillation: the teacher's log-probs are the signal
        return None
    if invalid is not None and invalid >= 1.0:
        return "no reward applied to any sample (response/invalid_frac 1)"
    if std is not None and std == 0.0 and m.get("batch/rollouts", 2.0) > 1:
        return f"every reward in the batch was equal ({m.get('reward/mean', float('nan')):.4g}; reward/std 0)"
    if grad is not None and grad == 0.0:
        return "the gradient was zero (train/grad_norm 0)"
    return None


def check_signal(o: Online, m: dict) -> None:
    """Warn at the first RL step without a learning signal; stop after ``train.stop_without_signal`` in a
    row (metrics that look normal while nothing learns are worse than a crash)."""
    why = no_signal(m)
    if why is None:
        o.flat_steps = 0
        return
    o.flat_steps += 1
    limit = o.cfg.train.stop_without_signal
    if o.flat_steps == 1:
        say(f"warning: RL step {o.step}: no learning signal: {why}. Check the reward against your prompts "
            f"(it stops after {limit} such steps in a row; train.stop_without_signal)")
    if limit and o.flat_steps >= limit:
        raise TrainingError(f"{o.flat_steps} RL steps in a row without a learning signal (last: {why}), so "
                            "nothing is being learned", where="reward",
                            fix="check that the reward scores your prompts' completions (posttrain data inspect "
                                "shows the prompts; reward/<name> in metrics.jsonl each component), or raise "
                                "train.stop_without_signal")
