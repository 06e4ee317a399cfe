"""Security and robustness fixes: expired assignments, edge validation (no deterministic 500s),
credential revocation and expiry, request-size limits enforced before the body is read."""

from __future__ import annotations

import re
import socket
import time
import uuid
from datetime import timedelta

from fastapi.testclient import TestClient
from label_helpers import PASSWORD, ServerProcess, open_task, pair_tasks, seed
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
    page = open_task(client, project_id)
    return {"csrf_token": re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1),
            "assignment_id": re.search(r'name="assignment_id" value="(\d+)"', page.text).group(1),
            "idempotency_key": re.search(r'name="idempotency_key" value="([^"]+)"', page.text).group(1)}


# ----------------------------------------------------------------------------- M3: expired assignments


def test_an_expired_assignment_is_refused_and_not_served_again(any_url):
    s = seed(any_url, annotators=["s1", "s2"], records=pair_tasks(1), overlap=1)
    with TestClient(create_app(any_url)) as client:
        h1, h2 = bearer(s.tokens["s1"]), bearer(s.tokens["s2"])
        a1 = client.post(f"/api/projects/{s.project_id}/next", headers=h1).json()
        _age(any_url, a1["assignment_id"])
        a2 = client.post(f"/api/projects/{s.project_id}/next", headers=h2).json()
        assert a2["done"] is False and a2["assignment_id"] != a1["assignment_id"]  # the slot was re-issued
        late = client.post(f"/api/assignments/{a1['assignment_id']}/label", headers=h1, json=label_body())
        assert late.status_code == 409 and "expired" in late.json()["detail"]
        assert "someone else" in late.json()["detail"]
        assert client.post(f"/api/projects/{s.project_id}/next", headers=h1).json() == {"done": True}
        ok = client.post(f"/api/assignments/{a2['assignment_id']}/label", headers=h2, json=label_body())
        assert ok.status_code == 201
    with _db(any_url) as db:
        assert db.scalar(select(func.count()).select_from(Label)) == 1  # overlap 1: one label, never two
        assert db.get(Assignment, a1["assignment_id"]).status == "expired"


def test_next_does_not_return_an_expired_assignment_to_its_holder(any_url):
    s = seed(any_url, annotators=["s1"], records=pair_tasks(2), overlap=1)
    with TestClient(create_app(any_url)) as client:
        h1 = bearer(s.tokens["s1"])
        a1 = client.post(f"/api/projects/{s.project_id}/next", headers=h1).json()
        _age(any_url, a1["assignment_id"])
        a2 = client.post(f"/api/projects/{s.project_id}/next", headers=h1).json()
        assert a2["done"] is False and a2["assignment_id"] != a1["assignment_id"]
        r = client.post(f"/api/assignments/{a1['assignment_id']}/label", headers=h1, json=label_body())
        assert r.status_code == 409 and "expired" in r.json()["detail"]


# ----------------------------------------------------------------------------- M4: no deterministic 500s


def _env(url: str):
    s = seed(url, annotators=["alice", "bob"], records=pair_tasks(4), overlap=2)
    return s, TestClient(create_app(url), raise_server_exceptions=False)


def test_nul_bytes_anywhere_are_422_never_500(any_url):
    import base64

    s, client = _env(any_url)
    with client:
        alice, admin = bearer(s.tokens["alice"]), bearer(s.tokens["admin"])
        r = client.post("/api/token", json={"username": "ali\u0000ce", "password": PASSWORD})
        assert r.status_code == 422 and "NUL" in r.json()["detail"]
        basic = base64.b64encode(f"ali\u0000ce:{PASSWORD}".encode()).decode()
        assert client.post("/api/token", headers={"Authorization": f"Basic {basic}"}).status_code == 401
        assert client.get("/api/me", headers={"Authorization": f"Basic {basic}"}).status_code == 401
        aid = client.post(f"/api/projects/{s.project_id}/next", headers=alice).json()["assignment_id"]
        path = f"/api/assignments/{aid}/label"
        for body in (label_body(rationale="bad \u0000 byte"), label_body(idempotency_key="k\u0000"),
                     label_body(flags={"A\u0000": ["harmful"]})):
            r = client.post(path, headers=alice, json=body)
            assert r.status_code == 422 and "NUL" in r.json()["detail"], r.text
        admin_cases = [
            ("/api/users", {"name": "eve\u0000", "password": PASSWORD}),
            ("/api/users", {"name": "eve", "password": PASSWORD, "projects": ["p\u0000"]}),
            ("/api/projects", {"name": "new\u0000project"}),
            ("/api/projects", {"name": "newproject", "annotators": ["bob\u0000"]}),
            (f"/api/projects/{s.project_id}/members", {"users": ["bob\u0000"]}),
            (f"/api/projects/{s.project_id}/tasks", {"records": [{"prompt": "x\u0000", "responses": ["a", "b"]}]}),
            (f"/api/projects/{s.project_id}/tasks", {"records": [{"prompt": "x", "responses": ["a", "b"],
                                                                  "meta": {"k\u0000": 1}}]}),
        ]
        for path2, body in admin_cases:
            r = client.post(path2, headers=admin, json=body)
            assert r.status_code == 422 and "NUL" in r.json()["detail"], (path2, r.status_code, r.text)
        assert client.post(path, headers=alice, json=label_body()).status_code == 201  # still works
    with _db(any_url) as db:
        assert db.scalar(select(func.count()).select_from(Label)) == 1


