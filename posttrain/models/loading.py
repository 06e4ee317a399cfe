"""Load any Hugging Face causal LM (hub id or local path) and its tokenizer; LoRA via peft; save.

``name_or_path: tiny`` (or ``tiny-qwen2``, ``tiny-llama-small``) builds the offline tiny model first.
"""

from __future__ import annotations

# transformers, peft and tokenizers are imported inside the functions that use them: importing them
# costs seconds, and `posttrain <command> --help` imports this module.

from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING

from posttrain.config import LoraConfig, ModelConfig
from posttrain.errors import ConfigError, ModelError
from posttrain.models import tiny

if TYPE_CHECKING:
    import torch


def quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def attn_implementation(cfg: ModelConfig) -> str:
    """``sdpa`` becomes SDPA with the padding-free packed path (``models.attention``)."""
    from posttrain.models import attention

    if cfg.attn_implementation == "sdpa":
        attention.register()
        return attention.PACKED_SDPA
    return cfg.attn_implementation


def _dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def check_not_missing_run(path: str, where: str = "model.name_or_path") -> None:
    """A path like ``runs/sft/final`` that does not exist yet is the output of an earlier command: say
    which one, instead of the Hub's repo-id message."""
    p = Path(path)
    if p.exists() or p.name != "final" or len(p.parts) < 3:
        return
    command = p.parent.name
    raise ModelError(f"{path} does not exist yet: it is the final model that `posttrain {command}` writes "
                     f"(train.output_dir={p.parent})", where=where,
                     fix=f"run that first, e.g. `posttrain {command} --config recipes/{command}.yaml` (or the "
                         "whole pipeline: posttrain demo), or point to another model")


def load_tokenizer(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False):
    """The tokenizer, with a pad token guaranteed (EOS is reused when the model has none)."""
    from transformers import AutoTokenizer

    check_not_missing_run(name_or_path)
    quiet_transformers()
    path = tiny.resolve(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load a tokenizer from '{name_or_path}': {e}", where="model.name_or_path",
                         fix="give a local model directory or a hub id available offline "
                             "(HF_HUB_OFFLINE=1 uses the local cache), or 'tiny'") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


_EMPTY = ContextVar("posttrain_empty_weights", default=False)


@contextmanager
def empty_weights(on: bool = True):
    """Inside the block (when ``on``) :func:`pretrained` builds each model on the ``meta`` device from its
    config, reading no weights and holding no memory: every rank but 0 of a ``train.strategy=fsdp`` run
    (``engines.sharding.loads_empty``), whose shards ``engines.sharding.shard`` fills from rank 0's copy."""
    token = _EMPTY.set(on)
    try:
        yield
    finally:
        _EMPTY.reset(token)


def pretrained(auto_class, path: str, cfg: ModelConfig, **kwargs):
    """:func:`built` with ``model.dropout=off`` applied (:func:`without_dropout`)."""
    out = built(auto_class, path, cfg, **kwargs)
    if getattr(cfg, "dropout", "keep") == "off":
        without_dropout(out[0] if isinstance(out, tuple) else out)
    return out


def without_dropout(model) -> None:
    """Every dropout in ``model`` set to 0: its ``nn.Dropout`` modules (LoRA's too) and the float rates that
    Hugging Face attention modules read in training (``attention_dropout``, ``dropout``, ...). The model's
    config is left as it is, so a saved model keeps the user's rates."""
    import torch

    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for name, value in list(vars(m).items()):
            if name.endswith("dropout") and isinstance(value, float):
                setattr(m, name, 0.0)


def built(auto_class, path: str, cfg: ModelConfig, **kwargs):
    """``auto_class.from_pretrained(path, **kwargs)`` with the configured dtype, attention backend, revision and
    remote-code choice; inside :func:`empty_weights` the same module built on ``meta`` instead: the same class
    from the same config (``kwargs`` such as ``num_labels`` go to the config as ``from_pretrained`` sends
    them), dtype, tied weights and generation config, in eval mode as ``from_pretrained`` leaves it.
    ``sharding.shard`` checks that every rank built the same module (names, shapes, dtypes, ties, configs)
    before rank 0's weights fill it. With ``output_loading_info`` an empty build's info lists nothing
    missing: rank 0, which reads the checkpoint, makes any check on it."""
    common = dict(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    if not _EMPTY.get():
        return auto_class.from_pretrained(path, dtype=_dtype(cfg.dtype), attn_implementation=attn_implementation(cfg),
                                          **common, **kwargs)
    import torch
    from transformers import AutoConfig
    from transformers.utils import find_adapter_config_file

    info = kwargs.pop("output_loading_info", False)
    if find_adapter_config_file(path, revision=cfg.revision) is not None:
        raise ConfigError(f"'{path}' is a LoRA adapter directory; under train.strategy=fsdp the processes other "
                         "than 0 build the model from its config without reading weights, which an adapter "
                         "directory does not hold whole", where="model.name_or_path",
                         fix="give a directory of merged weights (lora.merge_on_save=true writes one), or train "
                             "with train.strategy=ddp")
    config = AutoConfig.from_pretrained(path, **common, **kwargs)
    if getattr(config, "quantization_config", None):
        raise ConfigError(f"'{path}' is a quantized checkpoint, which train.strategy=fsdp does not load",
                         where="model.name_or_path", fix="give unquantized weights, or train with train.strategy=ddp")
    with torch.device("meta"):
        model = auto_class.from_config(config, dtype=_dtype(cfg.dtype), attn_implementation=attn_implementation(cfg),
                                       trust_remote_code=cfg.trust_remote_code)
    model.eval()
    if model.can_generate():  # generation_config.json, as from_pretrained reads it
        model.adjust_generation_fn(None, True, None, path, cache_dir=None, force_download=False, proxies=None,
                                   local_files_only=False, token=None, subfolder="", **common)
    return (model, {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}) if info else model


def load_causal_lm(cfg: ModelConfig, name_or_path: str | None = None):
    """``AutoModelForCausalLM.from_pretrained`` with the configured dtype and attention backend (inside
    :func:`empty_weights`, built on ``meta``)."""
    from transformers import AutoModelForCausalLM

    check_not_missing_run(name_or_path or cfg.name_or_path)
    quiet_transformers()
    path = tiny.resolve(name_or_path or cfg.name_or_path)
    try:
        model = pretrained(AutoModelForCausalLM, path, cfg)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load a causal LM from '{path}': {e}", where="model.name_or_path",
                         fix="give a local model directory or a hub id available offline, or 'tiny'") from None
    return model


