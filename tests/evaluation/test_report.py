"""Report rendering (HTML escaping, Markdown, JSON), plots, and the HTML in headless Chromium."""

import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest

from posttrain.evaluation import plots
from posttrain.evaluation.report import Report, markdown_to_html, parse_report_sections, slugify
from posttrain.evaluation.stats import EvaluationError

CHROMIUM = "/usr/bin/chromium"
XSS_SCRIPT = "<script>window.__x=1</script>"
XSS_IMG = '<img src=x onerror="window.__y=1">'
ALLOWED_TAGS = {"html", "head", "meta", "link", "title", "style", "body", "header", "h1", "nav", "ul", "li", "a",
                "main", "section", "h2", "p", "strong", "code", "pre", "br", "table", "thead", "tbody", "tr", "th",
                "td", "figure", "img", "figcaption"}


def _png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    return struct.unpack(">II", png[16:24])


@pytest.fixture(scope="module")
def figures():
    rng = np.random.default_rng(0)
    probs = rng.random(300)
    return {
        "line": plots.line_plot({"ppo": ([0, 1, 2], [0.1, 0.4, 0.5]), "dpo": ([0, 1, 2], [0.2, 0.3, 0.6])},
                                "Gold reward", "step", "reward"),
        "frontier": plots.scatter_frontier({"bon": [(0, 0), (1, 0.5), (2, 0.4)], "rl": [(0.5, 0.2), (3, 0.7)]},
                                           "Frontier", "KL", "gold"),
        "bars": plots.bar_with_ci(["a", "b"], [0.6, 0.45], [0.55, 0.4], [0.65, 0.5], "Win rate", "WR", ref=0.5),
        "calibration": plots.calibration_plot(probs, (rng.random(300) < probs).astype(int), 10),
    }


def _full_report(figures) -> Report:
    rep = Report("Eval <b>run</b> & friends")
    rep.add_text("Overview", "The **policy** beats `sft`.\n\n- win rate 0.61\n- KL 3.2\n\n```\n<raw> code\n```")
    rep.add_table("Win rates", ["model", "win_rate", "lo", "hi", "n"],
                  [["ppo <v2>", 0.61234567, np.float64(0.55), 0.67, np.int64(200)], ["dpo", 0.5, 0.44, 0.56, 200]])
    for name, png in figures.items():
        rep.add_image(f"Plot {name}", png, caption=f"{name} caption")
    rep.add_samples("Samples", [
        {"prompt": "Say hi", "response": f"hi {XSS_SCRIPT} and {XSS_IMG}", "score": 0.9},
        {"prompt": "Count ```ticks```", "response": "1 2 3", "score": float("nan")},
    ])
    return rep


def test_plots_are_small_pngs(figures):
    for png in figures.values():
        assert _png_size(png) == (500, 320)
        assert len(png) < 60_000


def test_frontier_keeps_only_improving_points():
    pts = [(2, 0.4), (0, 0.0), (1, 0.5), (1, 0.3), (3, 0.5), (4, 0.9)]
    assert plots.frontier(pts) == [(0.0, 0.0), (1.0, 0.5), (4.0, 0.9)]


def test_bar_with_ci_rejects_interval_not_containing_value():
    with pytest.raises(EvaluationError, match="contain"):
        plots.bar_with_ci(["a"], [0.6], [0.65], [0.7])


def test_slugs_are_unique_and_safe():
    rep = Report("t").add_text("Win rate (vs SFT)", "x").add_text("Win rate (vs SFT)", "y").add_text("!!", "z")
    assert [s.id for s in rep.sections] == ["win-rate-vs-sft", "win-rate-vs-sft-2", "section"]
    assert slugify("KL / reward: β=0.1") == "kl-reward-0-1"


def test_markdown_subset_escapes_before_formatting():
    out = markdown_to_html("a **b** `<i>` <script>x</script>\n\n- one\n- **two**")
    assert out == ("<p>a <strong>b</strong> <code>&lt;i&gt;</code> &lt;script&gt;x&lt;/script&gt;</p>\n"
                   "<ul><li>one</li><li><strong>two</strong></li></ul>")


