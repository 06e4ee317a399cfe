"""Hardening of the labeling app (L1, L3-L11 and the rest of the security issue): every test here
failed on the code before the fix it names. Database-backed defects run on SQLite and PostgreSQL."""

from __future__ import annotations

import random
import re
import uuid
from datetime import timedelta

import httpx
import pytest
from fastapi.testclient import TestClient
from label_helpers import PASSWORD, ServerProcess, open_task, pair_tasks, seed
from sqlalchemy import func, select, update

from posttrain.errors import ConfigError
from posttrain.feedback import commands as C
from posttrain.feedback.app import Settings, create_app
from posttrain.feedback.assign import gold_rng, next_assignment, skip
from posttrain.feedback.db import (
    Assignment,
    Label,
    LoginFailure,
    Project,
    User,
    WebSession,
    make_engine,
    make_sessionmaker,
    server_secret,
    utcnow,
)

CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def _db(url: str):
    return make_sessionmaker(make_engine(url))()


def _count(url: str, model) -> int:
    with _db(url) as db:
        return db.scalar(select(func.count()).select_from(model))


def _login(client: TestClient, name: str, password: str = PASSWORD):
    token = CSRF.search(client.get("/login").text).group(1)
    return client.post("/login", data={"username": name, "password": password, "csrf_token": token, "next": "/"},
                       follow_redirects=False)


# ----------------------------------------------------------------------------- L1: 500s keep the headers


def test_an_unhandled_error_is_a_500_with_the_security_headers(sqlite_url):
    app = create_app(sqlite_url)

    def boom():
        raise RuntimeError("a bug")

    app.add_api_route("/api/boom", boom)
    app.add_api_route("/boom", boom)
    with TestClient(app, raise_server_exceptions=False) as client:
        for path in ("/api/boom", "/boom"):
            r = client.get(path)
            assert r.status_code == 500, path
            assert "script-src 'self'" in r.headers["content-security-policy"]
            assert r.headers["x-frame-options"] == "DENY" and r.headers["x-content-type-options"] == "nosniff"
            assert "a bug" not in r.text  # no internals in the answer
        assert client.get("/healthz").status_code == 200  # the app goes on


# ----------------------------------------------------------------------------- L3: names


def test_names_with_newlines_or_control_characters_are_refused(sqlite_url):
    s = seed(sqlite_url, annotators=["alice"], records=pair_tasks(1))
    with TestClient(create_app(sqlite_url)) as client:
        admin = bearer(s.tokens["admin"])
        for name in ("two\nlines", "bell\x07", "esc\x1b[31mred", "rtl\u202eevil", "zero\u200bwidth", "sep\u2028x"):
            r = client.post("/api/projects", headers=admin, json={"name": name})
            assert r.status_code == 422 and "project name" in r.json()["detail"], (name, r.text)
        assert client.post("/api/projects", headers=admin, json={"name": "Hilfsbereit – ok"}).status_code == 201
        r = client.post("/api/users", headers=admin, json={"name": "bob\n", "password": "a fine passphrase"})
        assert r.status_code == 422 and "user name" in r.json()["detail"]
    with pytest.raises(ConfigError, match="control or invisible"):
        C.run_create_project(C.LabelCreateProjectConfig(db=sqlite_url, name="a\tb"))
    assert _count(sqlite_url, Project) == 2


# ----------------------------------------------------------------------------- L4: ownership first


def test_the_label_form_checks_the_assignment_before_the_form(any_url):
    records = [{"prompt": "rank", "responses": ["r1", "r2", "r3"]}, *pair_tasks(1)]
    s = seed(any_url, annotators=["alice", "bob"], records=records, overlap=2)
    with TestClient(create_app(any_url)) as client:
        theirs = client.post(f"/api/projects/{s.project_id}/next", headers=bearer(s.tokens["alice"])).json()
        assert theirs["mode"] == "ranking"
        assert _login(client, "bob").status_code == 303
        csrf = CSRF.search(open_task(client, s.project_id).text).group(1)
        url = f"/projects/{s.project_id}/label"
        for form in ({}, {"client_ms": str(2**62)}, {"rank_A": "9"}):
            r = client.post(url, data={"csrf_token": csrf, "assignment_id": str(theirs["assignment_id"]),
                                       "idempotency_key": "k1", **form})
            assert r.status_code == 403 and "another annotator" in r.text, (form, r.status_code)
            assert "1 to 3" not in r.text  # nothing about their task's candidates
        r = client.post(url, data={"csrf_token": csrf, "assignment_id": str(2**31 - 1), "client_ms": "x"})
        assert r.status_code == 404
        other = seed_project(any_url, "elsewhere", "bob")
        mine = client.post(f"/api/projects/{other}/next", headers={"X-CSRF-Token": csrf}).json()
        r = client.post(url, data={"csrf_token": csrf, "assignment_id": str(mine["assignment_id"]),
                                   "idempotency_key": "k2", "choice": "tie"})
        assert r.status_code == 404  # an assignment of another project is not one of this project's
    assert _count(any_url, Label) == 0


