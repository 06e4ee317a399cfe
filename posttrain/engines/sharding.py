"""FSDP2 sharded training (``train.strategy=fsdp``) with torch's own ``fully_shard`` on a 1-D device mesh.

Every decoder layer is its own FSDP unit (its parameters all-gathered just before its forward and
freed after), and the root module holds the rest (embeddings, final norm, the head). Gradients are
reduce-scattered, so each rank holds 1/world of the parameters, gradients and AdamW state.

Start-up: only rank 0 reads the checkpoint; every other rank builds the same module on ``meta``
(:func:`loads_empty`, :func:`empty_loading`) and :func:`shard` fills its shards from rank 0's copy.

Three things a sharded model cannot do that the rest of the code does with a plain one, and how they
are done here:

- **checkpoints**: ``torch.distributed.checkpoint`` writes each rank's shards of the model and the
  optimizer (``save_sharded`` / ``load_sharded``); resuming on the same world size restores them exactly;
- **evaluation, saving, generation**: these run one process's code on a whole model. ``gathered``
  all-gathers the full weights (a collective: every rank calls it) into an ordinary, unsharded copy
  on rank 0 (evaluation, saving) or on every rank (online RL's sampling and π_old), which exists only
  inside the ``with`` block and is freed after;
- **the fused LM head** (no [tokens, vocab] logits): one process calls the decoder apart from the head,
  which would skip the root's all-gather; a sharded root instead runs its own forward with
  ``logits_to_keep`` selecting no position, so FSDP's hooks gather and reduce-scatter it as usual, and
  the fused head uses the head's weight as that forward left it: whole, since FSDP2 keeps a root's
  parameters unsharded from its forward to its post-backward (``models.forward.final_hidden``; a test
  bounds the memory of a sharded forward + backward at a 152k vocabulary).

Frozen models (``train.frozen=shard``: the KL reference, a live DPO/KTO reference, a distillation teacher)
are sharded the same way over the same ranks (``TrainEngine.frozen``). Their forward is then a collective
too, so every rank makes the same number of them (``models.forward.lockstep`` checks where counts could differ),
and the main process's evaluation, which runs on it alone, gets a gathered copy inside ``gathered()``. A
frozen model has no backward, after which FSDP2 would reshard its root: ``models.forward`` reshards it once
the head has run (``FSDPModule.reshard``), so between forwards each rank holds only its shards.
"""

from __future__ import annotations

