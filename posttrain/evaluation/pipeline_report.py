"""``posttrain report RUN_DIR``: the report (``report.html``, ``report.md``, ``summary.json``) of any
run directory, rebuilt from what the commands left on disk. What the directory holds decides the
report (the first match wins):

- ``pipeline.json``: a pipeline or demo run; every stage's ``metrics.jsonl`` and ``summary.json``
  and the evaluation stage's ``eval.json``. Sections (ids are fixed so tests and readers can find
  them): stages, training curves, reward vs KL frontier, reward model, win rates, samples, multi-turn
  episodes (curves and a sample conversation of each stage that ran episodes; episode_report.py).
- ``eval.json``: one ``posttrain eval`` output: policies, reward vs KL, win rates and paired
  tests, samples.
- ``eval_reward.json``: one ``posttrain eval-reward`` output: accuracy, length baseline,
  calibration, subsets.
- ``metrics.jsonl``, ``summary.json`` or ``config.yaml``: one command's run (a training run):
  its training curves (one panel per metric), its summary and its config.

``summary.json`` of a single run belongs to the command that wrote it: the report keeps its
content and adds its own under the ``report`` key.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.config import opt
from posttrain.engines.runlog import read_metrics
from posttrain.errors import ConfigError
from posttrain.evaluation import plots
from posttrain.evaluation.episode_report import add_multiturn
from posttrain.evaluation.loop_report import is_loop, loop_report
from posttrain.evaluation.report import Report, paired_p
from posttrain.tasks import builtin

SECTIONS = ("Stages", "Training curves", "Reward vs KL frontier", "Reward model", "Win rates", "Samples",
            "Multi-turn episodes")
EVAL_SECTIONS = ("Evaluation", "Reward vs KL frontier", "Policies", "Win rates", "Samples")
RUN_SECTIONS = ("Run", "Training curves", "Summary")
RL_COMMANDS = ("ppo", "grpo", "rloo", "reinforce")
# Metrics drawn as training curves, each in its own panel, when a run logs them (at least two finite
# points); a run that logs none of them gets its first few logged metrics instead.
CURVE_METRICS = ("train/loss", "eval/loss", "reward/mean", "train/rewards/margin", "train/accuracy", "kl",
                 "entropy", "eval/gold_reward", "eval/accuracy")
MAX_FALLBACK_PANELS = 4
LOOKED_FOR = ("loop.json with labels.jsonl (posttrain loop), pipeline.json (a pipeline or demo run), eval.json "
              "(posttrain eval), eval_reward.json "
              "(posttrain eval-reward), or metrics.jsonl, summary.json or config.yaml (one command's run, "
              "e.g. a training run)")


@dataclass
class ReportConfig:
    run_dir: str = opt("", "Run directory: a pipeline (pipeline.json), a `posttrain eval` output (eval.json), "
                       "a `posttrain eval-reward` output (eval_reward.json) or one training run (metrics.jsonl, "
                       "summary.json, config.yaml).")
    title: str = opt("posttrain report", "Report title.")

    def validate(self) -> None:
        if not self.run_dir:
            raise ConfigError("no run directory given", where="run_dir", fix="posttrain report RUN_DIR")


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path.name} is not valid JSON ({e})", where=str(path),
                          fix="re-run the command that wrote it, or remove the file") from None
    return data if isinstance(data, dict) else {}


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


def run_kind(run_dir: Path) -> str:
    """``"loop"``, ``"pipeline"``, ``"eval"``, ``"eval-reward"`` or ``"run"`` from the files ``run_dir`` holds;
    a one-paragraph ConfigError naming what it looked for when it holds none of them."""
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is not a directory, so there is no run to report on", where="run_dir",
                          fix=f"posttrain report RUN_DIR, where RUN_DIR holds {LOOKED_FOR}")
    if is_loop(run_dir):
        return "loop"
    for name, kind in (("pipeline.json", "pipeline"), ("eval.json", "eval"), ("eval_reward.json", "eval-reward")):
        if (run_dir / name).is_file():
            return kind
    if any((run_dir / n).is_file() for n in ("metrics.jsonl", "summary.json", "config.yaml")):
        return "run"
    raise ConfigError(f"{run_dir} is not a run directory posttrain report can read: it looked for "
                      f"{LOOKED_FOR} and found none of them", where="run_dir",
                      fix="point at the output directory of a posttrain command or pipeline (the folder that "
                          "holds those files, not its parent or a checkpoint inside it)")


# ----------------------------------------------------------------------------- training curves


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def curve_panels(rows: list[dict], metrics: tuple[str, ...] = CURVE_METRICS, min_points: int = 2) -> dict:
    """``{metric: {metric: (steps, values)}}`` for each metric in ``metrics`` that ``rows`` (a
    ``metrics.jsonl``) logs at ``min_points`` finite values or more, in ``metrics`` order; the
    inner key (the curve's label) is the metric's own name. When none qualifies, the first
    ``MAX_FALLBACK_PANELS`` logged metrics that do (timings ``*_s``, the learning rate and the
    step excluded)."""
    def panel(key: str):
        pts = [(r["step"], r[key]) for r in rows if "step" in r and _finite(r.get(key))]
        return (key, {key: ([p[0] for p in pts], [p[1] for p in pts])}) if len(pts) >= min_points else None

    found = dict(p for p in map(panel, metrics) if p)
    if not found:
        keys = dict.fromkeys(k for r in rows for k in r
                             if k != "step" and not k.endswith("_s") and not k.endswith("/lr"))
        found = dict([p for p in map(panel, keys) if p][:MAX_FALLBACK_PANELS])
    return found


def _add_curves(report: Report, heading: str, rows: list[dict], title: str) -> bool:
    panels = curve_panels(rows)
    if panels:
        report.add_image(heading, plots.panel_plot(panels, title, "optimizer step"),
                         caption="one panel per metric, named by its key in metrics.jsonl")
    return bool(panels)


# ----------------------------------------------------------------------------- evaluation sections


def _frontier_panels(ev: dict) -> dict:
    """Gold and proxy reward against sqrt(KL to the reference), each in its own panel."""
    pols = ev.get("policies", {})

    def sqrt_kl(r):
        return r.get("kl", 0.0) ** 0.5 if r.get("kl", 0) > 0 else 0.0

    gold = {name: [(sqrt_kl(r), r["gold_reward"])] for name, r in pols.items() if "gold_reward" in r}
    proxy = {name: [(sqrt_kl(r), r["proxy_reward"])] for name, r in pols.items() if "proxy_reward" in r}
    for name, trace in ev.get("overopt", {}).items():
        if trace:
            gold[f"{name} (training checkpoints)"] = [(p["sqrt_kl"], p["gold"]) for p in trace]
        if trace and "proxy" in trace[0]:
            proxy[f"{name} (training checkpoints)"] = [(p["sqrt_kl"], p["proxy"]) for p in trace]
    if ev.get("best_of_n"):
        gold["best-of-N"] = [(p["sqrt_kl"], p["gold"]) for p in ev["best_of_n"]]
        proxy["best-of-N"] = [(p["sqrt_kl"], p["proxy"]) for p in ev["best_of_n"]]
    return {k: v for k, v in (("gold reward", gold), ("proxy reward (reward model)", proxy)) if v}


def _paired_key(v: dict) -> tuple[str, str] | None:
    """The paired test a comparison shows: the gold reward's, else the reward model's."""
    if "gold_paired" in v:
        return "gold_paired", "gold"
    if "proxy_paired" in v:
        return "proxy_paired", "RM score"
    return None


def _add_policies(report: Report, ev: dict, empty: str = "No evaluation with gold or proxy rewards.") -> None:
    """Reward vs KL frontier (gold and proxy in separate panels) and the per-policy table."""
    pols = ev.get("policies", {})
    panels = _frontier_panels(ev)
    if panels:
        report.add_image("Reward vs KL frontier", plots.panel_plot(
            panels, "reward vs sqrt(KL to the reference)", "sqrt(KL)", kind="frontier"),
            caption="points and their Pareto frontier; gold and proxy reward in separate panels")
    else:
        report.add_text("Reward vs KL frontier", empty)
    if pols:
        report.add_table("Policies", ["policy", "gold reward", "95% CI", "accuracy", "proxy reward", "KL",
                                      "length"],
                         [[n, r.get("gold_reward"), "[{:.3f}, {:.3f}]".format(*r["gold_ci"]) if "gold_ci" in r else "",
                           r.get("accuracy"), r.get("proxy_reward"), r.get("kl"), r.get("length_mean")]
                          for n, r in pols.items()])


def _add_win_rates(report: Report, ev: dict) -> None:
    """Win-rate bars and the table of win rates and paired tests against the baseline."""
    pols = ev.get("policies", {})
    vs = [(n, r["vs_baseline"]) for n, r in pols.items() if "vs_baseline" in r]
    if vs:
        report.add_image("Win rates", plots.bar_with_ci([n for n, _ in vs], [v["win_rate"] for _, v in vs],
                                                        [v["ci"][0] for _, v in vs], [v["ci"][1] for _, v in vs],
                                                        f"win rate vs {ev.get('baseline')} (judge: {ev.get('judge')})",
                                                        "win rate", ref=0.5))
        rows, measured = [], set()
        for n, v in vs:
            key = _paired_key(v)
            pd = v.get(key[0], {}) if key else {}
            if key:
                measured.add(key[1])
            rows.append([n, v["win_rate"], "[{:.3f}, {:.3f}]".format(*v["ci"]), v.get("lc_win_rate"),
                         f"{v['wins']}/{v['ties']}/{v['losses']}", pd.get("diff"),
                         "[{:.3f}, {:.3f}]".format(pd["lo"], pd["hi"]) if pd else "",
                         paired_p(pd, ev.get("bootstrap"))])
        what = " / ".join(sorted(measured)) or "gold"
        b = ev.get("bootstrap")
        report.add_table("Win rates and paired tests", ["policy", "win rate", "95% CI", "LC win rate", "W/T/L",
                                                        f"{what} diff", "diff 95% CI", "p"], rows,
                         caption=f"p: one-sided paired-bootstrap p-value for \"policy > {ev.get('baseline')}\" on "
                                 f"the {what} difference, from B{f' = {b}' if b else ''} resamples; \"< 1/B\" "
                                 f"(e.g. < 0.001 for B = 1000) when no resample favoured the baseline: the "
                                 f"estimate k/B is then 0, which only says p < 1/B.")
    else:
        report.add_text("Win rates", "No policies compared against a baseline.")


def _add_samples(report: Report, ev: dict) -> None:
    pols = ev.get("policies", {})
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


def _eval_summary(ev: dict) -> dict:
    pols = ev.get("policies", {})
    return {"eval": {k: v for k, v in ev.items() if k != "policies"},
            "policies": {n: {k: v for k, v in r.items() if k != "samples"} for n, r in pols.items()}}


# ----------------------------------------------------------------------------- one report per kind


def _stage_dir(run_dir: Path, stage: dict) -> Path:
    """A stage's directory as recorded, or under ``run_dir`` when the run was moved or the report
    runs from another working directory."""
    d = Path(stage["dir"])
    return d if d.exists() or not (run_dir / stage["stage"]).exists() else run_dir / stage["stage"]


def _pipeline_report(run_dir: Path, title: str) -> tuple[Report, dict]:
    pipeline = _read_json(run_dir / "pipeline.json")
    stages = pipeline.get("stages", [])
    report = Report(title)
    rows = []
    for s in stages:
        summary = _read_json(_stage_dir(run_dir, s) / "summary.json") or s.get("summary", {})
        rows.append([s["stage"], s["command"], s.get("seconds", ""), _key_metrics(s["command"], summary)])
    report.add_table("Stages", ["stage", "command", "seconds", "key metrics"], rows,
                     caption=f"total {sum(float(s.get('seconds') or 0) for s in stages):.0f} s")

    # ---- training curves: one figure per stage, one panel per metric
    curves = [(s, m) for s in stages if (m := _metrics(_stage_dir(run_dir, s)))]
    curves = [(s, m) for s, m in curves if curve_panels(m)]
    if curves:
        report.add_text("Training curves", "One figure per training stage below, one panel per metric; each "
                        "panel is named by the metric's key in the stage's `metrics.jsonl`.")
        for s, m in curves:
            _add_curves(report, f"Training curves: {s['stage']}", m,
                        s["stage"] if s["stage"] == s["command"] else f"{s['stage']} ({s['command']})")
    else:
        report.add_text("Training curves", "No stage logged training metrics.")

    # ---- evaluation
    ev_stage = next((s for s in stages if s["command"] == "eval"), None)
    ev = _read_json(_stage_dir(run_dir, ev_stage) / "eval.json") if ev_stage else {}
    _add_policies(report, ev, "No evaluation stage with gold rewards.")

    # ---- reward model
    rm = next((s for s in stages if s["command"] == "reward"), None)
    rm_dir = _stage_dir(run_dir, rm) if rm else None
    rm_summary = _read_json(rm_dir / "summary.json") if rm_dir else {}
    rm_eval = rm_summary.get("final", {})  # held-out pairs, scored after training
    if rm_eval:
        report.add_table("Reward model", ["metric", "value"],
                         [[k, v] for k, v in rm_eval.items() if isinstance(v, (int, float))])
        cal = _read_json(rm_dir / "calibration.json")
        if cal.get("probs"):
            report.add_image("Reward model calibration", plots.calibration_plot(cal["probs"], cal["labels"]))
    else:
        report.add_text("Reward model", "No reward-model stage.")

    _add_win_rates(report, ev)
    _add_samples(report, ev)
    multiturn = add_multiturn(report, stages, lambda s: _stage_dir(run_dir, s), curve_panels)  # episode_report.py
    return report, {"pipeline": pipeline, **_eval_summary(ev), **({"multiturn": multiturn} if multiturn else {})}


def _eval_report(run_dir: Path, title: str) -> tuple[Report, dict]:
    ev = _read_json(run_dir / "eval.json")
    report = Report(title)
    b = ev.get("bootstrap")
    report.add_text("Evaluation", f"`posttrain eval` of {len(ev.get('policies', {}))} policies on "
                    f"{ev.get('n_prompts', '?')} held-out prompts x {ev.get('samples', '?')} samples; win rates "
                    f"judged by **{ev.get('judge', '?')}** against the baseline **{ev.get('baseline', '?')}**; "
                    f"95% intervals from {b if b else 'B'} bootstrap resamples over prompts.")
    _add_policies(report, ev)
    _add_win_rates(report, ev)
    _add_samples(report, ev)
    own = {k: v for k, v in _read_json(run_dir / "summary.json").items() if k != "report"}
    return report, own or _eval_summary(ev)


def _eval_reward_report(run_dir: Path, title: str) -> tuple[Report, dict]:
    ev = _read_json(run_dir / "eval_reward.json")
    report = Report(title)
    report.add_text("Evaluation", f"`posttrain eval-reward` of the reward model `{ev.get('model', '?')}` on "
                    f"`{ev.get('data', '?')}`: {ev.get('pairs', 0)} pairs ({ev.get('ties', 0)} ties left out).")
    report.add_table("Reward model", ["metric", "value"],
                     [[k, v] for k, v in ev.items() if _finite(v) and k not in ("records",)])
    subsets = ev.get("subsets") or {}
    if subsets:
        report.add_table("Reward model by subset", ["subset", "n", "accuracy", "longer wins"],
                         [[n, s.get("n"), s.get("accuracy"), s.get("length_baseline")] for n, s in subsets.items()])
    own = {k: v for k, v in _read_json(run_dir / "summary.json").items() if k != "report"}
    return report, own


def _flat(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _flat(v, f"{prefix}{k}.")
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out.append((f"{prefix}{k}", v))
    return out


def _run_report(run_dir: Path, title: str) -> tuple[Report, dict]:
    summary = {k: v for k, v in _read_json(run_dir / "summary.json").items() if k != "report"}
    config_text = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").is_file() else ""
    command = ""
    if config_text:
        import yaml

        try:
            command = str((yaml.safe_load(config_text) or {}).get("command") or "")
        except (yaml.YAMLError, AttributeError):
            command = ""
    rows = read_metrics(run_dir)
    report = Report(title)
    steps = [r["step"] for r in rows if _finite(r.get("step"))]
    report.add_table("Run", ["item", "value"], [
        ["directory", str(run_dir)], ["command", command or "(no config.yaml)"],
        ["metrics.jsonl rows", len(rows)], ["last step", max(steps) if steps else ""],
        ["key metrics", _key_metrics(command, summary)]])
    if not _add_curves(report, "Training curves", rows, f"{command or run_dir.name}: training curves"):
        report.add_text("Training curves", "No training curves: metrics.jsonl is missing or logs no metric at "
                        "two steps or more.")
    if summary:
        scalars = [(k, v) for k, v in summary.items() if not isinstance(v, (dict, list))]
        if scalars:
            report.add_table("Summary", ["key", "value"], [list(x) for x in scalars])
        else:
            report.add_text("Summary", "summary.json, by part:")
        for part, v in summary.items():
            if isinstance(v, dict) and (flat := _flat(v)):
                report.add_table(f"Summary: {part}", ["metric", "value"], [list(x) for x in flat])
    else:
        report.add_text("Summary", "No summary.json (the run did not finish, or the command writes none).")
    if config_text:  # shown verbatim (escaped, in a fence longer than any backtick run in it)
        report.add_samples("Config", [{"config.yaml": config_text.rstrip()}])
    return report, summary


def build_report(run_dir: Path, title: str = "posttrain report") -> tuple[Report, dict]:
    """The report of ``run_dir`` (see the module docstring for what each kind of directory gets)
    and the summary dict that goes into its summary.json."""
    run_dir = Path(run_dir)
    kind = run_kind(run_dir)
    build = {"pipeline": _pipeline_report, "eval": _eval_report, "eval-reward": _eval_reward_report,
             "run": _run_report, "loop": loop_report}[kind]
    return build(run_dir, title)


def run(cfg: ReportConfig) -> dict:
    run_dir = Path(cfg.run_dir)
    report, summary = build_report(run_dir, cfg.title)
    paths = report.write(run_dir, summary=summary)
    kind = {"pipeline": "a pipeline run", "eval": "a posttrain eval output", "eval-reward": "a posttrain eval-reward "
            "output", "run": "a single run", "loop": "a posttrain loop"}[run_kind(run_dir)]
    print(f"report of {run_dir} ({kind}):")
    for kind in ("html", "md", "json"):
        print(f"  {paths[kind]}")
    return {"run_dir": str(run_dir), "report": str(paths.get("html", run_dir / "report.html")),
            "markdown": str(paths["md"]), "summary": str(paths["json"])}
