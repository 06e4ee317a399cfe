"""Who labels what, and storing a label exactly once.

Assignment: every regular task is labeled by ``project.overlap`` distinct annotators. A task's slot
is held by a done assignment or by a pending one younger than ``assignment_ttl_s``; skipped ones
free it. A regular pending assignment older than the TTL has *expired*: its slot may go to someone
else, so it can no longer be labeled (409) and ``next`` no longer returns it (its status becomes
``expired``). Labeling takes the same per-project lock as assignment, so a label and a re-issue of
the same slot can never both win: a task never gets more than ``overlap`` regular labels. Gold
assignments hold no slot and never expire. Partly labeled tasks are served first so finished tasks
accumulate early. Gold tasks (with a known answer) are mixed in at ``project.gold_rate`` by a
schedule seeded by an HMAC of (project, user, count) under the server secret: reproducible for the
server, unpredictable for an annotator who has seen earlier draws; every annotator may see every
gold task once. Each assignment gets a fresh random candidate order, stored with it.

Labels: a label names its assignment and a client idempotency key. A retry with the same key and
the same label is a success that returns the stored label; the same key with a different label is a
409. Nothing is acknowledged before the commit.
"""

from __future__ import annotations

import hashlib
import hmac
import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from posttrain.feedback.db import (
    CHOICES,
    FLAGS,
    LETTERS,
    MAX_CLIENT_MS,
    MAX_KEY,
    MAX_RATIONALE,
    Assignment,
    Label,
    Membership,
    Project,
    Task,
    User,
    server_secret,
    text_problem,
    utcnow,
    valid_id,
)


class Refused(Exception):
    """A request the app turns down; ``status`` is the HTTP status it maps to, ``headers`` go with the
    answer, ``field`` names the input at fault (the command line reports it)."""

    status = 400
    headers: dict[str, str] = {}

    def __init__(self, message: str = "", field: str | None = None):
        super().__init__(message)
        self.field = field


class NotFound(Refused):
    status = 404


class Forbidden(Refused):
    status = 403


class Conflict(Refused):
    status = 409


class Invalid(Refused):
    status = 422


class MethodNotAllowed(Refused):
    status = 405
    headers = {"Allow": "POST"}


@dataclass
class LabelInput:
    """A label as submitted, in display terms (slots A, B, ...)."""

    idempotency_key: str
    choice: str | None = None  # A | B | tie | both_bad (two candidates)
    strength: int | None = None  # 1 slightly, 2 clearly, 3 much better (A or B only)
    ranking: list[str] | None = None  # slots best -> worst (three or more candidates)
    rationale: str | None = None
    flags: dict[str, list[str]] = field(default_factory=dict)  # slot -> flags
    client_ms: int | None = None


# ----------------------------------------------------------------------------- access


def can_work_on(db: Session, user: User, project: Project) -> bool:
    if user.role == "admin":
        return True
    return db.get(Membership, (project.id, user.id)) is not None


def by_id(db: Session, model, ident: object):
    """``db.get`` for an id from a request: None for ids that cannot exist (out of the column's range)."""
    return db.get(model, ident) if valid_id(ident) else None


def get_project(db: Session, user: User, project_id: int) -> Project:
    project = by_id(db, Project, project_id)
    if project is None:
        raise NotFound(f"no project {project_id}")
    if not can_work_on(db, user, project):
        raise Forbidden("you are not a member of this project")
    return project


def own_assignment(db: Session, user: User, assignment_id: int, *, admin_ok: bool = False) -> Assignment:
    a = by_id(db, Assignment, assignment_id)
    if a is None:
        raise NotFound(f"no assignment {assignment_id}")
    if a.user_id != user.id and not (admin_ok and user.role == "admin"):
        raise Forbidden("this assignment belongs to another annotator")
    return a


# ----------------------------------------------------------------------------- assignment


def _cutoff(project: Project, now: datetime) -> datetime:
    return now - timedelta(seconds=project.assignment_ttl_s)


