"""The quick demo end to end: every stage runs and each method measurably beats SFT.

This is the CI form of `posttrain demo` (`--quick`): SFT -> simulated preference labels -> reward
model -> PPO / GRPO / DPO from the same SFT model -> evaluation; then multi-turn tool use (SFT on
calculator conversations -> GRPO on episodes with the calculator) -> report.
"""

import json
import shutil
from pathlib import Path

import pytest

from posttrain.config import load_config
from posttrain.demo import DemoConfig, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    summary = run(load_config(DemoConfig, None, ["quick=true", f"output_dir={out}"]))
    return Path(summary["run_dir"]), summary


def test_every_stage_ran(demo):
    run_dir, summary = demo
    stages = [s["stage"] for s in summary["stages"]]
    for name in ("sft", "prefs", "reward", "ppo", "grpo", "dpo", "eval", "tool_sft", "tool_grpo", "report"):
        assert name in stages


def test_reward_model_beats_length_baseline(demo):
    run_dir, _ = demo
    ev = json.loads((run_dir / "reward" / "summary.json").read_text())["final"]  # held-out gold pairs
    assert ev["accuracy"] > ev["length_baseline"] + 0.1


@pytest.mark.parametrize("method", ["grpo", "dpo"])
def test_method_beats_sft_on_gold(demo, method):
    # gold gain over seeds 0-3 of the whole quick demo: GRPO +0.065 to +0.084, DPO +0.05 to +0.10 (intervals
    # ~±0.035, lower ends >= +0.01): it holds for each seed tried, not for one lucky sampling stream
    run_dir, _ = demo
    ev = json.loads((run_dir / "eval" / "eval.json").read_text())
    r = ev["policies"][method]
    paired = r["vs_baseline"]["gold_paired"]
    assert paired["lo"] > 0, f"{method}: 95% interval of the gold difference {paired} includes 0"
    assert r["gold_reward"] > ev["policies"]["sft"]["gold_reward"]
    assert r["kl"] > 0  # KL to the SFT reference is reported (and the policy moved)


def test_ppo_raises_the_reward_model_score(demo):
    # PPO optimises the learned reward model (accuracy 0.72-0.82 on held-out gold pairs): over seeds 0-3
    # its score rises by +0.40 to +0.58 (lower ends >= +0.21), while the gold gain ranges from +0.008 to
    # +0.033 with intervals that include 0 (the proxy's limits: 30 steps instead of 15 gave +0.009 to
    # +0.030), so gold is not asserted here
    run_dir, _ = demo
    ev = json.loads((run_dir / "eval" / "eval.json").read_text())
    r = ev["policies"]["ppo"]
    proxy = r["vs_baseline"]["proxy_paired"]
    assert proxy["lo"] > 0, f"ppo: 95% interval of the reward-model score difference {proxy} includes 0"
    assert 0 < r["kl"] < 2.0  # moved, with the KL penalty holding it near the SFT policy


def test_grpo_with_the_calculator_beats_its_sft_model(demo):
    # held-out episode accuracy (64 prompts x 4 episodes) of the quick tool stages over seeds 0-2:
    # 0.40 -> 0.53, 0.38 -> 0.70, 0.32 -> 0.57 (the standard error of the difference is ~0.045)
    from posttrain.demo import multiturn_line

    run_dir, summary = demo
    s = json.loads((run_dir / "tool_grpo" / "summary.json").read_text())
    assert s["final"]["accuracy"] > s["initial"]["accuracy"] + 0.05, (s["initial"], s["final"])
    assert s["final"]["episode/tool_calls"] > 0.8  # it answers through the calculator
    episodes = [json.loads(r) for r in (run_dir / "tool_grpo" / "episodes.jsonl").read_text().splitlines()]
    assert episodes and any(m["role"] == "tool" for e in episodes for m in e["messages"])
    line = multiturn_line(summary)
    assert "tool_grpo" in line and f"{s['final']['accuracy']:.3f}" in line and "\n" not in line


def test_every_logged_metric_is_documented(demo):
    from pt_helpers import undocumented_metrics

    run_dir, summary = demo
    assert undocumented_metrics([s["dir"] for s in summary["stages"]]) == set()


def test_report_has_every_section(demo):
    from posttrain.evaluation.pipeline_report import SECTIONS
    from posttrain.evaluation.report import parse_report_sections, slugify

    run_dir, _ = demo
    ids = parse_report_sections((run_dir / "report.html").read_text())
    for heading in SECTIONS:
        assert slugify(heading) in ids, f"missing section {heading}: {ids}"
    assert (run_dir / "report.md").exists() and (run_dir / "summary.json").exists()
    for heading in ("Multi-turn curves: tool_grpo", "Sample episode: tool_grpo"):
        assert slugify(heading) in ids, f"missing section {heading}: {ids}"
    md = (run_dir / "report.md").read_text()
    sample = md[md.index("## Sample episode: tool_grpo"):]
    assert "| calc({" in sample and "| tool |" in sample and "| reward |" in sample  # a call, its output, reward
    assert "calc({&quot;expr&quot;" in (run_dir / "report.html").read_text()
    assert "tool_grpo" in json.loads((run_dir / "summary.json").read_text())["multiturn"]


@pytest.mark.skipif(not shutil.which("chromium"), reason="needs Debian's chromium (scripts/setup.sh)")
def test_report_opens_in_chromium(demo):
    from playwright.sync_api import sync_playwright

    run_dir, _ = demo
    errors = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), headless=True, args=[
            "--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic"])
        page = browser.new_page()
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto((run_dir / "report.html").resolve().as_uri())
        images = page.eval_on_selector_all("img", "els => els.map(e => [e.complete, e.naturalWidth])")
        browser.close()
    assert images and all(done and width > 0 for done, width in images)
    assert errors == []
