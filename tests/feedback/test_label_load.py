"""Load and crash test against a real uvicorn server process on loopback, on SQLite and PostgreSQL.

20 annotator threads each label 25 tasks through the JSON API (GET next, POST label with a client
idempotency key). A third of the way in, the server is killed with SIGKILL and restarted on the same
port and database. Clients retry connection failures and 5xx with the SAME key, as real clients must.
Afterwards: exactly 500 labels, none duplicated, every acknowledged key stored, no task over its
overlap, and not one 5xx answer from a live server (no "database is locked" under load). One run per
backend covers both claims (concurrency and crash safety) to keep the suite fast.
"""

from __future__ import annotations

import random
import threading
import time
import uuid

import httpx
from label_helpers import ServerProcess, pair_tasks, seed
from sqlalchemy import func, select, text

from posttrain.feedback.db import Assignment, Label, make_engine, make_sessionmaker

ANNOTATORS, PER_ANNOTATOR, OVERLAP = 20, 25, 5
TOTAL = ANNOTATORS * PER_ANNOTATOR
# 125 tasks x 5 = 625 slots for 500 labels: the slack keeps a late annotator from finding only tasks it
# has already labeled (greedy assignment fills tasks one after another)
TASKS = 125


def _retrying(send, errors: list[int], deadline_s: float = 90.0) -> httpx.Response:
    """Send until the server answers below 500; a dead or restarting server is retried. 5xx answers
    are recorded in ``errors`` (a live server should never give one)."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            r = send()
            if r.status_code < 500:
                return r
            errors.append(r.status_code)
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("server did not answer in time")
        time.sleep(0.05 + random.random() * 0.05)


class Annotator(threading.Thread):
    def __init__(self, base_url: str, token: str, project_id: int, acked: list[str]):
        super().__init__(daemon=True)
        self.base_url, self.token, self.project_id, self.acked = base_url, token, project_id, acked
        self.error: BaseException | None = None
        self.duplicates = 0  # retries the server answered "already stored": the lost-response case
        self.server_errors: list[int] = []

    def run(self) -> None:
        try:
            self._work()
        except BaseException as e:  # surfaced by the test
            self.error = e

    def _work(self) -> None:
        keys: dict[int, str] = {}
        rng = random.Random()
        with httpx.Client(base_url=self.base_url, headers={"Authorization": f"Bearer {self.token}"},
                          timeout=httpx.Timeout(10.0)) as client:
            for _ in range(PER_ANNOTATOR):
                nxt = _retrying(lambda: client.post(f"/api/projects/{self.project_id}/next"), self.server_errors)
                assert nxt.status_code == 200, nxt.text
                body = nxt.json()
                assert not body["done"], "ran out of tasks"
                aid = body["assignment_id"]
                key = keys.setdefault(aid, uuid.uuid4().hex)  # one key per assignment, reused on retry
                choice = rng.choice(["A", "B", "tie"])
                payload = {"idempotency_key": key, "choice": choice, "strength": 2 if choice != "tie" else None,
                           "client_ms": rng.randint(500, 9000)}
                r = _retrying(lambda aid=aid, payload=payload: client.post(f"/api/assignments/{aid}/label",
                                                                            json=payload), self.server_errors)
                assert r.status_code in (200, 201), r.text
                self.duplicates += r.status_code == 200
                self.acked.append(key)  # acknowledged: the server committed it


def _start_annotators(server: ServerProcess, db_url: str) -> tuple[list[Annotator], list[str]]:
    names = [f"ann{i:02d}" for i in range(ANNOTATORS)]
    s = seed(db_url, annotators=names, records=pair_tasks(TASKS), overlap=OVERLAP)
    acked: list[str] = []
    threads = [Annotator(server.url, s.tokens[n], s.project_id, acked) for n in names]
    for t in threads:
        t.start()
    return threads, acked


def _join(threads: list[Annotator]) -> None:
    for t in threads:
        t.join(timeout=180)
        assert not t.is_alive(), "an annotator hung"
        if t.error:
            raise t.error


def _check_database(db_url: str, acked: list[str]) -> None:
    engine = make_engine(db_url)
    try:
        with make_sessionmaker(engine)() as db:
            keys = list(db.scalars(select(Label.idempotency_key)))
            assert len(keys) == TOTAL, f"{len(keys)} labels stored, expected {TOTAL}"
            assert len(set(keys)) == TOTAL  # no duplicates (also enforced by UNIQUE)
            assert len(acked) == TOTAL and set(acked) == set(keys)  # every acknowledged label is there
            per_task = db.execute(select(func.count(), func.count(Label.user_id.distinct()))
                                  .group_by(Label.task_id)).all()
            assert all(n == d and n <= OVERLAP for n, d in per_task)  # k distinct annotators at most
            done = db.scalar(select(func.count()).select_from(Assignment).where(Assignment.status == "done"))
            assert done == TOTAL
            if db_url.startswith("sqlite"):
                assert db.execute(text("PRAGMA integrity_check")).scalar() == "ok"
    finally:
        engine.dispose()


def test_20_annotators_x_25_labels_survive_a_sigkill_mid_load(any_url):
    db_url = any_url
    server = ServerProcess(db_url).start()
    try:
        t0 = time.monotonic()
        threads, acked = _start_annotators(server, db_url)
        deadline = time.monotonic() + 60
        while len(acked) < TOTAL // 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        server.kill()  # mid-load: requests are in flight, some committed but not yet answered
        acked_at_kill = list(acked)
        assert 0 < len(acked_at_kill) < TOTAL
        time.sleep(0.3)
        server.start()  # same port, same database: clients find it again and retry
        _join(threads)
        elapsed = time.monotonic() - t0
    finally:
        server.stop()
    _check_database(db_url, acked)
    assert set(acked_at_kill) <= set(acked)
    assert [e for t in threads for e in t.server_errors] == []
    print(f"{TOTAL} labels in {elapsed:.1f} s; killed after {len(acked_at_kill)} acknowledged labels; "
          f"{sum(t.duplicates for t in threads)} retries found their label already stored")
