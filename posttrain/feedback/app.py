"""The FastAPI application: ``create_app(db_url)`` wires the database, pages, API, static files,
security headers and error mapping.

Endpoints are plain (sync) functions: FastAPI runs them in its thread pool, each with its own
SQLAlchemy session, which is what SQLite (one writer, busy timeout) and PostgreSQL both want.
"""

from __future__ import annotations

import re
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import anyio
import jinja2
from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException
from starlette.requests import cookie_parser

from posttrain.feedback import api, pages
from posttrain.feedback.assign import Refused
from posttrain.feedback.db import MAX_DEPTH, make_engine, make_sessionmaker, server_secret
from posttrain.feedback.deps import PRINCIPAL_KEY, SESSION_COOKIE, LoginRequired, client_address, credentials

HERE = Path(__file__).parent

# No inline script or style anywhere, so model output can never run code even if escaping failed.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
    (b"cache-control", b"no-store"),  # labeling pages and API answers are per user and change
]


# Host headers a server answers by default (the serve command adds its bind address): a DNS-rebinding
# page reaches a loopback server under its own name, which is never one of these
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass
class Settings:
    session_hours: float = 12.0
    secure_cookies: bool = False  # Secure cookies on plain HTTP too (a TLS proxy in front); https gets them anyway
    token_days: float | None = 30.0  # API tokens older than this are refused (401); None: never expire
    max_body_bytes: int = 1024 * 1024  # JSON and form bodies
    max_upload_bytes: int = 50 * 1024 * 1024  # task imports: the admin page's file upload and POST .../tasks
    allowed_hosts: tuple[str, ...] | None = None  # Host names answered (others: 400); None: LOOPBACK_HOSTS; "*": any
    login_max_failures: int = 10  # failed logins per user name and per client address in the window (then 429); 0: off
    login_window_s: float = 900.0  # the window of login_max_failures, and the longest lockout