def seed_project(url: str, name: str, member: str) -> int:
    from posttrain.feedback import accounts, importing

    with _db(url) as db:
        project = accounts.create_project(db, name, overlap=1, gold_rate=0.0)
        accounts.add_members(db, project, [member])
        importing.add_tasks(db, project, importing.parse_records(pair_tasks(1, prefix=name), "r")[0])
        return project.id


# ----------------------------------------------------------------------------- L5: only a POST assigns


def test_a_get_never_creates_an_assignment(any_url):
    s = seed(any_url, annotators=["alice"], records=pair_tasks(2))
    with TestClient(create_app(any_url)) as client:
        alice = bearer(s.tokens["alice"])
        for method in ("GET", "HEAD"):
            r = client.request(method, f"/api/projects/{s.project_id}/next", headers=alice)
            assert r.status_code == 405 and r.headers["allow"] == "POST"
        assert _login(client, "alice").status_code == 303
        page = client.get(f"/projects/{s.project_id}/label", headers={"Sec-Fetch-Site": "cross-site"})
        assert page.status_code == 200 and 'action="/projects/%d/next"' % s.project_id in page.text
        assert 'data-auto' not in page.text  # a cross-site link shows a button, never submits by itself
        assert 'data-auto="1"' in client.get(f"/projects/{s.project_id}/label",
                                             headers={"Sec-Fetch-Site": "same-origin"}).text
        assert _count(any_url, Assignment) == 0
        csrf = CSRF.search(page.text).group(1)
        assert client.post(f"/projects/{s.project_id}/next", data={}).status_code == 403
        assert client.post(f"/api/projects/{s.project_id}/next").status_code == 403  # cookie without CSRF header
        assert _count(any_url, Assignment) == 0
        r = client.post(f"/projects/{s.project_id}/next", data={"csrf_token": csrf}, follow_redirects=False)
        assert r.status_code == 303 and _count(any_url, Assignment) == 1
        assert 'name="assignment_id"' in client.get(f"/projects/{s.project_id}/label").text
        again = client.post(f"/api/projects/{s.project_id}/next", headers=alice).json()
        assert again["done"] is False and _count(any_url, Assignment) == 1  # the pending one, not a second


# ----------------------------------------------------------------------------- L6: login CSRF


def test_the_login_token_is_signed_bound_to_the_address_and_secure(sqlite_url):
    seed(sqlite_url, annotators=["alice"], records=pair_tasks(1))
    app = create_app(sqlite_url)
    client = TestClient(app, client=("10.0.0.1", 1000))
    form = {"username": "alice", "password": PASSWORD, "next": "/"}
    client.cookies.set("pt_login_csrf", "planted", path="/login")
    r = client.post("/login", data={**form, "csrf_token": "planted"}, follow_redirects=False)
    assert r.status_code == 403  # a pair the attacker made up
    token = CSRF.search(client.get("/login").text).group(1)
    nonce, issued, sig = token.split(".")
    for forged in (f"{nonce}.{int(issued) + 60}.{sig}", f"{nonce}x.{issued}.{sig}"):
        client.cookies.set("pt_login_csrf", forged, path="/login")
        assert client.post("/login", data={**form, "csrf_token": forged}, follow_redirects=False).status_code == 403
    victim = TestClient(app, client=("10.0.0.2", 2000))  # a real pair, fetched by the attacker for themselves
    victim.cookies.set("pt_login_csrf", token, path="/login")
    assert victim.post("/login", data={**form, "csrf_token": token}, follow_redirects=False).status_code == 403
    assert _login(client, "alice").status_code == 303
    assert "secure" not in client.get("/login").headers["set-cookie"].lower()  # plain HTTP, no setting
    secure = TestClient(create_app(sqlite_url, Settings(secure_cookies=True)))
    assert "secure" in secure.get("/login").headers["set-cookie"].lower()
    https = TestClient(app, base_url="https://testserver")
    assert "secure" in https.get("/login").headers["set-cookie"].lower()
    r = _login(https, "alice")
    assert r.status_code == 303 and "secure" in r.headers["set-cookie"].lower()