def _expired(a: Assignment, project: Project, now: datetime) -> bool:
    """A regular pending assignment past the project's TTL (its slot may have been re-issued)."""
    return a.status == "pending" and a.task.gold is None and a.served_at < _cutoff(project, now)


def _pending(db: Session, user: User, project: Project, now: datetime) -> Assignment | None:
    live = Task.gold.is_not(None) | (Assignment.served_at >= _cutoff(project, now))
    return db.scalar(select(Assignment).join(Task).where(
        Assignment.user_id == user.id, Assignment.status == "pending", Task.project_id == project.id, live)
        .order_by(Assignment.id).limit(1))


def _expire_stale(db: Session, user: User, project: Project, now: datetime) -> None:
    """Mark the user's expired pending assignments in ``project`` as ``expired`` (in the open transaction)."""
    stale = select(Task.id).where(Task.project_id == project.id, Task.gold.is_(None))
    db.execute(update(Assignment).where(Assignment.user_id == user.id, Assignment.status == "pending",
                                        Assignment.task_id.in_(stale), Assignment.served_at < _cutoff(project, now))
               .values(status="expired", finished_at=now).execution_options(synchronize_session=False))


def _lock_project(db: Session, project_id: int) -> None:
    # the transaction's first write: SQLite takes its write lock (waiting up to busy_timeout) and
    # PostgreSQL locks the project row, so assignment and labeling in a project are serialized
    db.execute(update(Project).where(Project.id == project_id).values(assign_seq=Project.assign_seq + 1))


def _regular_task(db: Session, user: User, project: Project, now: datetime) -> int | None:
    cutoff = _cutoff(project, now)
    holds = (Assignment.status == "done") | ((Assignment.status == "pending") & (Assignment.served_at >= cutoff))
    taken = (select(Assignment.task_id, func.count().label("n")).where(holds)
             .group_by(Assignment.task_id).subquery())
    mine = select(Assignment.task_id).where(Assignment.user_id == user.id)
    n = func.coalesce(taken.c.n, 0)
    return db.scalar(select(Task.id).outerjoin(taken, taken.c.task_id == Task.id).where(
        Task.project_id == project.id, Task.gold.is_(None), n < project.overlap, Task.id.not_in(mine))
        .order_by(n.desc(), Task.id).limit(1))


def _gold_task(db: Session, user: User, project: Project, rng: random.Random) -> int | None:
    mine = select(Assignment.task_id).where(Assignment.user_id == user.id)
    ids = list(db.scalars(select(Task.id).where(Task.project_id == project.id, Task.gold.is_not(None),
                                                Task.id.not_in(mine)).order_by(Task.id)))
    return rng.choice(ids) if ids else None


def pending_assignment(db: Session, user: User, project: Project) -> Assignment | None:
    """The user's live pending assignment in ``project``, or None; creates nothing."""
    return _pending(db, user, project, utcnow())


def has_work(db: Session, user: User, project: Project) -> bool:
    """Whether ``next_assignment`` would give the user a task (read only). It always does while a
    regular task has a free slot; once they run out the annotator is done, gold or not."""
    return _regular_task(db, user, project, utcnow()) is not None


def gold_rng(secret: bytes, project_id: int, user_id: int, served: int) -> random.Random:
    """The gold draw for the user's ``served``-th assignment: keyed by the server secret, so the
    schedule cannot be predicted from (project, user, count) as a plain seed could."""
    mac = hmac.new(secret, f"gold:{project_id}:{user_id}:{served}".encode(), hashlib.sha256).digest()
    return random.Random(int.from_bytes(mac, "big"))


