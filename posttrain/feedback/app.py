"""The FastAPI application: ``create_app(db_url)`` wires the database, pages, API, static files,
security headers and error mapping.

Endpoints are plain (sync) functions: FastAPI runs them in its thread pool, each with its own
SQLAlchemy session, which is what SQLite (one writer, busy timeout) and PostgreSQL both want.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import jinja2
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy.exc import OperationalError

from posttrain.feedback import api, pages
from posttrain.feedback.assign import Refused
from posttrain.feedback.db import make_engine, make_sessionmaker
from posttrain.feedback.deps import LoginRequired

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


@dataclass
class Settings:
    session_hours: float = 12.0
    secure_cookies: bool = False  # set when served over HTTPS (behind a proxy)


class SecurityHeaders:
    """Plain ASGI middleware (cheaper than BaseHTTPMiddleware on the load path)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        static = scope["path"].startswith("/static/")

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in SECURITY_HEADERS
                         if k not in names and not (static and k == b"cache-control")]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


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
            headers = {"WWW-Authenticate": 'Bearer realm="posttrain-label"'} if exc.status == 401 else None
            return JSONResponse({"detail": str(exc)}, status_code=exc.status, headers=headers)
        return _error_page(request, exc.status, str(exc))

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
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True)
    app.state.templates = Jinja2Templates(env=env)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.include_router(api.router)
    app.include_router(pages.router)
    _add_error_handlers(app)
    app.add_middleware(SecurityHeaders)
    return app