# ----------------------------------------------------------------------------- L7: Host allow-list


def test_unknown_host_headers_are_refused(sqlite_url):
    cfg = C.LabelServeConfig()
    assert C.serve_settings(cfg).allowed_hosts == ("127.0.0.1", "localhost", "::1")  # the real default
    assert C.serve_settings(C.LabelServeConfig(host="0.0.0.0")).allowed_hosts == ("localhost", "127.0.0.1", "::1")
    with TestClient(create_app(sqlite_url, Settings(allowed_hosts=("labels.example.com",)))) as client:
        r = client.get("/healthz", headers={"Host": "evil.example"})
        assert r.status_code == 400 and "allowed_hosts" in r.text and "\n" not in r.text.strip()
        assert "script-src 'self'" in r.headers["content-security-policy"]
        assert client.get("/healthz", headers={"Host": "LABELS.example.com:443"}).status_code == 200
        assert client.get("/healthz").status_code == 400  # "testserver" is allowed only where tests add it
    server = ServerProcess(sqlite_url).start()  # python -m posttrain.feedback serve, default settings
    try:
        for host, status in [("evil.example", 400), ("evil.example:%d" % server.port, 400), ("testserver", 400),
                             ("localhost:%d" % server.port, 200), ("127.0.0.1", 200), ("[::1]:1", 200)]:
            r = httpx.get(server.url + "/healthz", headers={"Host": host})
            assert r.status_code == status, (host, r.status_code, r.text)
    finally:
        server.stop()


# ----------------------------------------------------------------------------- L8: banner messages


def test_the_banner_shows_only_messages_the_server_signed(sqlite_url):
    seed(sqlite_url, annotators=["alice"], records=pair_tasks(1))
    with TestClient(create_app(sqlite_url)) as client:
        spoof = "Your account is locked: call +1 555 0100"
        assert spoof not in client.get("/login", params={"msg": spoof}).text
        assert _login(client, "admin").status_code == 303
        assert spoof not in client.get("/admin", params={"msg": spoof, "sig": "x" * 22}).text
        csrf = CSRF.search(client.get("/admin").text).group(1)
        r = client.post("/admin/projects", data={"csrf_token": csrf, "name": "fresh"}, follow_redirects=False)
        assert r.status_code == 303 and "sig=" in r.headers["location"]
        assert "Created project fresh." in client.get(r.headers["location"]).text
        tampered = r.headers["location"].replace("fresh", "stale")
        assert "Created project" not in client.get(tampered).text


# ----------------------------------------------------------------------------- L9: password policy


def test_common_passwords_and_the_user_name_are_refused(sqlite_url, monkeypatch):
    s = seed(sqlite_url, annotators=["alice"], records=pair_tasks(1))
    with TestClient(create_app(sqlite_url)) as client:
        admin = bearer(s.tokens["admin"])
        for name, password in [("carol", "password"), ("carol", "Password2024!"), ("carol", "qwertyuiop"),
                               ("carol", "iloveyou"), ("carol", "carol.carol"), ("carol", "my name is CAROL")]:
            r = client.post("/api/users", headers=admin, json={"name": name, "password": password})
            assert r.status_code == 422 and "password" in r.json()["detail"], (password, r.text)
        ok = client.post("/api/users", headers=admin, json={"name": "carol", "password": "tide pool lantern"})
        assert ok.status_code == 201
    with pytest.raises(ConfigError) as e:
        C.run_add_user(C.LabelAddUserConfig(db=sqlite_url, name="dave", password="short"))
    assert e.value.where == "password" and "at least 8" in e.value.what  # was reported as "projects"
    with pytest.raises(ConfigError) as e:
        C.run_add_user(C.LabelAddUserConfig(db=sqlite_url, name="dave", password="12345678"))
    assert e.value.where == "password" and "common" in e.value.what


