"""The closed loop with simulated annotators: two rounds, lineage asserted label by label, a SIGKILL
mid-round resumed without losing or duplicating a label, and an annotator's labels removed with one
command (the rounds they touched re-train, the later round re-samples)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from posttrain.config import load_config
from posttrain.loop import lineage
from posttrain.loop.config import LoopConfig
from posttrain.loop.rounds import run

SMALL = {"train": {"epochs": 2, "progress": False, "batch_size": 8, "micro_batch_size": 8}}


def _config(tmp_path: Path, sft: str, **extra) -> Path:
    cfg = {"name": "t", "run_dir": str(tmp_path / "loop"), "rounds": 2, "sft": sft, "prompts_per_round": 32,
           "labels_per_round": 24, "reward": SMALL, "policy": {**SMALL, "task_eval": False},
           "eval": {"n_prompts": 16, "samples": 2}, "heldout_prompts": 40,
           "sources": [{"kind": "simulated", "share": 3}, {"kind": "judge", "reward": "builtin_gold", "share": 1}],
           **extra}
    path = tmp_path / "loop.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _labels(root: Path) -> list[dict]:
    return [json.loads(x) for x in (root / "labels.jsonl").read_text().splitlines()]


def _chosen(root: Path, r: int) -> set[str]:
    return set(json.loads((root / f"round-{r}" / "selection.json").read_text())["chosen"])


def test_two_rounds_with_lineage_and_an_annotator_removed(sft_policy, tmp_path):
    path = _config(tmp_path, sft_policy)
    s = run(load_config(LoopConfig, path))
    root = tmp_path / "loop"
    labels = _labels(root)
    assert len({x["label_id"] for x in labels}) == len(labels)  # each label stored once
    assert {x["source"] for x in labels} == {"simulated", "judge"}
    c0, c1 = _chosen(root, 0), _chosen(root, 1)
    rm1 = json.loads((root / "round-1" / "reward" / "lineage.json").read_text())
    assert sorted(rm1["label_ids"]) == sorted(x["label_id"] for x in labels if x["pair_id"] in c0 | c1)
    pol1 = json.loads((root / "round-1" / "policy" / "lineage.json").read_text())
    assert sorted(pol1["label_ids"]) == sorted(x["label_id"] for x in labels if x["pair_id"] in c1
                                               and x["choice"] != "tie")
    assert pol1["candidates_model"] == str(root / "round-0" / "policy" / "final")
    chain = lineage.chain(root / "round-1" / "policy" / "final")
    assert [c.get("round") for c in chain] == [1, 0, None] and chain[-1]["model"] == sft_policy
    assert all("gold_reward" in r and "rm_accuracy" in r for r in s["rounds"])
    sel = json.loads((root / "round-1" / "selection.json").read_text())
    assert len(sel["chosen"]) + len(sel["passed_over"]) == len((root / "round-1" / "pairs.jsonl").read_text().splitlines())

    # one command removes the "hasty" annotator: round 0 re-trains without its labels, round 1 re-samples
    before = {x["label_id"] for x in labels if x["round"] == 0}
    run(load_config(LoopConfig, path, ["exclude_annotators=[hasty]"]))
    assert (root / "round-1.superseded-1" / "pairs.jsonl").exists()
    for r in (0, 1):
        for stage in ("reward", "policy"):
            rec = json.loads((root / f"round-{r}" / stage / "lineage.json").read_text())
            assert "hasty" not in rec["per_annotator"] and rec["excluded_annotators"] == ["hasty"]
    assert {x["label_id"] for x in _labels(root) if x["round"] == 0} == before  # round 0 was not labelled again


def test_a_killed_loop_resumes_without_losing_or_repeating_labels(sft_policy, tmp_path):
    path = _config(tmp_path, sft_policy, sources=[{"kind": "simulated"}])
    root = tmp_path / "loop"
    proc = subprocess.Popen([sys.executable, "-m", "posttrain.cli", "loop", str(path)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    stage = root / "round-0" / "policy" / "stage.json"
    deadline = time.time() + 300
    while not stage.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)  # mid-round: labels collected, reward model trained, the policy training
    proc.wait()
    assert stage.exists()
    labels = _labels(root)
    run(load_config(LoopConfig, path))
    after = _labels(root)
    assert after[:len(labels)] == labels and len({x["label_id"] for x in after}) == len(after)
    assert {x["label_id"] for x in after if x["round"] == 0} == {x["label_id"] for x in labels}
    assert (root / "round-1" / "policy" / "lineage.json").exists()