def next_assignment(db: Session, user: User, project: Project) -> Assignment | None:
    """The user's pending assignment in ``project``, else a new one (committed), else None (done)."""
    pending = _pending(db, user, project, utcnow())
    if pending is not None:  # a reload or a retry shows the same task in the same order
        return pending
    secret = server_secret(db) if project.gold_rate > 0 else b""  # may commit: before the lock
    _lock_project(db, project.id)
    now = utcnow()
    _expire_stale(db, user, project, now)  # never shown again: its slot may be someone else's now
    pending = _pending(db, user, project, now)  # the same user in two tabs may have raced us
    if pending is not None:
        db.commit()
        return pending
    task_id = None
    if project.gold_rate > 0:
        served = db.scalar(select(func.count()).select_from(Assignment).join(Task).where(
            Assignment.user_id == user.id, Task.project_id == project.id)) or 0
        rng = gold_rng(secret, project.id, user.id, served)
        if rng.random() < project.gold_rate:
            task_id = _gold_task(db, user, project, rng)
    if task_id is None:
        task_id = _regular_task(db, user, project, now)
    if task_id is None:
        db.commit()
        return None
    k = len(db.get(Task, task_id).candidates)
    order = list(range(k))
    random.SystemRandom().shuffle(order)  # unpredictable per assignment; the order is recorded
    a = Assignment(task_id=task_id, user_id=user.id, display_order=order, served_at=now)
    db.add(a)
    db.commit()
    return a


def skip(db: Session, user: User, assignment_id: int) -> Assignment:
    a = own_assignment(db, user, assignment_id)
    if a.status == "done":
        raise Conflict("this assignment is already labeled")
    if a.status == "pending":
        a.status, a.finished_at = "skipped", utcnow()
        db.commit()
    return a


# ----------------------------------------------------------------------------- labels


def _resolve(inp: LabelInput, order: list[int]) -> dict:
    """Check ``inp`` against the assignment and translate display slots to candidate positions."""
    k = len(order)
    slots = {LETTERS[i]: order[i] for i in range(k)}
    out: dict = {"choice": inp.choice, "winner": None, "strength": None, "ranks": None}
    if k == 2:
        if inp.ranking is not None:
            raise Invalid("ranking is for tasks with three or more candidates; send choice (A, B, tie, both_bad)")
        if inp.choice not in CHOICES:
            raise Invalid(f"choice must be one of {list(CHOICES)}, got {inp.choice!r}")
        if inp.choice in ("A", "B"):
            if inp.strength not in (1, 2, 3):
                raise Invalid("strength must be 1 (slightly), 2 (clearly) or 3 (much better) when choice is A or B")
            out["winner"], out["strength"] = slots[inp.choice], inp.strength
        elif inp.strength is not None:
            raise Invalid(f"strength applies only to choice A or B, not {inp.choice}")
    else:
        if inp.choice not in (None, "ranking") or inp.strength is not None:
            raise Invalid(f"this task has {k} candidates: send ranking (slots best to worst), not choice/strength")
        ranking = inp.ranking or []
        if sorted(ranking) != sorted(slots):
            raise Invalid(f"ranking must list each of {sorted(slots)} exactly once, best first; got {ranking!r}")
        ranks = [0] * k
        for place, slot in enumerate(ranking, 1):
            ranks[slots[slot]] = place
        out.update(choice="ranking", winner=slots[ranking[0]], ranks=ranks)
    flags: dict[str, list[str]] = {}
    for slot, values in (inp.flags or {}).items():
        if slot not in slots:
            raise Invalid(f"flags: unknown candidate {slot!r} (this task shows {sorted(slots)})")
        bad = [v for v in values if v not in FLAGS]
        if bad:
            raise Invalid(f"flags: unknown flag(s) {bad}; allowed: {list(FLAGS)}")
        if values:
            flags[str(slots[slot])] = sorted(set(values))
    out["flags"] = flags
    out["rationale"] = (inp.rationale or "").strip() or None
    return out


def _by_key(db: Session, key: str) -> Label | None:
    return db.scalar(select(Label).where(Label.idempotency_key == key))


