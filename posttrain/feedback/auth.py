"""Passwords, API tokens and browser sessions (no web framework here: deps.py wires them in).

* Passwords: scrypt with a per-user random salt; the parameters are stored with the hash so they
  can be raised later without invalidating old hashes. Unknown users still cost one scrypt, so
  response time does not reveal which names exist.
* API tokens and session ids: 256-bit random strings; the database keeps only their SHA-256, so a
  leaked database does not hand out live credentials.
* CSRF: one random token per browser session, compared in constant time.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import secrets
from datetime import timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session, contains_eager

from posttrain.feedback.db import ApiToken, User, WebSession, text_problem, utcnow

# scrypt cost: N=2^14, r=8 uses 16 MiB and ~50 ms per check on one core (RFC 7914's interactive
# setting); logins are rare, API calls use tokens
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
MIN_PASSWORD = 8
MAX_PASSWORD = 1024


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        got = hashlib.scrypt(password.encode(), salt=_unb64(salt), n=int(n), r=int(r), p=int(p),
                             dklen=len(_unb64(digest)), maxmem=256 * 1024 * 1024)
    except (ValueError, TypeError, UnicodeEncodeError):
        return False
    return hmac.compare_digest(got, _unb64(digest))


@functools.cache
def _dummy_hash() -> str:
    """A hash of a random password: checked when the user does not exist, to keep timing uniform."""
    return hash_password(secrets.token_urlsafe(16))


def password_problem(password: str | None) -> str | None:
    if not password or len(password) < MIN_PASSWORD:
        return f"password must have at least {MIN_PASSWORD} characters"
    if len(password) > MAX_PASSWORD:
        return f"password must have at most {MAX_PASSWORD} characters"
    if text_problem(password):
        return f"password {text_problem(password)}"
    return None


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def same(a: str | None, b: str | None) -> bool:
    return bool(a) and bool(b) and hmac.compare_digest(str(a).encode(), str(b).encode())


# ----------------------------------------------------------------------------- credential checks


def check_password(db: Session, name: str, password: str) -> User | None:
    # a name that cannot be stored cannot exist (and NUL would make PostgreSQL fail): no query for it
    ok = isinstance(name, str) and len(name) <= 64 and not text_problem(name)
    user = db.scalar(select(User).where(User.name == name)) if ok else None
    if user is None:
        verify_password(password, _dummy_hash())
        return None
    if not verify_password(password, user.password_hash) or not user.active:
        return None
    return user


def issue_token(db: Session, user: User) -> str:
    """A new API token for ``user`` (committed); the plain token is shown once and never stored."""
    token = new_secret()
    db.add(ApiToken(user_id=user.id, token_hash=sha256(token)))
    db.commit()
    return token


def find_token(db: Session, token: str) -> ApiToken | None:
    """The token's row with its user (one statement: this runs on every API call), or None."""
    return db.scalar(select(ApiToken).join(User, User.id == ApiToken.user_id)
                     .where(ApiToken.token_hash == sha256(token)).options(contains_eager(ApiToken.user)))


def token_problem(row: ApiToken | None, max_age_days: float | None) -> str | None:
    """Why the token cannot be used (the 401 message), or None when it is good."""
    if row is None:
        return "invalid API token"
    if row.revoked:
        return "API token revoked (a password change or an admin ended it): get a new one with POST /api/token"
    if not row.user.active:
        return "this account is deactivated"
    if max_age_days is not None and row.created_at < utcnow() - timedelta(days=max_age_days):
        return (f"API token expired (tokens last {max_age_days:g} days): get a new one with POST /api/token")
    return None


def check_token(db: Session, token: str, max_age_days: float | None = None) -> User | None:
    row = find_token(db, token)
    return None if token_problem(row, max_age_days) else row.user


def revoke_credentials(db: Session, user: User) -> tuple[int, int]:
    """End every API token and browser session of ``user`` (committed): (tokens, sessions) ended.
    Basic credentials stop working when the password changes or the account is deactivated."""
    tokens = db.execute(update(ApiToken).where(ApiToken.user_id == user.id, ApiToken.revoked.is_(False))
                        .values(revoked=True).execution_options(synchronize_session=False)).rowcount
    sessions = db.execute(delete(WebSession).where(WebSession.user_id == user.id)
                          .execution_options(synchronize_session=False)).rowcount
    db.commit()
    return tokens or 0, sessions or 0


def open_session(db: Session, user: User, hours: float) -> tuple[str, WebSession]:
    """(cookie value, session row) for a fresh login; committed."""
    sid = new_secret()
    row = WebSession(id_hash=sha256(sid), user_id=user.id, csrf_token=new_secret(),
                     expires_at=utcnow() + timedelta(hours=hours))
    db.add(row)
    db.commit()
    return sid, row


def find_session(db: Session, sid: str) -> WebSession | None:
    return db.scalar(select(WebSession).join(User, User.id == WebSession.user_id)
                     .where(WebSession.id_hash == sha256(sid), WebSession.expires_at > utcnow(),
                            User.active.is_(True)).options(contains_eager(WebSession.user)))


def close_session(db: Session, sid: str) -> None:
    row = db.get(WebSession, sha256(sid))
    if row is not None:
        db.delete(row)
        db.commit()