import gc
import os
import resource
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks: modules whose class name ends in ``DecoderLayer`` (Llama,
    Qwen2/3, Mistral, Gemma, OLMo, GPT-NeoX ... in transformers) or ``Block`` (GPT-2)."""
    return [m for m in model.modules() if type(m).__name__.endswith(("DecoderLayer", "Block"))]


def loads_empty(train_cfg, frozen: bool = False) -> bool:
    """Whether this process builds a model it loads on the ``meta`` device, without its weights: every rank
    but 0 of a ``train.strategy=fsdp`` run with several processes, for the trained model and (``frozen``)
    for a frozen one that ``train.frozen=shard`` shards. :func:`shard` fills its shards from rank 0."""
    rank = int(os.environ.get("RANK", "0"))
    return shards(train_cfg) and rank != 0 and (not frozen or train_cfg.frozen == "shard")


def shards(train_cfg) -> bool:
    """Whether this run shards its models (``train.strategy=fsdp`` with several processes), as
    ``TrainEngine.fsdp`` will find."""
    return train_cfg.strategy == "fsdp" and int(os.environ.get("WORLD_SIZE", "1")) > 1


def reference_pass(engine) -> dict:
    """What a reference pass over a sharded model needs (``models.reference.precompute``'s ``sharded``): the
    reference built on meta where :func:`loads_empty`, sharded over the engine's ranks, and a cache used only
    where every process found it (the forwards are collectives: all must make them, or none)."""
    def agree(hit: bool) -> bool:
        hits = [None] * dist.get_world_size()
        dist.all_gather_object(hits, hit)
        return all(hits)

    def place(model):
        return shard(model, engine.device, engine.loaded.setdefault("reference pass", []))

    return {"empty": loads_empty(engine.cfg), "place": place, "agree": agree}


def empty_loading(train_cfg, frozen: bool = False):
    """The block in which a model that :func:`shard` will shard is loaded: built on ``meta`` where
    :func:`loads_empty` (``models.loading.empty_weights``), read from its checkpoint elsewhere."""
    from posttrain.models.loading import empty_weights

    return empty_weights(loads_empty(train_cfg, frozen))


def is_empty(model: torch.nn.Module) -> bool:
    """Some of the model's parameters or buffers are on ``meta`` (built without weights)."""
    return any(t.is_meta for t in (*model.parameters(), *model.buffers()))


def refuse_empty(model: torch.nn.Module, sharded: bool) -> None:
    """A model built on ``meta`` gets its weights only from :func:`shard`: anywhere else it is an error."""
    if not sharded and is_empty(model):
        from posttrain.errors import TrainingError

        raise TrainingError("a model was built without its weights (on the meta device) but is not sharded",
                            where="train.strategy", fix="report this: the models that train.strategy=fsdp shards "
                                                        "are the only ones built on meta (sharding.loads_empty)")


def shard(model: torch.nn.Module, device: torch.device, record: list | None = None) -> torch.nn.Module:
    """``fully_shard`` every decoder layer, then the root, over all ranks, and fill every rank's shards with
    rank 0's weights; returns the same module.

    Rank 0 holds the loaded model; the others may hold the same module built on ``meta`` (:func:`loads_empty`:
    no weights, no memory). Every rank first checks that all built the same module (:func:`_layout`); then
    ``fully_shard`` moves each unit to ``device`` (meta stays meta), an empty module's shards are allocated
    (``to_empty``), and ``set_model_state_dict(full_state_dict=True, broadcast_from_rank0=True)`` broadcasts
    rank 0's tensors one at a time, each rank keeping its slice. Non-persistent buffers (rotary ``inv_freq``),
    which no state dict holds, are broadcast from rank 0, and so is its torch RNG state (loading may draw from
    it there: a fresh head, LoRA's A matrices), so every rank goes on as if it had loaded the model itself.
    ``record`` gets one entry per rank: how it built the model, the parameter bytes it held before and after,
    its peak RSS so far; with ``POSTTRAIN_CHECK_SHARDS=1`` also whether its shards and buffers equal rank 0's
    (a debugging check that gathers the whole model on rank 0)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    rank, empty = dist.get_rank(), is_empty(model)
    mine = {"rank": rank, "built_on": "meta" if empty else next(model.parameters()).device.type,
            "param_bytes_before": sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta)}
    _check_layouts(model)
    full = model.state_dict() if rank == 0 else {}  # rank 0's whole tensors, kept until broadcast
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if empty:
        model.to_empty(device=device)
    # a copy: set_model_state_dict puts the loaded shards into the dict it is given
    set_model_state_dict(model, dict(full), options=_options(full_state_dict=True, broadcast_from_rank0=True))
    for buf in _non_persistent_buffers(model):
        dist.broadcast(buf, src=0)
    state = [torch.get_rng_state()]
    dist.broadcast_object_list(state, src=0)
    torch.set_rng_state(state[0])
    mine["param_bytes_after"] = footprint(model)["bytes_per_process"]
    checked = _check_shards(model, full) if os.environ.get("POSTTRAIN_CHECK_SHARDS") == "1" else None
    del full
    mine["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if record is not None:
        records = [None] * dist.get_world_size()
        dist.all_gather_object(records, mine)
        record += [{**r, **(checked[r["rank"]] if checked else {})} for r in records]
    return model


def _non_persistent_buffers(model: torch.nn.Module) -> list[torch.Tensor]:
    """Buffers no state dict holds, per module in module order (the same on every rank)."""
    return [m._buffers[n] for m in model.modules() for n in sorted(m._non_persistent_buffers_set)
            if m._buffers.get(n) is not None]


def _layout(model: torch.nn.Module) -> dict:
    """What every rank's copy of a model must agree on before rank 0's weights fill it: classes, parameter and
    buffer names, shapes, dtypes, which parameters are one tensor (tied), configs and generation configs."""
    params = list(model.named_parameters(remove_duplicate=False))
    ties: dict[int, list[str]] = {}
    for n, p in params:
        ties.setdefault(id(p), []).append(n)
    subs = [(n, m) for n, m in model.named_modules() if hasattr(m, "config") and hasattr(m.config, "to_dict")]
    return {"classes": [type(m).__name__ for m in model.modules()],
            "params": [(n, tuple(p.shape), str(p.dtype), p.requires_grad) for n, p in params],
            "tied": sorted(t for t in ties.values() if len(t) > 1),
            "buffers": [(n, tuple(b.shape), str(b.dtype)) for n, b in model.named_buffers(remove_duplicate=False)],
            "configs": [(n, m.config.to_dict()) for n, m in subs if hasattr(m, "can_generate")],
            "generation": [(n, m.generation_config.to_dict()) for n, m in subs
                           if getattr(m, "generation_config", None) is not None]}


def _check_layouts(model: torch.nn.Module) -> None:
    """Every rank raises the same error unless all built the module rank 0 loaded (a collective)."""
    from posttrain.errors import ModelError

    layouts = [None] * dist.get_world_size()
    dist.all_gather_object(layouts, _layout(model))
    for r, theirs in enumerate(layouts[1:], start=1):
        for key, ours in layouts[0].items():
            if theirs[key] != ours:
                diff = next(((a, b) for a, b in zip(ours, theirs[key]) if a != b), (len(ours), len(theirs[key])))
                raise ModelError(f"process {r} built another model than process 0 loaded ({key}: {diff[1]!r} "
                                 f"instead of {diff[0]!r}), so process 0's weights cannot fill its shards",
                                 where="train.strategy=fsdp",
                                 fix="report this with the model's name: a model transformers builds "
                                     "differently from its config than from its checkpoint; train.strategy=ddp "
                                     "loads it on every process")


def _check_shards(model: torch.nn.Module, full: dict) -> dict[int, dict] | None:
    """Rank 0 only: {rank: {shards_equal_rank0, buffers_equal_rank0}}: every rank's slice of every tensor and its
    non-persistent buffers, gathered to rank 0 and compared with rank 0's loaded model exactly."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mine = {}
    for name, t in model.state_dict().items():
        if isinstance(t, DTensor):
            offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)[1]
            t = t.to_local()
        else:
            offset = (0,) * t.dim()
        mine[name] = (tuple(offset), t.detach().cpu().clone())
    buffers = [b.detach().cpu().clone() for b in _non_persistent_buffers(model)]
    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object((mine, buffers), parts, dst=0)
    if parts is None:
        return None
    ours = [b.cpu() for b in _non_persistent_buffers(model)]

    def equal(name, offset, t):
        whole = full[name].detach().cpu()
        return torch.equal(whole[tuple(slice(o, o + n) for o, n in zip(offset, t.shape))], t)

    return {r: {"shards_equal_rank0": set(sh) == set(full) and all(equal(n, o, t) for n, (o, t) in sh.items()),
                "buffers_equal_rank0": len(bu) == len(ours) and all(torch.equal(a, b) for a, b in zip(bu, ours))}
            for r, (sh, bu) in enumerate(parts)}


