"""train.report_to mirrors metrics.jsonl to TensorBoard, Weights & Biases (offline mode) and MLflow (a local
file store), nothing sent over the network: TensorBoard's and MLflow's numbers are read back (the same at the
same steps); W&B's offline run file is checked to exist."""

import json

import pytest

from posttrain.config import load_config
from posttrain.errors import ConfigError


def test_metrics_reach_tensorboard_wandb_and_mlflow_offline(tmp_path, monkeypatch):
    import mlflow
    import wandb

    from posttrain.algorithms.sft import SFTConfig, run

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    (tmp_path / "wandb").mkdir()
    out = tmp_path / "run"
    try:
        run(load_config(SFTConfig, None, [
            f"train.output_dir={out}", "train.max_steps=3", "train.batch_size=8", "train.micro_batch_size=8",
            "train.log_every=1", "train.progress=false", "task_eval_prompts=4", "task_eval_samples=1",
            "train.report_to=[tensorboard, wandb, mlflow]"]))
    finally:
        wandb.teardown()  # stop the wandb service process this test started
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
    assert sorted(losses) == [1, 2, 3]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(out / "tb"))
    tb.Reload()
    assert {e.step: e.value for e in tb.Scalars("train/loss")} == pytest.approx(losses, rel=1e-6)
    assert list(out.glob("wandb/offline-run-*/run-*.wandb"))  # wandb.init(dir=run_dir), offline
    client = mlflow.tracking.MlflowClient()
    (exp,) = [e for e in client.search_experiments() if e.name == "posttrain"]
    (mrun,) = client.search_runs([exp.experiment_id])
    history = {m.step: m.value for m in client.get_metric_history(mrun.info.run_id, "train/loss")}
    assert history == pytest.approx(losses, rel=1e-6)
    assert mrun.data.params["train.max_steps"] == "3" and mrun.data.tags["run_dir"] == str(out)


def test_unknown_tracker_is_refused_before_anything_runs():
    from posttrain.algorithms.sft import SFTConfig

    with pytest.raises(ConfigError, match="unknown tracker"):
        load_config(SFTConfig, None, ["train.report_to=[tensorboard, comet]"])
