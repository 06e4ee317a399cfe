"""``posttrain label`` commands: configs through the project's config machinery, bootstrap of a fresh
database, import/export round trip, and candidate generation with the offline tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from label_helpers import ROOT

from posttrain.config import load_config
from posttrain.errors import ConfigError
from posttrain.feedback import commands as C
from posttrain.feedback.db import Label, Project, User, make_engine, make_sessionmaker


def test_every_command_has_a_config_and_run_function():
    assert set(C.COMMANDS) == {"serve", "add-user", "create-project", "import", "export", "generate"}
    for cmd in C.COMMANDS.values():
        cls = getattr(C, cmd.config)
        assert callable(getattr(C, cmd.run))
        assert cls.__dataclass_fields__["db" if "db" in cls.__dataclass_fields__ else "model"].metadata["help"]
    cfg = load_config(C.LabelCreateProjectConfig, None, ["name=helpful", "annotators=[bob,carol]", "gold_rate=0.2"])
    assert cfg.annotators == ["bob", "carol"] and cfg.gold_rate == 0.2
    with pytest.raises(ConfigError, match="did you mean 'overlap'"):
        load_config(C.LabelCreateProjectConfig, None, ["name=x", "overlapp=2"])
    with pytest.raises(ConfigError, match="k must be 2..9"):
        load_config(C.LabelGenerateConfig, None, ["k=12"])


def test_bootstrap_import_label_export(tmp_path, monkeypatch, capsys):
    db = f"sqlite:///{tmp_path / 'fresh.db'}"
    with pytest.raises(ConfigError, match="no password"):
        C.run_add_user(C.LabelAddUserConfig(db=db, name="root", role="admin", password_env="NOPE_UNSET"))
    monkeypatch.setenv("POSTTRAIN_LABEL_PASSWORD", "a long admin password")
    out = C.run_add_user(C.LabelAddUserConfig(db=db, name="root", role="admin", token=True))
    assert out["role"] == "admin" and len(out["token"]) > 30 and out["token"] in capsys.readouterr().out
    with pytest.raises(ConfigError, match="already exists"):
        C.run_add_user(C.LabelAddUserConfig(db=db, name="root", role="admin"))
    with pytest.raises(ConfigError, match="at least 8"):
        C.run_add_user(C.LabelAddUserConfig(db=db, name="shorty", password="short"))
    C.run_add_user(C.LabelAddUserConfig(db=db, name="bob", password="a fine passphrase"))
    with pytest.raises(ConfigError, match="no user named 'carol'"):
        C.run_create_project(C.LabelCreateProjectConfig(db=db, name="h", annotators=["bob", "carol"]))
    C.run_create_project(C.LabelCreateProjectConfig(db=db, name="h", overlap=1, gold_rate=0.0, annotators=["bob"]))
    C.run_add_user(C.LabelAddUserConfig(db=db, name="bob", password="new password!", update=True, projects=["h"]))

    src = tmp_path / "cands.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "2+2?", "responses": [{"text": "4", "model": "a"}, {"text": "5", "model": "b"}]},
        {"prompt": "capital of Peru?", "chosen": "Lima", "rejected": "Quito"}]))
    with pytest.raises(ConfigError, match="create-project"):
        C.run_import(C.LabelImportConfig(db=db, project="nope", file=str(src)))
    assert C.run_import(C.LabelImportConfig(db=db, project="h", file=str(src)))["added"] == 2
    assert C.run_import(C.LabelImportConfig(db=db, project="h", file=str(src)))["duplicates"] == 2

    # label both tasks through the assignment code, then export in both formats
    from posttrain.feedback.assign import LabelInput, next_assignment, record_label

    engine = make_engine(db)
    with make_sessionmaker(engine)() as s:
        bob = s.query(User).filter_by(name="bob").one()
        project = s.query(Project).filter_by(name="h").one()
        for i in range(2):
            a = next_assignment(s, bob, project)
            inp = LabelInput(f"key-{i}", choice="A" if i == 0 else "tie", strength=2 if i == 0 else None)
            record_label(s, bob, a.id, inp)
        assert next_assignment(s, bob, project) is None
        assert s.query(Label).count() == 2
    engine.dispose()
    res = C.run_export(C.LabelExportConfig(db=db, project="h", output=str(tmp_path / "o.parquet")))
    assert res == {"records": 2, "ties": 1, "both_bad": 0, "output": str(tmp_path / "o.parquet")}
    res = C.run_export(C.LabelExportConfig(db=db, project="h", output=str(tmp_path / "m.jsonl"), aggregate="majority"))
    rows = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["n_labels"] == 1 and r["annotators"] == ["bob"] for r in rows)


def test_module_entry_point_runs_the_commands(tmp_path):
    db = f"sqlite:///{tmp_path / 'cli.db'}"
    r = subprocess.run([sys.executable, "-m", "posttrain.feedback", "add-user", f"db={db}", "name=alice", "role=admin"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "POSTTRAIN_LABEL_PASSWORD": "from the environment"})
    assert r.returncode == 0, r.stderr
    assert "created admin alice" in r.stdout and "from the environment" not in r.stdout + r.stderr
    bad = subprocess.run([sys.executable, "-m", "posttrain.feedback", "create-project", f"db={db}", "nmae=x"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "did you mean 'name'" in bad.stderr


def test_generate_writes_the_import_format(tmp_path, tiny_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "What is 3+4?"}) + "\n" +
                       json.dumps({"prompt": [{"role": "user", "content": "Name a color."}]}) + "\n")
    out = tmp_path / "cands.jsonl"
    res = C.run_generate(C.LabelGenerateConfig(model=tiny_path, prompts=str(prompts), output=str(out), k=3,
                                               max_new_tokens=8, seed=1))
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert res["prompts"] == 2 and len(rows) == 2
    assert rows[0]["prompt"] == "What is 3+4?" and rows[1]["prompt"][0]["content"] == "Name a color."
    assert all(len(r["responses"]) == 3 and all(c["model"] == tiny_path for c in r["responses"]) for r in rows)
    from posttrain.feedback.importing import parse_records

    specs, identical = parse_records(rows, "cands.jsonl")  # what generate writes, import reads
    assert len(specs) + identical == 2