# ----------------------------------------------------------------------------- L10: gold schedule


def test_the_gold_schedule_is_keyed_by_the_persistent_server_secret(any_url):
    records = pair_tasks(16) + [{**t, "gold": 0} for t in pair_tasks(16, prefix="gold")]
    s = seed(any_url, annotators=["alice"], records=records, gold_rate=0.5, tokens=False)
    with TestClient(create_app(any_url)):
        pass  # a server start creates the secret
    with _db(any_url) as db:
        secret = server_secret(db)
        user = db.scalar(select(User).where(User.name == "alice"))
        project = db.get(Project, s.project_id)
        seen = []
        for _ in range(16):
            a = next_assignment(db, user, project)
            seen.append(a.task.gold is not None)
            skip(db, user, a.id)
    old = [random.Random(f"{s.project_id}:{user.id}:{i}").random() < 0.5 for i in range(16)]
    keyed = [gold_rng(secret, s.project_id, user.id, i).random() < 0.5 for i in range(16)]
    assert seen == keyed and seen != old  # P(old schedule by chance) = 2^-16
    with _db(any_url) as db:
        assert server_secret(db) == secret  # a new engine (a restart) reads the same secret
    assert len(secret) == 32


# ----------------------------------------------------------------------------- L11 and bodies: no 500s


def test_corrupt_uploads_are_refused_naming_the_uploaded_file(sqlite_url):
    s = seed(sqlite_url, annotators=["alice"], records=pair_tasks(1))
    deep_meta = '{"prompt": "p", "responses": ["a", "b"], "meta": ' + "[" * 200 + "]" * 200 + "}\n"
    files = {"broken.parquet": b"PAR1 not really parquet PAR1", "latin1.jsonl": b'{"prompt": "caf\xe9"}\n',
             "deep.json": b"[" * 100_000 + b"]" * 100_000, "deepline.jsonl": b"[" * 100_000 + b"]" * 100_000 + b"\n",
             "meta.jsonl": deep_meta.encode(), "notes.txt": b"hello"}
    with TestClient(create_app(sqlite_url), raise_server_exceptions=False) as client:
        assert _login(client, "admin").status_code == 303
        csrf = CSRF.search(client.get("/admin").text).group(1)
        for name, content in files.items():
            r = client.post(f"/admin/projects/{s.project_id}/import", data={"csrf_token": csrf},
                            files={"file": (name, content)}, follow_redirects=False)
            assert r.status_code == 303, (name, r.status_code, r.text[:300])
            page = client.get(r.headers["location"]).text
            banner = re.search(r'<p class="msg" role="status">(.*?)</p>', page, re.S).group(1)
            assert banner.startswith("Error") and "/tmp" not in banner and "upload." not in banner, (name, banner)
            assert name in banner or name.endswith(".txt"), (name, banner)
    assert _count(sqlite_url, Assignment) == 0


def test_malformed_json_bodies_are_422_not_400(sqlite_url):
    s = seed(sqlite_url, annotators=["alice"], records=pair_tasks(1))
    with TestClient(create_app(sqlite_url), raise_server_exceptions=False) as client:
        alice, admin = bearer(s.tokens["alice"]), bearer(s.tokens["admin"])
        aid = client.post(f"/api/projects/{s.project_id}/next", headers=alice).json()["assignment_id"]
        path, ct = f"/api/assignments/{aid}/label", {"Content-Type": "application/json"}
        cases = [(b'{"idempotency_key": "k\xff", "choice": "tie"}', "UTF-8"),
                 (b"[" * 50_000 + b"]" * 50_000, "nested"),
                 (b'{"idempotency_key": "k", "choice": "tie", "flags": ' + b"[" * 300 + b"]" * 300 + b"}", "nested")]
        for body, needle in cases:
            r = client.post(path, headers={**alice, **ct}, content=body)
            assert r.status_code == 422 and needle in r.json()["detail"], (body[:40], r.status_code, r.text[:200])
        nested: list = []
        for _ in range(40):
            nested = [nested]
        deep = {"prompt": "p", "responses": ["a", "b"], "meta": {"x": nested}}
        r = client.post(f"/api/projects/{s.project_id}/tasks", headers=admin, json={"records": [deep]})
        assert r.status_code == 422 and "nested deeper" in r.json()["detail"]
        assert client.post(path, headers=alice, json={"idempotency_key": "k", "choice": "tie"}).status_code == 201


