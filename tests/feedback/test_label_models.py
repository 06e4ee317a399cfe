"""POST/GET /api/models: the models ``posttrain loop`` trained on the app's labels, on SQLite and
PostgreSQL: created once, idempotent re-posts (label ids added as a union), filters, 422 naming
unknown label ids, admin only."""

from __future__ import annotations

import uuid

import pytest
from fastapi.testclient import TestClient
from label_helpers import pair_tasks, seed
from sqlalchemy import func, select

from posttrain.feedback.app import create_app
from posttrain.feedback.db import TrainedModel, TrainedModelLabel, make_engine, make_sessionmaker


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def labels_of(client: TestClient, token: str, project_id: int, n: int) -> list[int]:
    """``n`` labels by the token's user in the project, through the API; their ids."""
    out = []
    for _ in range(n):
        a = client.post(f"/api/projects/{project_id}/next", headers=bearer(token)).json()
        r = client.post(f"/api/assignments/{a['assignment_id']}/label", headers=bearer(token),
                        json={"idempotency_key": uuid.uuid4().hex, "choice": "A", "strength": 2})
        assert r.status_code == 201, r.text
        out.append(r.json()["label_id"])
    return out


def record(label_ids: list[int], **kw) -> dict:
    """A body as AppSource.record_model sends it (a lineage.json record, app label ids as integers)."""
    return {"loop": "helpful", "model": "runs/helpful/round-0/reward/final", "run_id": "r-1", "kind": "reward",
            "stage": "reward", "round": 0, "label_ids": label_ids, "labels": len(label_ids) + 2,
            "distinct_labels": len(label_ids) + 2, "per_annotator": {"alice": 3, "bob": 1, "judge:gpt": 2},
            "per_source": {"app": len(label_ids), "judge": 2}, "per_round": {"0": len(label_ids) + 2},
            "source_versions": ["judge:gpt@v3", "p#1"], "excluded_annotators": [],
            "started_from": "runs/sft/final", "command": "reward", "candidates_model": "runs/sft/final",
            "candidates_model_id": "sft", "loop_dir": "runs/helpful", **kw}


@pytest.fixture()
def env(any_url):
    s = seed(any_url, annotators=["alice", "bob"], records=pair_tasks(4), overlap=2)
    s2 = seed(any_url, annotators=[], admins=("admin2",), records=pair_tasks(2, "other"), project="q")
    with TestClient(create_app(any_url)) as client:
        alice = labels_of(client, s.tokens["alice"], s.project_id, 3)
        bob = labels_of(client, s.tokens["bob"], s.project_id, 1)
        yield client, {**s.tokens, **s2.tokens}, alice + bob, any_url


def rows(url: str) -> tuple[int, int]:
    engine = make_engine(url)
    try:
        with make_sessionmaker(engine)() as db:
            return (db.scalar(select(func.count()).select_from(TrainedModel)),
                    db.scalar(select(func.count()).select_from(TrainedModelLabel)))
    finally:
        engine.dispose()