def footprint(model: torch.nn.Module) -> dict:
    """What a model's parameters hold on this process: 1/world of them when sharded, all of them otherwise;
    ``whole_per_process``: how many of them it holds whole (all of a sharded model's root between its
    forward and its resharding, none otherwise)."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]  # a DTensor: its shard
    return {"sharded": is_sharded(model), "params": sum(p.numel() for p in model.parameters()),
            "params_per_process": sum(t.numel() for t in local),
            "bytes_per_process": sum(t.numel() * t.element_size() for t in local),
            "whole_per_process": sum(p.numel() for p in model.parameters() if not hasattr(p, "to_local"))}


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kw)


def full_state_dict(model: torch.nn.Module, everywhere: bool = False) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, whole: on rank 0's CPU (other ranks get {}), or with ``everywhere`` on
    every rank's device. A collective."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(full_state_dict=True, cpu_offload=not everywhere))


def unsharded_class(model: torch.nn.Module) -> type:
    """The model's own class (``fully_shard`` makes ``FSDP<Class>`` with the class as a base)."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        return type(model)
    return next(c for c in type(model).__mro__[1:] if not issubclass(c, FSDPModule) and c is not object)


def _empty_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A new, unsharded model of the same architecture (with the same LoRA adapters for a peft model; a
    composite module, such as PPO's actor-critic, builds its own from copies of its parts)."""
    if hasattr(model, "empty_copy"):
        return model.empty_copy(_empty_copy)
    if hasattr(model, "peft_config"):
        from peft import get_peft_model

        inner = model.get_base_model()
        name = model.active_adapter
        return get_peft_model(unsharded_class(inner)(inner.config), model.peft_config[name], adapter_name=name)
    return unsharded_class(model)(model.config)


@contextmanager
def gathered(model: torch.nn.Module, main: bool, everywhere: bool = False):
    """An ordinary unsharded copy of a sharded model on the main rank (None elsewhere), or with
    ``everywhere`` on every rank (online RL: each process samples its own prompts), built from the
    all-gathered weights and freed when the block ends. Every rank must enter (the gather is a
    collective)."""
    state = full_state_dict(model, everywhere)
    copy = None
    if main or everywhere:
        copy = _empty_copy(model)
        copy.load_state_dict(state)
        first = next(iter(state.values()))
        copy.to(device=first.device, dtype=first.dtype)
        if hasattr(model, "generation_config"):
            base = copy.get_base_model() if hasattr(copy, "peft_config") else copy
            base.generation_config = model.generation_config
    del state
    try:
        yield copy
    finally:
        del copy
        gc.collect()
        dist.barrier()


def save_sharded(model, optimizer, path: Path) -> None:
    """Each rank's shards of the model's trainable tensors and of the optimizer state under ``path``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer, options=_options(ignore_frozen_params=True))
    dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=str(path))


def load_sharded(model, optimizer, path: Path) -> None:
    """Restore what :func:`save_sharded` wrote (same world size) into the sharded model and optimizer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    opts = _options(ignore_frozen_params=True)
    msd, osd = get_state_dict(model, optimizer, options=opts)
    state = {"model": msd, "optimizer": osd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=opts)
