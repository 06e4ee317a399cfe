"""The real labeling app for loop tests: a server on loopback and simulated annotators over HTTP.

Use::

    from app_helpers import annotate, labeling_app

    with labeling_app(tmp_path, annotators=["careful", "hasty"]) as app:
        source = AppSource(app.spec("myloop", overlap=2), tmp_path / "state")
        ...
        ann = annotate(app)                 # every member project, every annotator, in a background thread
        labels = source.collect(0, pair_ids)
        ann.stop()                          # stops the thread; re-raises what went wrong in it

* :func:`labeling_app` starts ``python -m posttrain.feedback serve`` on 127.0.0.1 (a free port) with a
  fresh SQLite file under ``tmp_path``, an admin and the annotators (all with password
  :data:`PASSWORD` and an API token each); on exit it stops the server (SIGTERM, then SIGKILL of its
  process group) and the annotator threads it started.
* :func:`annotate` labels through the JSON API as the annotators would: ``POST
  /api/projects/{id}/next``, then ``POST /api/assignments/{id}/label``, choosing with the built-in
  task's simulated annotators (``posttrain.tasks.annotators``; a user named like one of the pool,
  ``careful``/``average``/``hasty``, is that annotator). It decides on what the screen shows: the
  prompt and the candidates in the slots A and B as the app ordered them. Every label it sent is in
  ``.sent``.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import httpx

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "correct horse battery"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LabelingApp:
    url: str  # http://127.0.0.1:<port>
    db_url: str  # sqlite:///<tmp_path>/labels.db
    admin: str  # the admin's user name
    admin_token: str
    annotators: list[str]
    tokens: dict[str, str]  # user name -> API token (admin included)
    password: str = PASSWORD  # every user's password
    log: Path | None = None  # the server's stdout + stderr
    threads: list[Annotators] = field(default_factory=list)

    def spec(self, project: str, **kw) -> dict:
        """An AppSource spec for this app (admin token, all annotators as members, poll_s 0.1); ``kw`` overrides."""
        return {"kind": "app", "name": "app", "url": self.url, "token": self.admin_token, "project": project,
                "annotators": list(self.annotators), "poll_s": 0.1, **kw}

    def get(self, path: str, user: str | None = None, **kw) -> httpx.Response:
        """GET ``path`` as ``user`` (default: the admin)."""
        return httpx.get(self.url + path, headers=_bearer(self.tokens[user or self.admin]), timeout=30, **kw)

    def project_id(self, name: str) -> int | None:
        return next((p["id"] for p in self.get("/api/projects").json() if p["name"] == name), None)

    def stats(self, project_id: int) -> dict:
        return self.get(f"/api/projects/{project_id}/stats").raise_for_status().json()


def _bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def _create_users(db_url: str, admin: str, annotators: list[str], password: str) -> dict[str, str]:
    from posttrain.feedback import auth
    from posttrain.feedback.db import User, make_engine, make_sessionmaker

    engine = make_engine(db_url)
    try:
        with make_sessionmaker(engine)() as db:
            pw_hash = auth.hash_password(password)  # one scrypt for every user
            users = [User(name=n, role=r, password_hash=pw_hash)
                     for n, r in [(admin, "admin")] + [(a, "annotator") for a in annotators]]
            db.add_all(users)
            db.commit()
            return {u.name: auth.issue_token(db, u) for u in users}
    finally:
        engine.dispose()


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its own process group (start_new_session)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


@contextmanager
def labeling_app(tmp_path: Path, annotators: list[str] | tuple[str, ...] = ("careful", "hasty"), *,
                 admin: str = "admin", password: str = PASSWORD, timeout: float = 60.0) -> Iterator[LabelingApp]:
    """The labeling app on 127.0.0.1 with a fresh SQLite database in ``tmp_path`` and the given users."""
    tmp_path = Path(tmp_path)
    tmp_path.mkdir(parents=True, exist_ok=True)
    db_url = f"sqlite:///{tmp_path / 'labels.db'}"
    tokens = _create_users(db_url, admin, list(annotators), password)
    log = tmp_path / "label-server.log"
    proc = None
    for _ in range(3):  # a free port may be taken before the server binds it: try another
        port = free_port()
        with log.open("a") as out:
            proc = subprocess.Popen([sys.executable, "-m", "posttrain.feedback", "serve", f"db={db_url}",
                                     "host=127.0.0.1", f"port={port}"], cwd=ROOT, stdout=out, stderr=out,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(url + "/healthz", timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        else:
            _stop(proc)
            if "address already in use" in log.read_text().lower():
                continue
            raise RuntimeError(f"the labeling app did not come up in {timeout} s:\n{log.read_text()[-3000:]}")
        break
    else:
        raise RuntimeError(f"the labeling app could not bind a port:\n{log.read_text()[-3000:]}")
    app = LabelingApp(url, db_url, admin, tokens[admin], list(annotators), tokens, password, log)
    try:
        yield app
    finally:
        for t in app.threads:
            t.stop_event.set()
        for t in app.threads:
            t.join(timeout=30)
        _stop(proc)


# ----------------------------------------------------------------------------- simulated annotators


class Annotators(threading.Thread):
    """The background thread :func:`annotate` starts. ``sent``: one dict per label it stored::

        {"annotator", "project_id", "assignment_id", "label_id" (the app's id), "prompt",
         "A": text shown first, "B": text shown second, "choice": "A" | "B" | "tie",
         "chosen_text": the chosen response's text (None for a tie), "strength": 1..3 | None}
    """

    def __init__(self, app: LabelingApp, project: int | str | None, usernames: list[str],
                 stop_event: threading.Event, *, seed: int, pool, max_labels: int | None, poll_s: float):
        super().__init__(daemon=True, name="simulated-annotators")
        from posttrain.tasks.annotators import DEFAULT_POOL

        pool = list(pool or DEFAULT_POOL)
        by_name = {a.name: a for a in pool}
        self.app, self.project, self.usernames = app, project, list(usernames)
        self.deciders = {u: by_name.get(u, pool[i % len(pool)]) for i, u in enumerate(self.usernames)}
        self.stop_event, self.seed, self.max_labels, self.poll_s = stop_event, seed, max_labels, poll_s
        self.sent: list[dict] = []
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self.client = httpx.Client(base_url=app.url, timeout=30)

    def count(self, user: str | None = None) -> int:
        with self._lock:
            return sum(1 for s in self.sent if user is None or s["annotator"] == user)

    def _projects(self, user: str) -> list[int]:
        if isinstance(self.project, int):
            return [self.project]
        r = self.client.get("/api/projects", headers=_bearer(self.app.tokens[user]))
        r.raise_for_status()
        return [p["id"] for p in r.json() if self.project is None or p["name"] == self.project]

    def _one(self, user: str, project_id: int) -> bool:
        """Label one task of ``project_id`` as ``user``; False when there is none for them."""
        headers = _bearer(self.app.tokens[user])
        r = self.client.post(f"/api/projects/{project_id}/next", headers=headers)
        if r.status_code == 403:  # not (yet) a member
            return False
        r.raise_for_status()
        task = r.json()
        if task["done"]:
            return False
        prompt = task["prompt"]
        if isinstance(prompt, list):  # the app shows a conversation: the last user turn is the question
            prompt = next(m["content"] for m in reversed(prompt) if m["role"] == "user")
        slots = {c["slot"]: c["text"] for c in task["candidates"]}
        rng = random.Random(f"{self.seed}:{user}:{task['assignment_id']}")
        choice, strength = self.deciders[user].label(prompt, slots["A"], slots["B"], rng)
        slot = {"a": "A", "b": "B"}.get(choice, "tie")
        body = {"idempotency_key": uuid.uuid4().hex, "choice": slot}
        if slot != "tie":
            body["strength"] = strength
        r = self.client.post(f"/api/assignments/{task['assignment_id']}/label", headers=headers, json=body)
        if r.status_code == 409:  # expired meanwhile: the app offers it again
            return True
        r.raise_for_status()
        with self._lock:
            self.sent.append({"annotator": user, "project_id": project_id, "assignment_id": task["assignment_id"],
                              "label_id": r.json()["label_id"], "prompt": prompt, "A": slots["A"], "B": slots["B"],
                              "choice": slot, "chosen_text": slots.get(slot), "strength": body.get("strength")})
        return True

    def run(self) -> None:
        try:
            while not self.stop_event.is_set():
                worked = False
                for user in self.usernames:
                    if self.max_labels is not None and self.count(user) >= self.max_labels:
                        continue
                    for project_id in self._projects(user):
                        if self.stop_event.is_set():
                            return
                        if self._one(user, project_id):
                            worked = True
                            break
                if not worked:
                    self.stop_event.wait(self.poll_s)
        except BaseException as e:  # noqa: BLE001 - handed to stop()
            self.errors.append(e)
        finally:
            self.client.close()

    def stop(self, timeout: float = 30.0) -> list[dict]:
        """Stop the thread, re-raise its error if it had one; returns ``sent``."""
        self.stop_event.set()
        self.join(timeout)
        if self.is_alive():
            raise RuntimeError("the simulated annotators did not stop")
        if self.errors:
            raise self.errors[0]
        return self.sent


def annotate(app: LabelingApp, project: int | str | None = None, usernames: list[str] | None = None,
             stop_event: threading.Event | None = None, *, seed: int = 0, pool=None, max_labels: int | None = None,
             poll_s: float = 0.2) -> Annotators:
    """Start simulated annotators labelling in a background thread and return it (already running).

    ``project``: a project id, a project name (waited for until it exists), or None: every project the
    user is a member of (new ones included, e.g. each round of the loop). ``usernames``: default all of
    ``app.annotators``. ``stop_event``: set it (or call ``.stop()``) to end the thread; a new one by
    default. ``max_labels``: stop labelling after this many labels per user. ``pool``: the simulated
    annotators (default ``posttrain.tasks.annotators.DEFAULT_POOL``); a user is the one of the same
    name, else they are dealt round-robin. Each decision is seeded by (seed, user, assignment id).
    ``poll_s``: how long the thread waits before looking again when no user has a task."""
    t = Annotators(app, project, usernames or app.annotators, stop_event or threading.Event(), seed=seed,
                   pool=pool, max_labels=max_labels, poll_s=poll_s)
    app.threads.append(t)
    t.start()
    return t
