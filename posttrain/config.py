"""Typed configs: one dataclass per command, built from YAML presets and dotted ``key=value`` overrides.

Every field is declared with :func:`opt`, which records a help string and the *source* of its default
(a paper, an anchor framework, or "posttrain"). Loading checks every key and type before anything heavy
happens: an unknown key names the nearest valid one; each config's ``validate()`` rejects impossible
values. This module imports no torch, so ``posttrain --help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import difflib
import keyword
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

from posttrain.config_checks import check_frozen, check_ignored, check_trackers, resolve_dropout
from posttrain.config_io import parse_override, read_yaml  # noqa: F401 (part of this module's API)
from posttrain.errors import ConfigError

# ----------------------------------------------------------------------------- declaring fields


def opt(default: Any = MISSING, help: str = "", source: str = "posttrain", *, factory=None) -> Any:
    """A config field with help text and the source of its default.

    Mutable defaults (lists, dicts, nested configs) go through ``factory``.
    """
    meta = {"help": help, "source": source}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata=meta)
    return field(default=default, metadata=meta)


# ----------------------------------------------------------------------------- shared blocks


@dataclass
class ModelConfig:
    name_or_path: str = opt("tiny", "Hugging Face model id or local path; 'tiny' builds the offline "
                            "tiny model of the built-in task (tests, demo).")
    dtype: Literal["float32", "bfloat16", "float16"] = opt(
        "float32", "Weight dtype. Training keeps fp32 master weights; use train.mixed_precision=bf16 "
        "for bf16 compute (pure bf16 weights barely move at RLHF learning rates).",
        "measured: after 5 AdamW steps at lr 1e-5 only 15% of bf16 weights changed")
    attn_implementation: str = opt("sdpa", "Attention backend passed to from_pretrained (sdpa, eager, "
                                   "flash_attention_2).")
    trust_remote_code: bool = opt(False, "Allow model code from the hub repository to run.")
    revision: str | None = opt(None, "Hub revision (branch, tag or commit).")
    dropout: Literal["auto", "keep", "off"] = opt(
        "auto", "Dropout in training (nn.Dropout modules, LoRA's, attention dropout): keep (as the model and "
        "lora.dropout say), off, or auto: off where a loss compares log-probs of the same tokens from two passes "
        "(dpo/kto, online RL, distill: dropout would make pi/pi_old and pi/pi_ref differ from 1 before any "
        "update, and show as a rollout-trainer gap), keep for sft and reward.", "TRL disable_dropout (DPO: on)")


@dataclass
class LoraConfig:
    enabled: bool = opt(False, "Train LoRA adapters (peft) instead of all weights.")
    r: int = opt(16, "LoRA rank.", "Hu et al. 2021; TRL examples")
    alpha: int = opt(32, "LoRA scaling alpha (effective scale alpha/r).", "TRL examples")
    dropout: float | None = opt(None, "Dropout on the LoRA input; null: 0.05, or 0 where model.dropout is off.",
                                "peft/TRL examples (0.05)")
    target_modules: list[str] = opt(["q_proj", "k_proj", "v_proj", "o_proj"],
                                    "Module names to adapt ('all-linear' as a single item adapts every "
                                    "linear layer but the head).", "peft/TRL examples")
    merge_on_save: bool = opt(False, "Also write merged full weights to final/ (adapter kept in "
                              "final/adapter/).")

    def validate(self) -> None:
        if self.enabled and self.r <= 0:
            raise ConfigError(f"lora.r must be positive, got {self.r}", where="lora.r",
                              fix="use e.g. lora.r=16")


@dataclass
class DataConfig:
    train: str = opt("builtin:sft", "Training data: a .jsonl/.json/.parquet/.csv file, a save_to_disk folder, a "
                     "datasets name, or 'builtin:<kind>' for the built-in task (layouts: docs/data.md).")
    eval: str | None = opt("auto", "Held-out data in the same forms; null for none. 'auto': the built-in "
                           "task's held-out set when data.train is built-in, otherwise none (or "
                           "data.eval_fraction of the training records).")
    eval_fraction: float = opt(0.0, "With no data.eval, hold out this fraction of the training records (the "
                               "last ones) for evaluation; 0 = none.")
    split: str = opt("train", "Split to read from a datasets name or save_to_disk folder.")
    columns: dict[str, str] = opt({}, "Column mapping from your names to ours, e.g. "
                                  "{question: prompt, response: completion}.")
    format: Literal["auto", "hh", "plain"] = opt(
        "auto", "How strings are read: auto detects Anthropic HH transcripts ('\\n\\nHuman: ...\\n\\nAssistant: "
        "...'); hh requires them; plain reads every string as it is.")
    prompt_from: Literal["auto", "shared", "column"] = opt(
        "auto", "Where a preference record's prompt comes from when chosen/rejected are conversations sharing "
        "leading turns: those shared turns (auto/shared), or the prompt column with the conversations as whole "
        "responses (column).")
    scores_as_margin: bool = opt(False, "Use score_chosen - score_rejected as each pair's margin (otherwise "
                                 "the scores are kept as metadata).")
    max_length: int = opt(256, "Token budget per example (prompt + response). Longer examples lose whole "
                          "earliest turns first (system messages and the final turn are kept), then prompt "
                          "tokens from the start, then response tokens from the end.")
    max_rows: int | None = opt(None, "Use only the first N rows (quick experiments).")
    max_errors: int = opt(20, "How many bad rows to list before stopping validation.")

    def eval_source(self) -> str | None:
        """data.eval with 'auto' resolved."""
        if self.eval == "auto":
            return "builtin:eval" if self.train.startswith("builtin:") else None
        return self.eval

    def validate(self) -> None:
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}",
                              where="data.eval_fraction", fix="use e.g. data.eval_fraction=0.05")


@dataclass
class TrainConfig:
    output_dir: str = opt("runs/{command}", "Run directory; {command} and {time} are filled in.")
    seed: int = opt(0, "Seed for python, numpy and torch (and data order).")
    epochs: float = opt(1.0, "Passes over the training data (fractions allowed); ignored if "
                        "max_steps is set.")
    max_steps: int | None = opt(None, "Optimizer steps to run; overrides epochs.")
    batch_size: int = opt(32, "Global batch: examples per optimizer step across all processes.",
                          "TRL/rlhf-book use 32-64 for SFT")
    micro_batch_size: int = opt(32, "Examples per forward/backward per process; accumulation "
                                "steps = batch_size / (micro_batch_size x processes).")
    lr: float = opt(1e-4, "Peak learning rate (AdamW).")
    weight_decay: float = opt(0.0, "AdamW weight decay.", "TRL default 0.0")
    betas: list[float] = opt([0.9, 0.999], "AdamW betas.", "torch default")
    schedule: Literal["constant", "linear", "cosine"] = opt("cosine", "LR schedule after warmup.")
    warmup_ratio: float = opt(0.1, "Fraction of steps spent warming up linearly from 0.",
                              "rlhf-book SFT code: warmup 0.1")
    max_grad_norm: float | None = opt(1.0, "Clip the global gradient norm; null disables.",
                                      "rlhf-book code: grad-clip 1.0")
    mixed_precision: Literal["no", "bf16", "fp16"] = opt("no", "Autocast compute dtype (weights stay "
                                                           "fp32). bf16 is ~1.5x faster on CPUs with "
                                                           "AVX-512 bf16.", "measured: benchmarks/sft.py --mixed-precision bf16")
    gradient_checkpointing: bool = opt(False, "Recompute each layer's activations in the backward pass: "
                                       "activation memory of one layer instead of all, ~1/3 more compute.",
                                       "off: the CPU runs are compute-bound (TRL's SFTConfig default is on)")
    log_every: int = opt(10, "Log metrics every N optimizer steps.")
    eval_every: int | None = opt(None, "Evaluate every N steps (and always at the end); null = end only.")
    save_every: int | None = opt(None, "Checkpoint every N steps (atomic); null = final model only.")
    keep_checkpoints: int = opt(2, "Most recent checkpoints kept on disk.")
    resume: bool = opt(False, "Continue from the newest checkpoint in output_dir (says from which step, or "
                       "that there is none and the run starts fresh).")
    overwrite: bool = opt(False, "Replace a run already in output_dir (its metrics, checkpoints, final model and "
                          "summary are deleted first). Without it, or resume, such a directory is refused.")
    threads: int | None = opt(None, "torch intra-op threads (null = torch default).")
    strategy: Literal["ddp", "fsdp"] = opt(
        "ddp", "How several processes (torchrun --nproc_per_node N) share training: ddp = each holds the "
        "whole model, gradients averaged; fsdp = FSDP2 (torch's fully_shard): parameters, gradients and "
        "AdamW state sharded across processes, each decoder layer gathered only for its own forward and "
        "backward. One process trains the whole model either way. docs/distributed.md.",
        "torch FSDP2")
    frozen: Literal["replicate", "shard"] = opt("replicate", "Frozen models under strategy=fsdp (KL reference, dpo/kto "
        "reference=live, distill's teacher): replicate = a whole copy per process, no communication; shard = 1/world "
        "of their weights per process, every forward all-gathers them (a collective). rm: rewards stay replicated.")
    report_to: list[str] = opt(["tensorboard"], "Trackers the metrics are mirrored to besides metrics.jsonl: "
                               "tensorboard, wandb, mlflow (the last two are optional packages; they follow "
                               "WANDB_* / MLFLOW_* environment variables, e.g. WANDB_MODE=offline).")
    progress: bool = opt(True, "Show a progress bar on a terminal. Off a terminal (or with false), one plain "
                         "log line per logging step instead.")

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be positive, got {self.lr}", where="train.lr",
                              fix="use a small positive value such as 1e-5")
        for key in ("batch_size", "micro_batch_size", "log_every", "keep_checkpoints"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"train.{key} must be positive, got {getattr(self, key)}",
                                  where=f"train.{key}")
        if self.batch_size % self.micro_batch_size:
            ok = [d for d in range(1, self.batch_size + 1) if self.batch_size % d == 0]
            raise ConfigError(
                f"train.batch_size={self.batch_size} cannot be formed from micro-batches of "
                f"{self.micro_batch_size}", where="train.micro_batch_size",
                fix=f"use a micro_batch_size that divides {self.batch_size}: {ok}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio}",
                              where="train.warmup_ratio")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ConfigError("train.max_steps must be positive", where="train.max_steps")
        if self.epochs <= 0:
            raise ConfigError("train.epochs must be positive", where="train.epochs")
        check_trackers(self.report_to)


# ----------------------------------------------------------------------------- loading


def public_name(field_name: str) -> str:
    """The key users write for a field: ``async_`` is ``async`` (a Python keyword cannot be a field)."""
    return field_name[:-1] if field_name.endswith("_") and keyword.iskeyword(field_name[:-1]) else field_name


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def flat_keys(cls, prefix: str = "") -> list[str]:
    """All dotted keys a config class accepts (nested configs expanded)."""
    out = []
    hints = _hints(cls)
    for f in fields(cls):
        key = prefix + public_name(f.name)
        out.append(key)
        if is_dataclass(hints[f.name]):
            out += flat_keys(hints[f.name], key + ".")
    return out


def _leaf_path(key: str, value: Any) -> str:
    """'train' + {'lr': 1} -> 'train.lr': the full dotted key the user wrote."""
    while isinstance(value, dict) and len(value) == 1:
        (k, value), = value.items()
        key = f"{key}.{k}"
    return key


# names users bring from TRL / transformers -> ours (suggested by meaning, before spelling)
ALIASES: dict[str, tuple[str, ...]] = {
    'learning_rate': ('train.lr',), 'lr': ('train.lr',),
    'per_device_train_batch_size': ('train.micro_batch_size',), 'train_batch_size': ('train.batch_size',),
    'batch_size': ('train.batch_size',),
    'gradient_accumulation_steps': ('train.batch_size', 'train.micro_batch_size'),
    'num_train_epochs': ('train.epochs',), 'epochs': ('train.epochs',), 'max_steps': ('train.max_steps',),
    'max_seq_length': ('data.max_length', 'max_length'), 'max_length': ('data.max_length', 'max_length'),
    'max_prompt_length': ('rollout.max_prompt_tokens',), 'max_completion_length': ('rollout.max_new_tokens',),
    'max_new_tokens': ('rollout.max_new_tokens',), 'num_generations': ('rollout.group_size',),
    'temperature': ('rollout.temperature',), 'beta': ('beta', 'kl.beta'), 'kl_coef': ('kl.beta',),
    'epsilon': ('loss.clip_low', 'loss.clip_high'), 'cliprange': ('loss.clip_low', 'loss.clip_high'),
    'weight_decay': ('train.weight_decay',), 'warmup_ratio': ('train.warmup_ratio',),
    'lr_scheduler_type': ('train.schedule',), 'max_grad_norm': ('train.max_grad_norm',),
    'bf16': ('train.mixed_precision',), 'fp16': ('train.mixed_precision',),
    'gradient_checkpointing': ('train.gradient_checkpointing',), 'seed': ('train.seed',),
    'output_dir': ('train.output_dir', 'output_dir'), 'logging_steps': ('train.log_every',),
    'save_steps': ('train.save_every',), 'eval_steps': ('train.eval_every',),
    'model_name_or_path': ('model.name_or_path',), 'model_name': ('model.name_or_path',),
    'dataset_name': ('data.train', 'rollout.prompts', 'data'),
    'dataset': ('data.train', 'rollout.prompts', 'data'), 'use_peft': ('lora.enabled',), 'lora_r': ('lora.r',),
    'lora_alpha': ('lora.alpha',), 'loss_type': ('loss', 'variant'), 'use_vllm': ('rollout.engine',),
}


def _unknown(key: str, cls, prefix: str, value: Any = None) -> ConfigError:
    valid = flat_keys(cls, prefix)
    key = _leaf_path(key, value)
    meant = [k for k in ALIASES.get(key.rsplit(".", 1)[-1], ()) if k in valid and k != prefix + key]
    if meant:
        hint = f"did you mean '{meant[0]}'?" + (f" (or {', '.join(repr(k) for k in meant[1:])})" if meant[1:] else "")
    else:
        near = difflib.get_close_matches(prefix + key, valid, n=1, cutoff=0.5)
        hint = f"did you mean '{near[0]}'?" if near else f"valid keys: {', '.join(flat_keys(cls, prefix)[:30])}"
    return ConfigError(f"unknown config key '{prefix + key}'", where="config", fix=hint)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is Literal:
        if isinstance(value, bool) and True not in args and False not in args:
            # YAML 1.1 reads no/off/false (yes/on/true) as booleans: take back the word the option names
            words = ("no", "off", "false") if value is False else ("yes", "on", "true")
            value = next((a for a in args if isinstance(a, str) and a.lower() in words), value)
        if value not in args:
            near = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            raise ConfigError(f"{key}={value!r} is not one of {list(args)}", where=key,
                              fix=f"did you mean {near[0]!r}?" if near else f"choose one of {list(args)}")
        return value
    if is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping of its fields, got {value!r}", where=key)
        return build(tp, value, prefix=key + ".")
    if origin in (list, tuple):
        if isinstance(value, str):  # "a,b" on the command line
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}", where=key)
        inner = args[0] if args else Any
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}", where=key)
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}", where=key)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key} must be an integer, got {value!r}", where=key)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}", where=key)
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key} must be a string, got {value!r}", where=key)
        return str(value)
    return value


def build(cls, data: dict[str, Any], prefix: str = ""):
    """Build ``cls`` from a nested dict, checking keys and types (no validation of values)."""
    hints = _hints(cls)
    names = {f.name for f in fields(cls)}
    kwargs = {}
    defaults = {f.name: f for f in fields(cls)}
    for key, value in data.items():
        if keyword.iskeyword(key) and key + "_" in names:
            key = key + "_"
        if key not in names:
            raise _unknown(key, cls, prefix, value)
        f = defaults[key]
        if is_dataclass(hints[key]) and isinstance(value, dict) and f.default_factory is not MISSING:
            # a partial section overrides the command's own defaults for it, not the class's
            value = merge_tree(dataclasses.asdict(f.default_factory()), value)
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    return cls(**kwargs)


def merge_tree(base: dict, over: dict) -> dict:
    """``base`` with ``over`` laid on it, nested sections merged key by key (neither input is changed)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge_tree(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = tree.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"'{dotted}' sets a field inside '{p}', which is not a section",
                              where="command line")
        tree = node
    tree[parts[-1]] = value


