"""What the evaluation commands tell the user: the console summary of `posttrain eval` and
`posttrain eval-reward`, p-values that never read 0, `posttrain report` on any run directory, and
training-curve figures with one axis per metric."""

import json
import re
from pathlib import Path

import pytest

from posttrain.errors import ConfigError
from posttrain.evaluation import pipeline_report, plots
from posttrain.evaluation import stats as S
from posttrain.evaluation import report as R
from posttrain.evaluation.report import parse_report_sections, slugify


def _p_cells(md: str, table_heading: str) -> dict[str, str]:
    """policy -> the last cell ("p") of each row of a report.md table."""
    part = md.split(f"## {table_heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [r for r in part.splitlines() if r.startswith("| ") and not r.startswith("| policy")]
    return {r.split("|")[1].strip(): r.rstrip(" |").split("|")[-1].strip() for r in rows}


def _eval_json(baseline="sft", p_value=0.0, n_boot=1000) -> dict:
    paired = {"diff": 0.1, "lo": 0.05, "hi": 0.15, "p_value": p_value, "n": 8}
    if n_boot:
        paired.update(n_boot=n_boot, p_value_is_bound=p_value == 0)
    vs = {"win_rate": 0.6, "ci": [0.55, 0.65], "wins": 5, "ties": 2, "losses": 1, "lc_win_rate": 0.58,
          "gold_paired": paired, "proxy_paired": dict(paired, diff=0.7, lo=0.5, hi=0.9)}
    sample = [{"prompt": "Sort the numbers 3 1 2.", "response": "1 2 3"}]
    return {"baseline": baseline, "judge": "gold", "n_prompts": 8, "samples": 2, "bootstrap": n_boot,
            "policies": {
                baseline: {"path": "a", "kl": 0.0, "kl_se": 0.0, "gold_reward": 0.7, "gold_ci": [0.6, 0.8],
                           "accuracy": 0.6, "proxy_reward": 1.0, "length_mean": 9.0, "samples": sample},
                "ppo": {"path": "b", "kl": 0.4, "kl_se": 0.05, "gold_reward": 0.8, "gold_ci": [0.7, 0.9],
                        "accuracy": 0.7, "proxy_reward": 1.7, "length_mean": 8.0, "samples": sample,
                        "vs_baseline": vs}}}


# ----------------------------------------------------------------------------- p-values


def test_p_value_with_no_exceedance_is_a_bound_not_zero():
    r = S.paired_bootstrap([1, 2, 3], [0, 1, 2], n_boot=1000)  # every resample favours a: k = 0
    assert r["p_value"] == 0.0 and r["p_value_is_bound"] is True and r["n_boot"] == 1000
    assert R.paired_p(r) == "< 0.001"
    assert R.format_p(0.0, 1000) == "< 0.001"
    assert R.format_p(0.0, 2000) == "< 0.0005"
    assert R.format_p(0.0, 3000) == "< 0.00034"  # 1/B rounded up, never down
    assert R.format_p(0.0) == "< 1/B"  # B not recorded (an eval.json from before B was stored)
    assert R.format_p(0.25, 1000) == "0.250" and R.format_p(0.002, 1000) == "0.002"
    assert R.format_p(None) == ""
    r = S.paired_bootstrap([0, 1, 2], [1, 2, 3], n_boot=500)
    assert r["p_value"] == 1.0 and r["p_value_is_bound"] is False and R.paired_p(r) == "1.000"
    for p, b in ((0.0, 1000), (0.0, 200), (0.0, None), (1e-9, 100)):
        assert not re.fullmatch(r"0(\.0*)?", R.format_p(p, b))


def test_eval_summary_prints_p_bound():
    from posttrain.evaluation.evaluate import format_summary

    text = format_summary(_eval_json(), {"eval.json": Path("/x/eval.json")})
    row = next(line for line in text.splitlines() if line.strip().startswith("ppo "))
    assert row.rstrip().endswith("< 0.001"), row
    assert "+0.100 [+0.050, +0.150]" in row and "0.600 [0.550, 0.650]" in row and "0.400 ± 0.050" in row
    legacy = _eval_json(n_boot=None)  # written before B was recorded
    row = next(line for line in format_summary(legacy).splitlines() if line.strip().startswith("ppo "))
    assert row.rstrip().endswith("< 1/B"), row


# ----------------------------------------------------------------------------- console


def test_eval_prints_a_summary_table(tiny_path, tmp_path, capsys):
    from posttrain.evaluation.evaluate import EvalConfig, run

    out = tmp_path / "ev"
    res = run(EvalConfig(policies={"sft": tiny_path, "again": tiny_path}, baseline="sft", n_prompts=4, samples=2,
                         max_new_tokens=8, bootstrap=200, output_dir=str(out)))
    text = capsys.readouterr().out
    for header in ("policy", "gold reward [95% CI]", "accuracy", "KL", "win rate vs sft [95% CI]",
                   "gold diff [95% CI]", "p"):
        assert header in text, text
    r, vs = res["policies"]["again"], res["policies"]["again"]["vs_baseline"]
    row = next(line for line in text.splitlines() if line.strip().startswith("again "))
    assert f"{r['gold_reward']:.3f} [{r['gold_ci'][0]:.3f}, {r['gold_ci'][1]:.3f}]" in row
    assert f"{vs['win_rate']:.3f} [{vs['ci'][0]:.3f}, {vs['ci'][1]:.3f}]" in row
    assert row.rstrip().endswith(R.paired_p(vs["gold_paired"])), row
    assert next(line for line in text.splitlines() if line.strip().startswith("sft ")).count("baseline") == 1
    assert str(out / "eval.json") in text and str(out / "summary.json") in text
    saved = json.loads((out / "eval.json").read_text())
    assert saved["bootstrap"] == 200 and saved["policies"]["again"]["vs_baseline"]["gold_paired"]["n_boot"] == 200


def test_eval_win_rates_by_a_reward_model_and_by_an_llm_judge(tiny_path, tmp_path):
    """judge=rm: a response beats the baseline's when the reward model scores it higher (the same samples
    scored again here give the same wins, ties and losses); judge=llm:hf:PATH: a local model judges every
    pair in both orders (a disagreement or an unreadable verdict is a tie)."""
    from transformers import AutoModelForSequenceClassification

    from posttrain.evaluation.evaluate import EvalConfig, run
    from posttrain.models.loading import load_tokenizer
    from posttrain.rewards.reward_model import RewardModelScorer
    from pt_helpers import noisy_copy

    rm = tmp_path / "rm"  # an untrained head saved with the checkpoint
    AutoModelForSequenceClassification.from_pretrained(tiny_path, num_labels=1).save_pretrained(rm)
    load_tokenizer(tiny_path).save_pretrained(rm)
    other = noisy_copy(tiny_path, tmp_path / "other")  # a second policy
    common = dict(policies={"sft": tiny_path, "other": str(other)}, baseline="sft", n_prompts=6, samples=1,
                  max_new_tokens=8, bootstrap=100)
    res = run(EvalConfig(**common, judge="rm", reward_model=str(rm), output_dir=str(tmp_path / "rm-judged")))
    texts = {n: [x["response"] for x in res["policies"][n]["samples"]] for n in ("sft", "other")}
    prompts = [x["prompt"] for x in res["policies"]["sft"]["samples"]]
    a, b = (RewardModelScorer(str(rm)).score(prompts, texts[n]) for n in ("other", "sft"))
    vs = res["policies"]["other"]["vs_baseline"]
    assert (vs["wins"], vs["ties"], vs["losses"]) == (sum(x > y for x, y in zip(a, b)), sum(x == y for x, y in
                                                      zip(a, b)), sum(x < y for x, y in zip(a, b)))
    assert len(prompts) == 6 and vs["ties"] < 6  # the two policies wrote different responses
    res = run(EvalConfig(**common, judge=f"llm:hf:{tiny_path}", output_dir=str(tmp_path / "llm-judged")))
    vs = res["policies"]["other"]["vs_baseline"]
    assert vs["wins"] + vs["ties"] + vs["losses"] == 6 and res["judge"] == f"llm:hf:{tiny_path}"


def test_eval_reward_prints_where_its_json_went(tiny_path, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    from posttrain.config import ModelConfig
    from posttrain.evaluation.eval_reward import EvalRewardConfig, run
    from posttrain.models.loading import load_tokenizer
    from posttrain.tasks import builtin

    rm = tmp_path / "rm"  # a tiny reward model whose (untrained) head is saved in the checkpoint
    AutoModelForSequenceClassification.from_pretrained(tiny_path, num_labels=1).save_pretrained(rm)
    load_tokenizer(tiny_path).save_pretrained(rm)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in builtin.gold_preference_records(6, seed=3)))
    out = tmp_path / "ev"
    run(EvalRewardConfig(model=ModelConfig(name_or_path=str(rm)), data=str(data),
                         output_dir=str(out)))
    text = capsys.readouterr().out
    assert "accuracy" in text and str(out / "eval_reward.json") in text
    # and `posttrain report` reads that directory too
    pipeline_report.run(pipeline_report.ReportConfig(run_dir=str(out)))
    ids = parse_report_sections((out / "report.html").read_text())
    assert "reward-model" in ids and (out / "report.md").exists()
    assert json.loads((out / "summary.json").read_text())["eval"]["pairs"] == 6  # its own summary kept


