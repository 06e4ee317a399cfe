"""The reference model of offline preference training (DPO family, KTO).

Strategies (config ``reference``):

- ``precompute`` (default): reference log-probs of every training and eval sequence are computed in
  ONE inference pass before training, saved in a cache file keyed by a hash of the reference model
  (path + weight files' size/mtime + dtype) and of the tokenized sequences, and the reference model
  is freed — training holds one model. A rerun or a resumed run with the same model and data finds
  the file and loads no reference model at all.
- ``live``: log-probs computed each step by a frozen reference kept in memory.
- ``none``: reference-free losses (SimPO, ORPO) skip it entirely.

With LoRA the reference is the SAME model with its adapters disabled (``model.disable_adapter()``):
no second copy is ever loaded, in either strategy.
"""

from __future__ import annotations

import gc
import hashlib
import os
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from posttrain.config import ModelConfig
from posttrain.data.batching import collate, to_device
from posttrain.models.forward import sequence_logps
from posttrain.models.loading import empty_weights, eval_mode, load_causal_lm, load_policy
from posttrain.models.tiny import resolve


def default_cache_dir() -> Path:
    root = Path(os.environ.get("POSTTRAIN_CACHE", Path.home() / ".cache" / "posttrain"))
    return root / "ref_logps"


def model_fingerprint(path: str, dtype: str = "float32") -> str:
    """Path + weight files' names, sizes and mtimes (+ dtype): retraining into the same directory
    changes the key. A hub id without a local directory is keyed by its name."""
    p = Path(resolve(path))
    parts = [str(p.resolve()) if p.exists() else path, dtype]
    if p.is_dir():
        for f in sorted(p.iterdir()):
            if f.suffix in (".safetensors", ".bin", ".json") and f.is_file():
                st = f.stat()
                parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


def cache_key(fingerprint: str, examples: list) -> str:
    """sha256 of the model fingerprint and every sequence's tokens and response boundary."""
    import numpy as np

    h = hashlib.sha256(fingerprint.encode())
    for ex in examples:
        n_prompt = ex.loss_mask.index(1) if 1 in ex.loss_mask else len(ex.loss_mask)
        h.update(np.asarray([n_prompt, len(ex.input_ids), *ex.input_ids], dtype=np.int64).tobytes())
    return h.hexdigest()[:24]


@torch.no_grad()
def compute_logps(model, examples: list, *, batch_tokens: int = 4096, pad_id: int = 0,
                  autocast=None) -> torch.Tensor:
    """[N] summed response log-probs of ``examples`` (``chat.Example``), in order; packed batches of
    about ``batch_tokens`` tokens, longest first."""
    out = torch.zeros(len(examples), dtype=torch.float32)
    if not examples:
        return out
    with eval_mode(model):
        device = next(model.parameters()).device
        order = sorted(range(len(examples)), key=lambda i: -len(examples[i]))
        start = 0
        while start < len(order):
            end, tokens = start, 0
            while end < len(order) and (end == start or tokens + len(examples[order[end]]) <= batch_tokens):
                tokens += len(examples[order[end]])
                end += 1
            idx = order[start:end]
            batch = collate([examples[i] for i in idx], packing=True, pad_id=pad_id)
            batch = to_device(batch, device)
            with (autocast or nullcontext)():
                logp, _ = sequence_logps(model, batch)
            out[idx] = logp.float().cpu()
            start = end
    return out


@contextmanager
def adapters_disabled(model):
    """The base model of a peft model (adapters off); a plain model unchanged."""
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield model
    else:
        yield model


def load_reference(cfg: ModelConfig, path: str, to_gpu: bool = True):
    """``to_gpu=False``: left where it loaded, for FSDP to shard (which moves each unit to its device)."""
    model = load_causal_lm(cfg, path)
    model.requires_grad_(False)
    if to_gpu and torch.cuda.is_available() and not next(model.parameters()).is_meta:  # where the policy is
        model.to("cuda")
    return model.eval()


def free(model) -> None:
    del model
    gc.collect()


