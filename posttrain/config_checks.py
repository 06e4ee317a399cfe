"""Checks across the sections of a command's config, run by ``config.validate`` after every section's own
``validate()``: what one section cannot see alone."""

from __future__ import annotations

from typing import Any

from posttrain.errors import ConfigError


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
