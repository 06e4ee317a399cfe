"""Labels collected in the app train a reward model: import -> label -> export -> posttrain reward."""

import json

import pytest

from posttrain.feedback import commands as C
from posttrain.feedback.db import Project, User, make_engine, make_sessionmaker
from posttrain.tasks import builtin


@pytest.mark.slow
def test_export_trains_reward_model(tmp_path, tiny_path):
    from posttrain.algorithms.reward import RewardConfig, run
    from posttrain.config import load_config
    from posttrain.feedback.assign import LabelInput, next_assignment, record_label

    db = f"sqlite:///{tmp_path / 'labels.db'}"
    C.run_add_user(C.LabelAddUserConfig(db=db, name="ann", password="a long password"))
    C.run_create_project(C.LabelCreateProjectConfig(db=db, name="task", overlap=1, gold_rate=0.0, annotators=["ann"]))
    pairs = builtin.gold_preference_records(240, seed=5)
    src = tmp_path / "cands.jsonl"
    src.write_text("".join(json.dumps({"prompt": r["prompt"], "responses": [{"text": r["chosen"], "model": "x"},
                                                                            {"text": r["rejected"], "model": "y"}]}) + "\n"
                           for r in pairs))
    assert C.run_import(C.LabelImportConfig(db=db, project="task", file=str(src)))["added"] == len(pairs)
    # the annotator answers with the gold preference, whichever side the app showed it on
    engine = make_engine(db)
    with make_sessionmaker(engine)() as s:
        ann, project = s.query(User).filter_by(name="ann").one(), s.query(Project).filter_by(name="task").one()
        for i in range(len(pairs)):
            a = next_assignment(s, ann, project)
            prompt = a.task.prompt if isinstance(a.task.prompt, str) else a.task.prompt[-1]["content"]
            shown = [a.task.candidates[pos].text for pos in a.display_order]  # what slots A and B showed
            better = max(range(2), key=lambda k: builtin.gold_reward(prompt, shown[k]))
            record_label(s, ann, a.id, LabelInput(f"k{i}", choice="AB"[better], strength=2))
    engine.dispose()
    out = tmp_path / "prefs.jsonl"
    C.run_export(C.LabelExportConfig(db=db, project="task", output=str(out)))
    rows = [json.loads(r) for r in out.read_text().splitlines()]
    agree = sum(builtin.gold_reward(r["prompt"], r["chosen"]) > builtin.gold_reward(r["prompt"], r["rejected"]) for r in rows)
    assert agree == len(rows) == len(pairs)  # the export maps display slots back to the right responses

    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps(r) + "\n" for r in builtin.gold_preference_records(200, seed=77)))
    summary = run(load_config(RewardConfig, None, [
        f"model.name_or_path={tiny_path}", f"data.train={out}", f"data.eval={held}", f"train.output_dir={tmp_path/'rm'}",
        "train.max_steps=40", "train.lr=1e-3", "train.progress=false"]))
    assert summary["final"]["accuracy"] > 0.6