def apply_lora(model, cfg: LoraConfig):
    """Wrap ``model`` with peft LoRA adapters; the base weights are frozen."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets = cfg.target_modules
    target = "all-linear" if targets == ["all-linear"] else targets
    peft_cfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=lora_dropout(cfg),
                              target_modules=target, task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, peft_cfg)
    except ValueError as e:
        raise ModelError(f"LoRA could not be applied: {e}", where="lora.target_modules",
                         fix="name modules that exist in this model, e.g. q_proj,v_proj, or all-linear") from None


def lora_dropout(cfg: LoraConfig) -> float:
    """``lora.dropout`` (null only in a config built without ``config.validate``, which resolves it: 0.05)."""
    from posttrain.config_checks import LORA_DROPOUT

    return LORA_DROPOUT if cfg.dropout is None else cfg.dropout


def is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def merged_weights(model) -> dict[str, torch.Tensor]:
    """A LoRA (peft) model's weights with its adapters merged, under the base model's own names, for an engine
    that holds whole weights (generation servers, vLLM): W = W₀ + (α/r)·B·A for every adapted layer (peft's
    ``get_delta_weight``, which also handles fan-in/fan-out layouts), every other tensor as it is. The model
    is not changed: merging in place and unmerging would not give W₀ back bit for bit. Tensors the base model
    ties stay one tensor (``safetensors.torch.save_model``'s rule then keeps one name of them)."""
    import torch
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import _remove_duplicate_names  # save_model's own rule for tied names

    base, adapter = model.get_base_model(), model.active_adapter
    if any(getattr(c, "use_dora", False) for c in model.peft_config.values()):
        raise ModelError("merging DoRA adapters for the rollout engine is not supported", where="lora",
                         fix="use plain LoRA, or rollout.engine=local")
    out = {}
    for key, t in base.state_dict().items():
        if ".lora_" in key or ".original_module." in key:  # the adapters; a modules_to_save layer's frozen copy
            continue
        out[key.replace(".base_layer.", ".").replace(f".modules_to_save.{adapter}.", ".")] = t
    with torch.no_grad():
        for name, m in base.named_modules():
            if isinstance(m, LoraLayer) and adapter in m.lora_A and not m.merged:
                key = f"{name}.weight"
                out[key] = out[key] + m.get_delta_weight(adapter).to(out[key].dtype)
    for removed in _remove_duplicate_names(out).values():  # tied names: one tensor, one name
        for k in removed:
            del out[k]
    return out


def save_pretrained(model, tokenizer, out_dir: str | Path, merge_lora: bool = False) -> Path:
    """Save in Hugging Face format (safetensors). LoRA: the adapter in ``out/adapter`` and, if
    ``merge_lora``, merged full weights in ``out``; otherwise the adapter alone in ``out``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if is_peft(model):
        if not merge_lora:
            model.save_pretrained(out, safe_serialization=True)
            tokenizer.save_pretrained(out)
            return out
        model.save_pretrained(out / "adapter", safe_serialization=True)
        model = model.merge_and_unload()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@contextmanager
def eval_mode(model):
    """``model.eval()`` inside the block (no dropout), its previous train/eval mode restored after it,
    also when the block raises."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def tokenizer_for(cfg: ModelConfig):
    """The tokenizer of a ModelConfig (its path, revision and remote-code choice)."""
    return load_tokenizer(cfg.name_or_path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)


def load_policy(cfg: ModelConfig, lora: LoraConfig | None = None, name_or_path: str | None = None):
    """The trainable causal LM (LoRA-wrapped when enabled), without dropout where ``model.dropout=off``."""
    model = load_causal_lm(cfg, name_or_path)
    if lora is not None and lora.enabled:
        model = apply_lora(model, lora)
        if getattr(cfg, "dropout", "keep") == "off":
            without_dropout(model)  # LoRA's too (config.validate has refused a lora.dropout asked for with it)
    return model
