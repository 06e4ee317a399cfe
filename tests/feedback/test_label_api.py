"""The JSON API and the page endpoints in-process (FastAPI TestClient over a real SQLite file):
authentication, authorization, CSRF, validation, exactly-once labels, assignment rules."""

from __future__ import annotations

import base64
import json
import re
import uuid
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from label_helpers import PASSWORD, open_task, pair_tasks, seed
from sqlalchemy import func, select, update

from posttrain.feedback.app import create_app
from posttrain.feedback.db import Assignment, Label, make_engine, make_sessionmaker


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def basic(name: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{name}:{password}".encode()).decode()}


def label_body(**kw) -> dict:
    return {"idempotency_key": uuid.uuid4().hex, "choice": "A", "strength": 2, **kw}


def _env(url: str):
    records = pair_tasks(4) + [{"prompt": "rank these", "responses": ["r one", "r two", "r three"]}]
    s = seed(url, annotators=["alice", "bob"], records=records, overlap=2)
    with TestClient(create_app(url)) as client:
        yield client, s, url


@pytest.fixture()
def env(sqlite_url):
    yield from _env(sqlite_url)


@pytest.fixture()
def env_any(any_url):
    """``env`` on SQLite and on PostgreSQL."""
    yield from _env(any_url)


def count_labels(url: str) -> int:
    with make_sessionmaker(make_engine(url))() as db:
        return db.scalar(select(func.count()).select_from(Label))


def test_bad_credentials_are_401(env):
    client, s, _ = env
    r = client.get("/api/me")
    assert r.status_code == 401 and "authentication required" in r.json()["detail"]
    assert r.headers["www-authenticate"].startswith("Bearer")  # never Basic: browsers would cache it
    assert client.get("/api/me", headers=bearer("not-a-token")).status_code == 401
    assert client.get("/api/me", headers=basic("alice", "wrong password")).status_code == 401
    assert client.get("/api/me", headers=basic("nobody", PASSWORD)).status_code == 401
    assert client.get("/api/me", headers={"Authorization": "Basic %%%"}).status_code == 401
    assert client.post("/api/token", json={"username": "alice", "password": "nope nope"}).status_code == 401
    # the right ones work: Basic, a token made from Basic, and a token made from JSON credentials
    assert client.get("/api/me", headers=basic("alice", PASSWORD)).json()["name"] == "alice"
    tok = client.post("/api/token", headers=basic("alice", PASSWORD)).json()["token"]
    assert client.get("/api/me", headers=bearer(tok)).json() == {"name": "alice", "role": "annotator", "via": "token"}
    tok2 = client.post("/api/token", json={"username": "bob", "password": PASSWORD})
    assert tok2.status_code == 201
    assert client.get("/api/me", headers=bearer(tok2.json()["token"])).json()["name"] == "bob"


def test_annotator_is_403_on_others_assignments_and_admin_endpoints(env):
    client, s, _ = env
    alice, bob, admin = (bearer(s.tokens[n]) for n in ("alice", "bob", "admin"))
    a = client.post(f"/api/projects/{s.project_id}/next", headers=alice).json()
    aid = a["assignment_id"]
    assert client.get(f"/api/assignments/{aid}", headers=alice).status_code == 200
    assert client.get(f"/api/assignments/{aid}", headers=admin).status_code == 200  # admins may look
    r = client.get(f"/api/assignments/{aid}", headers=bob)
    assert r.status_code == 403 and "another annotator" in r.json()["detail"]
    assert client.post(f"/api/assignments/{aid}/label", headers=bob, json=label_body()).status_code == 403
    assert client.post(f"/api/assignments/{aid}/skip", headers=bob).status_code == 403
    for method, path in [("get", f"/api/projects/{s.project_id}/stats"), ("get", "/api/dashboard"),
                         ("get", f"/api/projects/{s.project_id}/export"),
                         ("post", "/api/users"), ("post", "/api/projects"),
                         ("post", f"/api/projects/{s.project_id}/tasks"),
                         ("post", f"/api/projects/{s.project_id}/members")]:
        body = {"name": "x", "password": "long enough", "users": [], "records": []}
        r = client.request(method, path, headers=bob, json=body if method == "post" else None)
        assert r.status_code == 403, (path, r.status_code, r.text)
    assert client.get("/admin", headers=bob).status_code == 403  # the dashboard page too
    assert client.get(f"/api/projects/{s.project_id}/stats", headers=admin).status_code == 200
    assert count_labels(env[2]) == 0


def test_non_member_cannot_work_on_a_project(env):
    client, s, url = env
    created = client.post("/api/projects", headers=bearer(s.tokens["admin"]), json={"name": "private"}).json()
    r = client.post(f"/api/projects/{created['id']}/next", headers=bearer(s.tokens["alice"]))
    assert r.status_code == 403 and "not a member" in r.json()["detail"]
    assert [p["name"] for p in client.get("/api/projects", headers=bearer(s.tokens["alice"])).json()] == ["p"]


def test_malformed_payloads_are_422_with_a_message(env):
    client, s, url = env
    alice = bearer(s.tokens["alice"])
    aid = client.post(f"/api/projects/{s.project_id}/next", headers=alice).json()["assignment_id"]
    path = f"/api/assignments/{aid}/label"
    cases = [
        (label_body(choice="C"), "choice"),
        (label_body(strength=7), "strength"),
        (label_body(strength=None), "strength must be 1"),
        (label_body(choice="tie"), "strength applies only"),
        (label_body(ranking=["A", "B"]), "ranking is for tasks with three"),
        (label_body(flags={"A": ["rude"]}), "flags"),
        (label_body(flags={"Z": ["harmful"]}), "unknown candidate"),
        ({**label_body(), "surprise": 1}, "surprise"),
        ({"choice": "A", "strength": 1}, "idempotency_key is required"),
        (label_body(client_ms=-5), "client_ms"),
    ]
    for body, needle in cases:
        r = client.post(path, headers=alice, json=body)
        assert r.status_code == 422, (body, r.text)
        assert isinstance(r.json()["detail"], str) and needle in r.json()["detail"], (needle, r.json())
    r = client.post(path, headers={**alice, "Content-Type": "application/json"}, content=b"{not json")
    assert r.status_code == 422 and "JSON" in r.json()["detail"]
    assert client.post("/api/projects/abc/next", headers=alice).status_code == 422
    r = client.post("/api/projects", headers=bearer(s.tokens["admin"]), json={"name": "q", "overlap": 0})
    assert r.status_code == 422 and "overlap" in r.json()["detail"]
    r = client.post(f"/api/projects/{s.project_id}/tasks", headers=bearer(s.tokens["admin"]),
                    json={"records": [{"prompt": "x", "responses": ["only one"]}]})
    assert r.status_code == 422 and "records:1: responses" in r.json()["detail"]
    assert count_labels(url) == 0


def test_a_retried_label_is_a_success_never_a_duplicate(env_any):
    client, s, url = env_any
    alice = bearer(s.tokens["alice"])
    first = client.post(f"/api/projects/{s.project_id}/next", headers=alice).json()
    again = client.post(f"/api/projects/{s.project_id}/next", headers=alice).json()
    assert again["assignment_id"] == first["assignment_id"]  # pending work is served again, same order
    assert again["candidates"] == first["candidates"]
    body = label_body(choice="B", strength=3, rationale="  B is right ", flags={"A": ["factual_error"]}, client_ms=4200)
    path = f"/api/assignments/{first['assignment_id']}/label"
    r1 = client.post(path, headers=alice, json=body)
    r2 = client.post(path, headers=alice, json=body)
    assert (r1.status_code, r1.json()["status"]) == (201, "created")
    assert (r2.status_code, r2.json()["status"]) == (200, "duplicate")
    assert r1.json()["label_id"] == r2.json()["label_id"]
    # the same assignment under a new key is a client bug: 409, nothing stored
    assert client.post(path, headers=alice, json=label_body()).status_code == 409
    # the key via header works as well; reusing a key on another assignment is refused
    second = client.post(f"/api/projects/{s.project_id}/next", headers=alice).json()
    reuse = client.post(f"/api/assignments/{second['assignment_id']}/label", headers=alice, json=body)
    assert reuse.status_code == 409 and "another assignment" in reuse.json()["detail"]
    r3 = client.post(f"/api/assignments/{second['assignment_id']}/label",
                     headers={**alice, "Idempotency-Key": "header-key-1"}, json={"choice": "tie"})
    assert r3.status_code == 201
    assert count_labels(url) == 2
    with make_sessionmaker(make_engine(url))() as db:
        stored = db.get(Label, r1.json()["label_id"])
        b_candidate = db.get(Assignment, first["assignment_id"]).display_order[1]
        assert (stored.choice, stored.winner, stored.strength) == ("B", b_candidate, 3)
        assert stored.rationale == "B is right" and stored.client_ms == 4200
        assert stored.flags == {str(1 - b_candidate): ["factual_error"]}  # flags follow the candidate, not the slot


def test_overlap_gives_k_distinct_annotators_then_done(any_url):
    s = seed(any_url, annotators=["a1", "a2", "a3"], records=pair_tasks(3), overlap=2)
    with TestClient(create_app(any_url)) as client:
        done = {}
        for name in ("a1", "a2", "a3"):
            n = 0
            while True:
                nxt = client.post(f"/api/projects/{s.project_id}/next", headers=bearer(s.tokens[name])).json()
                if nxt["done"]:
                    break
                r = client.post(f"/api/assignments/{nxt['assignment_id']}/label", headers=bearer(s.tokens[name]),
                                json=label_body())
                assert r.status_code == 201
                n += 1
            done[name] = n
    assert sum(done.values()) == 6 and done["a1"] == 3 and done["a2"] == 3 and done["a3"] == 0
    with make_sessionmaker(make_engine(any_url))() as db:
        per_task = db.execute(select(Label.task_id, func.count(), func.count(Label.user_id.distinct()))
                              .group_by(Label.task_id)).all()
    assert sorted((n, d) for _, n, d in per_task) == [(2, 2)] * 3


def test_candidate_order_is_random_per_assignment_and_recorded(sqlite_url):
    names = [f"u{i}" for i in range(24)]
    s = seed(sqlite_url, annotators=names, records=pair_tasks(1), overlap=len(names), tokens=False)
    from posttrain.feedback.assign import next_assignment
    from posttrain.feedback.db import Project, User

    with make_sessionmaker(make_engine(sqlite_url))() as db:
        project = db.get(Project, s.project_id)
        orders = {tuple(next_assignment(db, db.scalar(select(User).where(User.name == n)), project).display_order)
                  for n in names}
    assert orders == {(0, 1), (1, 0)}  # P(one order only) = 2^-23


def test_gold_tasks_are_mixed_in_once_per_annotator(sqlite_url):
    records = pair_tasks(6) + [{**t, "gold": 1} for t in pair_tasks(3, prefix="gold")]
    s = seed(sqlite_url, annotators=["g1", "g2"], records=records, overlap=2, gold_rate=0.5)
    with TestClient(create_app(sqlite_url)) as client:
        seen = {"g1": [], "g2": []}
        for name in seen:
            while not (nxt := client.post(f"/api/projects/{s.project_id}/next",
                                         headers=bearer(s.tokens[name])).json())["done"]:
                assert "gold" not in nxt  # annotators cannot tell gold from regular tasks
                seen[name].append(nxt["prompt"][0]["content"])
                # answer "the gold one is better" by picking the slot that shows candidate 1
                slot = next(c["slot"] for c in nxt["candidates"] if c["text"].endswith("answer two"))
                client.post(f"/api/assignments/{nxt['assignment_id']}/label", headers=bearer(s.tokens[name]),
                            json=label_body(choice=slot))
        stats = client.get(f"/api/projects/{s.project_id}/stats", headers=bearer(s.tokens["admin"])).json()
    for prompts in seen.values():
        assert len(prompts) == len(set(prompts))  # nothing twice
        assert sum(p.startswith("task") for p in prompts) == 6
        assert 1 <= sum(p.startswith("gold") for p in prompts) <= 3
    assert stats["tasks"] == 6 and stats["gold_tasks"] == 3 and stats["tasks_done"] == 6
    assert all(a["gold_accuracy"] == 1.0 and a["gold_n"] >= 1 for a in stats["annotators"])
    assert stats["agreement"]["percent"] == 1.0


def test_skip_frees_the_slot_and_expired_pending_work_is_reassigned(sqlite_url):
    s = seed(sqlite_url, annotators=["s1", "s2", "s3"], records=pair_tasks(1), overlap=1)
    with TestClient(create_app(sqlite_url)) as client:
        h1, h2, h3 = (bearer(s.tokens[n]) for n in ("s1", "s2", "s3"))
        a1 = client.post(f"/api/projects/{s.project_id}/next", headers=h1).json()
        assert client.post(f"/api/projects/{s.project_id}/next", headers=h2).json() == {"done": True}  # slot held
        assert client.post(f"/api/assignments/{a1['assignment_id']}/skip", headers=h1).json()["status"] == "skipped"
        assert client.post(f"/api/projects/{s.project_id}/next", headers=h1).json() == {"done": True}  # not again
        a2 = client.post(f"/api/projects/{s.project_id}/next", headers=h2).json()
        assert a2["done"] is False
        # s2 walks away: once the assignment is older than the project's TTL, s3 may take the slot
        with make_sessionmaker(make_engine(sqlite_url))() as db:
            db.execute(update(Assignment).where(Assignment.id == a2["assignment_id"])
                       .values(served_at=Assignment.served_at - timedelta(hours=2)))
            db.commit()
        assert client.post(f"/api/projects/{s.project_id}/next", headers=h3).json()["done"] is False
        skipped = client.post(f"/api/assignments/{a1['assignment_id']}/label", headers=h1, json=label_body())
        assert skipped.status_code == 409


def test_ranking_tasks_take_a_full_order(env):
    client, s, url = env
    admin = bearer(s.tokens["admin"])
    proj = client.post("/api/projects", headers=admin, json={"name": "rank", "overlap": 1, "gold_rate": 0,
                                                               "annotators": ["alice"]}).json()
    client.post(f"/api/projects/{proj['id']}/tasks", headers=admin,
                json={"records": [{"prompt": [{"role": "system", "content": "be brief"},
                                              {"role": "user", "content": "pick"}],
                                   "responses": [{"text": "x0", "model": "m0"}, {"text": "x1", "model": "m1"},
                                                 {"text": "x2", "model": "m2"}]}]})
    alice = bearer(s.tokens["alice"])
    nxt = client.post(f"/api/projects/{proj['id']}/next", headers=alice).json()
    assert nxt["mode"] == "ranking" and [c["slot"] for c in nxt["candidates"]] == ["A", "B", "C"]
    path = f"/api/assignments/{nxt['assignment_id']}/label"
    partial = label_body(ranking=["A", "B"], choice=None, strength=None)
    assert client.post(path, headers=alice, json=partial).status_code == 422
    assert client.post(path, headers=alice, json=label_body()).status_code == 422  # a choice is not a ranking
    by_text = {c["text"]: c["slot"] for c in nxt["candidates"]}
    order = [by_text["x2"], by_text["x0"], by_text["x1"]]  # x2 best, x1 worst
    r = client.post(path, headers=alice, json={"idempotency_key": "rank-1", "ranking": order})
    assert r.status_code == 201
    out = client.get(f"/api/projects/{proj['id']}/export", headers=admin, params={"ranking_as": "ranking"})
    rec = json.loads(out.text.splitlines()[0])
    assert rec["responses"] == ["x0", "x1", "x2"] and rec["ranking"] == [2, 3, 1]
    assert rec["prompt"][0] == {"role": "system", "content": "be brief"}


def _login(client: TestClient, name: str, password: str = PASSWORD):
    page = client.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    return client.post("/login", data={"username": name, "password": password, "csrf_token": token, "next": "/"},
                       follow_redirects=False)


def test_cookie_sessions_need_the_csrf_token_on_every_write(env):
    client, s, url = env
    bad = _login(client, "alice", "wrong password!")
    assert bad.status_code == 401 and "Wrong user name or password" in bad.text
    r = _login(client, "alice")
    assert r.status_code == 303
    cookie = r.headers["set-cookie"]
    assert "pt_session=" in cookie and "HttpOnly" in cookie and "SameSite=lax" in cookie.replace("Lax", "lax")
    page = open_task(client, s.project_id)
    assert page.status_code == 200
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    aid = re.search(r'name="assignment_id" value="(\d+)"', page.text).group(1)
    key = re.search(r'name="idempotency_key" value="([^"]+)"', page.text).group(1)
    form = {"assignment_id": aid, "idempotency_key": key, "choice": "tie"}
    # forms: no token or a wrong one -> 403
    assert client.post(f"/projects/{s.project_id}/label", data=form).status_code == 403
    assert client.post(f"/projects/{s.project_id}/label", data={**form, "csrf_token": "x" * 43}).status_code == 403
    # JSON with the cookie: the header is required too
    api = f"/api/assignments/{aid}/label"
    assert client.post(api, json=label_body(choice="tie", strength=None)).status_code == 403
    assert client.post("/logout").status_code == 403
    assert count_labels(url) == 0
    ok = client.post(f"/projects/{s.project_id}/label", data={**form, "csrf_token": csrf}, follow_redirects=False)
    assert ok.status_code == 303 and ok.headers["location"] == f"/projects/{s.project_id}/label"
    # a resubmitted form (same key) is fine; the API with the header works
    again = client.post(f"/projects/{s.project_id}/label", data={**form, "csrf_token": csrf}, follow_redirects=False)
    assert again.status_code == 303
    nxt = client.post(f"/api/projects/{s.project_id}/next", headers={"X-CSRF-Token": csrf}).json()
    r = client.post(f"/api/assignments/{nxt['assignment_id']}/label", headers={"X-CSRF-Token": csrf},
                    json=label_body())
    assert r.status_code == 201
    assert count_labels(url) == 2
    assert client.post("/logout", data={"csrf_token": csrf}, follow_redirects=False).status_code == 303
    assert client.get("/api/me").status_code == 401  # the session is gone server-side


def test_login_form_needs_its_csrf_cookie(env):
    client, _, _ = env
    r = client.post("/login", data={"username": "alice", "password": PASSWORD, "csrf_token": "forged"},
                    follow_redirects=False)
    assert r.status_code == 403
    r = _login(client, "alice")
    assert r.status_code == 303 and r.headers["location"] == "/"
    page = client.get("/login", params={"next": "//evil.example/steal"})
    assert 'value="//evil.example' not in page.text  # no open redirect


def test_pages_redirect_to_login_and_send_a_strict_csp(env):
    client, s, _ = env
    r = client.get(f"/projects/{s.project_id}/label", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/login?next=")
    for path in ("/login", "/api/me", "/static/label.js"):
        csp = client.get(path).headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "object-src 'none'" in csp
    assert client.get("/login").headers["x-frame-options"] == "DENY"
    assert client.get("/docs").status_code == 404  # Swagger UI would need a CDN and inline script


def test_invalid_form_rerenders_with_422_and_keeps_the_assignment(env):
    client, s, _ = env
    _login(client, "bob")
    page = open_task(client, s.project_id)
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    aid = re.search(r'name="assignment_id" value="(\d+)"', page.text).group(1)
    r = client.post(f"/projects/{s.project_id}/label",
                    data={"csrf_token": csrf, "assignment_id": aid, "idempotency_key": "k-422", "choice": "A"})
    assert r.status_code == 422 and "strength must be 1" in r.text and f'value="{aid}"' in r.text
