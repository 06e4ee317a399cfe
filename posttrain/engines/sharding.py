"""FSDP2 sharded training (``train.strategy=fsdp``) with torch's own ``fully_shard`` on a 1-D device mesh.

Every decoder layer is its own FSDP unit (its parameters all-gathered just before its forward and
freed after), and the root module holds the rest (embeddings, final norm, the head). Gradients are
reduce-scattered, so each rank holds 1/world of the parameters, gradients and AdamW state.

Three things a sharded model cannot do that the rest of the code does with a plain one, and how they
are done here:

- **checkpoints**: ``torch.distributed.checkpoint`` writes each rank's shards of the model and the
  optimizer (``save_sharded`` / ``load_sharded``); resuming on the same world size restores them exactly;
- **evaluation, saving, generation**: these run one process's code on a whole model. ``gathered``
  all-gathers the full weights (a collective: every rank calls it) into an ordinary, unsharded copy
  on rank 0 (evaluation, saving) or on every rank (online RL's sampling and π_old), which exists only
  inside the ``with`` block and is freed after;
- **the fused LM head**: it calls the decoder without the root module's forward, which would skip
  FSDP's all-gather, so a sharded model takes the full-forward path (``models.forward`` checks the
  class name, and ``fully_shard`` renames the class ``FSDP<Name>``).

Frozen models (``train.frozen=shard``: the KL reference, a live DPO/KTO reference, a distillation teacher)
are sharded the same way over the same ranks (``TrainEngine.frozen``). Their forward is then a collective
too, so every rank makes the same number of them (``models.forward.lockstep`` checks where counts could differ),
and the main process's evaluation, which runs on it alone, gets a gathered copy inside ``gathered()``.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks: modules whose class name ends in ``DecoderLayer`` (Llama,
    Qwen2/3, Mistral, Gemma, OLMo, GPT-NeoX ... in transformers) or ``Block`` (GPT-2)."""
    return [m for m in model.modules() if type(m).__name__.endswith(("DecoderLayer", "Block"))]


def shard(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``fully_shard`` every decoder layer, then the root, over all ranks; returns the same module."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    model.to(device)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def footprint(model: torch.nn.Module) -> dict:
    """What a model's parameters hold on this process: 1/world of them when sharded, all of them otherwise."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]  # a DTensor: its shard
    return {"sharded": is_sharded(model), "params": sum(p.numel() for p in model.parameters()),
            "params_per_process": sum(t.numel() for t in local),
            "bytes_per_process": sum(t.numel() * t.element_size() for t in local)}


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
