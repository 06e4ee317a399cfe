"""Checks across the sections of a command's config, run by ``config.validate`` after every section's own
``validate()``: what one section cannot see alone."""

from __future__ import annotations

import dataclasses
from typing import Any

from posttrain.errors import ConfigError

LORA_DROPOUT = 0.05  # lora.dropout=null with dropout kept (peft/TRL examples)


def check_frozen(cfg: Any) -> None:
    """``train.frozen=shard`` is refused where it would do nothing (a flag is never silently ignored):
    without ``train.strategy=fsdp``, or when the run keeps no frozen model of its own to shard."""
    train = getattr(cfg, "train", None)
    if getattr(train, "frozen", "replicate") != "shard":
        return
    if train.strategy != "fsdp":
        raise ConfigError(f"train.frozen=shard shards frozen models over the policy's FSDP mesh, but "
                          f"train.strategy={train.strategy}", where="train.frozen",
                          fix="add train.strategy=fsdp, or leave train.frozen=replicate (the default)")
    why, fix = _no_frozen_model(cfg)
    if why:
        raise ConfigError(f"train.frozen=shard, but {why}: there is nothing to shard", where="train.frozen",
                          fix=f"{fix + ', or ' if fix else ''}leave train.frozen=replicate (the default)")


def _no_frozen_model(cfg: Any) -> tuple[str | None, str | None]:
    """(why the run keeps no separate frozen model during training, a fix), or (None, None) when it does:
    distill's local teacher, online RL's KL reference, dpo/kto's reference=live."""
    lora = getattr(getattr(cfg, "lora", None), "enabled", False)
    teacher = getattr(cfg, "teacher", None)
    if teacher is not None and teacher.name_or_path and not getattr(cfg, "teacher_server", None):
        return None, None
    kl = getattr(cfg, "kl", None)
    if kl is not None:  # online RL
        if not ((kl.beta or 0) > 0 or kl.track):
            return "no KL reference is loaded (kl.beta=0, kl.track=false)", None
        if lora and kl.ref_model is None:  # the reference is the policy with its adapters off
            return ("with LoRA the KL reference is the policy itself with its adapters off, not a model of its own",
                    "set kl.ref_model to load a separate reference")
        return None, None
    reference = getattr(cfg, "reference", None)
    if isinstance(reference, str):  # dpo, kto
        if reference != "live":  # precompute loads the reference alone, before the policy, and frees it
            shown = "auto (precompute or none)" if reference == "auto" else reference
            return f"reference={shown} keeps no reference model during training", "set reference=live"
        if lora:
            return "with LoRA the reference is the policy itself with its adapters off, not a model of its own", None
        return None, None
    return "this command keeps no frozen model (those are online RL's KL reference, dpo/kto's reference=live " \
           "and distill's local teacher)", None


TRACKERS = ("tensorboard", "wandb", "mlflow")


def check_trackers(names: list[str]) -> None:
    """Known tracker names, and the optional packages they need installed (checked before anything runs)."""
    import importlib.util

    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ConfigError(f"unknown tracker(s) {unknown} in train.report_to", where="train.report_to",
                          fix=f"choose from {list(TRACKERS)} (metrics.jsonl is always written)")
    for n in ("wandb", "mlflow"):
        if n in names and importlib.util.find_spec(n) is None:
            raise ConfigError(f"train.report_to names {n}, which is not installed", where="train.report_to",
                              fix=f"pip install 'posttrain[{n}]', or remove {n} from train.report_to")


def resolve_dropout(cfg: Any) -> None:
    """``model.dropout=auto``: off for a command whose config class sets ``compares_logps`` (its loss compares
    log-probs of the same tokens from two passes, so a ratio must be 1 before any update), keep otherwise;
    ``lora.dropout=null``: 0 with dropout off, else 0.05. A LoRA dropout asked for with dropout off is refused."""
    model, lora = getattr(cfg, "model", None), getattr(cfg, "lora", None)
    if getattr(model, "dropout", None) == "auto":
        model.dropout = "off" if getattr(type(cfg), "compares_logps", False) else "keep"
    if lora is None or not hasattr(lora, "dropout"):
        return
    off = getattr(model, "dropout", "keep") == "off"
    if lora.dropout is None:
        lora.dropout = 0.0 if off else LORA_DROPOUT
    elif off and lora.dropout > 0 and getattr(lora, "enabled", True):
        raise ConfigError(f"lora.dropout={lora.dropout:g} asks for dropout, but model.dropout is off for this "
                          "command (its loss compares log-probs of the same tokens from two passes: with dropout "
                          "their ratio is not 1 before any update)", where="lora.dropout",
                          fix="leave lora.dropout unset, or set model.dropout=keep to train with dropout")


def _default(cfg: Any, name: str) -> Any:
    """The command's own default of its field ``name`` (a section's is the command's factory for it)."""
    f = next(f for f in dataclasses.fields(cfg) if f.name == name)
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def refuse_set(cfg: Any, section: str, keys, why: str, fix: str = "") -> None:
    """A ConfigError for the first of ``section.keys`` set away from the command's default: options this run
    would never read (``why``), refused rather than silently ignored."""
    sec, default = getattr(cfg, section), _default(cfg, section)
    for key in keys:
        value = getattr(sec, key)
        if value != getattr(default, key):
            raise ConfigError(f"{section}.{key}={value!r} is set, but {why}", where=f"{section}.{key}",
                              fix=fix or f"remove {section}.{key}")


