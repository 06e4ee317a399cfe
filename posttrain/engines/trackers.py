"""Experiment trackers a run mirrors its metrics to, besides metrics.jsonl (always written):
TensorBoard (default), Weights & Biases and MLflow, chosen by ``train.report_to``.

W&B and MLflow are optional packages (``pip install 'posttrain[wandb]'`` / ``'posttrain[mlflow]'``),
imported only when named. They follow their own environment variables: ``WANDB_PROJECT``,
``WANDB_MODE=offline`` (no network; ``wandb sync`` uploads later), ``MLFLOW_TRACKING_URI`` (default
``./mlruns``, a local file store), ``MLFLOW_EXPERIMENT_NAME``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from posttrain.config import check_trackers

def _finite(row: dict) -> dict[str, float]:
    return {k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _flat(config: Any, prefix: str = "") -> dict[str, Any]:
    """A config dataclass (or dict) as flat dotted keys -> short strings (tracker parameters)."""
    import dataclasses

    if dataclasses.is_dataclass(config):
        config = dataclasses.asdict(config)
    out: dict[str, Any] = {}
    for k, v in (config or {}).items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)[:250]
    return out


class TensorBoardTracker:
    def __init__(self, run_dir: Path, **_: Any):
        from torch.utils.tensorboard import SummaryWriter  # torch's; imported when a run logs

        self._writer = SummaryWriter(str(Path(run_dir) / "tb"))

    def log(self, step: int, row: dict) -> None:
        for k, v in _finite(row).items():
            self._writer.add_scalar(k, v, step)

    def close(self) -> None:
        self._writer.close()


class WandbTracker:
    def __init__(self, run_dir: Path, run_name: str, config: Any):
        import wandb  # optional package: config.check_trackers has already refused it when missing

        self._wandb = wandb
        self._run = wandb.init(project=os.environ.get("WANDB_PROJECT", "posttrain"), name=run_name,
                               dir=str(run_dir), config=_flat(config), reinit="finish_previous")

    def log(self, step: int, row: dict) -> None:
        self._run.log(_finite(row), step=step)

    def close(self) -> None:
        self._run.finish()


class MlflowTracker:
    def __init__(self, run_dir: Path, run_name: str, config: Any):
        import mlflow  # optional package: config.check_trackers has already refused it when missing

        self._mlflow = mlflow
        if os.environ.get("MLFLOW_EXPERIMENT_NAME") is None:
            mlflow.set_experiment("posttrain")
        self._run = mlflow.start_run(run_name=run_name)
        mlflow.log_params(_flat(config))
        mlflow.set_tag("run_dir", str(run_dir))

    def log(self, step: int, row: dict) -> None:
        values = _finite(row)
        if values:
            self._mlflow.log_metrics(values, step=step)

    def close(self) -> None:
        self._mlflow.end_run()


def make_trackers(names: list[str], run_dir: Path, run_name: str, config: Any) -> list:
    check_trackers(names)
    kinds = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}
    return [kinds[n](Path(run_dir), run_name=run_name, config=config) for n in dict.fromkeys(names)]
