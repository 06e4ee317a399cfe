"""Tables of the labeling app (SQLAlchemy 2 ORM) and engine setup for SQLite and PostgreSQL.

Durability rules the rest of the app relies on:

* A label row has two UNIQUE keys, ``assignment_id`` and ``idempotency_key``. A client retrying an
  acknowledged label (same key) finds the stored row and gets a success, never a second row.
* Tasks are unique per project by a content fingerprint, so importing a file twice adds nothing.
* SQLite runs in WAL mode with a 30 s busy timeout: many readers, one writer, writers queue instead of
  failing. pysqlite's default transaction handling issues ``BEGIN`` just before the first write of a
  transaction, so reads before it see the latest commit (like PostgreSQL's READ COMMITTED) and the
  write lock is taken with the busy timeout, never as a failing read->write upgrade.
* Times are naive UTC (SQLite has no time zones; PostgreSQL gets ``timestamp without time zone``).
"""

from __future__ import annotations

import secrets
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker

from posttrain.errors import ConfigError

ROLES = ("admin", "annotator")
FLAGS = ("harmful", "factual_error", "refusal", "off_topic", "other")
CHOICES = ("A", "B", "tie", "both_bad")
LETTERS = "ABCDEFGHI"  # display slots; 9 is also the most candidates the 1..9 keys can rank
MAX_CANDIDATES = len(LETTERS)


# Edge limits (validated before anything reaches the database, so bad input is a 422/404, never a 500):
# ids and stored integers fit PostgreSQL's 32-bit ``integer`` (SQLite's are 64-bit)
MAX_ID = 2**31 - 1
MAX_KEY = 100  # idempotency key characters
MAX_RATIONALE = 10_000  # characters
MAX_CLIENT_MS = 7 * 24 * 3600 * 1000  # a week of visible time
MAX_DEPTH = 32  # JSON nesting in bodies and imported records (a task record needs about 5)


def valid_id(value: object) -> bool:
    """An id that can exist: a positive int within the column type (so lookups never overflow)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_ID


def text_problem(value: str) -> str | None:
    """Why a string cannot be stored (PostgreSQL text has no NUL; UTF-8 has no lone surrogates), or None."""
    if "\x00" in value:
        return "must not contain NUL (\\u0000) characters"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "must be valid Unicode text (no lone surrogates)"
    return None


def find_text_problem(value: Any, where: str = "") -> str | None:
    """The first string (or mapping key) in ``value`` that cannot be stored, as 'where: problem', or
    nesting deeper than MAX_DEPTH. Walked with a stack, not recursion: a hostile document nested
    900 levels deep must be a 422, not a RecursionError (a 500)."""
    stack: list[tuple[Any, str, int]] = [(value, where, 0)]
    while stack:
        item, at, depth = stack.pop()
        if isinstance(item, str):
            problem = text_problem(item)
            if problem:
                return f"{at or 'text'}: {problem}"
        elif isinstance(item, (dict, list, tuple)):
            if depth >= MAX_DEPTH:
                return f"{at or 'value'}: nested deeper than {MAX_DEPTH} levels"
            if isinstance(item, dict):
                children = []
                for k, v in item.items():
                    children += [(k, at or "key", depth), (v, f"{at}.{k}" if at else str(k), depth + 1)]
            else:
                children = [(v, f"{at}[{i}]", depth + 1) for i, v in enumerate(item)]
            stack.extend(reversed(children))  # depth first, in document order
    return None


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)  # noqa: UP017 (datetime.UTC needs 3.11)


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))  # one of ROLES
    password_hash: Mapped[str] = mapped_column(String(255))  # scrypt$n$r$p$salt$hash (auth.py)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class ApiToken(Base):
    """Bearer tokens for the JSON API. Only the SHA-256 of a token is stored: tokens are 256-bit
    random strings, so a fast hash is enough (unlike passwords, which get scrypt)."""

    __tablename__ = "api_tokens"
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    user: Mapped[User] = relationship()


class WebSession(Base):
    """Browser sessions, stored server-side so they survive a restart and can be revoked. The cookie
    holds a random id; the table holds its SHA-256 and the session's CSRF token."""

    __tablename__ = "web_sessions"
    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime)
    user: Mapped[User] = relationship()


