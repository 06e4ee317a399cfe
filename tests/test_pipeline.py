"""Pipelines: stage references, validation of every stage before any runs, skip-on-rerun by fingerprint, the
console line per stage, re-runs of changed stages and their dependents, force, resume."""

import json
import os
import shutil

import pytest
import yaml

from posttrain.config import load_config
from posttrain.errors import ConfigError
from posttrain.pipeline import PipelineConfig, load_stages, run


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


# ----------------------------------------------------------------------------- fingerprints: skip, re-run, resume

PREFS = {"name": "prefs", "command": "collect",
         "config": {"model": {"name_or_path": "${sft.final}"}, "n_prompts": 6, "heldout_prompts": 4}}
BASE = {**SFT, "name": "base"}  # reads nothing of sft: independent of it


def stage_lines(capsys):
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith("stage ")]


def go(f, *overrides):
    return run(load_config(PipelineConfig, None, [f"file={f}", *overrides]))


def with_train(stage, **train):
    return {**stage, "config": {**stage["config"], "train": {**stage["config"]["train"], **train}}}


def test_rerun_skips_unchanged_stages_and_says_so(tmp_path, capsys):
    f = write(tmp_path, [SFT, PREFS, BASE])
    go(f)
    assert stage_lines(capsys) == ["stage sft: run (not run before)", "stage prefs: run (not run before)",
                                   "stage base: run (not run before)"]
    record = json.loads((tmp_path / "run" / "sft" / "stage.json").read_text())
    assert record["status"] == "finished" and len(record["fingerprint"]) == 64
    assert record["config"]["train.lr"] == 1e-3 and record["config"]["train.output_dir"] == "${run_dir}/sft"
    prefs = json.loads((tmp_path / "run" / "prefs" / "stage.json").read_text())
    assert prefs["inputs"] == {"sft": record["run_id"]}  # prefs reads sft/final
    assert json.loads((tmp_path / "run" / "base" / "stage.json").read_text())["inputs"] == {}

    second = go(f)
    assert all(s["skipped"] for s in second["stages"])
    assert stage_lines(capsys) == [f"stage {n}: skip (finished, config unchanged)" for n in ("sft", "prefs", "base")]

    # a run directory from before stage.json: compared with the config.yaml the command wrote
    for name in ("sft", "prefs"):
        (tmp_path / "run" / name / "stage.json").unlink()
    assert all(s["skipped"] for s in go(f)["stages"])
    assert stage_lines(capsys)[:2] == [
        "stage sft: skip (finished, config unchanged)",
        "stage prefs: skip (finished; no fingerprint or config.yaml to compare; force=prefs re-runs it)"]


def test_changed_config_reruns_the_stage_and_what_depends_on_it(tmp_path, capsys):
    f = write(tmp_path, [SFT, PREFS, BASE])
    go(f)
    old_sft = (tmp_path / "run" / "sft" / "final" / "model.safetensors").read_bytes()
    capsys.readouterr()
    write(tmp_path, [with_train(SFT, lr=5e-4), PREFS, BASE])
    second = go(f)
    assert [s.get("skipped", False) for s in second["stages"]] == [False, False, True]
    assert "lr: 0.0005" in (tmp_path / "run" / "sft" / "config.yaml").read_text()
    assert stage_lines(capsys) == ["stage sft: run (config changed: train.lr 0.001 -> 0.0005)",
                                   "stage prefs: run (an input changed: sft)",
                                   "stage base: skip (finished, config unchanged)"]
    assert (tmp_path / "run" / "sft" / "final" / "model.safetensors").read_bytes() != old_sft
    go(f)
    lines = stage_lines(capsys)
    assert len(lines) == 3 and all(line.endswith("skip (finished, config unchanged)") for line in lines)

    write(tmp_path, [with_train(SFT, lr=5e-4, max_steps=3, seed=1, warmup_ratio=0.0, log_every=1), PREFS, BASE])
    go(f)  # at most three changed keys are named
    assert stage_lines(capsys)[0] == ("stage sft: run (config changed: train.seed 0 -> 1, train.max_steps 2 -> 3, "
                                      "train.warmup_ratio 0.1 -> 0.0 and 1 more)")


def test_force_reruns_a_stage_and_its_dependents(tmp_path, capsys):
    f = write(tmp_path, [SFT, PREFS, BASE])
    go(f)
    capsys.readouterr()
    second = go(f, "force=[sft]")
    assert [s.get("skipped", False) for s in second["stages"]] == [False, False, True]
    assert stage_lines(capsys) == ["stage sft: run (forced)", "stage prefs: run (an input changed: sft)",
                                   "stage base: skip (finished, config unchanged)"]
    go(f, "force=prefs")
    assert stage_lines(capsys) == ["stage sft: skip (finished, config unchanged)", "stage prefs: run (forced)",
                                   "stage base: skip (finished, config unchanged)"]
    with pytest.raises(ConfigError, match="'sfft' is not a stage of this pipeline"):
        go(f, "force=[sfft]")


def test_interrupted_stage_resumes_from_its_newest_checkpoint(tmp_path, capsys):
    sft = with_train(SFT, save_every=1, keep_checkpoints=5)
    f = write(tmp_path, [sft, PREFS])
    go(f)
    d = tmp_path / "run" / "sft"

    def interrupt():  # as if killed after step 1: no DONE, no final model, no step-2
        for p in (d / "DONE", d / "final", d / "checkpoints" / "step-2"):
            shutil.rmtree(p) if p.is_dir() else p.unlink()

    interrupt()
    capsys.readouterr()
    go(f)
    assert stage_lines(capsys) == ["stage sft: resume from step 1", "stage prefs: run (an input changed: sft)"]
    assert (d / "DONE").exists() and (d / "final").exists()
    interrupt()
    write(tmp_path, [with_train(sft, lr=5e-4), PREFS])  # a changed config does not resume the old run
    go(f)
    assert stage_lines(capsys)[0] == "stage sft: run (config changed: train.lr 0.001 -> 0.0005)"


def test_changed_data_file_reruns_the_stage(tmp_path, capsys):
    from posttrain.tasks.builtin import sft_records

    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sft_records(64)))
    sft = {**SFT, "config": {**SFT["config"], "data": {"train": str(data), "eval": None}}}
    f = write(tmp_path, [sft])
    go(f)
    data.write_text("".join(json.dumps(r) + "\n" for r in sft_records(64, seed=1)))
    capsys.readouterr()
    go(f)
    assert stage_lines(capsys) == [f"stage sft: run (a data file changed: {data})"]


def test_dependencies_from_references_literal_paths_and_the_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    literal = {"name": "lit", "command": "collect",  # a path written out, not a ${sft.final} reference
               "config": {"model": {"name_or_path": str(run_dir / "sft" / "final")}}}
    relative = {"name": "rel", "command": "reward",  # written relative to the working directory
                "config": {"data": {"train": os.path.relpath(run_dir / "prefs" / "train.jsonl")}}}
    report = {"name": "report", "command": "report", "config": {"run_dir": "${run_dir}"}}
    spec = {"stages": [SFT, PREFS, BASE, literal, relative, report]}
    deps = {s.name: s.deps for s, _ in load_stages(spec, run_dir, "test")}
    assert deps == {"sft": [], "prefs": ["sft"], "base": [], "lit": ["sft"], "rel": ["prefs"],
                    "report": ["sft", "prefs", "base", "lit", "rel"]}
    with pytest.raises(ConfigError, match="unknown key 'confg' in stage 'x'.*did you mean 'config'"):
        load_stages({"stages": [{"name": "x", "command": "sft", "confg": {}}]}, run_dir, "test")