def test_out_of_range_ids_are_404_and_unbounded_numbers_422(any_url):
    s, client = _env(any_url)
    with client:
        alice, admin = bearer(s.tokens["alice"]), bearer(s.tokens["admin"])
        for big in (2**31, 2**63, 2**64 + 5):
            assert client.post(f"/api/projects/{big}/next", headers=alice).status_code == 404
            assert client.get(f"/api/assignments/{big}", headers=alice).status_code == 404
            assert client.post(f"/api/assignments/{big}/label", headers=alice, json=label_body()).status_code == 404
            assert client.post(f"/api/assignments/{big}/skip", headers=alice).status_code == 404
            assert client.get(f"/api/projects/{big}/stats", headers=admin).status_code == 404
            assert client.post(f"/api/projects/{big}/members", headers=admin, json={"users": []}).status_code == 404
        for field in ("overlap", "assignment_ttl_s"):
            r = client.post("/api/projects", headers=admin, json={"name": f"big-{field}", field: 2**40})
            assert r.status_code == 422 and field in r.json()["detail"]


def test_the_form_path_has_the_api_limits(any_url):
    s, client = _env(any_url)
    with client:
        assert _login(client, "alice").status_code == 303
        form = _page_form(client, s.project_id)
        url = f"/projects/{s.project_id}/label"
        base = {**form, "choice": "A", "strength": "2"}
        cases = [
            ({"client_ms": str(2**62)}, 422, "client_ms"),
            ({"client_ms": "²"}, 422, "client_ms"),
            ({"strength": "²"}, 422, "strength"),
            ({"rationale": "x" * 900_000}, 422, "rationale"),
            ({"rationale": "nul \u0000"}, 422, "NUL"),
            ({"idempotency_key": "k" * 101}, 422, "idempotency_key"),
            ({"assignment_id": "²"}, 422, "assignment_id"),
            ({"assignment_id": str(2**63)}, 404, "no assignment"),
            ({"assignment_id": str(2**31)}, 404, "no assignment"),
        ]
        for change, status, needle in cases:
            r = client.post(url, data={**base, **change}, follow_redirects=False)
            assert r.status_code == status and needle in r.text, (change, r.status_code, r.text[-500:])
        r = client.post(f"/projects/{s.project_id}/skip", data={"csrf_token": form["csrf_token"],
                                                                "assignment_id": str(2**63)})
        assert r.status_code == 404
        for big in (2**31, 2**63):
            assert client.get(f"/projects/{big}/label").status_code == 404
        assert client.post(url, data={**base, "client_ms": "1234"}, follow_redirects=False).status_code == 303
    with _db(any_url) as db:
        labels = db.scalars(select(Label)).all()
        assert [(x.client_ms, x.rationale) for x in labels] == [(1234, None)]  # nothing else was stored


# ----------------------------------------------------------------------------- M2: revocation, expiry


def test_a_password_reset_revokes_old_tokens_and_sessions(any_url, monkeypatch, capsys):
    from posttrain.feedback import commands as C

    s = seed(any_url, annotators=["alice"], records=pair_tasks(1))
    with TestClient(create_app(any_url)) as client:
        old = bearer(s.tokens["alice"])
        assert _login(client, "alice").status_code == 303
        assert client.get("/api/me").status_code == 200 and client.get("/api/me", headers=old).status_code == 200
        monkeypatch.setenv("POSTTRAIN_LABEL_PASSWORD", "a brand new password")
        C.run_add_user(C.LabelAddUserConfig(db=any_url, name="alice", update=True))
        r = client.get("/api/me", headers=old)
        assert r.status_code == 401 and "revoked" in r.json()["detail"]
        assert client.get("/api/me").status_code == 401  # the browser session is gone too
        assert client.post("/api/token", json={"username": "alice", "password": PASSWORD}).status_code == 401
        new = client.post("/api/token", json={"username": "alice", "password": "a brand new password"})
        assert client.get("/api/me", headers=bearer(new.json()["token"])).status_code == 200


