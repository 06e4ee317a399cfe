"""What every training loop composes (functions, not a base class): throughput, the held-out loss,
the end-of-step checkpoint / evaluation / logging, the end of a run, the final save and summary.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from posttrain.config import LoraConfig, TrainConfig
from posttrain.data.batching import collate, to_device
from posttrain.models.loading import save_pretrained


class Throughput:
    """Items per second since construction (wall clock)."""

    def __init__(self):
        self.t0, self.n = time.perf_counter(), 0

    def add(self, n: int) -> None:
        self.n += n

    def rate(self) -> float:
        return self.n / max(time.perf_counter() - self.t0, 1e-9)


@torch.no_grad()
def eval_loss(engine, examples, loss_fn, count_fn, pad_id, packing, micro) -> dict[str, float]:
    """Held-out loss and metrics, weighted exactly like training (sum / total count)."""
    if not examples:
        return {}
    model = engine.unwrapped  # not the DDP wrapper: only the main process evaluates
    model.eval()
    device = next(model.parameters()).device
    batches = [to_device(collate(examples[s:s + micro], packing=packing, pad_id=pad_id), device)
               for s in range(0, len(examples), micro)]
    total = torch.stack([count_fn(b) for b in batches]).sum().clamp(min=1)
    loss, sums = 0.0, {}
    for b in batches:
        with engine.autocast():
            l, m = loss_fn(model, b, total)
        loss += l.float()
        w = count_fn(b) / total
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + v.float() * w
    out = {k: float(v) for k, v in sums.items()}
    out["loss"] = float(loss)
    return out


def save_final(engine, tokenizer, run_dir: Path, lora: LoraConfig | None = None) -> Path:
    """The trained model in Hugging Face format under ``run_dir/final``."""
    return save_pretrained(engine.unwrapped, tokenizer, Path(run_dir) / "final",
                           merge_lora=bool(lora and lora.enabled and lora.merge_on_save))


def write_summary(run_dir: Path, summary: dict) -> None:
    (Path(run_dir) / "summary.json").write_text(json.dumps(summary, indent=2, default=float))


def _eval_row(metrics: dict, flatten) -> dict:
    return {f"eval/{k}": v for k, v in (flatten(metrics) if flatten else metrics).items()}


def between_steps(engine, train, step: int, total: int, evaluate, logger, state: dict, flatten=None) -> None:
    """Periodic work after optimizer step ``step``: a held-out evaluation every ``train.eval_every``
    steps (main process; the last step is evaluated by ``finish``) and a checkpoint every
    ``train.save_every`` steps carrying ``state`` (what resuming needs besides the engine's own)."""
    if train.eval_every and step % train.eval_every == 0 and step < total:
        with engine.gathered():
            if engine.is_main and (row := _eval_row(evaluate(), flatten)):
                logger.log(step, row)
    if train.save_every and step % train.save_every == 0:
        engine.save_checkpoint(state)


def finish(engine, logger, run_dir: Path, summary: dict, evaluate, step: int, save, flatten=None) -> dict:
    """End of a training run: on the main process the final held-out evaluation, ``save()`` (the
    model into final/) and summary.json; then every process waits for it."""
    with engine.gathered():  # under FSDP the main process works on the all-gathered model
        if engine.is_main:
            summary["final"] = evaluate()
            if row := _eval_row(summary["final"], flatten):
                logger.log(step, row)
            save()
            write_summary(run_dir, summary)
            print(results_text(run_dir, summary, flatten), flush=True)
    logger.close()
    engine.accelerator.wait_for_everyone()
    summary["run_dir"] = str(run_dir)
    return summary


def initial_eval(engine, logger, summary: dict, evaluate, flatten=None) -> None:
    """Before the first step of a fresh run: evaluate once and log it at step 0 (main process only)."""
    if engine.step_count == 0:
        with engine.gathered():
            if engine.is_main:
                summary["initial"] = evaluate()
                logger.log(0, _eval_row(summary["initial"], flatten))


def record_steps(engine, train: TrainConfig, total: int, micro_batches, loss_fn, count_fn, logger, progress,
                 evaluate, *, rate_key: str, describe, flatten=None) -> float:
    """The loop of the offline preference commands (reward, dpo, kto): micro-batches of records ->
    ``engine.step`` -> log every ``train.log_every`` steps (``train/<metric>`` and ``rate_key`` records
    per second) -> checkpoint and evaluate when due. ``describe(row)`` is the progress text. Returns
    the records-per-second rate."""
    clock = Throughput()
    while engine.step_count < total:
        batches = micro_batches(engine.step_count)
        metrics = engine.step(batches, loss_fn, count_fn)
        clock.add(sum(int(b["n_records"]) for b in batches) * engine.world_size)
        step = engine.step_count
        if step % train.log_every == 0 or step == total:
            row = {f"train/{k}": v for k, v in metrics.items()}
            row[rate_key] = clock.rate()
            logger.log(step, row)
            progress.update(step, describe(row))
        between_steps(engine, train, step, total, evaluate, logger, {"data_step": step}, flatten)
    progress.close()
    return clock.rate()


def results_text(run_dir: Path, summary: dict, flatten=None) -> str:
    """The end of a training run for the console: held-out metrics before -> after, and where the files are."""
    before, after = _eval_row(summary.get("initial") or {}, flatten), _eval_row(summary.get("final") or {}, flatten)
    lines = [f"results in {run_dir}:"]
    for key, value in after.items():
        if isinstance(value, (int, float)):
            was = before.get(key)
            lines.append(f"  {key:<28} {was:>10.4f} -> {value:.4f}" if isinstance(was, (int, float))
                         else f"  {key:<28} {value:>10.4f}")
    if len(lines) == 1:
        lines.append("  no held-out evaluation (no held-out data)")
    for name in ("final", "metrics.jsonl", "summary.json"):
        if (run_dir / name).exists():
            lines.append(f"  {name:<14} {run_dir / name}")
    return "\n".join(lines)


class TrainEngineAutocast:
    """The autocast context the engine will use, available before the engine exists (the reference
    pass runs before the policy is loaded)."""

    def __init__(self, train: TrainConfig):
        self.mp = train.mixed_precision

    def __call__(self):
        from contextlib import nullcontext

        if self.mp == "no":
            return nullcontext()
        dtype = torch.bfloat16 if self.mp == "bf16" else torch.float16
        return torch.autocast("cpu" if not torch.cuda.is_available() else "cuda", dtype=dtype)