def _replay(existing: Label, a: Assignment, fields: dict, client_ms: int | None) -> Label:
    """The stored label for a retry; a key reused for another assignment or another label is a 409."""
    if existing.assignment_id != a.id:
        raise Conflict("this idempotency key was already used for another assignment; use a new key")
    stored = {"choice": existing.choice, "winner": existing.winner, "strength": existing.strength,
              "ranks": existing.ranks, "flags": existing.flags or {}, "rationale": existing.rationale,
              "client_ms": existing.client_ms}
    if stored != {**fields, "client_ms": client_ms}:
        raise Conflict("this idempotency key was already used with a different label for this assignment: a "
                       "retry must resend the same body; the stored label stays")
    return existing


_EXPIRED = ("this assignment expired (it was not labeled within the project's assignment_ttl_s) and its task "
            "was given to someone else; your label was not stored. Ask for the next task.")


def _check_status(a: Assignment) -> None:
    if a.status == "done":
        raise Conflict("this assignment is already labeled (under another idempotency key)")
    if a.status == "skipped":
        raise Conflict("this assignment was skipped; ask for the next one")
    if a.status == "expired":
        raise Conflict(_EXPIRED)


def check_label_input(inp: LabelInput) -> None:
    """The limits every label passes, from the JSON API and the HTML form alike (422 with a message)."""
    key = inp.idempotency_key
    if not isinstance(key, str) or not key or len(key) > MAX_KEY:
        raise Invalid(f"idempotency_key must be a non-empty string of at most {MAX_KEY} characters")
    if text_problem(key):
        raise Invalid(f"idempotency_key {text_problem(key)}")
    if inp.rationale is not None:
        if not isinstance(inp.rationale, str) or len(inp.rationale) > MAX_RATIONALE:
            raise Invalid(f"rationale must be text of at most {MAX_RATIONALE} characters")
        if text_problem(inp.rationale):
            raise Invalid(f"rationale {text_problem(inp.rationale)}")
    ms = inp.client_ms
    if ms is not None and (isinstance(ms, bool) or not isinstance(ms, int) or not 0 <= ms <= MAX_CLIENT_MS):
        raise Invalid(f"client_ms must be a whole number of milliseconds from 0 to {MAX_CLIENT_MS}")
    if inp.strength is not None and (isinstance(inp.strength, bool) or inp.strength not in (1, 2, 3)):
        raise Invalid("strength must be 1 (slightly), 2 (clearly) or 3 (much better) when choice is A or B")


def record_label(db: Session, user: User, assignment_id: int, inp: LabelInput) -> tuple[Label, bool]:
    """Store a label once. Returns (label, created); created is False for a retry of the same key."""
    a = own_assignment(db, user, assignment_id)  # 404/403 first: nothing about another's task leaks
    check_label_input(inp)
    fields = _resolve(inp, a.display_order)
    existing = _by_key(db, inp.idempotency_key)
    if existing is not None:
        return _replay(existing, a, fields, inp.client_ms), False
    _check_status(a)
    if a.task.gold is None:
        # take the assignment lock, then look again: an expired slot is either re-issued or labeled
        _lock_project(db, a.task.project_id)
        db.refresh(a)
        existing = _by_key(db, inp.idempotency_key)  # a concurrent retry of this label committed first
        if existing is not None:
            db.rollback()
            return _replay(existing, a, fields, inp.client_ms), False
        try:
            _check_status(a)
        except Conflict:
            db.rollback()
            raise
        if _expired(a, db.get(Project, a.task.project_id), utcnow()):
            a.status, a.finished_at = "expired", utcnow()
            db.commit()
            raise Conflict(_EXPIRED)
    now = utcnow()
    label = Label(assignment_id=a.id, idempotency_key=inp.idempotency_key, task_id=a.task_id, user_id=user.id,
                  client_ms=inp.client_ms, served_at=a.served_at, created_at=now, **fields)
    a.status, a.finished_at = "done", now
    db.add(label)
    try:
        db.commit()  # acknowledged only after this returns
    except IntegrityError:
        # a concurrent retry of the same label won the race: its row is the answer
        db.rollback()
        existing = _by_key(db, inp.idempotency_key)
        if existing is None:
            raise Conflict("this assignment is already labeled (under another idempotency key)") from None
        return _replay(existing, a, fields, inp.client_ms), False
    return label, True