def test_revoke_and_deactivate_from_the_command_line(any_url, capsys):
    from posttrain.feedback import commands as C

    s = seed(any_url, annotators=["alice", "bob"], records=pair_tasks(1))
    with TestClient(create_app(any_url)) as client:
        a, b = bearer(s.tokens["alice"]), bearer(s.tokens["bob"])
        out = C.run_add_user(C.LabelAddUserConfig(db=any_url, name="alice", revoke=True))
        assert out["tokens_revoked"] == 1 and out["active"] is True
        assert client.get("/api/me", headers=a).status_code == 401
        assert client.get("/api/me", headers=b).status_code == 200  # only alice's
        fresh = client.post("/api/token", json={"username": "alice", "password": PASSWORD})
        assert fresh.status_code == 201  # her password still works: revoke ends credentials, not the account
        out = C.run_add_user(C.LabelAddUserConfig(db=any_url, name="bob", active=False))
        assert out["active"] is False and out["tokens_revoked"] == 1
        assert client.get("/api/me", headers=b).status_code == 401
        assert client.post("/api/token", json={"username": "bob", "password": PASSWORD}).status_code == 401
        assert _login(client, "bob").status_code == 401
        C.run_add_user(C.LabelAddUserConfig(db=any_url, name="bob", active=True))
        assert client.post("/api/token", json={"username": "bob", "password": PASSWORD}).status_code == 201


def test_admin_page_revokes_and_deactivates_with_csrf(any_url):
    s = seed(any_url, annotators=["alice"], records=pair_tasks(1))
    with TestClient(create_app(any_url)) as client:
        alice = bearer(s.tokens["alice"])
        assert _login(client, "admin").status_code == 303
        page = client.get("/admin")
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
        uid = re.search(r'action="/admin/users/(\d+)/access"[^>]*>\s*<input[^>]*>\s*<button[^>]*>Revoke',
                        page.text)
        with _db(any_url) as db:
            from posttrain.feedback.db import User
            alice_id = db.scalar(select(User.id).where(User.name == "alice"))
            admin_id = db.scalar(select(User.id).where(User.name == "admin"))
        assert uid is not None and f"/admin/users/{alice_id}/access" in page.text
        path = f"/admin/users/{alice_id}/access"
        assert client.post(path, data={"action": "revoke"}).status_code == 403  # no CSRF token
        assert client.get("/api/me", headers=alice).status_code == 200
        r = client.post(path, data={"action": "revoke", "csrf_token": csrf}, follow_redirects=False)
        assert r.status_code == 303 and "revoked" in r.headers["location"]
        assert client.get("/api/me", headers=alice).status_code == 401
        r = client.post(path, data={"action": "deactivate", "csrf_token": csrf}, follow_redirects=False)
        assert "deactivated" in r.headers["location"]
        assert client.post("/api/token", json={"username": "alice", "password": PASSWORD}).status_code == 401
        r = client.post(f"/admin/users/{admin_id}/access", data={"action": "deactivate", "csrf_token": csrf},
                        follow_redirects=False)
        assert "Error" in r.headers["location"]  # not yourself
        assert client.get("/api/me").status_code == 200


def test_api_tokens_expire(any_url):
    s = seed(any_url, annotators=["alice"], records=pair_tasks(1))
    with TestClient(create_app(any_url, Settings(token_days=30))) as client:
        alice = bearer(s.tokens["alice"])
        assert client.get("/api/me", headers=alice).status_code == 200
        with _db(any_url) as db:
            db.execute(update(ApiToken).values(created_at=utcnow() - timedelta(days=31)))
            db.commit()
        r = client.get("/api/me", headers=alice)
        assert r.status_code == 401 and "expired" in r.json()["detail"]
        assert r.headers["www-authenticate"].startswith("Bearer")
        fresh = client.post("/api/token", json={"username": "alice", "password": PASSWORD}).json()["token"]
        assert client.get("/api/me", headers=bearer(fresh)).status_code == 200
    from posttrain.feedback.commands import LabelServeConfig

    assert LabelServeConfig().token_days == 30.0


# ----------------------------------------------------------------------------- M1: body limits, auth first


def _raw(port: int, head: str, parts: list[bytes] = (), timeout: float = 5.0) -> tuple[int | None, float, bytes]:
    """Send a request head (and maybe some body) on a raw socket; (status, seconds to answer, response head)."""
    t0 = time.monotonic()
    data = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(head.encode("latin-1"))
            for part in parts:
                sock.sendall(part)
        except OSError:
            pass  # the server answered and closed while we were still sending: read its answer
        try:
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except OSError:
            pass
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else None
    return status, time.monotonic() - t0, data


def _head(method: str, path: str, length: int | None, **headers: str) -> str:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return "\r\n".join(lines) + "\r\n\r\n"


