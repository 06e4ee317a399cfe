"""The report of a ``posttrain loop`` directory: per round the labels by source, the reward model's
held-out accuracy, the policy's gold reward with its interval and its difference to the SFT model, and
the judges' agreement with people; the curves of gold reward against labels bought (the loop's
label-efficiency curve) and of reward-model accuracy per round; and the selection of each round."""

from __future__ import annotations

import json
from pathlib import Path

from posttrain.evaluation import plots
from posttrain.evaluation.report import Report


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def is_loop(run_dir: Path) -> bool:
    return (run_dir / "loop.json").is_file() and (run_dir / "labels.jsonl").is_file()


def _ci(v, ci) -> str:
    return f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if v is not None and ci else ("-" if v is None else f"{v:.3f}")


def loop_report(run_dir: Path, title: str) -> tuple[Report, dict]:
    summary = _json(run_dir / "summary.json")
    rounds = summary.get("rounds", [])
    cfg = _json(run_dir / "loop.json").get("config", {})
    report = Report(title)
    report.add_text("The loop", f"`{cfg.get('name', 'loop')}`: {len(rounds)} round(s) from `{cfg.get('sft')}`, "
                    f"{cfg.get('labels_per_round')} pairs chosen per round by `{cfg.get('selection', {}).get('rule')}`, "
                    f"policy update `{cfg.get('policy_command')}`, {summary.get('labels', 0)} labels in all "
                    f"(`labels.jsonl`). Lineage of any model: `posttrain lineage {run_dir}/round-N/policy`.")
    sources = sorted({s for r in rounds for s in r.get("labels", {})})
    rows, total, points, rm_acc = [], 0, [], []
    base = _json(run_dir / "round-0" / "eval" / "eval.json").get("policies", {}).get("sft", {})
    if "gold_reward" in base:
        points.append((0, base["gold_reward"]))
    for r in rounds:
        n = sum(r.get("labels", {}).values())
        total += n
        pd = r.get("gold_vs_sft") or {}
        rows.append([r["round"], *(r.get("labels", {}).get(s, 0) for s in sources), total,
                     r.get("rm_accuracy", "-"), _ci(r.get("gold_reward"), r.get("gold_ci")),
                     f"{pd['diff']:+.3f} [{pd['lo']:+.3f}, {pd['hi']:+.3f}]" if pd else "-"])
        if "gold_reward" in r:
            points.append((total, r["gold_reward"]))
        if "rm_accuracy" in r:
            rm_acc.append((r["round"], r["rm_accuracy"]))
    report.add_table("Rounds", ["round", *(f"labels: {s}" for s in sources), "labels so far", "RM held-out accuracy",
                                "gold reward [95% CI]", "gold − SFT [95% CI]"], rows,
                     caption="Gold reward: the built-in task's hidden reward on held-out prompts (posttrain eval); "
                             "RM accuracy on gold-labelled held-out pairs of the SFT model.")
    if len(points) >= 2:
        report.add_image("Gold reward against labels bought", plots.line_plot(
            {"policy": ([p[0] for p in points], [p[1] for p in points])}, "gold reward vs labels", "labels bought",
            "gold reward"), caption="The loop's label-efficiency curve; benchmarks/label_efficiency.py compares "
                                    "selection rules on it.")
    if len(rm_acc) >= 2:
        report.add_image("Reward-model accuracy per round", plots.line_plot(
            {"reward model": ([p[0] for p in rm_acc], [p[1] for p in rm_acc])}, "reward model", "round",
            "held-out accuracy"))
    cal = [(r["round"], j, c) for r in rounds for j, c in (r.get("calibration") or {}).items()]
    if cal:
        report.add_table("Judges against people", ["round", "judge", "pairs", "agreement [95% CI]", "kappa",
                                                   "swap inconsistency"],
                         [[r, j, c["pairs"], _ci(c.get("agreement"), c.get("agreement_ci")), c.get("kappa", "-"),
                           c.get("swap_inconsistency", "-")] for r, j, c in cal])
    sel = []
    for r in rounds:
        s = _json(run_dir / f"round-{r['round']}" / "selection.json")
        if s:
            sel.append([r["round"], s.get("applied"), s.get("fallback") or "-", len(s.get("chosen", [])),
                        len(s.get("passed_over", []))])
    if sel:
        report.add_table("Selection", ["round", "rule applied", "fallback", "chosen", "passed over"], sel,
                         caption="Every candidate's score is in round-N/selection.json.")
    return report, {"kind": "loop", "rounds": rounds, "labels": summary.get("labels", 0)}
