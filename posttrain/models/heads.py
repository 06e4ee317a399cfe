"""Scalar reward heads on any causal-LM backbone.

A reward model is a Hugging Face ``*ForSequenceClassification`` with ``num_labels=1``: the causal LM's
backbone plus a linear ``score`` head read at each sequence's last token (RLHF book ch. 5). Creating
it with ``AutoModelForSequenceClassification.from_pretrained(causal_lm_path, num_labels=1)`` reuses
the backbone weights and initialises the head; saving it with ``save_pretrained`` gives a directory
that loads back the same way, so the trained model works with any tool that reads HF classifiers.

Training and scoring use packed batches (``collate``: the sequences of a micro-batch in one
row, each attending to itself only, no compute on padding). :func:`sequence_rewards` runs the classifier's forward and reads
the head's output at each sequence's last token (found through ``seq_index``) instead of the row's.
That "last token" is the one the Hugging Face class picks on a padded batch — the rightmost token that
is not ``pad_token_id`` — so both give the same score for the same token ids (tested to 1e-5).
"""

from __future__ import annotations

from pathlib import Path

import torch

from posttrain.config import LoraConfig, ModelConfig
from posttrain.errors import ModelError
from posttrain.models.attention import model_inputs
from posttrain.models.loading import lora_dropout, pretrained, quiet_transformers
from posttrain.models.tiny import resolve

# transformers, peft and tokenizers are imported inside the functions that use them: importing them
# costs seconds, and `posttrain <command> --help` imports this module.





def load_reward_model(cfg: ModelConfig, name_or_path: str | None = None, pad_token_id: int | None = None,
                      lora: LoraConfig | None = None, *, require_trained_head: bool = False,
                      where: str | None = "model.name_or_path"):
    """A ``*ForSequenceClassification`` with one output, from a causal LM or a saved reward model.

    ``pad_token_id`` is written into the config (the HF class needs it to find the last token); the
    head of a fresh model is initialised by ``from_pretrained`` from the torch seed.
    ``require_trained_head``: raise :class:`ModelError` unless the head's weights come from the
    checkpoint (set wherever the model *scores*: a random head would give confident nonsense; leave
    it off where a fresh head is created to be trained). ``where`` names the config key in errors.
    """
    from transformers import AutoModelForSequenceClassification


    quiet_transformers()
    path = resolve(name_or_path or cfg.name_or_path)
    try:
        model, info = pretrained(AutoModelForSequenceClassification, path, cfg, num_labels=1, output_loading_info=True)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load '{path}' as a sequence-classification reward model: {e}",
                         where=where,
                         fix="give a causal LM whose architecture has a ForSequenceClassification class "
                             "(Llama, Qwen2, Mistral, Gemma, ...), a saved reward model, or 'tiny'") from None
    if require_trained_head:
        _check_trained_head(model, info, path, where)
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    if model.config.pad_token_id is None:
        raise ModelError("the reward model has no pad_token_id, so its last token cannot be found",
                         where=where, fix="use a tokenizer with a pad token")
    if lora is not None and lora.enabled:
        model = apply_reward_lora(model, lora)
    return model


def _check_trained_head(model, info: dict, path, where: str | None) -> None:
    """Raise unless the scalar head's weights were read from the checkpoint at ``path``.

    ``from_pretrained`` initialises a head it does not find (a causal LM has none) and lists it in
    ``missing_keys``. A PEFT adapter directory loads through transformers' integration, whose loading
    info covers the adapter only: there the head counts as trained when the adapter saved it
    (``modules_to_save``, which wraps the module)."""
    name = next((n for n in HEAD_NAMES if isinstance(getattr(model, n, None), torch.nn.Module)), None)
    if name is None:
        head_name(model)  # raises the no-head error
    head = getattr(model, name)
    if hasattr(head, "modules_to_save"):  # peft ModulesToSaveWrapper: the adapter saved the trained head
        return
    missing = {str(k) for k in info.get("missing_keys", ())}
    if hasattr(model, "peft_config") or any(k == name or k.startswith(name + ".") for k in missing):
        raise ModelError(
            f"the model at {path} has no trained scalar reward head: its `{name}` weights are not in the "
            f"checkpoint, so every score would come from a randomly initialised head",
            where=where,
            fix="train one with `posttrain reward` and give its final/ directory, or a hub "
                "sequence-classification reward model with one label")


