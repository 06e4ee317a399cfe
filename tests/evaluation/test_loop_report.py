"""The report of a loop directory: rounds table, label-efficiency curve, judges against people, selection."""

import json

from posttrain.evaluation.loop_report import is_loop, loop_report


def test_loop_report_from_a_hand_made_loop(tmp_path):
    d = tmp_path / "loop"
    (d / "round-0" / "eval").mkdir(parents=True)
    (d / "round-1").mkdir()
    (d / "loop.json").write_text(json.dumps({"config": {"name": "x", "sft": "sft/final", "labels_per_round": 4,
                                                        "selection": {"rule": "rm_uncertainty"}, "policy_command": "dpo"}}))
    (d / "labels.jsonl").write_text("")
    (d / "round-0" / "eval" / "eval.json").write_text(json.dumps({"policies": {"sft": {"gold_reward": 0.60}}}))
    for r in (0, 1):
        (d / f"round-{r}" / "selection.json").write_text(json.dumps(
            {"applied": "random" if r == 0 else "rm_uncertainty", "fallback": "no reward model yet" if r == 0 else None,
             "chosen": ["a", "b"], "passed_over": ["c"]}))
    rounds = [{"round": r, "labels": {"people": 3, "judge": 1}, "rm_accuracy": 0.6 + 0.1 * r,
               "gold_reward": 0.65 + 0.05 * r, "gold_ci": [0.6, 0.7 + 0.05 * r],
               "gold_vs_sft": {"diff": 0.05 * (r + 1), "lo": 0.01, "hi": 0.09 + 0.05 * r},
               "calibration": {"judge": {"pairs": 2, "agreement": 0.5, "agreement_ci": [0.0, 1.0], "kappa": 0.0,
                                         "swap_inconsistency": 0.25}}} for r in (0, 1)]
    (d / "summary.json").write_text(json.dumps({"rounds": rounds, "labels": 8}))
    assert is_loop(d) and not is_loop(tmp_path)
    report, summary = loop_report(d, "loop x")
    md = report.to_markdown()
    assert "| 1 | 1 | 3 | 8 | 0.7 | 0.700 [0.600, 0.750] | +0.100 [+0.010, +0.140] |" in md
    assert "Gold reward against labels bought" in md and "Reward-model accuracy per round" in md
    assert "| 0 | judge | 2 | 0.500 [0.000, 1.000] | 0 | 0.25 |" in md
    assert "| 0 | random | no reward model yet | 2 | 1 |" in md
    assert summary == {"kind": "loop", "rounds": rounds, "labels": 8}


def test_posttrain_report_recognises_a_loop_directory(tmp_path):
    from posttrain.evaluation.pipeline_report import build_report, run_kind

    d = tmp_path / "loop"
    d.mkdir()
    (d / "loop.json").write_text(json.dumps({"config": {"name": "x"}}))
    (d / "labels.jsonl").write_text("")
    (d / "summary.json").write_text(json.dumps({"rounds": [], "labels": 0}))
    assert run_kind(d) == "loop" and build_report(d)[1]["kind"] == "loop"
