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
from pt_helpers import run_cli

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
    printed = run_cli("lineage", str(root / "round-1" / "policy" / "final"), "ids=true")  # the command users type
    assert printed.returncode == 0, printed.stderr
    out = printed.stdout
    assert "policy of round 1 (iterative DPO)" in out and "policy of round 0" in out, out
    assert f"{sft_policy}  (the starting model: no lineage)" in out
    assert all(x["label_id"] in out for x in labels if x["pair_id"] in c1 and x["choice"] != "tie")  # ids=true
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


def test_active_rules_score_every_candidate_and_record_what_they_passed_over(sft_policy, tmp_path):
    path = _config(tmp_path, sft_policy, sources=[{"kind": "simulated"}], eval=None, heldout_prompts=0,
                   selection={"rule": "rm_uncertainty", "ensemble": 2, "max_per_prompt": 1})
    run(load_config(LoopConfig, path))
    root = tmp_path / "loop"
    s0 = json.loads((root / "round-0" / "selection.json").read_text())
    assert s0["applied"] == "random" and "no reward model yet" in s0["fallback"]
    s1 = json.loads((root / "round-1" / "selection.json").read_text())
    pairs = [json.loads(x) for x in (root / "round-1" / "pairs.jsonl").read_text().splitlines()]
    assert s1["applied"] == "rm_uncertainty" and len(s1["reward_models"]) == 2
    assert set(s1["scores"]) == {p["pair_id"] for p in pairs}
    worst_chosen = min(s1["scores"][i] for i in s1["chosen"])
    prompt_of = {p["pair_id"]: p["prompt"] for p in pairs}
    taken = {prompt_of[i] for i in s1["chosen"]}
    # every pair passed over scored lower, or its prompt already had its one pair
    assert all(s1["scores"][i] <= worst_chosen or prompt_of[i] in taken for i in s1["passed_over"])
    boot = json.loads((root / "round-1" / "reward_e1" / "lineage.json").read_text())
    assert boot["labels"] == len(json.loads((root / "round-1" / "reward" / "lineage.json").read_text())["label_ids"])
    assert boot["distinct_labels"] < boot["labels"]  # a bootstrap resample repeats some labels

    path = _config(tmp_path, sft_policy, sources=[{"kind": "simulated"}], eval=None, heldout_prompts=0, rounds=1,
                   labels_per_round=12,
                   run_dir=str(tmp_path / "margin"), selection={"rule": "policy_margin"})
    run(load_config(LoopConfig, path))
    sm = json.loads((tmp_path / "margin" / "round-0" / "selection.json").read_text())
    assert sm["applied"] == "policy_margin" and max(sm["scores"][i] for i in sm["chosen"]) <= min(
        sm["scores"][i] for i in sm["passed_over"])


def test_a_judge_is_calibrated_against_people_and_its_unsure_pairs_go_to_them(sft_policy, tmp_path):
    """The SFT model as a pairwise LLM judge (logprob mode, both orders) next to simulated people: half
    of the people's pairs are judged too, agreement and swap inconsistency are reported per round, and
    every pair the judge was unsure of is labelled by people as well."""
    small = {"train": {**SMALL["train"], "batch_size": 4, "micro_batch_size": 4}}
    path = _config(tmp_path, sft_policy, rounds=1, eval=None, heldout_prompts=0, prompts_per_round=16,
                   labels_per_round=12, calibrate=0.5, route_unsure=0.1, reward=small, policy=small,
                   sources=[{"kind": "simulated", "name": "people"},
                            {"kind": "llm_judge", "name": "judge", "backend": f"hf:{sft_policy}", "logprobs": True}])
    s = run(load_config(LoopConfig, path))
    rd = tmp_path / "loop" / "round-0"
    dealt = json.loads((rd / "requests.json").read_text())
    assert set(dealt["judge"]) & set(dealt["people"])  # the calibration pairs
    labels = _labels(tmp_path / "loop")
    judged = {x["pair_id"]: x for x in labels if x["source"] == "judge"}
    unsure = {i for i, x in judged.items() if i in dealt["judge"] and i not in dealt["people"] and (
        x["choice"] == "tie" or x["consistent"] is False or abs(x["prob_a"] - 0.5) < 0.1)}
    routed = set(json.loads((rd / "routed.json").read_text())["people"])
    assert routed == unsure and routed <= {x["pair_id"] for x in labels if x["source"] == "people"}
    cal = s["rounds"][0]["calibration"]["judge"]
    both = set(judged) & {x["pair_id"] for x in labels if x["source"] == "people"}
    assert cal["pairs"] == len(both) > 0 and 0 <= cal["agreement_ci"][0] <= cal["agreement"] <= cal["agreement_ci"][1]
    assert cal["swap_pairs"] == len(judged) and 0 <= cal["swap_inconsistency"] <= 1