class AppSecret(Base):
    """Server-side secrets (HMAC keys), created once and kept in the database so they survive restarts
    and every worker shares them: login-form tokens, banner messages and gold schedules are keyed by it."""

    __tablename__ = "app_secrets"
    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    value: Mapped[str] = mapped_column(String(128))  # hex


class LoginFailure(Base):
    """One failed password check (login form, POST /api/token, HTTP Basic). Counted per user name and
    per client address over a window (auth.LoginLimits); in the database so every worker sees them."""

    __tablename__ = "login_failures"
    __table_args__ = (Index("ix_login_fail_name", "name", "at"), Index("ix_login_fail_addr", "address", "at"))
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64))  # "" for a name that cannot exist
    address: Mapped[str] = mapped_column(String(64))
    at: Mapped[datetime] = mapped_column(DateTime, index=True, default=utcnow)


class Project(Base):
    __tablename__ = "projects"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    overlap: Mapped[int] = mapped_column(Integer, default=3)  # distinct annotators per regular task
    gold_rate: Mapped[float] = mapped_column(Float, default=0.1)  # share of assignments that are gold
    instructions: Mapped[str] = mapped_column(Text, default="")
    # a pending assignment older than this stops holding its slot (the annotator walked away)
    assignment_ttl_s: Mapped[int] = mapped_column(Integer, default=3600)
    # bumped at the start of every assignment transaction: the UPDATE takes SQLite's write lock or
    # PostgreSQL's row lock, so two annotators can never both take a task's last slot
    assign_seq: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Membership(Base):
    """Which annotators work on which project (admins see every project)."""

    __tablename__ = "memberships"
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), primary_key=True)