# ----------------------------------------------------------------------------- posttrain report on any run dir


def test_report_on_a_single_eval_dir(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from posttrain.cli import main

    run_dir = tmp_path / "eval"
    run_dir.mkdir()
    (run_dir / "eval.json").write_text(json.dumps(_eval_json()))
    calls = []
    real = plots.panel_plot
    monkeypatch.setattr(plots, "panel_plot",
                        lambda panels, *a, **k: calls.append((panels, a, k)) or real(panels, *a, **k))
    res = CliRunner().invoke(main, ["report", str(run_dir)])
    assert res.exit_code == 0, res.output
    assert str(run_dir / "report.html") in res.output and str(run_dir / "report.md") in res.output
    ids = parse_report_sections((run_dir / "report.html").read_text())
    for heading in pipeline_report.EVAL_SECTIONS + ("Win rates and paired tests",):
        assert slugify(heading) in ids, ids
    md = (run_dir / "report.md").read_text()
    assert _p_cells(md, "Win rates and paired tests") == {"ppo": "< 0.001"}
    assert "&lt; 0.001" in (run_dir / "report.html").read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["policies"]["ppo"]["vs_baseline"]["gold_paired"]["p_value_is_bound"] is True
    # gold and proxy reward never share an axis
    (panels, _, kw), = calls
    assert kw.get("kind") == "frontier" and list(panels) == ["gold reward", "proxy reward (reward model)"]


def test_pipeline_report_p_value_is_never_zero(tmp_path):
    run_dir = tmp_path / "pipe"
    (run_dir / "eval").mkdir(parents=True)
    (run_dir / "eval" / "eval.json").write_text(json.dumps(_eval_json(p_value=0.0, n_boot=2000)))
    (run_dir / "pipeline.json").write_text(json.dumps({"stages": [
        {"stage": "eval", "command": "eval", "seconds": 1.0, "dir": str(run_dir / "eval")}]}))
    pipeline_report.run(pipeline_report.ReportConfig(run_dir=str(run_dir)))
    md = (run_dir / "report.md").read_text()
    assert _p_cells(md, "Win rates and paired tests") == {"ppo": "< 0.0005"}


def _training_run(run_dir: Path) -> Path:
    run_dir.mkdir(parents=True)
    rows = [{"step": 0, "eval/gold_reward": 0.5}]
    rows += [{"step": s, "train/loss": 1.0 / s, "reward/mean": 0.1 * s, "kl": 0.01 * s * s, "gen_s": 0.3,
              "train/lr": 1e-5} for s in range(1, 6)]
    rows.append({"step": 5, "eval/gold_reward": 0.7})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "summary.json").write_text(json.dumps({"rl_steps": 5, "initial": {"gold_reward": 0.5},
                                                      "final": {"gold_reward": 0.7, "accuracy": 0.6}}))
    (run_dir / "config.yaml").write_text("command: grpo\nmodel:\n  name_or_path: tiny\ntrain:\n  lr: 1.0e-05\n")
    return run_dir


