"""What a training run writes as it goes: metrics.jsonl (mirrored to the trackers), the progress line or
bar, and the one-line messages of the main process."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from posttrain.engines.trackers import check_trackers, make_trackers


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def say(line: str) -> None:
    """One plain line for the person running the command (main process only), flushed at once so
    it reaches a log file under nohup or SLURM."""
    if is_main_process():
        print(line, flush=True)



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
        self._plain = is_main_process() and not (enabled and sys.stdout.isatty())
        if self._plain:
            say(f"{description}: {total} steps")
        if enabled and is_main_process() and not self._plain:
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
