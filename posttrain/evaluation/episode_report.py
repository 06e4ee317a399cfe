"""The multi-turn part of a pipeline report: for every RL stage that ran episodes (``rollout.environment``:
its ``metrics.jsonl`` logs ``episode/*``, or it left an ``episodes.jsonl``), its held-out result (the
initial and final ``accuracy`` of its own episode evaluation, the mean episode reward), its curves (held-out
accuracy at each evaluation, training reward, turns and tool calls per episode over RL steps) and one
episode of its final evaluation rendered as a conversation: roles, tool calls, tool outputs, reward.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from posttrain.engines.runlog import read_metrics
from posttrain.evaluation import plots

HEADING = "Multi-turn episodes"
# the curves of an episode run, each in its own panel, from its metrics.jsonl
EPISODE_CURVES = ("eval/accuracy", "reward/mean", "episode/turns", "episode/tool_calls", "episode/tool_errors")
CONVERSATION = ("turn", "role", "content", "tool calls")  # the columns of a sample episode
EPISODES_FILE = "episodes.jsonl"  # written by the held-out episode evaluation (posttrain.rollouts.task_eval)


def read_episodes(stage_dir: Path) -> list[dict]:
    """The episodes a run's latest held-out evaluation kept (``episodes.jsonl``); [] when none or unreadable."""
    path = Path(stage_dir) / EPISODES_FILE
    out = []
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("messages"), list):
                out.append(row)
    return out


def ran_episodes(stage_dir: Path, rows: list[dict]) -> bool:
    return (Path(stage_dir) / EPISODES_FILE).is_file() or any("episode/turns" in r for r in rows)


def pick_episode(episodes: list[dict]) -> tuple[dict | None, str]:
    """The episode to show and why it was chosen: the first that called a tool and was rewarded, else the
    first that called a tool, else the first."""
    for why, ok in (("the first kept episode that called a tool and was rewarded", lambda e: e.get("tool_calls")
                     and (e.get("reward") or 0) > 0),
                    ("the first kept episode that called a tool", lambda e: e.get("tool_calls")),
                    ("the first kept episode", lambda e: True)):
        for e in episodes:
            if ok(e):
                return e, why
    return None, ""


def _call_text(call: dict) -> str:
    fn = call.get("function", call) if isinstance(call, dict) else {}
    name, args = fn.get("name", ""), fn.get("arguments", {})
    if not name and isinstance(args, dict) and "raw" in args:  # not valid JSON: the model's own text
        return f"(malformed call) {args['raw']}"
    return f"{name}({json.dumps(args) if not isinstance(args, str) else args})"


def conversation_rows(messages: list[dict]) -> list[dict]:
    """One row per message: its role, its text and its tool calls as ``name({arguments})``."""
    rows = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            continue
        calls = m.get("tool_calls") or []
        rows.append({"turn": i, "role": str(m.get("role", "")), "content": str(m.get("content") or ""),
                     "tool calls": "\n".join(_call_text(c) for c in calls)})
    return rows


def _num(v) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "?"


def _read_summary(stage_dir: Path) -> dict:
    try:
        data = json.loads((Path(stage_dir) / "summary.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def stage_result(summary: dict) -> dict:
    """Initial and final held-out accuracy and tool calls per episode of an episode run's summary.json."""
    ini, fin = summary.get("initial") or {}, summary.get("final") or {}
    return {"initial_accuracy": ini.get("accuracy"), "final_accuracy": fin.get("accuracy"),
            "initial_tool_calls": ini.get("episode/tool_calls"), "final_tool_calls": fin.get("episode/tool_calls"),
            "rl_steps": summary.get("rl_steps")}


def add_multiturn(report, stages: list[dict], stage_dir: Callable[[dict], Path], curve_panels: Callable) -> dict:
    """The "Multi-turn episodes" section (and, per episode stage, its curves and a sample episode);
    returns ``{stage: stage_result}`` for the report's summary.json."""
    found = []
    for s in stages:
        d = stage_dir(s)
        rows = read_metrics(d) if (d / "metrics.jsonl").is_file() else []
        if ran_episodes(d, rows):
            found.append((s, d, rows))
    if not found:
        report.add_text(HEADING, "No stage ran multi-turn episodes (`rollout.environment`).")
        return {}
    lines, results, extra = [], {}, []
    for s, d, rows in found:
        res = results[s["stage"]] = stage_result(_read_summary(d))
        episode, why = pick_episode(read_episodes(d))
        lines.append(f"- **{s['stage']}** ({s['command']}): held-out accuracy (mean episode reward) "
                     f"{_num(res['initial_accuracy'])} before RL → {_num(res['final_accuracy'])} after "
                     f"{res['rl_steps'] or '?'} RL steps; tool calls per episode {_num(res['initial_tool_calls'])} → "
                     f"{_num(res['final_tool_calls'])}.")
        panels = curve_panels(rows, EPISODE_CURVES)
        if panels:
            extra.append(("image", f"Multi-turn curves: {s['stage']}", plots.panel_plot(
                panels, f"{s['stage']}: episodes", "RL step"),
                "eval/accuracy: held-out accuracy at each evaluation (step 0 = before RL); reward/mean, "
                "episode/*: the training episodes of each RL step"))
        if episode is not None:
            ans = (episode.get("row") or {}).get("answer")
            trunc = f", truncated ({episode['truncated']})" if episode.get("truncated") else ""
            convo = conversation_rows(episode["messages"]) + [
                {"turn": "", "role": "reward", "content": _num(episode.get("reward")), "tool calls": ""}]
            extra.append(("table", f"Sample episode: {s['stage']}", convo,
                          f"From the last held-out evaluation (step {episode.get('step', '?')}), {why}: reward "
                          f"{_num(episode.get('reward'))}{f' (expected answer {ans})' if ans is not None else ''}, "
                          f"{episode.get('turns', '?')} turns, {episode.get('tool_calls', '?')} tool calls, "
                          f"{episode.get('tool_errors', 0)} tool errors{trunc}; more in "
                          f"{s['stage']}/{EPISODES_FILE}"))
    report.add_text(HEADING, "RL stages that ran multi-turn episodes (`rollout.environment`); accuracy is the "
                    "mean reward of the run's own held-out episodes (step 0: before RL).\n\n" + "\n".join(lines))
    for kind, heading, data, caption in extra:
        if kind == "image":
            report.add_image(heading, data, caption=caption)
        else:
            report.add_table(heading, CONVERSATION, [[r[c] for c in CONVERSATION] for r in data], caption=caption)
    return results