# ----------------------------------------------------------------------------- idempotency, sessions, rate limits


def test_an_idempotency_key_reused_with_a_different_label_is_409(any_url):
    s = seed(any_url, annotators=["alice"], records=pair_tasks(1))
    with TestClient(create_app(any_url)) as client:
        alice = bearer(s.tokens["alice"])
        aid = client.post(f"/api/projects/{s.project_id}/next", headers=alice).json()["assignment_id"]
        path = f"/api/assignments/{aid}/label"
        body = {"idempotency_key": uuid.uuid4().hex, "choice": "A", "strength": 2, "rationale": "A is right",
                "flags": {"B": ["harmful"]}, "client_ms": 900}
        assert client.post(path, headers=alice, json=body).status_code == 201
        assert client.post(path, headers=alice, json=body).json()["status"] == "duplicate"
        for change in ({"choice": "B"}, {"strength": 3}, {"rationale": "B"}, {"flags": {}}, {"client_ms": 901}):
            r = client.post(path, headers=alice, json={**body, **change})
            assert r.status_code == 409 and "different label" in r.json()["detail"], (change, r.text)
    with _db(any_url) as db:
        assert [(x.choice, x.strength) for x in db.scalars(select(Label))] == [("A", 2)]


def test_expired_sessions_are_purged_on_login(any_url):
    seed(any_url, annotators=["alice", "bob"], records=pair_tasks(1), tokens=False)
    with TestClient(create_app(any_url)) as a, TestClient(create_app(any_url)) as b:
        assert _login(a, "alice").status_code == 303 and _login(b, "bob").status_code == 303
        with _db(any_url) as db:
            alice_id = db.scalar(select(User.id).where(User.name == "alice"))
            db.execute(update(WebSession).where(WebSession.user_id == alice_id)
                       .values(expires_at=utcnow() - timedelta(minutes=1)))
            db.commit()
        assert _count(any_url, WebSession) == 2
        assert _login(TestClient(a.app), "admin").status_code == 303
        with _db(any_url) as db:
            left = db.scalars(select(WebSession.user_id)).all()
        assert alice_id not in left and len(left) == 2  # bob's live session and the admin's new one
        assert b.get("/api/me").status_code == 200


def test_logins_are_rate_limited_per_name_and_per_address(any_url):
    seed(any_url, annotators=["alice", "bob"], records=pair_tasks(1), tokens=False)
    app = create_app(any_url, Settings(login_max_failures=3, login_window_s=600))
    x, y, z = (TestClient(app, client=(f"10.0.0.{i}", 1000 + i)) for i in (1, 2, 3))
    wrong = {"username": "alice", "password": "not her password"}
    assert [x.post("/api/token", json=wrong).status_code for _ in range(2)] == [401, 401]
    assert _login(y, "alice").status_code == 303  # alice from elsewhere: not locked, and x keeps its count
    assert x.post("/api/token", json=wrong).status_code == 401
    r = x.post("/api/token", json={"username": "alice", "password": PASSWORD})
    assert r.status_code == 429 and 0 < int(r.headers["retry-after"]) <= 600  # the right password too
    assert "too many failed logins" in r.json()["detail"]
    page = _login(z, "alice")  # the name is locked from every address
    assert page.status_code == 429 and "Too many failed logins" in page.text and page.headers["retry-after"]
    assert z.get("/api/me", auth=("alice", PASSWORD)).status_code == 429  # HTTP Basic is a login too
    # per address: guesses against many names
    for name in ("bob", "nobody", "admin"):
        assert z.post("/api/token", json={"username": name, "password": "guess guess"}).status_code == 401
    assert z.post("/api/token", json={"username": "bob", "password": PASSWORD}).status_code == 429
    assert y.post("/api/token", json={"username": "bob", "password": PASSWORD}).status_code == 201
    with _db(any_url) as db:  # the window passes: unlocked
        db.execute(update(LoginFailure).values(at=utcnow() - timedelta(seconds=601)))
        db.commit()
    assert x.post("/api/token", json={"username": "alice", "password": PASSWORD}).status_code == 201
    assert C.LabelServeConfig().login_max_failures == 10 and C.LabelServeConfig().login_window_s == 900
