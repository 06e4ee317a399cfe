"""Judge-vs-human agreement and Cohen's κ (hand-computed), and the judge command on labelled data."""

import json
import re

import pytest

from posttrain.config import load_config
from posttrain.judges import commands
from posttrain.judges.commands import JudgeConfig, load_judge_items, run_judge
from posttrain.judges.pairwise import _kappa, cohens_kappa, human_agreement


def test_kappa_hand_computed():
    judge = ["a", "a", "b", "tie", "b"]
    human = ["a", "b", "b", "tie", "a"]
    # p_o = 3/5; marginals a:2 b:2 tie:1 for both -> p_e = (4 + 4 + 1) / 25 = 0.36
    assert _kappa(judge, human) == pytest.approx((0.6 - 0.36) / (1 - 0.36))  # 0.375
    assert cohens_kappa(judge, human) == pytest.approx(0.375)
    assert _kappa(["a", "b"], ["b", "a"]) == pytest.approx(-1.0)
    assert _kappa(["a", "b", "tie"], ["a", "b", "tie"]) == pytest.approx(1.0)
    assert _kappa(["a", "a"], ["a", "a"]) is None  # one class for both raters: undefined
    assert _kappa([], []) is None


def test_human_agreement_skips_unparseable():
    out = human_agreement(["a", "a", "b", "tie", None, "b"], ["a", "b", "b", "tie", "a", "a"])
    assert out["n"] == 5 and out["skipped"] == 1
    assert out["agreement"] == pytest.approx(0.6)
    assert out["kappa"] == pytest.approx(0.375)
    assert human_agreement([None], ["a"]) == {"n": 0, "skipped": 1, "agreement": None, "kappa": None}
    with pytest.raises(ValueError):
        human_agreement(["a"], [])


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


EXPORT = [  # the labeling app's export: one row per annotation
    {"prompt": "p1", "chosen": "good one", "rejected": "bad one", "annotator": "alice"},
    {"prompt": "p1", "chosen": "bad one", "rejected": "good one", "annotator": "bob"},
    {"prompt": "p1", "chosen": "good one", "rejected": "bad one", "tie": True, "annotator": "carol"},
    {"prompt": "p2", "chosen": "good two", "rejected": "bad two", "annotator": "alice"},
    {"prompt": "p3", "chosen": "good three", "rejected": "bad three", "annotator": "bob"},
]


def test_labelled_pairs_are_deduplicated_and_sides_follow_the_coin(tmp_path):
    cfg = JudgeConfig(input=_write(tmp_path / "export.jsonl", EXPORT))
    items, labelled = load_judge_items(cfg)
    assert labelled and len(items) == 3
    first = items[0]
    assert {first.a, first.b} == {"good one", "bad one"}
    good = "a" if first.a == "good one" else "b"
    bad = "b" if good == "a" else "a"
    assert first.human == [good, bad, "tie"] and first.annotators == ["alice", "bob", "carol"]
    for item in items[1:]:
        assert item.human == ["a" if item.a.startswith("good") else "b"]
    # the seeded coin decides the sides, the same way every time
    again, _ = load_judge_items(cfg)
    assert [(i.a, i.b) for i in again] == [(i.a, i.b) for i in items]
    assert len(load_judge_items(JudgeConfig(input=cfg.input, max_pairs=2))[0]) == 2


class PrefersGood:
    """A judge that picks whichever shown response contains 'good' (so it is swap-consistent)."""

    name = "prefers-good"

    def complete(self, messages_list, max_tokens=256, temperature=0.0):
        out = []
        for m in messages_list:
            first = re.search(r"\[Response A\]\n(.*?)\n\n", m[-1]["content"], re.S).group(1)
            out.append("[[A]]" if "good" in first else "[[B]]")
        return out


def test_judge_command_reports_agreement_with_people(tmp_path, monkeypatch):
    monkeypatch.setattr(commands, "_make_backend", lambda spec, opts, seed: PrefersGood())
    cfg = load_config(JudgeConfig, None, [f"input={_write(tmp_path / 'e.jsonl', EXPORT)}",
                                          f"output_dir={tmp_path / 'run'}"])
    result = run_judge(cfg)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["pairs"] == 3 and summary["swap_inconsistency_rate"] == 0
    # the judge always picks the 'good' response; people agree in alice, alice, bob (p2, p3) rows
    # and disagree with bob's reversed label and carol's tie on p1 -> 3 of 5 labels
    assert summary["human"]["n"] == 5 and summary["human"]["agreement"] == pytest.approx(0.6)
    rows = [json.loads(x) for x in (tmp_path / "run" / "judgments.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["consistent"] for r in rows)
    winners = [r["winner"] for r in rows]
    labels = [(w, h) for w, r in zip(winners, rows) for h in r["human"]]
    kappa = _kappa([w for w, _ in labels], [h for _, h in labels])
    assert summary["human"]["kappa"] == pytest.approx(kappa)
    assert result["run_dir"] == str(tmp_path / "run")
    assert (tmp_path / "run" / "config.yaml").exists()


def test_judge_command_plain_pairs_have_no_human_section(tmp_path, monkeypatch):
    monkeypatch.setattr(commands, "_make_backend", lambda spec, opts, seed: PrefersGood())
    rows = [{"prompt": "q", "x": "good", "y": "bad"}, {"prompt": "q", "x": "bad", "y": "good"}]
    cfg = JudgeConfig(input=_write(tmp_path / "p.jsonl", rows), a_column="x", b_column="y",
                      output_dir=str(tmp_path / "run"))
    summary = run_judge(cfg)
    assert "human" not in summary
    assert (summary["wins_a"], summary["wins_b"], summary["win_rate_a"]) == (1, 1, 0.5)


def test_judge_command_names_a_missing_column(tmp_path):
    from posttrain.errors import DataError

    cfg = JudgeConfig(input=_write(tmp_path / "p.jsonl", [{"prompt": "q", "x": "a"}]),
                      input_kind="pairs", a_column="x", b_column="y", output_dir=str(tmp_path / "r"))
    with pytest.raises(DataError, match=r"p.jsonl:1.*y: missing"):
        run_judge(cfg)
