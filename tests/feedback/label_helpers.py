"""Helpers for the labeling-app tests (conftest.py holds the fixtures).

Overview of the fixtures:

* ``pg`` (session): a throwaway PostgreSQL server (initdb in a temp dir, random port, fsync off),
  torn down at the end. Missing binaries FAIL the tests (run scripts/ci_services.sh) unless
  POSTTRAIN_SKIP_POSTGRES=1.
* ``browser`` (session): Debian's Chromium driven by Playwright's sync API. Missing Chromium fails
  unless POSTTRAIN_SKIP_CHROMIUM=1.
* ``ServerProcess``: ``python -m posttrain.feedback serve`` in a subprocess on loopback, so SIGKILL
  is a real crash.
* ``seed``: users, tokens, a project and tasks written straight through the app's own modules.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _pg_bin() -> Path:
    """POSTTRAIN_PG_BIN, else the newest Debian PostgreSQL server install."""
    if os.environ.get("POSTTRAIN_PG_BIN"):
        return Path(os.environ["POSTTRAIN_PG_BIN"])
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3])
                   if p.parts[-3].isdigit() else 0)
    return found[-1].parent if found else Path("/usr/lib/postgresql/15/bin")


PG_BIN = _pg_bin()
CHROMIUM = os.environ.get("POSTTRAIN_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic"]
PASSWORD = "correct horse battery"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def missing(what: str, env: str) -> None:
    msg = f"{what} not found: run `bash scripts/ci_services.sh` (CI installs it), or set {env}=1 to skip"
    if os.environ.get(env) == "1":
        pytest.skip(msg)
    pytest.fail(msg, pytrace=False)


# ----------------------------------------------------------------------------- PostgreSQL


@dataclass
class PgServer:
    port: int
    password: str
    databases: list[str] = field(default_factory=list)

    def new_database(self) -> str:
        """A fresh empty database on the server; returns its SQLAlchemy URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", password=self.password,
                             dbname="postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        self.databases.append(name)
        return f"postgresql+psycopg://postgres:{self.password}@127.0.0.1:{self.port}/{name}"


def as_postgres(cmd: list[str]) -> list[str]:
    # initdb refuses to run as root: run the server tools as the postgres user then
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


# ----------------------------------------------------------------------------- the server process


class ServerProcess:
    """``posttrain label serve`` in a child process on 127.0.0.1."""

    def __init__(self, db_url: str, port: int | None = None):
        self.db_url, self.port = db_url, port or free_port()
        self.proc: subprocess.Popen | None = None
        self.log = Path(tempfile.mkstemp(prefix="posttrain-label-", suffix=".log")[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> ServerProcess:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with self.log.open("a") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "posttrain.feedback", "serve", f"db={self.db_url}",
                                          f"port={self.port}"], cwd=ROOT, env=env, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"server did not come up in {timeout} s:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL: no shutdown handlers, no flushing: a crash."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- seeding


@dataclass
class Seeded:
    project_id: int
    tokens: dict[str, str]  # user name -> API token


def pair_tasks(n: int, prefix: str = "task") -> list[dict]:
    return [{"prompt": f"{prefix} {i}: say something", "responses": [
        {"text": f"{prefix} {i} answer one", "model": "m1"}, {"text": f"{prefix} {i} answer two", "model": "m2"}]}
        for i in range(n)]


def seed(db_url: str, *, annotators: list[str], records: list[dict], project: str = "p", overlap: int = 1,
         gold_rate: float = 0.0, admins: tuple[str, ...] = ("admin",), tokens: bool = True) -> Seeded:
    """Users (password PASSWORD), a project with members, tasks, and API tokens, via the app's modules."""
    from posttrain.feedback import accounts, auth, importing
    from posttrain.feedback.db import User, make_engine, make_sessionmaker

    engine = make_engine(db_url)
    try:
        with make_sessionmaker(engine)() as db:
            pw_hash = auth.hash_password(PASSWORD)  # one scrypt for all test users keeps seeding fast
            users = []
            for name, role in [(a, "admin") for a in admins] + [(a, "annotator") for a in annotators]:
                user = User(name=name, role=role, password_hash=pw_hash)
                db.add(user)
                users.append(user)
            db.commit()
            p = accounts.create_project(db, project, overlap=overlap, gold_rate=gold_rate)
            accounts.add_members(db, p, list(annotators))
            specs, _ = importing.parse_records(records, "records")
            importing.add_tasks(db, p, specs)
            toks = {u.name: auth.issue_token(db, u) for u in users} if tokens else {}
            return Seeded(p.id, toks)
    finally:
        engine.dispose()


def open_task(client, project_id: int):
    """The label page with a task, as a browser gets it: the GET shows the pending assignment or a
    "next task" form (a GET never creates one), which is then posted with its CSRF token."""
    import re

    page = client.get(f"/projects/{project_id}/label")
    if 'id="next-form"' in page.text:
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
        page = client.post(f"/projects/{project_id}/next", data={"csrf_token": csrf})
    return page