def refuse_top(cfg: Any, keys, why: str, fix: str = "") -> None:
    """:func:`refuse_set` for top-level keys of a command's config."""
    for key in keys:
        value = getattr(cfg, key)
        if value != _default(cfg, key):
            raise ConfigError(f"{key}={value!r} is set, but {why}", where=key, fix=fix or f"remove {key}")


def check_ignored(cfg: Any) -> None:
    """Options a run would accept and then never read, across sections: refused, naming the one that decides."""
    lora, train, rollout = (getattr(cfg, k, None) for k in ("lora", "train", "rollout"))
    if lora is not None and hasattr(lora, "enabled") and not lora.enabled:
        refuse_set(cfg, "lora", ("r", "alpha", "target_modules", "merge_on_save"),
                   "lora.enabled is false: the run trains every weight", "add lora.enabled=true, or remove it")
    if train is not None and hasattr(train, "epochs") and train.max_steps is not None:
        if train.epochs != _default(cfg, "train").epochs:
            raise ConfigError(f"train.epochs={train.epochs:g} is set, but train.max_steps={train.max_steps} decides "
                              "the length of the run", where="train.epochs",
                              fix="set train.max_steps=null to train by epochs, or remove train.epochs")
    if getattr(cfg, "launcher", "ray") != "ray" and hasattr(cfg, "ray"):
        refuse_set(cfg, "ray", [f.name for f in dataclasses.fields(cfg.ray)],
                   f"launcher={cfg.launcher}: no Ray actor starts", "set launcher=ray, or remove it")
    if rollout is not None and hasattr(rollout, "environment"):
        _check_rollout(cfg, rollout)
    data = getattr(cfg, "data", None)
    if hasattr(data, "eval_source"):
        _check_holdout(cfg, data, getattr(cfg, "eval_holdout", 0))
    if isinstance(getattr(cfg, "reference", None), str):  # dpo, kto
        _check_offline_reference(cfg)
    shaping = getattr(cfg, "shaping", None)
    if shaping is not None and shaping.truncated != "penalize":
        refuse_set(cfg, "shaping", ("truncation_penalty",), f"shaping.truncated={shaping.truncated} (it is the "
                   "reward of a cut-off response with truncated=penalize)")
    if getattr(cfg, "dynamic_sampling", None) is False:  # the grpo family
        refuse_top(cfg, ("max_sample_rounds",), "dynamic_sampling is off (it bounds dynamic sampling's rounds)")
    kl = getattr(cfg, "kl", None)
    if kl is not None and kl.controller == "adaptive" and kl.beta == 0:
        raise ConfigError("kl.controller=adaptive scales kl.beta, which is 0 here, so the KL would never act",
                          where="kl.controller", fix="give kl.beta a starting value > 0, or kl.controller=fixed")


def _check_holdout(cfg: Any, data: Any, n: int) -> None:
    key = "eval_holdout" if n else "data.eval_fraction"
    if (n or data.eval_fraction) and data.eval_source() is not None:
        raise ConfigError(f"{key} holds out training records, but the held-out set is data.eval "
                          f"({data.eval_source()})", where=key,
                          fix=f"set data.eval=null to hold out training records instead, or remove {key}")
    if n and data.eval_fraction:
        raise ConfigError("eval_holdout and data.eval_fraction both hold out training records (eval_holdout "
                          "would decide)", where="data.eval_fraction", fix="keep one of them")


def _check_offline_reference(cfg: Any) -> None:
    refuse_set(cfg, "data", ("scores_as_margin",), "no loss of this command reads a pair's margin (reward does)")
    if cfg.lora.enabled and cfg.ref_model:
        raise ConfigError(f"ref_model={cfg.ref_model} is set, but with LoRA the reference is the policy with its "
                          "adapters off, so it would never load", where="ref_model",
                          fix="remove ref_model, or train all weights (lora.enabled=false) against it")


def _check_rollout(cfg: Any, rollout: Any) -> None:
    if rollout.environment:
        refuse_set(cfg, "shaping", ("truncated", "truncation_penalty", "overlong_penalty", "clip"),
                   "rollout.environment gives the reward of each episode, unshaped")
        if cfg.shaping.overlong_buffer:
            raise ConfigError(f"shaping.overlong_buffer={cfg.shaping.overlong_buffer} (DAPO's overlong penalty, "
                              "variant=dapo's default) is set, but rollout.environment gives the reward of each "
                              "episode, unshaped", where="shaping.overlong_buffer", fix="shaping.overlong_buffer=0")
        if getattr(getattr(cfg, "async_", None), "max_staleness", 0):
            raise ConfigError("multi-turn episodes are sampled in step with the learner, so async.max_staleness "
                              "would not overlap anything", where="async.max_staleness",
                              fix="async.max_staleness=0 with rollout.environment")
    else:
        refuse_set(cfg, "rollout", ("max_turns", "max_episode_tokens"), "rollout.environment is not set "
                   "(these bound multi-turn episodes)")
    if rollout.correction == "none":
        refuse_set(cfg, "rollout", ("tis_cap",), "rollout.correction=none (it caps the correction's weights)")
    if rollout.engine != "local":
        refuse_set(cfg, "rollout", ("engine_dtype",), f"rollout.engine={rollout.engine} (the local engine's "
                   "option)")
    if rollout.engine != "server" and not getattr(cfg, "teacher_server", None):
        refuse_set(cfg, "rollout", ("server_timeout_s", "server_retries", "server_weights_dir"),
                   f"rollout.engine={rollout.engine} (options of rollout.engine=server)")