def test_report_on_a_single_training_run_dir(tmp_path, capsys):
    run_dir = _training_run(tmp_path / "grpo")
    res = pipeline_report.run(pipeline_report.ReportConfig(run_dir=str(run_dir)))
    assert res["report"] == str(run_dir / "report.html")
    assert str(run_dir / "report.md") in capsys.readouterr().out
    ids = parse_report_sections((run_dir / "report.html").read_text())
    for heading in pipeline_report.RUN_SECTIONS + ("Summary: final", "Config"):
        assert slugify(heading) in ids, ids
    md = (run_dir / "report.md").read_text()
    assert "| command | grpo |" in md and "| gold_reward | 0.7 |" in md
    assert (run_dir / "fig-training-curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final"] == {"gold_reward": 0.7, "accuracy": 0.6} and summary["rl_steps"] == 5  # kept
    pipeline_report.run(pipeline_report.ReportConfig(run_dir=str(run_dir)))  # again, over its own output


def test_report_on_an_unreadable_dir_says_what_it_looked_for(tmp_path):
    (tmp_path / "empty").mkdir()
    for d in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(ConfigError) as e:
            pipeline_report.run(pipeline_report.ReportConfig(run_dir=str(d)))
        msg = str(e.value)
        assert "\n" not in msg and str(d) in msg
        for name in ("pipeline.json", "eval.json", "metrics.jsonl", "summary.json", "config.yaml"):
            assert name in msg, msg


