"""Held-out metrics by sampling: the built-in task's accuracy and gold reward, and the mean reward of
held-out prompts under the run's reward functions.
"""

from __future__ import annotations

from posttrain.data.chat import Example
from posttrain.engines.rollout import sample_rollouts, sample_texts
from posttrain.evaluation.stats import kl_from_samples
from posttrain.models.reference import compute_logps, reference_logps_for
from posttrain.rewards.combine import combine_rewards
from posttrain.tasks import builtin


def task_eval(model, tokenizer, engine, prompts_source: str, n_prompts: int, n_samples: int, seed: int,
              eval_records: list[dict] | None = None, rewards=None, max_new_tokens: int = 24) -> dict[str, float]:
    """Held-out metrics: the built-in task's accuracy / gold reward, and the mean reward on
    ``eval_records`` when given."""
    out: dict[str, float] = {}
    if prompts_source.startswith("builtin:"):
        out.update(builtin_task_eval(model, tokenizer, n_prompts, n_samples, seed=seed, engine=engine))
    if eval_records and rewards:
        texts = sample_texts(model, tokenizer, [r["prompt"] for r in eval_records], 1, max_new_tokens,
                                    1.0, seed + 29, engine)
        raw = {name: list(fn([r["prompt"] for r in eval_records], texts,
                             **{k: [r.get(k) for r in eval_records] for k in eval_records[0] if k != "prompt"}))
               for name, fn, _ in rewards}
        total, valid = combine_rewards(raw, {name: w for name, _, w in rewards})
        out["reward"] = float(total[valid].mean()) if valid.any() else float("nan")
    return out


def episode_eval(engine, tokenizer, env_factory, rows: list[dict], n_samples: int, seed: int, *, max_turns: int,
                 max_tokens: int, max_new_tokens: int, save_to=None, step: int = 0,
                 keep: int = 8) -> dict[str, float]:
    """Held-out multi-turn metrics: ``n_samples`` episodes per row at temperature 1; ``accuracy`` is the
    mean episode reward (the built-in tool task's reward is 1 for the exact sum), plus the episode metrics.
    With ``save_to`` (a path), the first episode of each of the first ``keep`` rows is written there as
    JSON lines for people to read (replacing the file: it holds the latest evaluation, at ``step``)."""
    from posttrain.engines.rollout import SamplingParams
    from posttrain.rollouts.episodes import episode_metrics, run_episodes

    reps = [r for r in rows for _ in range(n_samples)]
    eps = run_episodes(engine, tokenizer, [env_factory() for _ in reps], reps,
                       SamplingParams(max_new_tokens=max_new_tokens, n=1), max_turns=max_turns,
                       max_tokens=max_tokens, seed=seed + 17)
    if save_to is not None:
        import json

        with open(save_to, "w") as f:
            for e, row in list(zip(eps, reps))[::max(n_samples, 1)][:keep]:
                f.write(json.dumps({"step": step, "reward": e.reward, "turns": e.turns, "tool_calls": e.tool_calls,
                                    "tool_errors": e.tool_errors, "truncated": e.truncated, "messages": e.messages,
                                    "row": {k: v for k, v in row.items() if k not in ("prompt", "messages")}},
                                   default=str) + "\n")
    return {"accuracy": sum(e.reward for e in eps) / max(len(eps), 1), **episode_metrics(eps)}


def episode_eval_rows(prompts_source: str, eval_records: list[dict] | None, n: int) -> list[dict]:
    """The held-out rows of a multi-turn run: rollout.eval_prompts, or the built-in tool task's."""
    if eval_records:
        return eval_records[:n]
    if prompts_source == "builtin:tool_prompts":
        from posttrain.tasks import tool_task

        return tool_task.prompt_records(n, held=True)
    return []


def builtin_task_eval(model, tokenizer, n_prompts: int = 64, n_samples: int = 4, seed: int = 0,
                      temperature: float = 1.0, engine=None) -> dict[str, float]:
    """The built-in task's held-out metrics on samples from the policy: mean gold reward and
    accuracy (share of samples whose numbers are exactly right)."""
    problems = builtin.heldout_problems(n_prompts)
    prompts = [p.prompt for p in problems]
    texts = sample_texts(model, tokenizer, prompts, n_samples, 24, temperature, seed + 17, engine)
    rep = [p for p in prompts for _ in range(n_samples)]
    gold = [builtin.gold_reward(p, t) for p, t in zip(rep, texts)]
    acc = [float(builtin.is_correct(p, t)) for p, t in zip(rep, texts)]
    return {"gold_reward": sum(gold) / len(gold), "accuracy": sum(acc) / len(acc),
            "response_chars": sum(len(t) for t in texts) / len(texts)}


def sampled_eval(policy, tokenizer, *, n_prompts: int, n_samples: int, seed: int, ref_logps_fn=None,
                 max_new_tokens: int = 24, pad_id: int = 0, autocast=None) -> dict[str, float]:
    """Built-in task metrics on samples y ~ π (temperature 1) for held-out prompts: mean gold reward,
    exact accuracy, response length and, with ``ref_logps_fn``, KL(π‖π_ref) = mean over samples of
    log π(y|x) − log π_ref(y|x) (sequence sums; an unbiased Monte-Carlo estimate)."""
    problems = builtin.heldout_problems(n_prompts)
    prompts = [p.prompt for p in problems]
    outs = sample_rollouts(policy, tokenizer, prompts, n_samples, max_new_tokens, 1.0, seed + 17)
    rep = [p for p in prompts for _ in range(n_samples)]
    texts = [tokenizer.decode(o.completion_ids, skip_special_tokens=True) for o in outs]
    gold = [builtin.gold_reward(p, t) for p, t in zip(rep, texts)]
    acc = [float(builtin.is_correct(p, t)) for p, t in zip(rep, texts)]
    result = {"gold_reward": sum(gold) / len(gold), "accuracy": sum(acc) / len(acc),
              "response_chars": sum(len(t) for t in texts) / len(texts)}
    if ref_logps_fn is not None:
        exs = [Example(list(o.prompt_ids) + list(o.completion_ids),
                       [0] * len(o.prompt_ids) + [1] * len(o.completion_ids)) for o in outs if o.completion_ids]
        pol = compute_logps(policy, exs, pad_id=pad_id, autocast=autocast)
        ref = ref_logps_fn(exs)
        kl = kl_from_samples(pol.double().numpy(), ref.double().numpy())
        result.update(kl=kl["kl"], kl_se=kl["se"])
    return result


def task_metrics(cfg, engine, tokenizer, live, ref_path: str, initial: bool) -> dict:
    """Gold reward / accuracy of samples from the policy, and KL(π‖π_ref) (0 by definition before
    the first update when the policy is the reference)."""
    model = engine.unwrapped
    same = initial and ref_path == cfg.model.name_or_path
    ref_fn = None if same else (lambda exs: reference_logps_for(
        exs, policy=model, ref_path=ref_path, model_cfg=cfg.model, live=live, pad_id=tokenizer.pad_token_id,
        autocast=engine.autocast))
    out = sampled_eval(model, tokenizer, n_prompts=cfg.task_eval_prompts, n_samples=cfg.task_eval_samples,
                       seed=cfg.train.seed, ref_logps_fn=ref_fn, pad_id=tokenizer.pad_token_id,
                       autocast=engine.autocast)
    if same:
        out["kl"] = 0.0
    return out
