"""``posttrain demo``: the whole RLHF pipeline on the built-in task and the tiny model.

SFT → sample response pairs from the SFT policy → labels from simulated annotators (Bradley–Terry on
the hidden gold reward, three reliabilities) → reward model → PPO (against the reward model), GRPO
(verifiable reward) and DPO (on the labels), each from the same SFT model → evaluation; then multi-turn
tool use (SFT on calculator conversations, GRPO on episodes with the calculator) → report.
The stages live in ``posttrain/pipelines/demo.yaml``; ``--quick`` applies its ``quick:`` section
(smaller, for CI). Finished stages are skipped when the demo runs again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from posttrain.config import merge_tree, opt, read_yaml
from posttrain.evaluation.evaluate import format_summary
from posttrain.pipeline import run_spec

SPEC = Path(__file__).parent / "pipelines" / "demo.yaml"


@dataclass
class DemoConfig:
    quick: bool = opt(False, "Smaller stages (CI): ~2.5 minutes instead of ~4 on 2 cores.")
    output_dir: str = opt("runs/demo", "Run directory ('-quick' is appended in quick mode).")
    force: list[str] = opt([], "Re-run these stages even if finished.")


def demo_spec(quick: bool) -> dict:
    spec = read_yaml(SPEC)
    overrides = spec.pop("quick", {})
    if quick:
        for stage in spec["stages"]:
            over = overrides.get(stage["name"])
            if over:
                stage["config"] = merge_tree(stage.get("config") or {}, over)
    return spec


def run(cfg: DemoConfig) -> dict:
    from rich.console import Console


    console = Console()
    run_dir = Path(cfg.output_dir + ("-quick" if cfg.quick else ""))
    spec = demo_spec(cfg.quick)
    n = len(spec["stages"])
    names = [s["name"] for s in spec["stages"]]

    def on_stage(name: str, command: str) -> None:
        console.rule(f"[bold]stage {names.index(name) + 1}/{n}: {name}[/] ({command})")

    summary = run_spec(spec, run_dir, str(SPEC), force=cfg.force, on_stage=on_stage)
    _print_results(console, run_dir, summary)
    return summary


def _print_results(console, run_dir: Path, summary: dict) -> None:
    from rich.table import Table

    t = Table(title="stages")
    for col in ("stage", "command", "seconds"):
        t.add_column(col)
    for s in summary["stages"]:
        t.add_row(s["stage"], s["command"], f"{s.get('seconds', 0):.0f}" + (" (done before)" if s.get("skipped") else ""))
    console.print(t)
    ev_path = next((Path(s["dir"]) / "eval.json" for s in summary["stages"] if s["command"] == "eval"), None)
    if ev_path and ev_path.exists():  # the same table `posttrain eval` prints, as the run's last word
        console.print(format_summary(json.loads(ev_path.read_text())), markup=False, highlight=False)
    if line := multiturn_line(summary):
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    report = run_dir / "report.html"
    if report.exists():
        console.print(f"report: {report}")


def multiturn_line(summary: dict) -> str:
    """The multi-turn result in one line: held-out episode accuracy of the tool-use SFT model (the GRPO run's
    initial evaluation) -> after GRPO with the tool, from each episode stage's summary.json."""
    out = []
    for s in summary["stages"]:
        path = Path(s["dir"]) / "summary.json"
        res = json.loads(path.read_text()) if s["command"] == "grpo" and path.exists() else {}
        ini, fin = res.get("initial") or {}, res.get("final") or {}
        if "episode/turns" in fin and "accuracy" in ini and "accuracy" in fin:
            out.append(f"multi-turn ({s['stage']}): held-out accuracy {ini['accuracy']:.3f} (SFT) -> "
                       f"{fin['accuracy']:.3f} (GRPO with tools), {fin.get('episode/tool_calls', 0):.2f} tool "
                       f"calls per episode")
    return "\n".join(out)