def precompute(examples: list, *, ref_path: str, model_cfg: ModelConfig, policy=None,
               cache_dir: str | Path | None = None, batch_tokens: int = 4096, pad_id: int = 0,
               autocast=None, log=print, sharded=None) -> tuple[torch.Tensor, dict]:
    """Reference log-probs [N] of ``examples``, from the cache or from one inference pass.

    ``policy``: a peft-wrapped policy whose base IS the reference (LoRA): scored with adapters
    disabled, no model loaded. Otherwise the reference at ``ref_path`` is loaded, used, and freed.
    ``sharded`` (under FSDP, ``engines.sharding.reference_pass``): {empty, place, agree}: the reference is
    built on meta where ``empty`` and sharded by ``place(model)``, its forwards are collectives that every
    process makes in the same order, and the cache is used only where ``agree(hit)``: every process found it.
    Returns (logps, info) with info = {cache: hit|miss, path, loaded_reference, seconds}."""
    t0 = time.perf_counter()
    key = cache_key(model_fingerprint(ref_path, model_cfg.dtype), examples)
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    path = root / f"{key}.pt"
    data = torch.load(path, weights_only=True) if path.exists() else None
    hit = data is not None and data.shape == (len(examples),)
    if sharded["agree"](hit) if sharded else hit:
        log(f"reference log-probs: cache hit {path} ({len(examples)} sequences)")
        return data, {"cache": "hit", "path": str(path), "loaded_reference": False,
                      "seconds": time.perf_counter() - t0}
    loaded = policy is None or not hasattr(policy, "disable_adapter")
    if loaded:
        with empty_weights(bool(sharded and sharded["empty"])):
            model = load_reference(model_cfg, ref_path, to_gpu=not sharded)
        model = sharded["place"](model) if sharded else model
        logps = compute_logps(model, examples, batch_tokens=batch_tokens, pad_id=pad_id, autocast=autocast)
        free(model)
    else:
        with adapters_disabled(policy) as base:
            logps = compute_logps(base, examples, batch_tokens=batch_tokens, pad_id=pad_id, autocast=autocast)
    root.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(logps, tmp)
    os.replace(tmp, path)  # atomic: a concurrent or killed run never sees half a file
    dt = time.perf_counter() - t0
    log(f"reference log-probs: computed {len(examples)} sequences in {dt:.1f}s -> {path}")
    return logps, {"cache": "miss", "path": str(path), "loaded_reference": loaded, "seconds": dt}


class LiveReference:
    """Reference log-probs computed during training: the policy with adapters disabled (LoRA), or a
    frozen copy loaded once."""

    def __init__(self, policy, model_cfg: ModelConfig, ref_path: str):
        self.policy = policy
        self.model = None if hasattr(policy, "disable_adapter") else load_reference(model_cfg, ref_path)

    @torch.no_grad()
    def batch_logps(self, batch: dict, policy=None) -> torch.Tensor:
        if self.model is not None:
            if self.model.device != batch["input_ids"].device:
                self.model.to(batch["input_ids"].device)
            return sequence_logps(self.model, batch)[0]
        model = policy if policy is not None else self.policy
        with adapters_disabled(getattr(model, "module", model)) as base, eval_mode(base):
            return sequence_logps(base, batch)[0]


# ----------------------------------------------------------------------------- sampled metrics


def reference_logps_for(examples: list, *, policy, ref_path: str, model_cfg: ModelConfig, live: LiveReference | None,
                        pad_id: int, autocast=None) -> torch.Tensor:
    """Reference log-probs of new sequences (samples) at evaluation time: the live reference, the
    policy with adapters disabled, or the reference loaded briefly and freed."""
    if live is not None and live.model is not None:
        return compute_logps(live.model, examples, pad_id=pad_id, autocast=autocast)
    if hasattr(policy, "disable_adapter"):
        with adapters_disabled(policy) as base:
            return compute_logps(base, examples, pad_id=pad_id, autocast=autocast)
    model = load_reference(model_cfg, ref_path)
    out = compute_logps(model, examples, pad_id=pad_id, autocast=autocast)
    free(model)
    return out


