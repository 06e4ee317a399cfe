"""Passwords, API tokens and browser sessions (no web framework here: deps.py wires them in).

* Passwords: scrypt with a per-user random salt; the parameters are stored with the hash so they
  can be raised later without invalidating old hashes. Unknown users still cost one scrypt, so
  response time does not reveal which names exist.
* API tokens and session ids: 256-bit random strings; the database keeps only their SHA-256, so a
  leaked database does not hand out live credentials.
* CSRF: one random token per browser session, compared in constant time. The login form's
  double-submit token is signed with the server secret (db.server_secret) and carries its age.
* Login limits: failed password checks are counted per user name and per client address in the
  database (``LoginLimits``); past the limit every check answers 429 until the window has passed.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import math
import secrets
import time
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session, contains_eager

from posttrain.feedback.assign import Refused
from posttrain.feedback.db import ApiToken, LoginFailure, User, WebSession, text_problem, utcnow

# scrypt cost: N=2^14, r=8 uses 16 MiB and ~50 ms per check on one core (RFC 7914's interactive
# setting); logins are rare, API calls use tokens
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
MIN_PASSWORD = 8
MAX_PASSWORD = 1024
# the commonest passwords of 8+ characters (shorter ones fail the length rule anyway); also refused
# with digits or symbols appended ("Password2024!")
COMMON_PASSWORDS = frozenset("""
password password1 password12 password123 passw0rd p@ssw0rd p@ssword 1password mypassword passwordpassword
12345678 123456789 1234567890 12345678910 87654321 987654321 147258369 741852963 159753456 123123123
11111111 00000000 88888888 66666666 55555555 99999999 77777777 22222222 12121212 13131313 12341234 11223344
qwertyuiop qwerty123 qwertyui qwerty12 qwertyqwerty asdfghjkl asdf1234 zxcvbnm1 1q2w3e4r 1q2w3e4r5t
1qaz2wsx 1qazxsw2 zaq12wsx qazwsxedc 123qweasd q1w2e3r4 q1w2e3r4t5 1234qwer abcd1234 abc12345 abcdefgh
abcdefg1 a1234567 aa123456 123456789a aaaaaaaa iloveyou iloveyou1 lovelove loveyou1 sunshine princess
football baseball welcome welcome1 welcome123 superman batman12 trustno1 starwars whatever computer
internet michelle jennifer jordan23 liverpool chelsea1 arsenal1 letmein letmein1 letmein123 dragon12
monkey12 shadow12 master12 admin123 administrator changeme default1 secret12 test1234 testtest guest123
root1234 mustang1 michael1 charlie1 samsung1 pokemon1 minecraft corvette mercedes blink182 qwerty
""".split())


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


def password_problem(password: str | None, name: str | None = None) -> str | None:
    """Why ``password`` is refused for user ``name`` (a message naming the fix), or None."""
    if not password or len(password) < MIN_PASSWORD:
        return f"password must have at least {MIN_PASSWORD} characters"
    if len(password) > MAX_PASSWORD:
        return f"password must have at most {MAX_PASSWORD} characters"
    if text_problem(password):
        return f"password {text_problem(password)}"
    lowered = password.lower()
    if lowered in COMMON_PASSWORDS or lowered.rstrip("0123456789!@#$%^&*.?_-") in COMMON_PASSWORDS:
        return "password is one of the most common passwords: choose a longer, less guessable one"
    # names of 1-2 characters would forbid half the alphabet; they are still refused as the whole password
    if name and (lowered == name.lower() or (len(name) >= 3 and name.lower() in lowered)):
        return "password must not contain the user name: choose one that does not"
    return None


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def same(a: str | None, b: str | None) -> bool:
    return bool(a) and bool(b) and hmac.compare_digest(str(a).encode(), str(b).encode())


def sign(secret: bytes, purpose: str, text: str) -> str:
    """A 128-bit HMAC of ``text`` under the server secret; ``purpose`` keeps signatures of one use
    from being valid for another."""
    mac = hmac.new(secret, f"{purpose}\x00{text}".encode("utf-8", "replace"), hashlib.sha256).digest()
    return _b64(mac[:16])


def signed(secret: bytes, purpose: str, text: str, signature: str | None) -> bool:
    return bool(signature) and hmac.compare_digest(sign(secret, purpose, text), str(signature))


LOGIN_FORM_S = 12 * 3600  # a login form older than this is refused ("the login form expired")


def login_form_token(secret: bytes, address: str) -> str:
    """The login form's double-submit token: nonce.issued.HMAC(nonce.issued.address). Signed with the
    server secret, so an attacker who can plant a cookie cannot make up a pair, and bound to the
    client's address, so a pair the attacker fetched for themselves fails from the victim's."""
    body = f"{new_secret()[:22]}.{int(time.time())}"
    return f"{body}.{sign(secret, 'login-form', f'{body}.{address}')}"


def login_form_ok(secret: bytes, sent: str | None, cookie: str | None, address: str) -> bool:
    if not same(sent, cookie):
        return False
    nonce, _, rest = str(sent).partition(".")
    issued, _, signature = rest.partition(".")
    if not (issued.isascii() and issued.isdigit() and len(issued) <= 12):
        return False
    fresh = 0 <= time.time() - int(issued) <= LOGIN_FORM_S
    return fresh and signed(secret, "login-form", f"{nonce}.{issued}.{address}", signature)


# ----------------------------------------------------------------------------- credential checks


@dataclass
class LoginLimits:
    max_failures: int = 10  # failed checks per user name, and per client address, within window_s; 0: off
    window_s: float = 900.0


class TooManyAttempts(Refused):
    status = 429

    def __init__(self, retry_after: int):
        super().__init__(f"too many failed logins: try again in {retry_after} s")
        self.headers = {"Retry-After": str(retry_after)}


def _locked(db: Session, name: str, address: str, limits: LoginLimits) -> bool:
    """Raise TooManyAttempts when the name or the address is over the limit; True when either has
    failures in the window (a success then clears this pair's)."""
    now = utcnow()
    cutoff = now - timedelta(seconds=limits.window_s)
    any_failures = False
    for column, value in ((LoginFailure.name, name), (LoginFailure.address, address)):
        if not value:
            continue
        n, oldest = db.execute(select(func.count(), func.min(LoginFailure.at))
                               .where(column == value, LoginFailure.at > cutoff)).one()
        if n >= limits.max_failures:
            wait = (oldest + timedelta(seconds=limits.window_s) - now).total_seconds()
            raise TooManyAttempts(max(1, math.ceil(wait)))
        any_failures = any_failures or n > 0
    return any_failures


def check_password(db: Session, name: str, password: str, *, address: str | None = None,
                   limits: LoginLimits | None = None) -> User | None:
    """The active user with this name and password, else None. With ``limits``, failures are counted
    per name and per ``address`` and a locked-out pair raises TooManyAttempts before any check."""
    # a name that cannot be stored cannot exist (and NUL would make PostgreSQL fail): no query for it
    ok = isinstance(name, str) and len(name) <= 64 and not text_problem(name)
    key, address = (name if ok else ""), (address or "")[:64]
    limited = limits is not None and limits.max_failures > 0
    had_failures = _locked(db, key, address, limits) if limited else False
    user = db.scalar(select(User).where(User.name == name)) if ok else None
    if user is None:
        verify_password(password, _dummy_hash())
    good = user is not None and verify_password(password, user.password_hash) and user.active
    if limited and not good:
        db.add(LoginFailure(name=key, address=address, at=utcnow()))
        db.execute(delete(LoginFailure).where(LoginFailure.at < utcnow() - timedelta(seconds=limits.window_s)))
        db.commit()
    elif limited and had_failures:
        # only this name from this address: another address's failures keep counting
        db.execute(delete(LoginFailure).where(LoginFailure.name == key, LoginFailure.address == address))
        db.commit()
    return user if good else None


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
    """(cookie value, session row) for a fresh login; committed. Expired sessions of every user are
    deleted here: they can never be used again, and logins are rare enough to carry the cleanup."""
    db.execute(delete(WebSession).where(WebSession.expires_at <= utcnow()).execution_options(synchronize_session=False))
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
