"""Creating users and projects: shared by the admin API, the admin page and the CLI commands."""

from __future__ import annotations

import re
import unicodedata

from sqlalchemy import select
from sqlalchemy.orm import Session

from posttrain.feedback import auth
from posttrain.feedback.assign import Conflict, Invalid, NotFound
from posttrain.feedback.db import ROLES, Membership, Project, User, text_problem

NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")  # used with fullmatch ("$" would accept a trailing newline)
MAX_OVERLAP = 1000
MAX_TTL_S = 365 * 24 * 3600
# control, format (bidi overrides, zero-width) and line/paragraph separators: a name is one line of
# plain text, shown on every page, and must not reorder or hide what is around it
HIDDEN = {"Cc", "Cf", "Zl", "Zp"}


def name_problem(name: str) -> str | None:
    bad = next((c for c in name if unicodedata.category(c) in HIDDEN), None)
    return None if bad is None else f"must not contain control or invisible characters (found U+{ord(bad):04X})"


def user_by_name(db: Session, name: str) -> User:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise NotFound(f"no user named {name!r}")  # never sent to the database: NUL would be a 500
    user = db.scalar(select(User).where(User.name == name))
    if user is None:
        raise NotFound(f"no user named {name!r}")
    return user


def project_by_name(db: Session, name: str) -> Project:
    if not isinstance(name, str) or len(name) > 128 or text_problem(name):
        raise NotFound(f"no project named {name!r}")
    project = db.scalar(select(Project).where(Project.name == name))
    if project is None:
        raise NotFound(f"no project named {name!r}")
    return project


def create_user(db: Session, name: str, role: str, password: str, *, update: bool = False) -> User:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise Invalid("user name must be 1-64 letters, digits or _ . @ -", field="name")
    if role not in ROLES:
        raise Invalid(f"role must be one of {list(ROLES)}, got {role!r}", field="role")
    problem = auth.password_problem(password, name)
    if problem:
        raise Invalid(problem, field="password")
    user = db.scalar(select(User).where(User.name == name))
    if user is not None and not update:
        raise Conflict(f"user {name!r} already exists", field="name")
    if user is None:
        user = User(name=name, role=role, password_hash=auth.hash_password(password))
        db.add(user)
    else:
        user.role, user.password_hash, user.active = role, auth.hash_password(password), True
        db.commit()
        auth.revoke_credentials(db, user)  # a new password ends every token and session of the old one
    db.commit()
    return user


def set_access(db: Session, user: User, *, revoke: bool = True, active: bool | None = None) -> dict:
    """Revoke ``user``'s API tokens and browser sessions and/or (de)activate the account. Deactivating
    always revokes: an inactive user can neither log in nor use a token."""
    if active is not None:
        user.active = active
        db.commit()
    tokens = sessions = 0
    if revoke or active is False:
        tokens, sessions = auth.revoke_credentials(db, user)
    return {"user": user.name, "active": user.active, "tokens_revoked": tokens, "sessions_ended": sessions}


def check_project_settings(overlap: int, gold_rate: float, ttl_s: int) -> None:
    if not 1 <= overlap <= MAX_OVERLAP:
        raise Invalid(f"overlap must be 1..{MAX_OVERLAP}, got {overlap}")
    if not 0.0 <= gold_rate <= 1.0:
        raise Invalid(f"gold_rate must be between 0 and 1, got {gold_rate}")
    if not 60 <= ttl_s <= MAX_TTL_S:
        raise Invalid(f"assignment_ttl_s must be 60..{MAX_TTL_S} seconds, got {ttl_s}")


def create_project(db: Session, name: str, *, overlap: int = 3, gold_rate: float = 0.1, instructions: str = "",
                   assignment_ttl_s: int = 3600, update: bool = False) -> Project:
    if not isinstance(name, str) or not name or len(name) > 128:
        raise Invalid("project name must have 1-128 characters")
    if text_problem(name) or name_problem(name):
        raise Invalid(f"project name {text_problem(name) or name_problem(name)}", field="name")
    if not isinstance(instructions, str) or text_problem(instructions):
        raise Invalid(f"instructions {text_problem(instructions) if isinstance(instructions, str) else 'must be text'}")
    check_project_settings(overlap, gold_rate, assignment_ttl_s)
    project = db.scalar(select(Project).where(Project.name == name))
    if project is not None and not update:
        raise Conflict(f"project {name!r} already exists")
    if project is None:
        project = Project(name=name)
        db.add(project)
    project.overlap, project.gold_rate = overlap, gold_rate
    project.instructions, project.assignment_ttl_s = instructions, assignment_ttl_s
    db.commit()
    return project


def add_members(db: Session, project: Project, names: list[str]) -> list[str]:
    """Add annotators to ``project`` (idempotent); unknown names are an error before any change."""
    users = [user_by_name(db, n) for n in names]
    for user in users:
        if db.get(Membership, (project.id, user.id)) is None:
            db.add(Membership(project_id=project.id, user_id=user.id))
    db.commit()
    return [u.name for u in users]