def apply_reward_lora(model, cfg: LoraConfig):
    """LoRA adapters on the backbone; the fresh ``score`` head is trained in full (peft
    ``modules_to_save``), as a frozen random head could not learn anything."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    target = "all-linear" if cfg.target_modules == ["all-linear"] else cfg.target_modules
    peft_cfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=lora_dropout(cfg), target_modules=target,
                              task_type="SEQ_CLS", modules_to_save=[head_name(model)])
    try:
        return get_peft_model(model, peft_cfg)
    except ValueError as e:
        raise ModelError(f"LoRA could not be applied to the reward model: {e}", where="lora.target_modules",
                         fix="name modules that exist in this model, e.g. q_proj,v_proj") from None


def _base(model):
    """The ``*ForSequenceClassification`` inside a peft wrapper (or the model itself)."""
    if hasattr(model, "peft_config"):
        return model.base_model.model
    return model


HEAD_NAMES = ("score", "classifier", "v_head")


def head_name(model) -> str:
    base = _base(model)
    for name in HEAD_NAMES:
        if isinstance(getattr(base, name, None), torch.nn.Module):
            return name
    raise ModelError(f"{type(base).__name__} has no scalar head named score/classifier",
                     where="model.name_or_path", fix="use a Llama/Qwen2/Mistral-style architecture")


def backbone_and_head(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(transformer backbone, scalar head) of a sequence-classification model (peft-aware)."""
    base = _base(model)
    backbone = getattr(base, base.base_model_prefix)
    head = getattr(base, head_name(model))  # a peft ModulesToSaveWrapper routes to the trained copy
    return backbone, head


def last_token_positions(batch: dict, pad_id: int | None) -> torch.Tensor:
    """[n_seqs] flat indices (row * L + col) of each sequence's last token that is not padding.

    Matches the HF classifier's rule (rightmost token != pad_token_id) on a padded batch; in a packed
    row it is applied within each sequence (``seq_index``)."""
    ids, seq = batch["input_ids"], batch["seq_index"]
    n = int(batch["n_seqs"])
    keep = seq >= 0
    if pad_id is not None:
        keep = keep & (ids != pad_id)
    flat = torch.arange(ids.numel(), device=ids.device).view_as(ids)
    pos = torch.full((n,), -1, dtype=torch.long, device=ids.device)
    pos = pos.scatter_reduce(0, seq[keep], flat[keep], reduce="amax", include_self=True)
    if bool((pos < 0).any()):
        raise ModelError("a sequence consists only of pad tokens, so it has no token to score",
                         where="data", fix="drop empty responses or use a pad token distinct from EOS")
    return pos


def sequence_rewards(model, batch: dict, pad_id: int | None = None) -> torch.Tensor:
    """[n_seqs] scalar rewards of a (packed or padded) batch, sequence i read at its last token.

    The forward goes through ``model`` itself (so DDP's gradient hooks run) and a forward hook on the
    head captures its per-position outputs, which are read at each sequence's last token; the head is
    a single linear map, so scoring every position costs next to nothing."""
    inner = getattr(model, "module", model)  # DDP / accelerate wrappers
    _, head = backbone_and_head(inner)
    if pad_id is None:
        pad_id = _base(inner).config.pad_token_id
    captured = {}
    hook = head.register_forward_hook(lambda mod, args, out: captured.__setitem__("scores", out))
    try:
        model(**model_inputs(model, batch))
    finally:
        hook.remove()
    pos = batch["last_pos"] if "last_pos" in batch else last_token_positions(batch, pad_id)
    return captured["scores"].reshape(-1)[pos].float()


def save_reward_model(model, tokenizer, out_dir: str | Path) -> Path:
    """Save so ``AutoModelForSequenceClassification.from_pretrained(out_dir)`` gives the same scores.
    LoRA adapters are merged first (a reward model is consumed as full weights)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "peft_config"):
        model = model.merge_and_unload()
    model.config.num_labels = 1
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
