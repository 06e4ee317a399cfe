"""Request-level plumbing: database sessions, who is asking, and CSRF checks.

Credentials, in order: an ``Authorization`` header (``Bearer <token>`` or ``Basic``) — a wrong one is
401 even if a cookie is present — then the session cookie. State-changing requests that rely on the
cookie must carry the session's CSRF token (``X-CSRF-Token`` header or ``csrf_token`` form field);
header-authenticated requests need none, because browsers never attach those headers on their own
(the API's 401 challenges with ``Bearer``, never ``Basic``, so no browser caches Basic credentials).

For requests with a body, app.BodyGuard checks the credentials before the body is read and leaves
the principal in the request scope (``PRINCIPAL_KEY``); ``authenticate`` reuses it.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterator
from dataclasses import dataclass

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from posttrain.feedback import auth
from posttrain.feedback.assign import Forbidden, Invalid, Refused
from posttrain.feedback.db import User, text_problem

SESSION_COOKIE = "pt_session"
LOGIN_CSRF_COOKIE = "pt_login_csrf"
UNSAFE = {"POST", "PUT", "PATCH", "DELETE"}


class Unauthorized(Refused):
    status = 401


class LoginRequired(Exception):
    """A page needs a logged-in user: the app redirects to /login."""


@dataclass
class Principal:
    user: User
    via: str  # session | token | basic
    csrf: str | None = None  # the session's CSRF token (cookie sessions only)

    @property
    def is_admin(self) -> bool:
        return self.user.role == "admin"


def get_db(request: Request) -> Iterator[Session]:
    db = request.app.state.sessionmaker()
    try:
        yield db
    finally:
        db.close()


def from_header(db: Session, header: str, token_days: float | None = None, *, address: str | None = None,
                limits: auth.LoginLimits | None = None) -> Principal:
    scheme, _, value = header.partition(" ")
    scheme = scheme.lower()
    if scheme == "bearer":
        row = auth.find_token(db, value.strip())
        problem = auth.token_problem(row, token_days)
        if problem:
            raise Unauthorized(problem)
        return Principal(row.user, "token")
    if scheme == "basic":
        try:
            name, _, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise Unauthorized("malformed Basic credentials") from None
        user = auth.check_password(db, name, password, address=address, limits=limits)  # Basic guesses count too
        if user is None:
            raise Unauthorized("wrong user name or password")
        return Principal(user, "basic")
    raise Unauthorized("unsupported Authorization scheme; use Bearer <token> or Basic")


def token_days(request: Request) -> float | None:
    return getattr(request.app.state.settings, "token_days", None)


def login_limits(settings) -> auth.LoginLimits:
    return auth.LoginLimits(settings.login_max_failures, settings.login_window_s)


def client_address(scope) -> str:
    """The client's address (uvicorn puts a trusted proxy's X-Forwarded-For there); '' if unknown."""
    client = scope.get("client")
    return str(client[0]) if client else ""


def credentials(db: Session, header: str | None, sid: str | None, settings, address: str) -> Principal | None:
    """Who sends these credentials (an Authorization header wins over the session cookie); None for none."""
    if header:
        return from_header(db, header, settings.token_days, address=address, limits=login_limits(settings))
    if sid:
        row = auth.find_session(db, sid)
        if row is not None:
            return Principal(row.user, "session", row.csrf_token)
    return None


PRINCIPAL_KEY = "posttrain.principal"  # set in the request scope by app.BodyGuard, which checks first


def authenticate(request: Request, db: Session) -> Principal | None:
    # BodyGuard already checked the credentials of requests with a body (before reading it)
    found = request.scope.get(PRINCIPAL_KEY)
    if found is not None:
        return found
    return credentials(db, request.headers.get("authorization"), request.cookies.get(SESSION_COOKIE),
                       request.app.state.settings, client_address(request.scope))


def check_csrf(p: Principal, sent: str | None) -> None:
    if p.via == "session" and not auth.same(sent, p.csrf):
        raise Forbidden("CSRF token missing or wrong: reload the page and try again")


# ----------------------------------------------------------------------------- JSON API


def api_user(request: Request, db: Session = Depends(get_db)) -> Principal:
    p = authenticate(request, db)
    if p is None:
        raise Unauthorized("authentication required: send Authorization: Bearer <token> (POST /api/token)")
    return p


def api_admin(p: Principal = Depends(api_user)) -> Principal:
    if not p.is_admin:
        raise Forbidden("admin only")
    return p


def api_writer(request: Request, p: Principal = Depends(api_user)) -> Principal:
    check_csrf(p, request.headers.get("x-csrf-token"))
    return p


def api_admin_writer(p: Principal = Depends(api_writer)) -> Principal:
    if not p.is_admin:
        raise Forbidden("admin only")
    return p


# ----------------------------------------------------------------------------- HTML pages


async def form_fields(request: Request) -> dict[str, list]:
    """The submitted form as {name: [values]} (multi-valued fields such as checkboxes keep all)."""
    form = await request.form()
    fields = {k: form.getlist(k) for k in form.keys()}
    for name, values in fields.items():  # NUL would make PostgreSQL fail (a 500) wherever it is stored
        for value in [name, *(v for v in values if isinstance(v, str))]:
            if text_problem(value):
                raise Invalid(f"form field {name[:40]!r}: {text_problem(value)}")
    return fields


def page_user(request: Request, db: Session = Depends(get_db)) -> Principal:
    p = authenticate(request, db)
    if p is None:
        raise LoginRequired()
    return p


def page_admin(p: Principal = Depends(page_user)) -> Principal:
    if not p.is_admin:
        raise Forbidden("admin only")
    return p


def page_writer(fields: dict = Depends(form_fields), p: Principal = Depends(page_user)) -> Principal:
    check_csrf(p, (fields.get("csrf_token") or [None])[0])
    return p


def page_admin_writer(p: Principal = Depends(page_writer)) -> Principal:
    if not p.is_admin:
        raise Forbidden("admin only")
    return p


def first(fields: dict[str, list], name: str, default: str | None = None) -> str | None:
    values = fields.get(name) or []
    return values[0] if values and isinstance(values[0], str) else default