def test_write_outputs(tmp_path, figures):
    rep = _full_report(figures)
    paths = rep.write(tmp_path, summary={"world_size": 1, "final": {"win_rate": np.float64(0.61)}})
    page = paths["html"].read_text()

    # Self-contained and escaped: only our own tags, every image inline, the payload is inert text.
    assert set(re.findall(r"<([a-zA-Z]\w*)", page)) <= ALLOWED_TAGS
    assert re.findall(r"<img src=\"([^\"]{5})", page) == ["data:"] * len(figures)
    assert "http://" not in page and "https://" not in page
    assert "&lt;script&gt;window.__x=1&lt;/script&gt;" in page
    assert "Eval &lt;b&gt;run&lt;/b&gt; &amp; friends" in page
    assert page.count("data:image/png;base64,") == len(figures)
    assert parse_report_sections(page) == ["overview", "win-rates", "plot-line", "plot-frontier", "plot-bars",
                                           "plot-calibration", "samples"]
    assert "<td class=num>0.6123</td>" in page and "<td>ppo &lt;v2&gt;</td>" in page

    md = paths["md"].read_text()
    assert "![line caption](fig-plot-line.png)" in md
    assert (tmp_path / "fig-plot-line.png").read_bytes() == figures["line"]
    assert "| ppo <v2> | 0.6123 | 0.55 | 0.67 | 200 |" in md
    assert "````\nCount ```ticks```\n````" in md  # fence longer than the text's own backticks

    data = json.loads(paths["json"].read_text())
    assert data["world_size"] == 1 and data["final"]["win_rate"] == 0.61
    secs = {s["id"]: s for s in data["report"]["sections"]}
    assert secs["win-rates"]["rows"][0] == ["ppo <v2>", 0.61234567, 0.55, 0.67, 200]
    assert secs["plot-bars"]["file"] == "fig-plot-bars.png"
    assert secs["samples"]["samples"][1]["score"] is None  # NaN → null: strict JSON


def test_bad_inputs_fail_early():
    with pytest.raises(EvaluationError, match="PNG"):
        Report("t").add_image("x", b"GIF89a")
    with pytest.raises(EvaluationError, match="row 0"):
        Report("t").add_table("x", ["a", "b"], [[1]])
    with pytest.raises(EvaluationError, match="report"):
        Report("t").to_summary({"report": 1})


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"Debian chromium not installed at {CHROMIUM}")
def test_report_in_headless_chromium(tmp_path, figures):
    from playwright.sync_api import sync_playwright

    paths = _full_report(figures).write(tmp_path)
    errors, requests = [], []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic"])
        try:
            page = browser.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(paths["html"].as_uri())
            page.wait_for_load_state("load")

            images = page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth])")
            assert images == [[True, 500]] * len(figures)
            assert page.evaluate("typeof window.__x") == "undefined"
            assert page.evaluate("typeof window.__y") == "undefined"
            cell = page.locator("#samples td").filter(has_text="window.__x").first
            assert cell.is_visible()
            assert f"hi {XSS_SCRIPT} and {XSS_IMG}" in cell.inner_text()
            assert page.evaluate("document.querySelectorAll('main script, main img:not([src^=\"data:\"])').length") == 0
            assert page.locator("section").evaluate_all("s => s.map(x => x.id)") == parse_report_sections(
                paths["html"].read_text())
        finally:
            browser.close()
    assert errors == []
    assert all(u.startswith(("file:", "data:")) for u in requests), requests


# ----------------------------------------------------------------------------- multi-turn episodes


