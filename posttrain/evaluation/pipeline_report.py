"""``posttrain report RUN_DIR``: the report of a pipeline run (``report.html``, ``report.md``,
``summary.json``), rebuilt from what the stages left on disk: ``pipeline.json``, each stage's
``metrics.jsonl`` and ``summary.json``, and the evaluation's ``eval.json``.

Sections (ids are fixed so tests and readers can find them): stages, training curves, reward vs
KL frontier, reward model, win rates, samples.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from posttrain.config import opt
from posttrain.engines.train import read_metrics
from posttrain.errors import ConfigError
from posttrain.evaluation import plots
from posttrain.evaluation.report import Report
from posttrain.tasks import builtin

SECTIONS = ("Stages", "Training curves", "Reward vs KL frontier", "Reward model", "Win rates", "Samples")
RL_COMMANDS = ("ppo", "grpo", "rloo", "reinforce")
CURVES = {  # plot title -> metric keys tried in order (the first a stage logs is used)
    "Training curves": ("train/loss",),
    "Training curves: reward": ("reward/mean", "train/rewards/margin", "train/accuracy"),
    "Training curves: KL": ("kl", "train/kl"),
    "Training curves: entropy": ("entropy", "train/entropy"),
}


@dataclass
class ReportConfig:
    run_dir: str = opt("", "Pipeline run directory (holds pipeline.json).")
    title: str = opt("posttrain report", "Report title.")

    def validate(self) -> None:
        if not self.run_dir:
            raise ConfigError("no run directory given", where="run_dir", fix="posttrain report RUN_DIR")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _metrics(stage_dir: Path) -> list[dict]:
    return read_metrics(stage_dir)


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _key_metrics(command: str, summary: dict) -> str:
    """A few headline numbers per stage for the stage table."""
    keys = {"sft": ("final.gold_reward", "final.accuracy", "final.loss"),
            "collect": ("labels", "ties", "label_gold_agreement"),
            "reward": ("final.accuracy", "final.length_baseline", "final.ece")}.get(command, ())
    keys = keys or ("final.gold_reward", "final.accuracy", "final.kl", "eval.accuracy")
    out = []
    for k in keys:
        v = summary
        for part in k.split("."):
            v = v.get(part) if isinstance(v, dict) else None
        if v is not None:
            out.append(f"{k.split('.')[-1]}={_fmt(v)}")
    return ", ".join(out)


def build_report(run_dir: Path, title: str = "posttrain report"):
    pipeline = _read_json(run_dir / "pipeline.json")
    if not pipeline:
        raise ConfigError(f"{run_dir} has no pipeline.json", where=str(run_dir),
                          fix="point at a pipeline's run directory (posttrain pipeline / posttrain demo)")
    stages = pipeline["stages"]
    report = Report(title)
    rows = []
    for s in stages:
        summary = _read_json(Path(s["dir"]) / "summary.json") or s.get("summary", {})
        rows.append([s["stage"], s["command"], s.get("seconds", ""), _key_metrics(s["command"], summary)])
    report.add_table("Stages", ["stage", "command", "seconds", "key metrics"], rows,
                     caption=f"total {sum(float(s.get('seconds') or 0) for s in stages):.0f} s")

    # ---- training curves
    for heading, keys in CURVES.items():
        series = {}
        for s in stages:
            m = _metrics(Path(s["dir"]))
            key = next((k for k in keys if any(k in r for r in m)), None)
            if key:
                pts = [(r["step"], r[key]) for r in m if key in r]
                series[f"{s['stage']} ({key})"] = ([p[0] for p in pts], [p[1] for p in pts])
        if series:
            report.add_image(heading, plots.line_plot(series, heading, "optimizer step", ", ".join(keys[:1])))
        elif heading == "Training curves":
            report.add_text(heading, "No stage logged training metrics.")

    # ---- evaluation
    ev_stage = next((s for s in stages if s["command"] == "eval"), None)
    ev = _read_json(Path(ev_stage["dir"]) / "eval.json") if ev_stage else {}
    pols = ev.get("policies", {})
    points = {name: [(r.get("kl", 0.0) ** 0.5 if r.get("kl", 0) > 0 else 0.0, r["gold_reward"])]
              for name, r in pols.items() if "gold_reward" in r}
    for name, trace in ev.get("overopt", {}).items():
        points[f"{name} (gold, training)"] = [(p["sqrt_kl"], p["gold"]) for p in trace]
        if trace and "proxy" in trace[0]:
            points[f"{name} (proxy, training)"] = [(p["sqrt_kl"], p["proxy"]) for p in trace]
    if ev.get("best_of_n"):
        points["best-of-N (gold)"] = [(p["sqrt_kl"], p["gold"]) for p in ev["best_of_n"]]
        points["best-of-N (proxy)"] = [(p["sqrt_kl"], p["proxy"]) for p in ev["best_of_n"]]
    if points:
        report.add_image("Reward vs KL frontier", plots.scatter_frontier(
            points, "gold / proxy reward vs sqrt(KL to the reference)", "sqrt(KL)", "reward"))
    else:
        report.add_text("Reward vs KL frontier", "No evaluation stage with gold rewards.")
    if pols:
        report.add_table("Policies", ["policy", "gold reward", "95% CI", "accuracy", "proxy reward", "KL",
                                      "length"],
                         [[n, r.get("gold_reward"), "[{:.3f}, {:.3f}]".format(*r["gold_ci"]) if "gold_ci" in r else "",
                           r.get("accuracy"), r.get("proxy_reward"), r.get("kl"), r.get("length_mean")]
                          for n, r in pols.items()])

    # ---- reward model
    rm = next((s for s in stages if s["command"] == "reward"), None)
    rm_summary = _read_json(Path(rm["dir"]) / "summary.json") if rm else {}
    rm_eval = rm_summary.get("final", {})  # held-out pairs, scored after training
    if rm_eval:
        report.add_table("Reward model", ["metric", "value"],
                         [[k, v] for k, v in rm_eval.items() if isinstance(v, (int, float))])
        cal = _read_json(Path(rm["dir"]) / "calibration.json")
        if cal.get("probs"):
            report.add_image("Reward model calibration", plots.calibration_plot(cal["probs"], cal["labels"]))
    else:
        report.add_text("Reward model", "No reward-model stage.")

    # ---- win rates
    vs = [(n, r["vs_baseline"]) for n, r in pols.items() if "vs_baseline" in r]
    if vs:
        report.add_image("Win rates", plots.bar_with_ci([n for n, _ in vs], [v["win_rate"] for _, v in vs],
                                                        [v["ci"][0] for _, v in vs], [v["ci"][1] for _, v in vs],
                                                        f"win rate vs {ev.get('baseline')} (judge: {ev.get('judge')})",
                                                        "win rate", ref=0.5))
        report.add_table("Win rates and paired tests", ["policy", "win rate", "95% CI", "LC win rate", "W/T/L",
                                                        "gold diff", "diff 95% CI", "p"],
                         [[n, v["win_rate"], "[{:.3f}, {:.3f}]".format(*v["ci"]), v.get("lc_win_rate"),
                           f"{v['wins']}/{v['ties']}/{v['losses']}",
                           v.get("gold_paired", {}).get("diff"),
                           "[{:.3f}, {:.3f}]".format(v["gold_paired"]["lo"], v["gold_paired"]["hi"]) if "gold_paired" in v else "",
                           v.get("gold_paired", {}).get("p_value")] for n, v in vs])
    else:
        report.add_text("Win rates", "No policies compared against a baseline.")

    # ---- samples
    samples = []
    for name, r in pols.items():
        for smp in r.get("samples", [])[:3]:
            row = {"policy": name, "prompt": smp["prompt"], "response": smp["response"]}
            if ev.get("n_prompts") and smp["prompt"]:
                if builtin.parse_prompt(smp["prompt"]):
                    row["gold"] = round(builtin.gold_reward(smp["prompt"], smp["response"]), 3)
            samples.append(row)
    if samples:
        report.add_samples("Samples", samples)
    else:
        report.add_text("Samples", "No samples.")
    return report, {"pipeline": pipeline, "eval": {k: v for k, v in ev.items() if k != "policies"},
                    "policies": {n: {k: v for k, v in r.items() if k != "samples"} for n, r in pols.items()}}


def run(cfg: ReportConfig) -> dict:
    run_dir = Path(cfg.run_dir)
    report, summary = build_report(run_dir, cfg.title)
    paths = report.write(run_dir, summary=summary)
    return {"run_dir": str(run_dir), "report": str(paths.get("html", run_dir / "report.html"))}
