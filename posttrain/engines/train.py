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
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch

from posttrain.config import TrainConfig, save_config
from posttrain.engines.trackers import check_trackers, make_trackers
from posttrain.errors import ConfigError, TrainingError

LossFn = Callable[[torch.nn.Module, Any, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]
CountFn = Callable[[Any], torch.Tensor]

# Set by the crash-and-resume tests: the process kills itself right after this optimizer step.
_FAULT_AT_STEP = int(os.environ.get("POSTTRAIN_FAULT_AT_STEP", "0"))


# ----------------------------------------------------------------------------- run directory


RUN_ARTIFACTS = ("metrics.jsonl", "summary.json", "checkpoints", "final", "tb")


def make_run_dir(cfg: TrainConfig, command: str, full_config: Any) -> Path:
    """Create the run directory, save the resolved config, seed everything, set threads.

    A directory that already holds a run is refused unless ``train.resume`` (continue it) or
    ``train.overwrite`` (delete its metrics, checkpoints, final model and summary first): two runs'
    metrics are never interleaved in one metrics.jsonl."""
    out = Path(cfg.output_dir.format(command=command, time=time.strftime("%Y%m%d-%H%M%S")))
    old = [a for a in RUN_ARTIFACTS if (out / a).exists()] if out.is_dir() else []
    if old and not cfg.resume:
        if not cfg.overwrite:
            raise ConfigError(f"{out} already holds a run ({', '.join(old)})", where="train.output_dir",
                              fix="continue it with --resume, replace it with train.overwrite=true, or choose "
                                  "another train.output_dir")
        if _is_main():
            for a in old:
                shutil.rmtree(out / a) if (out / a).is_dir() else (out / a).unlink()
    out.mkdir(parents=True, exist_ok=True)
    if _is_main():
        save_config(full_config, out / "config.yaml", command=command)
        say(f"posttrain {command}: run directory {out}, seed {cfg.seed}"
            + (" (replacing the run that was there)" if old and cfg.overwrite and not cfg.resume else ""))
    seed_everything(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return out


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def say(line: str) -> None:
    """One plain line for the person running the command (main process only), flushed at once so
    it reaches a log file under nohup or SLURM."""
    if _is_main():
        print(line, flush=True)


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


# ----------------------------------------------------------------------------- metrics


class MetricsLogger:
    """Appends one JSON object per logged step to metrics.jsonl and mirrors the scalars to the trackers
    of ``report_to`` (TensorBoard by default; W&B, MLflow: ``engines/trackers.py``), started lazily at
    the first logged row (main process only)."""

    def __init__(self, run_dir: Path, enabled: bool = True, report_to: list[str] | tuple[str, ...] = ("tensorboard",),
                 config: Any = None):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._names, self._config, self._trackers = list(report_to), config, None
        check_trackers(self._names)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _scalar(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._trackers is None:
            run_dir = self.path.parent
            self._trackers = make_trackers(self._names, run_dir, run_dir.name, self._config)
        for t in self._trackers:
            t.log(step, row)

    def truncate_after(self, step: int) -> None:
        """On resume, drop rows logged after the checkpoint so the file matches one clean run."""
        if self.enabled and self.path.exists():
            rows = [r for r in self.path.read_text().splitlines() if r and json.loads(r)["step"] <= step]
            self.path.write_text("".join(r + "\n" for r in rows))

    def close(self) -> None:
        for t in self._trackers or []:
            t.close()
        self._trackers = []


def _scalar(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.detach().float().item()
    return v


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(r) for r in path.read_text().splitlines() if r] if path.exists() else []


# ----------------------------------------------------------------------------- progress


class Progress:
    """Progress of a run (main process only): a rich bar with ETA and the latest metrics on a terminal;
    off a terminal (nohup, SLURM, CI) or with ``enabled=False``, one plain line per update
    (``sft step 20/100 | loss 0.412 1234 tok/s | 12s elapsed, eta 48s``), and a start and an end line."""

    def __init__(self, total: int, description: str, enabled: bool = True):
        import sys

        self._bar, self.total, self.description, self.t0 = None, total, description, time.perf_counter()
        self._plain = _is_main() and not (enabled and sys.stdout.isatty())
        if self._plain:
            say(f"{description}: {total} steps")
        if enabled and _is_main() and not self._plain:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress,
                                       TextColumn, TimeElapsedColumn, TimeRemainingColumn)

            self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                     TextColumn("{task.fields[info]}"), transient=False)
            self._task = self._bar.add_task(description, total=total, info="")
            self._bar.start()

    def update(self, completed: int, info: str = "") -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=completed, info=info)
        elif self._plain:
            dt = time.perf_counter() - self.t0
            eta = dt / max(completed, 1) * (self.total - completed)
            say(f"{self.description} step {completed}/{self.total} | {info} | {dt:.0f}s elapsed, eta {eta:.0f}s")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
        elif self._plain:
            say(f"{self.description}: finished in {time.perf_counter() - self.t0:.0f}s")


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


class TrainEngine:
    """Owns the accelerator, optimizer, scheduler and checkpoints of one trained model."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, total_steps: int, run_dir: Path,
                 name: str = "model"):
        from accelerate import Accelerator

        self.cfg, self.total_steps, self.run_dir, self.name = cfg, total_steps, Path(run_dir), name
        # cpu=True when there is no GPU: under torchrun this is what gives real gloo DDP (docs/architecture.md, DDP on CPU)
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                                       mixed_precision=cfg.mixed_precision)
        if cfg.gradient_checkpointing:
            if not getattr(model, "supports_gradient_checkpointing", True):
                raise TrainingError(f"{type(model).__name__} does not support gradient checkpointing",
                                    where="train.gradient_checkpointing", fix="set train.gradient_checkpointing=false")
            # non-reentrant: works with frozen inputs (LoRA) and passes the packed-attention kwargs through
            kwargs = {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.23's name
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
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
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
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
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

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
        local = torch.stack([count_fn(mb).float() for mb in micro_batches]).sum()
        total = self.accelerator.reduce(local.to(self.device), reduction="sum") if self.world_size > 1 else local
        total = total.clamp(min=1)
        sums: dict[str, torch.Tensor] = {}
        step_loss = torch.zeros(())
        for i, mb in enumerate(micro_batches):
            sync = i == len(micro_batches) - 1
            ctx = nullcontext() if sync or self.world_size == 1 else self.accelerator.no_sync(model)
            with ctx:
                with self.autocast():
                    loss, metrics = loss_fn(model, mb, total)
                self.accelerator.backward(loss * self.world_size)
            step_loss += loss.detach().float().cpu()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0) + v.detach().float()
        out = {k: v / len(micro_batches) for k, v in sums.items()}
        out["loss"] = step_loss  # micro-batch losses are sum/N, so they add up to this process's step loss
        params = [p for p in model.parameters() if p.requires_grad]
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm is not None else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
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
        if self.is_main:
            tmp = self.checkpoint_root / f".tmp-step-{self.step_count}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            model = self.unwrapped
            state = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
            save_file(state, str(tmp / f"{self.name}.safetensors"))
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                        "rng": rng_state()}, tmp / "trainer.pt")
            (tmp / "state.json").write_text(json.dumps({"step": self.step_count, "extra": extra or {}}))
            for f in tmp.iterdir():  # make the files durable before the rename publishes them
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
        meta = json.loads((path / "state.json").read_text())
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