class Task(Base):
    """A prompt (string or message list, stored as imported) and its 2..9 candidate responses."""

    __tablename__ = "tasks"
    __table_args__ = (UniqueConstraint("project_id", "fingerprint"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"), index=True)
    fingerprint: Mapped[str] = mapped_column(String(64))  # sha256 of prompt + candidates + gold
    prompt: Mapped[Any] = mapped_column(JSON)
    gold: Mapped[int | None] = mapped_column(Integer, nullable=True)  # index of the better candidate
    external_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    meta: Mapped[Any] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    candidates: Mapped[list[Candidate]] = relationship(order_by="Candidate.position",
                                                       cascade="all, delete-orphan")


class Candidate(Base):
    __tablename__ = "candidates"
    __table_args__ = (UniqueConstraint("task_id", "position"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"), index=True)
    position: Mapped[int] = mapped_column(Integer)  # import order; labels refer to this index
    text: Mapped[str] = mapped_column(Text)
    model: Mapped[str | None] = mapped_column(String(200), nullable=True)


class Assignment(Base):
    """One task shown to one annotator, with the candidate order they saw.

    ``display_order[slot]`` is the candidate position shown in display slot ``slot`` (A, B, ...)."""

    __tablename__ = "assignments"
    __table_args__ = (UniqueConstraint("task_id", "user_id"), Index("ix_assign_user_status", "user_id", "status"))
    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    display_order: Mapped[list[int]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending | done | skipped
    served_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    task: Mapped[Task] = relationship()
    user: Mapped[User] = relationship()


class Label(Base):
    """A submitted judgement, stored in candidate space (display letters already resolved)."""

    __tablename__ = "labels"
    id: Mapped[int] = mapped_column(primary_key=True)
    assignment_id: Mapped[int] = mapped_column(ForeignKey("assignments.id"), unique=True)
    idempotency_key: Mapped[str] = mapped_column(String(100), unique=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"), index=True)  # denormalized for stats
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    choice: Mapped[str] = mapped_column(String(16))  # A | B | tie | both_bad | ranking (display terms)
    winner: Mapped[int | None] = mapped_column(Integer, nullable=True)  # candidate position, or None
    strength: Mapped[int | None] = mapped_column(Integer, nullable=True)  # 1 slightly .. 3 much better
    ranks: Mapped[list[int] | None] = mapped_column(JSON, nullable=True)  # per candidate, 1 = best
    rationale: Mapped[str | None] = mapped_column(Text, nullable=True)
    flags: Mapped[dict[str, list[str]]] = mapped_column(JSON, default=dict)  # candidate position -> flags
    client_ms: Mapped[int | None] = mapped_column(Integer, nullable=True)  # visible time, browser-measured
    served_at: Mapped[datetime] = mapped_column(DateTime)  # server: when the assignment was created
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)  # server: commit time
    assignment: Mapped[Assignment] = relationship()
    user: Mapped[User] = relationship()


class TrainedModel(Base):
    """A model ``posttrain loop`` trained on labels of this app (its lineage record, ``POST /api/models``):
    one row per (loop, model path, run id); ``trained_model_labels`` links it to the app's labels it
    was trained on. The counts cover every source of the loop (judges, other apps), not only this app."""

    __tablename__ = "trained_models"
    id: Mapped[int] = mapped_column(primary_key=True)
    # sha256 of [loop, model, run_id]: one short UNIQUE key (PostgreSQL caps btree keys near 2.7 kB)
    identity: Mapped[str] = mapped_column(String(64), unique=True)
    loop: Mapped[str] = mapped_column(String(200), index=True)  # the loop's name
    model: Mapped[str] = mapped_column(String(1000))  # path of its final/
    run_id: Mapped[str] = mapped_column(String(200))  # new every time the stage trains
    kind: Mapped[str] = mapped_column(String(16))  # reward | policy
    stage: Mapped[str] = mapped_column(String(64))
    round: Mapped[int] = mapped_column(Integer)
    labels: Mapped[int] = mapped_column(Integer)  # labels trained on, all sources
    per_annotator: Mapped[dict[str, int]] = mapped_column(JSON, default=dict)
    per_source: Mapped[dict[str, int]] = mapped_column(JSON, default=dict)
    per_round: Mapped[dict[str, int]] = mapped_column(JSON, default=dict)
    source_versions: Mapped[list[str]] = mapped_column(JSON, default=list)  # app projects, judge versions
    excluded_annotators: Mapped[list[str]] = mapped_column(JSON, default=list)
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # started_from, command, loop_dir, ...
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class TrainedModelLabel(Base):
    """Label ``label_id`` of this app was among the training labels of model ``model_id``."""

    __tablename__ = "trained_model_labels"
    model_id: Mapped[int] = mapped_column(ForeignKey("trained_models.id"), primary_key=True)
    label_id: Mapped[int] = mapped_column(ForeignKey("labels.id"), primary_key=True, index=True)


# ----------------------------------------------------------------------------- engine


def normalize_url(url: str) -> str:
    """A bare path means a SQLite file; ``postgres://``/``postgresql://`` use the psycopg 3 driver."""
    if "://" not in url:
        return f"sqlite:///{url}"
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def safe_url(url: str) -> str:
    """The URL with its password hidden, for logs and messages."""
    return make_url(normalize_url(url)).render_as_string(hide_password=True)


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
    cur.execute("PRAGMA busy_timeout=30000")  # writers queue for up to 30 s instead of failing
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=FULL")  # an acknowledged label survives power loss, not just SIGKILL
    cur.close()


def make_engine(url: str, *, create: bool = True) -> Engine:
    """An engine for ``url`` with the tables created (``create_all`` adds missing tables only)."""
    url = normalize_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            raise ConfigError("an in-memory SQLite database would vanish with the server", where="db",
                              fix="give a file path, e.g. db=sqlite:///runs/labels.db")
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        # one connection per worker thread; 20 concurrent requests must not wait on the pool
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False},
                               pool_size=16, max_overflow=32)
        event.listen(engine, "connect", _sqlite_pragmas)
    elif parsed.get_backend_name() == "postgresql":
        engine = create_engine(url, pool_pre_ping=True, pool_size=16, max_overflow=32)
    else:
        raise ConfigError(f"unsupported database URL {safe_url(url)}", where="db",
                          fix="use sqlite:///path/to/labels.db or postgresql+psycopg://user:pw@host/db")
    if create:
        Base.metadata.create_all(engine)
    return engine


def make_sessionmaker(engine: Engine) -> sessionmaker:
    # objects stay readable after commit: handlers commit, then build the response from them
    return sessionmaker(engine, expire_on_commit=False)


def server_secret(db: Session) -> bytes:
    """The server's HMAC key: read from ``app_secrets``, created on first use (committed). Call it
    outside a transaction that holds locks: creating the row commits."""
    row = db.get(AppSecret, "server")
    if row is None:
        db.add(AppSecret(name="server", value=secrets.token_hex(32)))
        try:
            db.commit()
        except IntegrityError:  # another worker created it first: use theirs
            db.rollback()
        row = db.get(AppSecret, "server")
    return bytes.fromhex(row.value)
