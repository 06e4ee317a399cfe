"""Pipelines: stage references, validation of every stage before any runs, skip-on-rerun, resume."""

import json

import pytest
import yaml

from posttrain.config import load_config
from posttrain.errors import ConfigError
from posttrain.pipeline import PipelineConfig, run


def write(tmp_path, stages):
    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "stages": stages}))
    return str(f)


SFT = {"name": "sft", "command": "sft",
       "config": {"data": {"max_rows": 64, "eval": None}, "task_eval": False,
                  "train": {"max_steps": 2, "batch_size": 16, "micro_batch_size": 16, "progress": False}}}


def test_pipeline_runs_references_and_skips(tmp_path):
    collect = {"name": "prefs", "command": "collect",
               "config": {"model": {"name_or_path": "${sft.final}"}, "n_prompts": 6, "heldout_prompts": 4}}
    f = write(tmp_path, [SFT, collect])
    first = run(load_config(PipelineConfig, None, [f"file={f}"]))
    assert [s["stage"] for s in first["stages"]] == ["sft", "prefs"]
    assert not any(s.get("skipped") for s in first["stages"])
    rows = [json.loads(r) for r in (tmp_path / "run" / "prefs" / "train.jsonl").read_text().splitlines()]
    assert rows and {"prompt", "chosen", "rejected", "tie", "margin", "annotator"} <= set(rows[0])
    second = run(load_config(PipelineConfig, None, [f"file={f}"]))
    assert all(s["skipped"] for s in second["stages"])  # nothing re-run


def test_bad_stage_fails_before_anything_runs(tmp_path):
    bad = {"name": "dpo", "command": "sft", "config": {"train": {"lrr": 1}}}
    f = write(tmp_path, [SFT, bad])
    with pytest.raises(ConfigError, match="stage 'dpo'.*did you mean 'train.lr'"):
        run(load_config(PipelineConfig, None, [f"file={f}"]))
    assert not (tmp_path / "run" / "sft").exists()


def test_unknown_reference_and_command(tmp_path):
    ref = {"name": "x", "command": "sft", "config": {"model": {"name_or_path": "${nothere.final}"}}}
    with pytest.raises(ConfigError, match="not an earlier stage"):
        run(load_config(PipelineConfig, None, [f"file={write(tmp_path, [ref])}"]))
    cmd = {"name": "x", "command": "sfft"}
    with pytest.raises(ConfigError, match="unknown command 'sfft'"):
        run(load_config(PipelineConfig, None, [f"file={write(tmp_path, [cmd])}"]))