MiB = 1024 * 1024
AUTH_BODY_BYTES = 64 * 1024  # /login and /api/token: a user name and a password
PUBLIC_POSTS = {"/login", "/api/token"}  # the only bodies read before authentication (capped at 64 KiB)
UPLOADS = re.compile(r"^/(admin/projects/[^/]+/import|api/projects/[^/]+/tasks)$")
ADMIN_ONLY = re.compile(r"^/(admin/.*|api/users|api/models|api/projects(/[^/]+/(tasks|members))?)$")
NO_BODY = {"GET", "HEAD", "OPTIONS"}


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` once a body passes its route's cap (FastAPI re-raises HTTPExceptions
    from body parsing, so the client gets this 413, not a parse error)."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body too large: this endpoint accepts at most {_size(limit)}",
                         headers={"Connection": "close"})


def _size(n: int) -> str:
    return f"{n / MiB:g} MiB" if n >= MiB else f"{n / 1024:g} KiB"


class BodyGuard:
    """Request bodies: a per-route size cap, and authentication before the first byte is read.

    * The cap: 64 KiB for /login and /api/token, ``max_upload_bytes`` for task imports, else
      ``max_body_bytes``. A larger ``Content-Length`` is answered 413 at once (with ``Connection:
      close``: the rest is never read); a chunked body is counted while it is read.
    * Credentials in headers (Bearer/Basic, the session cookie) are checked first for every request
      with a body except /login and /api/token, and admin-only routes need an admin: an anonymous or
      unauthorized client gets its 401/303/403 without the server reading (or spooling) its upload.
      The handler reuses the principal found here.
    """

    def __init__(self, app, state):
        self.app, self.state = app, state

    def _limit(self, path: str) -> int:
        settings = self.state.settings
        if path in PUBLIC_POSTS:
            return min(AUTH_BODY_BYTES, settings.max_body_bytes)
        return settings.max_upload_bytes if UPLOADS.match(path) else settings.max_body_bytes

    def _who(self, header: str | None, sid: str | None, address: str):
        with self.state.sessionmaker() as db:
            return credentials(db, header, sid, self.state.settings, address)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, limit = scope["path"], self._limit(scope["path"])
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        length = headers.get("content-length")
        if length is not None:
            if not (length.isascii() and length.isdigit()):
                return await self._reply(scope, send, 400, "malformed Content-Length")
            if len(length) > 15 or int(length) > limit:
                return await self._reply(scope, send, 413, BodyTooLarge(limit).detail)
        has_body = scope["method"] not in NO_BODY and (length not in (None, "0")
                                                       or "transfer-encoding" in headers)
        if has_body and path not in PUBLIC_POSTS:
            sid = cookie_parser(headers.get("cookie", "")).get(SESSION_COOKIE)  # as Request.cookies parses
            try:
                p = await anyio.to_thread.run_sync(self._who, headers.get("authorization"), sid, client_address(scope))
            except Refused as e:
                return await self._reply(scope, send, e.status, str(e), e.headers)
            except OperationalError:
                return await self._reply(scope, send, 503, "database unavailable, retry", {"Retry-After": "1"})
            if p is None:
                if not path.startswith("/api/"):
                    query = scope.get("query_string", b"").decode("latin-1")
                    target = path + (f"?{query}" if query else "")
                    return await self._reply(scope, send, 303, "", {"Location": f"/login?next={quote(target)}"})
                return await self._reply(scope, send, 401, "authentication required: send Authorization: "
                                         "Bearer <token> (POST /api/token)")
            if ADMIN_ONLY.match(path) and not p.is_admin:
                return await self._reply(scope, send, 403, "admin only")
            scope[PRINCIPAL_KEY] = p
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        started = False

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge as e:  # raised where nothing turned it into a response
            if started:
                raise
            await self._reply(scope, send, 413, e.detail)

    @staticmethod
    async def _reply(scope, send, status: int, message: str, headers: dict | None = None) -> None:
        extra = {**(headers or {}), "Connection": "close"}  # the unread body is never read: close
        if status == 401 and scope["path"].startswith("/api/"):
            extra["WWW-Authenticate"] = 'Bearer realm="posttrain-label"'
        if status == 303:
            response = Response(status_code=303, headers=extra)
        elif scope["path"].startswith("/api/"):
            response = JSONResponse({"detail": message}, status_code=status, headers=extra)
        else:
            response = Response(message, status_code=status, media_type="text/plain; charset=utf-8", headers=extra)
        await response(scope, _no_body, send)


async def _no_body():
    return {"type": "http.disconnect"}


def host_name(value: str) -> str:
    """'Example.COM:8600' -> 'example.com', '[::1]:8600' -> '::1' (a Host header or an allowed_hosts entry)."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return (value.rsplit(":", 1)[0] if value.count(":") == 1 else value).rstrip(".")


class HostGuard:
    """Answer only the Host names in ``settings.allowed_hosts``: a DNS-rebinding page (evil.example
    resolving to 127.0.0.1) reaches a loopback server with its own name in Host and gets a 400."""

    def __init__(self, app, state):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":  # lifespan; the app has no websockets
            return await self.app(scope, receive, send)
        allowed = self.state.settings.allowed_hosts or LOOPBACK_HOSTS  # read per request: tests add theirs
        host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), "")
        if "*" not in allowed and host_name(host) not in {host_name(h) for h in allowed}:
            message = f"Host {host[:100]!r} is not served here: add it to the serve option allowed_hosts"
            response = Response(message, status_code=400, media_type="text/plain; charset=utf-8",
                                headers={"Connection": "close"})
            return await response(scope, receive, send)
        await self.app(scope, receive, send)


class SecurityHeaders:
    """Plain ASGI middleware (cheaper than BaseHTTPMiddleware on the load path). An unhandled error
    is answered 500 here, with the headers, before it propagates: Starlette's outer error middleware
    would send its 500 without them."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        static = scope["path"].startswith("/static/")
        started = False

        async def send_with_headers(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                names = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in SECURITY_HEADERS
                         if k not in names and not (static and k == b"cache-control")]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception:
            if not started:
                detail = "internal server error: retry (with the same idempotency key for a label)"
                response = (JSONResponse({"detail": detail}, status_code=500) if scope["path"].startswith("/api/")
                            else Response(detail, status_code=500, media_type="text/plain; charset=utf-8"))
                await response(scope, receive, send_with_headers)
            raise  # logged by the server; the error middleware sees the answer started and sends nothing


def _is_api(request: Request) -> bool:
    return request.url.path.startswith(("/api/", "/healthz"))


def _error_page(request: Request, status: int, message: str) -> Response:
    return request.app.state.templates.TemplateResponse(
        request, "error.html", {"status": status, "message": message, "user": None, "csrf": None,
                                "admin": False, "msg": None}, status_code=status)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(Refused)
    async def refused(request: Request, exc: Refused) -> Response:
        if _is_api(request):
            headers = {"WWW-Authenticate": 'Bearer realm="posttrain-label"'} if exc.status == 401 else {}
            return JSONResponse({"detail": str(exc)}, status_code=exc.status, headers={**headers, **exc.headers})
        response = _error_page(request, exc.status, str(exc))
        response.headers.update(exc.headers)
        return response

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        if exc.status_code != 400:
            return await http_exception_handler(request, exc)
        # FastAPI and Starlette answer a body they cannot parse with 400; the app promises 422
        cause = exc.__cause__
        if isinstance(cause, UnicodeDecodeError):
            problem = "the body is not valid UTF-8: send JSON as UTF-8 text"
        elif isinstance(cause, RecursionError):
            problem = f"JSON nested too deeply: at most {MAX_DEPTH} levels"
        else:
            problem = f"the body could not be parsed ({exc.detail})"
        if not _is_api(request):
            return _error_page(request, 422, f"malformed request: {problem}")
        return JSONResponse({"detail": f"malformed request: {problem}"}, status_code=422)

    @app.exception_handler(LoginRequired)
    async def login_required(request: Request, exc: LoginRequired) -> Response:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?next={quote(target)}", status_code=303)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        errors = exc.errors()
        parts = []
        for e in errors:
            where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
        message = "malformed request: " + "; ".join(parts)
        if not _is_api(request):
            return _error_page(request, 422, message)
        safe = [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in errors]
        return JSONResponse({"detail": message, "errors": safe}, status_code=422)

    @app.exception_handler(OperationalError)
    async def db_down(request: Request, exc: OperationalError) -> Response:
        # the database is restarting or locked past the busy timeout: nothing was acknowledged, so a
        # client retrying with the same idempotency key is safe
        return JSONResponse({"detail": "database unavailable, retry"}, status_code=503, headers={"Retry-After": "1"})


def create_app(db_url: str, settings: Settings | None = None) -> FastAPI:
    engine = make_engine(db_url)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        engine.dispose()  # close pooled connections on shutdown (PostgreSQL counts them)

    # the API has its own docs in docs/labeling.md; FastAPI's Swagger page needs a CDN and inline script
    app = FastAPI(title="posttrain label", docs_url=None, redoc_url=None, openapi_url="/api/openapi.json",
                  lifespan=lifespan)
    app.state.engine = engine
    app.state.sessionmaker = make_sessionmaker(engine)
    app.state.settings = settings or Settings()
    with app.state.sessionmaker() as db:
        app.state.secret = server_secret(db)  # HMAC key, kept in the database: the same after a restart
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True)
    app.state.templates = Jinja2Templates(env=env)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.include_router(api.router)
    app.include_router(pages.router)
    _add_error_handlers(app)
    app.add_middleware(BodyGuard, state=app.state)
    app.add_middleware(HostGuard, state=app.state)  # an unknown Host is refused before anything else
    app.add_middleware(SecurityHeaders)  # outermost: the guards' own answers and 500s get the headers too
    return app