# ----------------------------------------------------------------------------- one axis per metric


def test_training_curves_have_one_axis_per_metric_labelled_by_its_key(tmp_path):
    rows = [json.loads(r) for r in (_training_run(tmp_path / "r") / "metrics.jsonl").read_text().splitlines()]
    panels = pipeline_report.curve_panels(rows)
    assert list(panels) == ["train/loss", "reward/mean", "kl", "eval/gold_reward"]  # no timings, no lr
    fig = plots.panels_figure(panels, "grpo", "optimizer step")
    assert len(fig.axes) == 4
    for ax, metric in zip(fig.axes, panels):
        assert ax.get_title() == metric and ax.get_ylabel() == metric
        assert [line.get_label() for line in ax.get_lines()] == [metric]  # one quantity per axis
        assert [t.get_text() for t in ax.get_legend().get_texts()] == [metric]


def test_pipeline_training_curves_never_mix_metrics(tmp_path, monkeypatch):
    """The pipeline report once drew PPO's reward/mean and DPO's train/rewards/margin on one axis
    labelled reward/mean; now every stage's figure has one panel per metric, named by its key."""
    run_dir = tmp_path / "pipe"
    stages = []
    for name, key in (("ppo", "reward/mean"), ("dpo", "train/rewards/margin")):
        d = run_dir / name
        d.mkdir(parents=True)
        d.joinpath("metrics.jsonl").write_text("".join(
            json.dumps({"step": s, "train/loss": 1.0 / s, key: 0.1 * s}) + "\n" for s in range(1, 4)))
        stages.append({"stage": name, "command": name, "seconds": 1.0, "dir": str(d)})
    (run_dir / "pipeline.json").write_text(json.dumps({"stages": stages}))
    calls = []
    real = plots.panel_plot
    monkeypatch.setattr(plots, "panel_plot", lambda panels, *a, **k: calls.append(panels) or real(panels, *a, **k))
    report, _ = pipeline_report.build_report(run_dir)
    ids = [s.id for s in report.sections]
    assert "training-curves" in ids and "training-curves-ppo" in ids and "training-curves-dpo" in ids
    assert [list(p) for p in calls] == [["train/loss", "reward/mean"], ["train/loss", "train/rewards/margin"]]
    for panels in calls:
        for metric, curves in panels.items():
            assert list(curves) == [metric]
