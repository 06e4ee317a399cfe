"""Import parsing and export records: display order undone, ties kept, majority votes, rankings."""

from __future__ import annotations

import json

import pytest

from posttrain.data.formats import load_records, read_rows
from posttrain.errors import DataError
from posttrain.feedback import importing
from posttrain.feedback.db import Project, make_engine, make_sessionmaker
from posttrain.feedback.export import ExportOptions, LabelRow, build_records, write_records

TEXTS = ["first answer", "second answer"]


def row(label_id=1, *, order=(0, 1), choice="A", winner=None, strength=2, ranks=None, annotator="ann",
        task_id=1, texts=TEXTS, gold=None, flags=None) -> LabelRow:
    order = list(order)
    if winner is None and choice in ("A", "B"):
        winner = order["AB".index(choice)]
    return LabelRow(label_id, task_id, "the prompt", list(texts), [f"m{i}" for i in range(len(texts))], gold,
                    annotator, order, choice, winner, strength if choice in ("A", "B") else None, ranks,
                    None, flags or {}, 1234, "2025-01-01T00:00:00Z")


def test_a_pair_label_maps_display_slots_back_to_candidates():
    # the annotator saw candidate 1 as A and picked A, much better, flagging B (= candidate 0)
    rec, = build_records([row(order=(1, 0), choice="A", strength=3, flags={"0": ["harmful"]})], ExportOptions(), "p")
    assert rec["chosen"] == "second answer" and rec["rejected"] == "first answer"
    assert (rec["chosen_model"], rec["rejected_model"]) == ("m1", "m0")
    assert rec["margin"] == 1.0 and rec["strength"] == 3 and rec["tie"] is False and rec["both_bad"] is False
    assert rec["flags"] == {"chosen": [], "rejected": ["harmful"]}
    assert rec["annotator"] == "ann" and rec["source"] == "human:p" and rec["time_ms"] == 1234
    # strength 1 and 2 -> margins 1/3 and 2/3 (Llama 2's margin scale)
    assert build_records([row(strength=1)], ExportOptions(), "p")[0]["margin"] == pytest.approx(0.3333, abs=1e-4)


def test_ties_are_kept_in_display_order_and_both_bad_is_flagged_or_excluded():
    tie, = build_records([row(order=(1, 0), choice="tie")], ExportOptions(), "p")
    assert tie["tie"] is True and tie["margin"] == 0.0
    assert (tie["chosen"], tie["rejected"]) == ("second answer", "first answer")  # A then B as shown
    bad, = build_records([row(choice="both_bad")], ExportOptions(), "p")
    assert bad["tie"] is True and bad["both_bad"] is True
    assert build_records([row(choice="both_bad")], ExportOptions(both_bad="exclude"), "p") == []


def test_majority_aggregation_counts_votes_and_agreement():
    votes = [row(1, choice="A", strength=1, annotator="a"), row(2, choice="A", strength=3, annotator="b"),
             row(3, order=(1, 0), choice="A", strength=2, annotator="c")]  # c prefers candidate 1
    rec, = build_records(votes, ExportOptions(aggregate="majority"), "p")
    assert rec["chosen"] == "first answer" and rec["tie"] is False and rec["split"] is False
    assert rec["votes"] == {"chosen": 2, "rejected": 1, "tie": 0, "both_bad": 0}
    assert rec["n_labels"] == 3 and rec["agreement"] == pytest.approx(0.6667, abs=1e-4)
    assert rec["margin"] == pytest.approx((1 / 3 + 3 / 3) / 2, abs=1e-4)  # mean over the agreeing votes
    assert rec["annotators"] == ["a", "b", "c"]
    split, = build_records(votes[:1] + votes[2:], ExportOptions(aggregate="majority"), "p")
    assert split["tie"] is True and split["split"] is True and split["margin"] == 0.0
    assert build_records(votes[:2], ExportOptions(aggregate="majority", min_labels=3), "p") == []


def test_rankings_expand_to_pairs_or_stay_rankings():
    texts = ["x0", "x1", "x2"]
    r1 = row(1, choice="ranking", winner=2, ranks=[2, 3, 1], texts=texts, annotator="a")
    r2 = row(2, choice="ranking", winner=0, ranks=[1, 3, 2], texts=texts, annotator="b")
    pairs = build_records([r1], ExportOptions(), "p")
    # ranks x2 < x0 < x1 -> (x0 > x1), (x2 > x0), (x2 > x1)
    assert [(p["chosen"], p["rejected"], p["rank_gap"]) for p in pairs] == [("x0", "x1", 1), ("x2", "x0", 1),
                                                                            ("x2", "x1", 2)]
    assert all(p["margin"] == 0.0 and p["tie"] is False for p in pairs)
    ranking, = build_records([r1], ExportOptions(ranking_as="ranking"), "p")
    assert ranking["responses"] == texts and ranking["ranking"] == [2, 3, 1] and ranking["annotator"] == "a"
    mean, = build_records([r1, r2], ExportOptions(aggregate="majority", ranking_as="ranking"), "p")
    assert mean["ranking"] == [1.5, 3, 1.5] and mean["n_labels"] == 2
    majority = build_records([r1, r2], ExportOptions(aggregate="majority"), "p")
    # (0,1): both say x0 ; (0,2): split 1-1 -> tie ; (1,2): both say x2
    assert [(m["chosen"], m["tie"]) for m in majority] == [("x0", False), ("x0", True), ("x2", False)]