def frozen_reference(model_cfg: ModelConfig, ref_model: str | None, lora_enabled: bool):
    """The online RL reference: a frozen causal LM (``ref_model``, default the initial policy), or
    None with LoRA (the policy's adapters are disabled instead)."""
    if lora_enabled and ref_model is None:
        return None
    ref = load_policy(model_cfg, None, name_or_path=ref_model)
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def precompute_tables(encs_by_split: dict[str, list], *, ref_path: str, model_cfg: ModelConfig, policy,
                      cache_dir, pad_id: int, autocast, extra: dict[str, list] | None = None, sharded=None):
    """Reference log-probs of every response of every record, one pass for all splits and extras
    (``sharded``: see :func:`precompute`).
    Returns ({split: [N, K] table}, {name: [M] tensor} for ``extra`` example lists, info)."""
    exs, spans = [], {}
    for name, encs in encs_by_split.items():
        start = len(exs)
        exs += [e.example(k) for e in encs for k in range(len(e.responses))]
        spans[name] = (start, len(exs))
    for name, more in (extra or {}).items():
        start = len(exs)
        exs += more
        spans[name] = (start, len(exs))
    logps, info = precompute(exs, ref_path=ref_path, model_cfg=model_cfg, policy=policy, cache_dir=cache_dir,
                             pad_id=pad_id, autocast=autocast, sharded=sharded)
    tables = {}
    for name, encs in encs_by_split.items():
        a, _ = spans[name]
        k = max((len(e.responses) for e in encs), default=1)
        tables[name] = logps[a:a + len(encs) * k].view(len(encs), k) if encs else None
    extras = {name: logps[spans[name][0]:spans[name][1]] for name in (extra or {})}
    return tables, extras, info


def attach_reference(batch: dict, table: torch.Tensor | None, idx: list[int]) -> dict:
    """Add the precomputed reference log-probs [N, K] of records ``idx`` to a micro-batch."""
    if table is not None:
        batch["ref"] = table[idx]
    return batch


def attach_reference_in_order(batches: list[dict], table: torch.Tensor | None) -> list[dict]:
    s = 0
    for b in batches:
        n = int(b["n_records"])
        attach_reference(b, table, list(range(s, s + n)))
        s += n
    return batches


def policy_with_reference(encs_by_split: dict[str, list], *, reference: str, ref_path: str, model_cfg: ModelConfig,
                          lora, cache_dir, pad_id: int, autocast, extra: dict[str, list] | None = None,
                          empty: tuple[bool, bool] = (False, False), defer: bool = False):
    """The trainable policy and its reference, by strategy: ``precompute`` runs the reference pass
    BEFORE the policy loads with full fine-tuning (one model in memory at a time) and after it with
    LoRA (the same model, adapters disabled); ``live`` keeps a frozen reference (or the disabled
    adapters); ``none`` has none. Under FSDP (``engines.sharding.loads_empty``) ``empty`` says whether
    this process builds (the policy, the live reference) on meta, and ``defer`` leaves the reference pass
    to the returned ``later(policy, sharded)``, called once the policy is sharded (:func:`precompute`).
    Returns (model, {split: table or None}, {extra name: tensor}, info, live reference or None, later or None)."""
    tables, extras, info = {name: None for name in encs_by_split}, {}, {"cache": "none"}

    def pre(policy, sharded=None):
        return precompute_tables(encs_by_split, ref_path=ref_path, model_cfg=model_cfg, policy=policy,
                                 cache_dir=cache_dir, pad_id=pad_id, autocast=autocast, extra=extra, sharded=sharded)

    if reference == "precompute" and not lora.enabled and not defer:
        tables, extras, info = pre(None)
    with empty_weights(empty[0]):
        model = load_policy(model_cfg, lora)
    if reference == "precompute" and lora.enabled and not defer:
        tables, extras, info = pre(model)
    with empty_weights(empty[1]):
        live = LiveReference(model, model_cfg, ref_path) if reference == "live" else None
    def later(policy, sharded):  # the reference pass on the sharded models, after the engine starts
        return pre(policy if lora.enabled else None, sharded)

    return model, tables, extras, info, live, (later if defer and reference == "precompute" else None)
