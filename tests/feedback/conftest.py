"""Fixtures for the labeling app: a throwaway PostgreSQL server, a Chromium browser, a SQLite URL.
See label_helpers.py for the server process and seeding helpers."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest
from label_helpers import CHROMIUM, CHROMIUM_ARGS, PG_BIN, PgServer, as_postgres, free_port, missing


@pytest.fixture(scope="session")
def pg():
    if not (PG_BIN / "initdb").exists() or not (PG_BIN / "pg_ctl").exists():
        missing(f"PostgreSQL server binaries ({PG_BIN})", "POSTTRAIN_SKIP_POSTGRES")
    try:
        importlib.import_module("psycopg")
    except ImportError:
        missing("psycopg (pip install 'psycopg[binary]')", "POSTTRAIN_SKIP_POSTGRES")
    base = Path(tempfile.mkdtemp(prefix="posttrain-pg-"))
    password = uuid.uuid4().hex
    (base / "pw").write_text(password + "\n")
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
        shutil.chown(base / "pw", "postgres")
    port = free_port()
    data = base / "data"
    try:
        subprocess.run(as_postgres([str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "-A", "scram-sha-256",
                                     f"--pwfile={base / 'pw'}", "--no-sync", "-E", "UTF8"]),
                       check=True, capture_output=True, timeout=60)
        subprocess.run(as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(base / "log"), "-w", "start",
                                     "-o", f"-p {port} -c listen_addresses=127.0.0.1 -k {base} -c fsync=off "
                                           f"-c max_connections=200"]),
                       check=True, capture_output=True, timeout=60)
    except subprocess.CalledProcessError as e:
        log = (base / "log").read_text() if (base / "log").exists() else ""
        shutil.rmtree(base, ignore_errors=True)
        pytest.fail(f"could not start PostgreSQL: {e.stderr.decode()[-2000:]}\n{log[-2000:]}", pytrace=False)
    try:
        yield PgServer(port, password)
    finally:
        subprocess.run(as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]),
                       capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(autouse=True)
def _testclient_host(monkeypatch):
    """In-process tests talk to the app as Starlette's TestClient, whose Host is "testserver": allow it
    here, in the tests only. Servers started by the tests keep the real default (loopback names)."""
    from posttrain.feedback import app

    monkeypatch.setattr(app, "LOOPBACK_HOSTS", (*app.LOOPBACK_HOSTS, "testserver"))


@pytest.fixture()
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'labels.db'}"


@pytest.fixture(params=["sqlite", "postgres"])
def any_url(request, tmp_path) -> str:
    """The test runs twice: on a SQLite file and on a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'labels.db'}"
    return request.getfixturevalue("pg").new_database()


# ----------------------------------------------------------------------------- browser


@pytest.fixture(scope="module")
def browser():
    # module scope: a sync Playwright left open would make later sync_playwright() calls (the report
    # tests) fail with "Sync API inside the asyncio loop"
    if not Path(CHROMIUM).exists():
        missing(f"Chromium ({CHROMIUM})", "POSTTRAIN_SKIP_CHROMIUM")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("the playwright Python package", "POSTTRAIN_SKIP_CHROMIUM")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()