def _rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_oversized_and_anonymous_bodies_are_refused_before_they_are_read(sqlite_url):
    s = seed(sqlite_url, annotators=["alice"], records=pair_tasks(2))
    server = ServerProcess(sqlite_url).start()
    try:
        port, pid = server.port, server.proc.pid
        rss0 = _rss_kib(pid)
        json_ct, form_ct = "application/json", "multipart/form-data; boundary=xyz"
        cases = [
            # anonymous 200 MiB JSON to /api/token: the declared size alone is refused
            (_head("POST", "/api/token", 200 * 2**20, Content_Type=json_ct), 413),
            # anonymous 10 MiB upload (under the 50 MiB cap) to the admin import: login redirect, unread
            (_head("POST", f"/admin/projects/{s.project_id}/import", 10 * 2**20, Content_Type=form_ct), 303),
            # an annotator's upload: 403 before the body
            (_head("POST", f"/admin/projects/{s.project_id}/import", 10 * 2**20, Content_Type=form_ct,
                   Authorization=f"Bearer {s.tokens['alice']}"), 403),
            # anonymous and bad-token JSON posts: 401 before the body
            (_head("POST", "/api/assignments/1/label", 512 * 1024, Content_Type=json_ct), 401),
            (_head("POST", "/api/assignments/1/label", 512 * 1024, Content_Type=json_ct,
                   Authorization="Bearer nope"), 401),
            # a logged-in annotator's 2 MiB JSON: over the 1 MiB cap
            (_head("POST", "/api/assignments/1/label", 2 * 2**20, Content_Type=json_ct,
                   Authorization=f"Bearer {s.tokens['alice']}"), 413),
            # an admin's 100 MiB import: over the 50 MiB upload cap
            (_head("POST", f"/admin/projects/{s.project_id}/import", 100 * 2**20, Content_Type=form_ct,
                   Authorization=f"Bearer {s.tokens['admin']}"), 413),
        ]
        for head, want in cases:
            status, seconds, raw = _raw(port, head, [b"x" * 4096])
            assert status == want, (head.splitlines()[0], status, raw[:300])
            assert seconds < 3.0, (head.splitlines()[0], seconds)
            assert b"connection: close" in raw.lower()
        # chunked (no Content-Length): counted while read, refused once past the cap
        chunk = b"x" * 65536
        body = [f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"] * 40  # 2.5 MiB
        status, seconds, raw = _raw(port, _head("POST", "/api/assignments/1/label", None, Content_Type=json_ct,
                                                Transfer_Encoding="chunked",
                                                Authorization=f"Bearer {s.tokens['alice']}"), body)
        assert status == 413 and seconds < 5.0, (status, raw[:300])
        assert _rss_kib(pid) - rss0 < 50 * 1024  # nothing was buffered
        assert server.proc.poll() is None
        import httpx

        ok = httpx.post(server.url + "/api/token", json={"username": "alice", "password": PASSWORD})
        assert ok.status_code == 201  # and the server still serves
    finally:
        server.stop()


def test_body_limits_are_configurable_and_count_chunked_bodies(sqlite_url):
    s = seed(sqlite_url, annotators=["alice"], records=pair_tasks(1))
    with TestClient(create_app(sqlite_url, Settings(max_body_bytes=4096, max_upload_bytes=8192))) as client:
        alice = bearer(s.tokens["alice"])
        aid = client.post(f"/api/projects/{s.project_id}/next", headers=alice).json()["assignment_id"]
        big = label_body(rationale="y" * 5000)
        r = client.post(f"/api/assignments/{aid}/label", headers=alice, json=big)
        assert r.status_code == 413 and "at most 4 KiB" in r.json()["detail"]

        def chunks():
            yield b'{"idempotency_key": "k1", "choice": "A", "strength": 2, "rationale": "'
            for _ in range(10):
                yield b"z" * 1000
            yield b'"}'

        r = client.post(f"/api/assignments/{aid}/label", headers={**alice, "Content-Type": "application/json"},
                        content=chunks())
        assert r.status_code == 413
        records = [{"prompt": f"p{i}", "responses": ["a" * 100, "b" * 100]} for i in range(20)]  # ~5 KiB
        r = client.post(f"/api/projects/{s.project_id}/tasks", headers=bearer(s.tokens["admin"]),
                        json={"records": records})
        assert r.status_code == 201  # imports have the larger cap
        assert client.post(f"/api/assignments/{aid}/label", headers=alice, json=label_body()).status_code == 201
    from posttrain.feedback.commands import LabelServeConfig

    cfg = LabelServeConfig()
    assert (cfg.max_body_bytes, cfg.max_upload_bytes) == (2**20, 50 * 2**20)