def test_gold_tasks_are_left_out_unless_asked():
    rows = [row(1, gold=0), row(2, task_id=2)]
    assert [r["task_id"] for r in build_records(rows, ExportOptions(), "p")] == [2]
    assert len(build_records(rows, ExportOptions(include_gold=True), "p")) == 2


def test_exported_files_load_as_preference_data(tmp_path):
    records = build_records([row(1, choice="B"), row(2, choice="tie"), row(3, choice="both_bad")], ExportOptions(), "p")
    records.append({**records[0], "prompt": [{"role": "user", "content": "a message-list prompt"}]})
    for name in ("prefs.jsonl", "prefs.parquet"):
        path = write_records(records, tmp_path / name)
        loaded = load_records(str(path), "preference")  # the trainers' loader and validator
        assert len(loaded) == 4 and [bool(r["tie"]) for r in loaded] == [False, True, True, False]
        assert loaded[0]["chosen"] == "second answer" and loaded[2]["both_bad"]
    # Parquet needs one type per column: string prompts become message lists next to list prompts
    assert read_rows(str(tmp_path / "prefs.parquet"))[0][0]["prompt"] == [{"role": "user", "content": "the prompt"}]


# ----------------------------------------------------------------------------- import


def test_import_accepts_responses_pairs_and_conversations():
    rows = [
        {"prompt": "p1", "responses": [{"text": "a", "model": "m1"}, "b", {"content": "c"}], "gold": 2, "id": 7,
         "subset": "math"},
        {"prompt": "p2", "chosen": "good", "rejected": "bad", "source": "hh"},
        {"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"}],
         "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go away"}]},
        {"prompt": "p4", "responses": ["same", "same"]},  # nothing to compare: skipped
    ]
    specs, identical = importing.parse_records(rows, "f.jsonl")
    assert identical == 1 and len(specs) == 3
    assert specs[0].candidates == [("a", "m1"), ("b", None), ("c", None)] and specs[0].gold == 2
    assert specs[0].external_id == "7" and specs[0].meta == {"subset": "math"}
    assert specs[1].candidates == [("good", "hh"), ("bad", "hh")] and specs[1].gold is None
    assert specs[2].prompt == [{"role": "user", "content": "hi"}]
    assert specs[2].candidates == [("hello!", None), ("go away", None)]
    assert importing.parse_records(rows[1:2], "f", gold_from_chosen=True)[0][0].gold == 0


def test_import_reports_every_bad_row_with_file_and_row():
    rows = [{"prompt": "ok", "responses": ["a", "b"]}, {"prompt": "", "responses": ["a", "b"]},
            {"prompt": "x", "responses": ["a"]}, {"prompt": "x", "responses": ["a", "b"], "gold": 5},
            {"prompt": [{"role": "robot", "content": "?"}], "responses": ["a", "b"]}, {"text": "?"}, "nope"]
    with pytest.raises(DataError) as e:
        importing.parse_records(rows, "tasks.jsonl")
    msg = str(e.value)
    for needle in ("tasks.jsonl:2: prompt: empty", "tasks.jsonl:3: responses", "tasks.jsonl:4: gold",
                   "tasks.jsonl:5: prompt[0]", "tasks.jsonl:6: record: needs", "tasks.jsonl:7: record: expected"):
        assert needle in msg


def test_import_files_twice_adds_nothing(tmp_path):
    rows = [{"prompt": f"q{i}", "responses": [{"text": "a", "model": "x"}, {"text": f"b{i}", "model": "y"}]}
            for i in range(5)]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_records(rows, tmp_path / "t.parquet")
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    with make_sessionmaker(engine)() as db:
        project = Project(name="imp")
        db.add(project)
        db.commit()
        specs, _ = importing.read_tasks(str(tmp_path / "t.jsonl"))
        assert importing.add_tasks(db, project, specs) == {"added": 5, "duplicates": 0}
        specs, _ = importing.read_tasks(str(tmp_path / "t.parquet"))  # same content from Parquet
        assert importing.add_tasks(db, project, specs) == {"added": 0, "duplicates": 5}
        import pandas as pd  # a CSV written by pandas holds the lists as Python literals: same tasks

        pd.DataFrame(rows).to_csv(tmp_path / "t.csv", index=False)
        specs, _ = importing.read_tasks(str(tmp_path / "t.csv"))
        assert importing.add_tasks(db, project, specs) == {"added": 0, "duplicates": 5}
    with pytest.raises(DataError, match="does not exist"):
        importing.read_tasks(str(tmp_path / "missing.csv"))