def _episode_pipeline(run_dir: Path) -> Path:
    """A pipeline directory by hand: an SFT stage and a GRPO stage that ran calculator episodes."""
    sft, grpo = run_dir / "tool_sft", run_dir / "tool_grpo"
    sft.mkdir(parents=True)
    grpo.mkdir()
    sft.joinpath("metrics.jsonl").write_text("".join(json.dumps({"step": s, "train/loss": 1.0 / s}) + "\n"
                                                     for s in range(1, 4)))
    rows = [{"step": 0, "eval/accuracy": 0.4, "eval/episode/turns": 1.9}]
    rows += [{"step": s, "reward/mean": 0.4 + 0.05 * s, "episode/turns": 1.9, "episode/tool_calls": 0.9 + 0.01 * s,
              "episode/tool_errors": 0.1} for s in range(1, 5)]
    rows += [{"step": 2, "eval/accuracy": 0.5}, {"step": 4, "eval/accuracy": 0.6}]
    grpo.joinpath("metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    grpo.joinpath("summary.json").write_text(json.dumps({
        "rl_steps": 4, "initial": {"accuracy": 0.4, "episode/tool_calls": 0.9},
        "final": {"accuracy": 0.6, "episode/tool_calls": 0.95, "episode/turns": 1.95}}))
    call = {"id": "call_0", "type": "function", "function": {"name": "calc", "arguments": {"expr": "1+3+2"}}}
    wrong = [{"role": "user", "content": "Add the numbers 4 4 4."},
             {"role": "assistant", "content": "12 <script>x</script>", "tool_calls": []}]
    right = [{"role": "user", "content": "Add the numbers 1 3 2."},
             {"role": "assistant", "content": "", "tool_calls": [call]},
             {"role": "tool", "tool_call_id": "call_0", "content": "6"},
             {"role": "assistant", "content": "6", "tool_calls": []}]
    grpo.joinpath("episodes.jsonl").write_text("".join(json.dumps(e) + "\n" for e in [
        {"step": 4, "reward": 0.0, "turns": 1, "tool_calls": 0, "tool_errors": 0, "truncated": None,
         "messages": wrong, "row": {"answer": "12"}},
        {"step": 4, "reward": 1.0, "turns": 2, "tool_calls": 1, "tool_errors": 0, "truncated": None,
         "messages": right, "row": {"answer": "6"}}]))
    (run_dir / "pipeline.json").write_text(json.dumps({"stages": [
        {"stage": "tool_sft", "command": "sft", "seconds": 1.0, "dir": str(sft)},
        {"stage": "tool_grpo", "command": "grpo", "seconds": 2.0, "dir": str(grpo)}]}))
    return run_dir


def test_pipeline_report_shows_the_multi_turn_curve_and_a_sample_episode(tmp_path, monkeypatch):
    from posttrain.evaluation import pipeline_report

    run_dir = _episode_pipeline(tmp_path / "pipe")
    calls = []
    real = plots.panel_plot
    monkeypatch.setattr(plots, "panel_plot", lambda panels, *a, **k: calls.append(panels) or real(panels, *a, **k))
    pipeline_report.run(pipeline_report.ReportConfig(run_dir=str(run_dir)))
    html_text = (run_dir / "report.html").read_text()
    ids = parse_report_sections(html_text)
    for heading in pipeline_report.SECTIONS + ("Multi-turn curves: tool_grpo", "Sample episode: tool_grpo"):
        assert slugify(heading) in ids, (heading, ids)
    assert "multi-turn-curves-tool-sft" not in ids  # the SFT stage ran no episodes
    assert list(calls[-1]) == ["eval/accuracy", "reward/mean", "episode/turns", "episode/tool_calls",
                               "episode/tool_errors"]
    assert calls[-1]["eval/accuracy"]["eval/accuracy"] == ([0, 2, 4], [0.4, 0.5, 0.6])
    md = (run_dir / "report.md").read_text()
    assert "0.400 before RL → 0.600 after 4 RL steps" in md
    sample = md[md.index("## Sample episode: tool_grpo"):]
    # the rewarded episode that called the tool, as a conversation: the call, the tool's output, the reward
    assert '| 1 | assistant |  | calc({"expr": "1+3+2"}) |' in sample
    assert "| 2 | tool | 6 |  |" in sample and "| 3 | assistant | 6 |  |" in sample
    assert "|  | reward | 1.000 |  |" in sample and "expected answer 6" in sample
    assert "calc({&quot;expr&quot;: &quot;1+3+2&quot;})" in html_text
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["multiturn"]["tool_grpo"]["final_accuracy"] == 0.6


def test_episode_report_without_episodes_and_with_malformed_calls(tmp_path):
    from posttrain.evaluation import episode_report, pipeline_report

    run_dir = _episode_pipeline(tmp_path / "pipe")
    (run_dir / "tool_grpo" / "episodes.jsonl").unlink()
    (run_dir / "tool_grpo" / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward/mean": 0.5}) + "\n")
    report, summary = pipeline_report.build_report(run_dir)
    texts = {s.heading: s.data.get("text") for s in report.sections}
    assert texts["Multi-turn episodes"].startswith("No stage ran multi-turn episodes") and "multiturn" not in summary
    rows = episode_report.conversation_rows([
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "", "arguments": {"raw": '{"nme": "calc"'}}}]}, "not a message"])
    assert rows == [{"turn": 0, "role": "assistant", "content": "", "tool calls": '(malformed call) {"nme": "calc"'}]
