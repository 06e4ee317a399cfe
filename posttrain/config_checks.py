"""Checks across the sections of a command's config, run by ``config.validate`` after every section's own
``validate()``: what one section cannot see alone."""

from __future__ import annotations

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