def test_models_are_recorded_once_and_found_by_label(env):
    client, tokens, ids, url = env
    admin = bearer(tokens["admin"])
    r = client.post("/api/models", headers=admin, json=record(ids[:3]))
    assert r.status_code == 201, r.text
    first = r.json()
    assert first["status"] == "created" and (first["label_ids_added"], first["app_labels"]) == (3, 3)
    again = client.post("/api/models", headers=admin, json=record(ids[:3]))  # a retry / the loop resumed
    assert again.status_code == 200 and again.json() == {**first, "status": "unchanged", "label_ids_added": 0}
    # the same model in parts: label ids are added (a union), never duplicated
    part = client.post("/api/models", headers=admin, json=record([ids[2], ids[3]]))
    assert part.status_code == 200 and part.json()["status"] == "updated"
    assert (part.json()["label_ids_added"], part.json()["app_labels"]) == (1, 4)
    assert rows(url) == (1, 4)
    # the same path trained again (a new run id): a second row; the policy of the round: a third
    assert client.post("/api/models", headers=admin, json=record(ids[:2], run_id="r-2")).status_code == 201
    policy = record([ids[3]], kind="policy", stage="policy", model="runs/helpful/round-0/policy/final",
                    command="dpo", run_id="p-1")
    assert client.post("/api/models", headers=admin, json=policy).status_code == 201
    assert rows(url) == (3, 7)

    listed = client.get("/api/models", headers=admin)
    assert listed.status_code == 200
    got = listed.json()
    assert [(m["model"], m["run_id"], m["app_labels"]) for m in got] == [
        ("runs/helpful/round-0/reward/final", "r-1", 4), ("runs/helpful/round-0/reward/final", "r-2", 2),
        ("runs/helpful/round-0/policy/final", "p-1", 1)]
    m = got[0]
    assert "label_ids" not in m  # only with ids=true
    assert m["per_annotator"] == {"alice": 3, "bob": 1, "judge:gpt": 2}
    assert m["source_versions"] == ["judge:gpt@v3", "p#1"]
    # the fields are the latest post's (its labels: 2 app labels + 2 of the judge)
    assert (m["kind"], m["stage"], m["round"], m["loop"], m["labels"], m["command"]) == ("reward", "reward", 0,
                                                                                         "helpful", 4, "reward")
    assert m["started_from"] == "runs/sft/final" and m["candidates_model_id"] == "sft"
    with_ids = client.get("/api/models", headers=admin, params={"ids": "true"}).json()
    assert [x["label_ids"] for x in with_ids] == [sorted(ids), sorted(ids[:2]), [ids[3]]]

    def models(**params) -> list[tuple[str, str]]:
        r = client.get("/api/models", headers=admin, params=params)
        assert r.status_code == 200, r.text
        return [(x["stage"], x["run_id"]) for x in r.json()]

    assert models(label_id=ids[3]) == [("reward", "r-1"), ("policy", "p-1")]
    assert models(label_id=ids[0]) == [("reward", "r-1"), ("reward", "r-2")]
    assert models(project="p") == [("reward", "r-1"), ("reward", "r-2"), ("policy", "p-1")]
    assert models(project="q") == []  # no model trained on project q's labels
    assert models(project="p", label_id=ids[2]) == [("reward", "r-1")]
    assert models(loop="other") == []
    assert client.get("/api/models", headers=admin, params={"project": "nope"}).status_code == 404
    assert client.get("/api/models", headers=admin, params={"label_id": 99999}).status_code == 404
    assert client.get("/api/models", headers=admin, params={"label_id": 2**40}).status_code == 404
    assert client.get("/api/models", headers=admin, params={"loop": "a\x00b"}).status_code == 422


def test_bad_bodies_are_422_and_annotators_403(env):
    client, tokens, ids, url = env
    admin, alice = bearer(tokens["admin"]), bearer(tokens["alice"])
    r = client.post("/api/models", headers=admin, json=record([ids[0], 99991, 99992, 2**40]))
    assert r.status_code == 422
    assert r.json()["detail"] == f"label_ids: no such labels in this app: 99991, 99992, {2**40}"
    assert rows(url) == (0, 0)  # nothing stored
    for bad in [{"kind": "sft"}, {"round": -1}, {"label_ids": ["1"]}, {"label_ids": [True]}, {"typo": 1},
                {"model": "a\x00b"}, {"model": ""}, {"per_annotator": {"alice": "3"}}]:
        r = client.post("/api/models", headers=admin, json={**record(ids[:1]), **bad})
        assert r.status_code == 422, (bad, r.text)
    no_loop = record(ids[:1])
    del no_loop["loop"]
    assert client.post("/api/models", headers=admin, json=no_loop).status_code == 422
    assert rows(url) == (0, 0)
    # annotators: 403 on both; no credentials: 401
    assert client.post("/api/models", headers=alice, json=record(ids[:1])).status_code == 403
    assert client.get("/api/models", headers=alice).status_code == 403
    assert client.get("/api/models").status_code == 401
    assert client.post("/api/models", json=record(ids[:1])).status_code == 401
    assert rows(url) == (0, 0)
    # any admin may record; an empty id list records the model without labels
    r = client.post("/api/models", headers=bearer(tokens["admin2"]), json=record([]))
    assert r.status_code == 201 and r.json()["app_labels"] == 0