def validate(cfg: Any) -> None:
    """Run ``validate()`` of a config and of every nested config, innermost first."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if is_dataclass(value):
            validate(value)
    if hasattr(cfg, "validate"):
        cfg.validate()
    check_frozen(cfg)  # across sections: train.frozen against the frozen models the command keeps
    resolve_dropout(cfg)  # model.dropout=auto and lora.dropout=null by what the command's loss compares
    check_ignored(cfg)  # options the run would never read


def load_config(cls, config_file: str | Path | None = None, overrides: list[str] = (), command: str | None = None,
                check: bool = True):
    """YAML preset (optional) + dotted overrides -> a validated ``cls`` instance (``check=False``: built
    and type-checked, values not validated). A preset's ``command:`` must name ``command``."""
    tree: dict[str, Any] = read_yaml(config_file) if config_file else {}
    named = tree.pop("command", None)  # presets may name their command; it must be the one being run
    if command is not None and named is not None and named != command:
        raise ConfigError(f"{config_file} is a preset for `posttrain {named}`, but the command is `posttrain {command}`",
                          where=str(config_file), fix=f"run `posttrain {named} --config {config_file}`, or use a "
                                                      f"{command} preset")
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    cfg = build(cls, tree)
    if check:
        validate(cfg)
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    def public(x):
        return {public_name(k): public(v) for k, v in x.items()} if isinstance(x, dict) else x

    return public(dataclasses.asdict(cfg))


def save_config(cfg: Any, path: str | Path, command: str | None = None) -> None:
    import yaml

    data = to_dict(cfg)
    if command:
        data = {"command": command, **data}
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))


