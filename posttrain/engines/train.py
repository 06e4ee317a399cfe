"""The training runtime every algorithm composes: accelerate, optimizer, schedule, accumulation,
clipping, mixed precision, atomic checkpoints with exact resume, metrics and progress.

An algorithm owns its loop and calls :meth:`TrainEngine.step` once per optimizer step with that
step's micro-batches, a loss function and a counting function. The engine counts the normalizer
(tokens, pairs, sequences) over *all* micro-batches and processes first, so every micro-batch loss is
``sum / global_count``: accumulating k micro-batches, or splitting across processes, gives exactly
the gradient of one large batch (DDP averages gradients, so each rank's loss is scaled by the world
size to turn that mean back into a sum).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable

import torch

from posttrain.config import TrainConfig, save_config
from posttrain.data.batching import to_device
from posttrain.engines import sharding
from posttrain.engines.runlog import is_main_process, say
from posttrain.errors import ConfigError, TrainingError

LossFn = Callable[[torch.nn.Module, Any, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]
CountFn = Callable[[Any], torch.Tensor]

# Set by the crash-and-resume tests: the process kills itself right after this optimizer step.
_FAULT_AT_STEP = int(os.environ.get("POSTTRAIN_FAULT_AT_STEP", "0"))


# ----------------------------------------------------------------------------- run directory


RUN_ARTIFACTS = ("metrics.jsonl", "summary.json", "checkpoints", "final", "tb")


def make_run_dir(cfg: TrainConfig, command: str, full_config: Any) -> Path:
    """Create the run directory, save the resolved config, seed everything, set threads.

    A directory that already holds a run is refused unless ``train.resume`` (continue it from its checkpoint;
    without one an interrupted run is replaced, a finished one refused) or ``train.overwrite`` (delete its
    metrics, checkpoints, final model and summary first): two runs' metrics never share one metrics.jsonl."""
    out = Path(cfg.output_dir.format(command=command, time=time.strftime("%Y%m%d-%H%M%S")))
    old = [a for a in RUN_ARTIFACTS if (out / a).exists()] if out.is_dir() else []
    fresh = cfg.resume and old and not any((out / "checkpoints").glob("step-*"))  # nothing to resume from
    if fresh and "final" in old:
        raise ConfigError(f"{out} holds a finished run that kept no checkpoint, so there is nothing to resume",
                          where="train.resume", fix="replace it with train.overwrite=true, or choose another "
                          "train.output_dir (train.save_every=N keeps checkpoints to resume from)")
    if old and (fresh or not cfg.resume):  # an interrupted run without a checkpoint: this one takes its place
        if not cfg.overwrite and not fresh:
            raise ConfigError(f"{out} already holds a run ({', '.join(old)})", where="train.output_dir",
                              fix="continue it with --resume, replace it with train.overwrite=true, or choose "
                                  "another train.output_dir")
        if is_main_process():
            for a in old:
                shutil.rmtree(out / a) if (out / a).is_dir() else (out / a).unlink()
    out.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        save_config(full_config, out / "config.yaml", command=command)
        say(f"posttrain {command}: run directory {out}, seed {cfg.seed}"
            + (" (replacing the run that was there)" if old and (fresh or cfg.overwrite and not cfg.resume) else ""))
    seed_everything(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return out


def seed_everything(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    import numpy as np

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


# ----------------------------------------------------------------------------- schedule


def lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    """Linear warmup from 0 over ``warmup`` steps, then constant / linear decay / cosine to 0."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        frac = (step - warmup) / max(1, total - warmup)
        return max(0.0, 1 - frac) if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))

    return f


# ----------------------------------------------------------------------------- engine


def refuse_accelerate_plugins() -> None:
    """``accelerate launch`` with a DeepSpeed or FSDP config sets these variables and expects the script to
    hand its model to that plugin; posttrain shards with torch's own FSDP2 instead, so either would
    silently train something else (on a CPU accelerate's FSDP plugin falls back to DDP)."""
    for var, what in (("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"), ("ACCELERATE_USE_FSDP", "accelerate's FSDP plugin")):
        if os.environ.get(var, "").lower() in ("1", "true"):
            raise ConfigError(
                f"this run was launched with {what} ({var}=true), which posttrain does not use: its sharded "
                f"training is FSDP2 (torch's fully_shard), chosen by train.strategy=fsdp", where=var,
                fix="launch with torchrun --nproc_per_node N -m posttrain.cli <command> train.strategy=fsdp ... "
                    "(or accelerate launch without a DeepSpeed/FSDP config); see docs/distributed.md")



class TrainEngine:
    """Owns the accelerator, optimizer, scheduler and checkpoints of one trained model."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, total_steps: int, run_dir: Path,
                 name: str = "model"):
        from accelerate import Accelerator

        self.cfg, self.total_steps, self.run_dir, self.name = cfg, total_steps, Path(run_dir), name
        refuse_accelerate_plugins()
        # cpu=True when there is no GPU: under torchrun this is what gives real gloo DDP (docs/architecture.md, DDP on CPU)
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                                       mixed_precision=cfg.mixed_precision)
        if cfg.gradient_checkpointing:
            if not getattr(model, "supports_gradient_checkpointing", True):
                raise TrainingError(f"{type(model).__name__} does not support gradient checkpointing",
                                    where="train.gradient_checkpointing", fix="set train.gradient_checkpointing=false")
            # non-reentrant: works with frozen inputs (LoRA) and passes the packed-attention kwargs through;
            # a composite model (PPO's actor-critic): each Hugging Face model in it
            kwargs, able = {"use_reentrant": False}, lambda m: hasattr(m, "gradient_checkpointing_enable")
            for m in [model] if able(model) else [c for c in model.children() if able(c)]:
                if hasattr(m, "activation_checkpointing_enable"):  # transformers >= 5.23's name
                    m.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
                else:
                    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        # FSDP2 shards before the optimizer exists: AdamW must hold the sharded parameters
        self.fsdp = cfg.strategy == "fsdp" and self.accelerator.num_processes > 1
        self.loaded: dict[str, list] = {}  # name -> under FSDP how each rank built and filled it (summary.json)
        sharding.refuse_empty(model, self.fsdp)
        if self.fsdp:
            model = sharding.shard(model, self.accelerator.device, self.loaded.setdefault(name, []))
        self._gathered = None
        self.frozen_models: dict[str, dict] = {}  # name -> what it holds per process (summary.json)
        self._frozen_holders: list = []  # sharded frozen models the main process's evaluation uses
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise TrainingError("the model has no trainable parameters", where="model",
                                fix="check lora.target_modules or the model's frozen parameters")
        # the fused kernel (one pass over each tensor; transformers' default optimizer too) where it exists
        fused = all(p.device.type in ("cpu", "cuda") for p in params)
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas),
                                      weight_decay=cfg.weight_decay, fused=fused or None)
        warmup = math.ceil(cfg.warmup_ratio * total_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.schedule, warmup, total_steps))
        self.model, self.optimizer = (model, optimizer) if self.fsdp else self.accelerator.prepare(model, optimizer)
        self.scheduler = scheduler
        self.step_count = 0

    # --- properties
    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def strategy(self) -> str:
        """What this run really does: single (one process), ddp or fsdp."""
        return "fsdp" if self.fsdp else "ddp" if self.world_size > 1 else "single"

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def unwrapped(self) -> torch.nn.Module:
        """The model as one process's code can run it: not the DDP wrapper; under FSDP the gathered
        copy, which exists only inside ``with engine.gathered():`` on the main process."""
        if self.fsdp:
            if self._gathered is None:
                raise TrainingError("a sharded (train.strategy=fsdp) model was used outside engine.gathered()",
                                    where="train.strategy", fix="report this: a code path misses the gather")
            return self._gathered
        return self.accelerator.unwrap_model(self.model)

    @contextmanager
    def gathered(self, everywhere: bool = False):
        """Around work on the whole model (evaluation and saving on the main process; with ``everywhere``
        sampling on every process): under FSDP every process must enter (the weights are all-gathered)
        and the main one (or every one) gets an unsharded copy as ``unwrapped`` until the block ends;
        otherwise nothing happens."""
        if not self.fsdp:
            yield
            return
        with sharding.gathered(self.model, self.is_main, everywhere) as copy, ExitStack() as frozen:
            # evaluation on the main process alone cannot run a sharded model: it gets gathered copies too
            swapped = []
            for h in [] if everywhere else self._frozen_holders:
                c = frozen.enter_context(sharding.gathered(h.model, self.is_main))
                swapped.append((h, h.model))
                if c is not None:
                    h.model = c.requires_grad_(False).eval()
            self._gathered = copy
            try:
                yield
            finally:
                self._gathered = None
                for h, sharded in swapped:
                    h.model = sharded

    def frozen(self, model: torch.nn.Module, name: str, holder=None) -> torch.nn.Module:
        """A frozen model (no gradients, eval mode) placed per ``train.frozen``: whole on every process
        (replicate), or under FSDP sharded over the policy's ranks (shard: every forward is then a
        collective, which every rank must make in lockstep). ``holder``: an object whose ``model`` is this
        model and which the main process's evaluation also uses; inside :meth:`gathered` its ``model`` is
        a gathered copy there. Its summary (:meth:`frozen_summary`) is measured at placement and, sharded,
        again as each forward starts (before FSDP gathers anything): what it holds between forwards."""
        model.requires_grad_(False)
        model.eval()
        sharding.refuse_empty(model, self.fsdp and self.cfg.frozen == "shard")
        if self.fsdp and self.cfg.frozen == "shard":
            sharding.shard(model, self.device, self.loaded.setdefault(name, []))
            if holder is not None:
                self._frozen_holders.append(holder)

            def measure(m, _args):
                self.frozen_models[name] = sharding.footprint(m)
            model.register_forward_pre_hook(measure, prepend=True)  # before FSDP's own pre-forward gathers
        self.frozen_models[name] = sharding.footprint(model)
        return model

    def frozen_summary(self) -> dict:
        """summary.json's ``frozen``: the placement really used and each frozen model's share per process
        (the models dict itself, so a model placed later still appears)."""
        return {"mode": "shard" if self.fsdp and self.cfg.frozen == "shard" else "replicate",
                "models": self.frozen_models}

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def autocast(self):
        return self.accelerator.autocast() if self.cfg.mixed_precision != "no" else nullcontext()

    # --- one optimizer step
    def step(self, micro_batches: list, loss_fn: LossFn, count_fn: CountFn) -> dict[str, torch.Tensor]:
        """Forward/backward every micro-batch, then clip, step and schedule. Returns the loss
        function's metrics averaged over micro-batches, plus ``loss`` (the step's loss: the sum of
        the micro-batch losses), ``grad_norm`` and ``lr``."""
        model = self.model
        model.train()
        micro_batches = [to_device(mb, self.device) for mb in micro_batches]
        local = torch.stack([count_fn(mb).float() for mb in micro_batches]).sum()
        total = self.accelerator.reduce(local.to(self.device), reduction="sum") if self.world_size > 1 else local
        total = total.clamp(min=1)
        sums: dict[str, torch.Tensor] = {}
        step_loss = torch.zeros(())
        for i, mb in enumerate(micro_batches):
            sync = i == len(micro_batches) - 1
            if self.fsdp:  # reduce-scatter only after the last micro-batch
                model.set_requires_gradient_sync(sync)
                ctx = nullcontext()
            else:
                ctx = nullcontext() if sync or self.world_size == 1 else self.accelerator.no_sync(model)
            with ctx:
                with self.autocast():
                    loss, metrics = loss_fn(model, mb, total)
                self.accelerator.backward(loss * self.world_size)
            step_loss += loss.detach().float().cpu()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0) + v.detach().float()
        out = {k: v / len(micro_batches) for k, v in sums.items()}
        # micro-batch losses are sum/N (N the global count), so they add up to this process's share; the
        # shares of all processes add up to the step's loss, which every process reports
        out["loss"] = (self.accelerator.reduce(step_loss.to(self.device), reduction="sum").cpu()
                       if self.world_size > 1 else step_loss)
        params = [p for p in model.parameters() if p.requires_grad]
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm is not None else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP: the norm over every rank's shards
            grad_norm = grad_norm.full_tensor()
        if not torch.isfinite(grad_norm):  # one host sync per optimizer step, not per micro-batch
            self.optimizer.zero_grad(set_to_none=True)
            last = self.latest_checkpoint()
            raise TrainingError(
                f"the loss or gradients became non-finite at step {self.step_count + 1}; the update was "
                f"not applied", where=str(self.run_dir),
                fix=f"lower train.lr or enable train.max_grad_norm, then resume from the last good "
                    f"checkpoint ({last if last else 'none saved yet; set train.save_every'}) with train.resume=true")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        if self.step_count == _FAULT_AT_STEP:  # crash test hook: a real SIGKILL mid-run
            os.kill(os.getpid(), 9)
        out["grad_norm"] = grad_norm.detach()
        out["lr"] = torch.tensor(self.scheduler.get_last_lr()[0])
        return out

    # --- checkpoints
    @property
    def checkpoint_root(self) -> Path:
        return self.run_dir / "checkpoints"

    def latest_checkpoint(self) -> Path | None:
        root = self.checkpoint_root
        if not root.exists():
            return None
        steps = sorted((int(p.name.split("-")[1]), p) for p in root.glob("step-*") if p.is_dir())
        return steps[-1][1] if steps else None

    def save_checkpoint(self, extra: dict | None = None) -> Path | None:
        """Write model (trainable tensors), optimizer, scheduler, RNG and ``extra`` (data position)
        to ``checkpoints/step-N`` atomically: a temp directory renamed into place."""
        from safetensors.torch import save_file

        self.accelerator.wait_for_everyone()
        final = self.checkpoint_root / f"step-{self.step_count}"
        tmp = self.checkpoint_root / f".tmp-step-{self.step_count}"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        if self.fsdp:  # every rank writes its shards (model, optimizer) and its own RNG
            self.accelerator.wait_for_everyone()
            sharding.save_sharded(self.model, self.optimizer, tmp / "sharded")
            torch.save({"scheduler": self.scheduler.state_dict(), "rng": rng_state()}, tmp / f"rank{self.rank}.pt")
            self.accelerator.wait_for_everyone()
        if self.is_main:
            if not self.fsdp:
                model = self.unwrapped
                state = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
                save_file(state, str(tmp / f"{self.name}.safetensors"))
                torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                            "rng": rng_state()}, tmp / "trainer.pt")
            (tmp / "state.json").write_text(json.dumps({"step": self.step_count, "extra": extra or {},
                                                        "world_size": self.world_size, "strategy": self.cfg.strategy}))
            for f in tmp.rglob("*"):  # make the files durable before the rename publishes them
                if f.is_file():
                    with f.open("rb") as fh:
                        os.fsync(fh.fileno())
            os.replace(tmp, final)
            old = sorted((int(p.name.split("-")[1]), p) for p in self.checkpoint_root.glob("step-*"))
            for _, p in old[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(p, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return final

    def load_checkpoint(self, path: Path) -> dict:
        """Restore everything :meth:`save_checkpoint` wrote; returns ``extra``."""
        from safetensors.torch import load_file

        meta = json.loads((path / "state.json").read_text())
        if self.fsdp or (path / "sharded").exists():
            return self._load_sharded(path, meta)
        state = load_file(str(path / f"{self.name}.safetensors"))
        missing = set(state) - {n for n, _ in self.unwrapped.named_parameters()}
        if missing:
            raise TrainingError(f"checkpoint {path} holds parameters this model lacks: {sorted(missing)[:3]}",
                                where=str(path), fix="resume with the same model and LoRA settings")
        params = dict(self.unwrapped.named_parameters())
        with torch.no_grad():
            for n, t in state.items():
                params[n].copy_(t)
        trainer = torch.load(path / "trainer.pt", weights_only=False)
        self.optimizer.load_state_dict(trainer["optimizer"])
        self.scheduler.load_state_dict(trainer["scheduler"])
        set_rng_state(trainer["rng"])
        self.step_count = meta["step"]
        return meta["extra"]

    def _load_sharded(self, path: Path, meta: dict) -> dict:
        saved = (meta.get("strategy", "ddp"), meta.get("world_size", 1))
        if saved != (self.cfg.strategy, self.world_size):
            raise TrainingError(f"checkpoint {path} was written with train.strategy={saved[0]} on {saved[1]} "
                                f"process(es); this run is train.strategy={self.cfg.strategy} on {self.world_size}",
                                where=str(path), fix="resume with the same train.strategy and number of processes")
        sharding.load_sharded(self.model, self.optimizer, path / "sharded")
        trainer = torch.load(path / f"rank{self.rank}.pt", weights_only=False)
        self.scheduler.load_state_dict(trainer["scheduler"])
        set_rng_state(trainer["rng"])
        self.step_count = meta["step"]
        return meta["extra"]

    def maybe_resume(self) -> dict | None:
        """With ``train.resume``: load the newest checkpoint (None if there is none), and say which."""
        if not self.cfg.resume:
            return None
        path = self.latest_checkpoint()
        if path is None:
            say(f"resume: no checkpoint in {self.run_dir / 'checkpoints'}: starting fresh")
            return None
        extra = self.load_checkpoint(path)
        say(f"resume: resuming from step {self.step_count} ({path})")
        return extra

