"""Security and robustness fixes: expired assignments, edge validation (no deterministic 500s),
credential revocation and expiry, request-size limits enforced before the body is read."""

from __future__ import annotations

import re
import socket
import time
import uuid
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from label_helpers import PASSWORD, ServerProcess, pair_tasks, seed
from sqlalchemy import func, select, update

from posttrain.feedback.app import Settings, create_app
from posttrain.feedback.db import ApiToken, Assignment, Label, make_engine, make_sessionmaker, utcnow


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def label_body(**kw) -> dict:
    return {"idempotency_key": uuid.uuid4().hex, "choice": "A", "strength": 2, **kw}


def _db(url: str):
    return make_sessionmaker(make_engine(url))()


def _age(url: str, assignment_id: int, hours: float = 2) -> None:
    with _db(url) as db:
        db.execute(update(Assignment).where(Assignment.id == assignment_id)
                   .values(served_at=utcnow() - timedelta(hours=hours)))
        db.commit()


def _login(client: TestClient, name: str, password: str = PASSWORD):
    page = client.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    return client.post("/login", data={"username": name, "password": password, "csrf_token": token, "next": "/"},
                       follow_redirects=False)


def _page_form(client: TestClient, project_id: int) -> dict:
    page = client.get(f"/projects/{project_id}/label")
    return {"csrf_token": re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1),
            "assignment_id": re.search(r'name="assignment_id" value="(\d+)"', page.text).group(1),
            "idempotency_key": re.search(r'name="idempotency_key" value="([^"]+)"', page.text).group(1)}


# ----------------------------------------------------------------------------- M3: expired assignments


def test_an_expired_assignment_is_refused_and_not_served_again(any_url):
    s = seed(any_url, annotators=["s1", "s2"], records=pair_tasks(1), overlap=1)
    with TestClient(create_app(any_url)) as client:
        h1, h2 = bearer(s.tokens["s1"]), bearer(s.tokens["s2"])
        a1 = client.get(f"/api/projects/{s.project_id}/next", headers=h1).json()
        _age(any_url, a1["assignment_id"])
        a2 = client.get(f"/api/projects/{s.project_id}/next", headers=h2).json()
        assert a2["done"] is False and a2["assignment_id"] != a1["assignment_id"]  # the slot was re-issued
        late = client.post(f"/api/assignments/{a1['assignment_id']}/label", headers=h1, json=label_body())
        assert late.status_code == 409 and "expired" in late.json()["detail"]
        assert "someone else" in late.json()["detail"]
        assert client.get(f"/api/projects/{s.project_id}/next", headers=h1).json() == {"done": True}
        ok = client.post(f"/api/assignments/{a2['assignment_id']}/label", headers=h2, json=label_body())
        assert ok.status_code == 201
    with _db(any_url) as db:
        assert db.scalar(select(func.count()).select_from(Label)) == 1  # overlap 1: one label, never two
        assert db.get(Assignment, a1["assignment_id"]).status == "expired"


def test_next_does_not_return_an_expired_assignment_to_its_holder(any_url):
    s = seed(any_url, annotators=["s1"], records=pair_tasks(2), overlap=1)
    with TestClient(create_app(any_url)) as client:
        h1 = bearer(s.tokens["s1"])
        a1 = client.get(f"/api/projects/{s.project_id}/next", headers=h1).json()
        _age(any_url, a1["assignment_id"])
        a2 = client.get(f"/api/projects/{s.project_id}/next", headers=h1).json()
        assert a2["done"] is False and a2["assignment_id"] != a1["assignment_id"]
        r = client.post(f"/api/assignments/{a1['assignment_id']}/label", headers=h1, json=label_body())
        assert r.status_code == 409 and "expired" in r.json()["detail"]
