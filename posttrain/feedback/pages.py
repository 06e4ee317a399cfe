"""HTML pages: login, the annotator's labeling page, and the admin dashboard.

Forms post back and redirect (post/redirect/get), so the pages work without JavaScript; label.js adds
keyboard shortcuts and time measurement. Every text from the database goes through Jinja's
autoescaping: model output is shown as text, never as markup.

Only POSTs (with the session's CSRF token) create assignments: the label page's GET shows the pending
one or a "next task" form, so a cross-site link cannot make an annotator take a task. The banner
shows only messages the server signed (``msg`` + ``sig``), so a crafted link cannot put text there.
"""

from __future__ import annotations

import json
import tempfile
import uuid
from pathlib import Path
from urllib.parse import quote

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from posttrain.errors import DataError
from posttrain.feedback import accounts, auth, importing, quality
from posttrain.feedback.api import messages
from posttrain.feedback.assign import (
    Conflict,
    Invalid,
    LabelInput,
    NotFound,
    Refused,
    by_id,
    get_project,
    has_work,
    next_assignment,
    own_assignment,
    pending_assignment,
    record_label,
    skip,
)
from posttrain.feedback.db import FLAGS, LETTERS, Assignment, Membership, Project, Task, User
from posttrain.feedback.deps import (
    LOGIN_CSRF_COOKIE,
    SESSION_COOKIE,
    Principal,
    client_address,
    first,
    login_limits,
    form_fields,
    get_db,
    page_admin,
    page_admin_writer,
    page_user,
    page_writer,
)
from posttrain.feedback.export import ExportOptions, export_project

router = APIRouter()


MAX_MSG = 2000  # characters of a banner message carried in a redirect


def _banner(request: Request) -> str | None:
    """The redirect's message if the server signed it; anything else in ``msg`` is never shown."""
    msg, sig = request.query_params.get("msg"), request.query_params.get("sig")
    return msg if msg and auth.signed(request.app.state.secret, "msg", msg, sig) else None


def render(request: Request, name: str, p: Principal | None = None, status: int = 200, **ctx) -> HTMLResponse:
    ctx.update(user=p.user if p else None, csrf=p.csrf if p else None, admin=bool(p and p.is_admin),
               msg=ctx.get("msg", _banner(request)))
    return request.app.state.templates.TemplateResponse(request, name, ctx, status_code=status)


def redirect(request: Request, path: str, msg: str | None = None) -> RedirectResponse:
    if not msg:
        return RedirectResponse(path, status_code=303)
    msg = msg[:MAX_MSG]
    sig = auth.sign(request.app.state.secret, "msg", msg)
    return RedirectResponse(f"{path}?msg={quote(msg)}&sig={sig}", status_code=303)


def _secure(request: Request) -> bool:
    """Cookies are Secure on https requests (uvicorn takes the scheme from a trusted proxy) and with
    secure_cookies=true (a TLS proxy that does not say so)."""
    return request.app.state.settings.secure_cookies or request.url.scheme == "https"


def _safe_next(path: str | None) -> str:
    """Only same-site paths: '/x' yes, '//evil.com' or 'https://evil.com' no (open redirect)."""
    if not path or not path.startswith("/") or path.startswith(("//", "/\\")):
        return "/"
    return path


# ----------------------------------------------------------------------------- login


@router.get("/login")
def login_page(request: Request, next: str = "/") -> HTMLResponse:
    return _login_form(request, next)


def _login_form(request: Request, next: str, status: int = 200, error: str | None = None) -> HTMLResponse:
    # login CSRF: a signed token in a cookie and in the form must match (double submit), so another
    # site cannot log the browser into an account of its choosing. Every answer gets a fresh pair.
    token = auth.login_form_token(request.app.state.secret, client_address(request.scope))
    resp = render(request, "login.html", status=status, login_csrf=token, next=_safe_next(next), error=error)
    resp.set_cookie(LOGIN_CSRF_COOKIE, token, httponly=True, samesite="strict", path="/login",
                    secure=_secure(request))
    return resp


@router.post("/login")
def login(request: Request, fields: dict = Depends(form_fields), db: Session = Depends(get_db)) -> Response:
    nxt = _safe_next(first(fields, "next"))
    address = client_address(request.scope)
    if not auth.login_form_ok(request.app.state.secret, first(fields, "csrf_token"),
                              request.cookies.get(LOGIN_CSRF_COOKIE), address):
        return _login_form(request, nxt, status=403, error="The login form expired; please try again.")
    settings = request.app.state.settings
    try:
        user = auth.check_password(db, first(fields, "username", "") or "", first(fields, "password", "") or "",
                                   address=address, limits=login_limits(settings))
    except auth.TooManyAttempts as e:
        resp = _login_form(request, nxt, status=429, error=f"Too many failed logins: try again in "
                                                           f"{e.headers['Retry-After']} s.")
        resp.headers.update(e.headers)
        return resp
    if user is None:
        return _login_form(request, nxt, status=401, error="Wrong user name or password.")
    sid, _ = auth.open_session(db, user, settings.session_hours)
    resp = RedirectResponse(nxt, status_code=303)
    resp.set_cookie(SESSION_COOKIE, sid, httponly=True, samesite="lax", secure=_secure(request),
                    max_age=int(settings.session_hours * 3600), path="/")
    resp.delete_cookie(LOGIN_CSRF_COOKIE, path="/login")
    return resp


@router.post("/logout")
def logout(request: Request, p: Principal = Depends(page_writer), db: Session = Depends(get_db)) -> Response:
    sid = request.cookies.get(SESSION_COOKIE)
    if sid:
        auth.close_session(db, sid)
    resp = redirect(request, "/login")
    resp.delete_cookie(SESSION_COOKIE, path="/")
    return resp


# ----------------------------------------------------------------------------- annotators


def _my_counts(db: Session, user: User, project: Project) -> dict[str, int]:
    rows = db.execute(select(Assignment.status, func.count()).join(Task).where(
        Assignment.user_id == user.id, Task.project_id == project.id).group_by(Assignment.status)).all()
    return {status: n for status, n in rows}


@router.get("/")
def home(request: Request, p: Principal = Depends(page_user), db: Session = Depends(get_db)) -> Response:
    if p.is_admin:
        return redirect(request, "/admin")
    projects = db.scalars(select(Project).join(Membership, Membership.project_id == Project.id)
                          .where(Membership.user_id == p.user.id).order_by(Project.id)).all()
    rows = [(x, _my_counts(db, p.user, x)) for x in projects]
    return render(request, "home.html", p, projects=rows)


def _label_page(request: Request, p: Principal, db: Session, project: Project, a: Assignment,
                error: str | None = None, key: str | None = None, status: int = 200) -> HTMLResponse:
    cands = a.task.candidates
    view = [{"slot": LETTERS[i], "text": cands[pos].text} for i, pos in enumerate(a.display_order)]
    return render(request, "label.html", p, status=status, project=project, assignment=a,
                  prompt=messages(a.task.prompt), candidates=view, mode="pairwise" if len(cands) == 2 else "ranking",
                  k=len(cands), flags=FLAGS,
                  key=key or uuid.uuid4().hex, error=error, counts=_my_counts(db, p.user, project))


@router.get("/projects/{project_id}/label")
def label_page(request: Request, project_id: int, p: Principal = Depends(page_user),
               db: Session = Depends(get_db)) -> HTMLResponse:
    """The pending assignment, else a "next task" form (a GET never creates one), else "all done"."""
    project = get_project(db, p.user, project_id)
    a = pending_assignment(db, p.user, project)
    if a is not None:
        return _label_page(request, p, db, project, a)
    counts = _my_counts(db, p.user, project)
    if not has_work(db, p.user, project):
        return render(request, "done.html", p, project=project, counts=counts)
    # label.js submits the form at once for navigations from this site or the address bar, never for
    # a cross-site link (Sec-Fetch-Site), which shows the button instead
    auto = request.headers.get("sec-fetch-site") in ("same-origin", "none")
    return render(request, "next.html", p, project=project, counts=counts, auto=auto)


@router.post("/projects/{project_id}/next")
def take_next(request: Request, project_id: int, p: Principal = Depends(page_writer),
              db: Session = Depends(get_db)) -> Response:
    return _to_next(request, db, p, get_project(db, p.user, project_id))


def _to_next(request: Request, db: Session, p: Principal, project: Project, msg: str | None = None) -> Response:
    """After a CSRF-checked POST: assign the next task (if any) and show it (post/redirect/get)."""
    next_assignment(db, p.user, project)
    return redirect(request, f"/projects/{project.id}/label", msg)


def _form_int(fields: dict, name: str) -> int | None:
    """A whole number from a form field: ASCII digits only (str.isdigit() accepts '²', which int() refuses),
    at most 19 of them; None when the field is empty or missing. Range checks are the caller's."""
    value = first(fields, name, "") or ""
    if not value:
        return None
    if not (value.isascii() and value.isdigit() and len(value) <= 19):
        raise Invalid(f"{name} must be a whole number, got {value[:40]!r}")
    return int(value)


def _label_input(fields: dict, k: int) -> LabelInput:
    """The label form -> LabelInput. Rank selects become a best-first list of slots."""
    choice = first(fields, "choice")
    strength = first(fields, "strength")
    ranking = None
    if k > 2:
        ranks = {}
        for slot in LETTERS[:k]:
            value = first(fields, f"rank_{slot}", "") or ""
            if not (value.isascii() and value.isdigit() and len(value) <= 2):
                raise Invalid(f"give response {slot} a rank from 1 to {k}")
            ranks[slot] = int(value)
        if sorted(ranks.values()) != list(range(1, k + 1)):
            raise Invalid(f"give each response a different rank from 1 to {k}")
        ranking = sorted(ranks, key=ranks.get)
        choice = None
    ms = _form_int(fields, "client_ms")  # the limits are check_label_input's, shared with the JSON API
    return LabelInput(
        idempotency_key=first(fields, "idempotency_key", "") or "",
        choice=choice, ranking=ranking,
        # the form may still hold a strength picked before switching to tie / both bad: drop it
        strength=_form_int(fields, "strength") if strength and choice in ("A", "B") else None,
        rationale=first(fields, "rationale"),
        flags={slot: [v for v in fields.get(f"flag_{slot}", []) if isinstance(v, str)] for slot in LETTERS[:k]},
        client_ms=ms)


@router.post("/projects/{project_id}/label")
def submit_label(request: Request, project_id: int, fields: dict = Depends(form_fields),
                 p: Principal = Depends(page_writer), db: Session = Depends(get_db)) -> Response:
    project = get_project(db, p.user, project_id)
    aid = _form_int(fields, "assignment_id")
    if aid is None:
        raise Invalid("assignment_id missing")
    # 404/403 before the form is read: its errors would tell about another annotator's task
    a = own_assignment(db, p.user, aid)
    if a.task.project_id != project.id:
        raise NotFound(f"no assignment {aid} in project {project.id}")
    try:
        record_label(db, p.user, a.id, _label_input(fields, len(a.task.candidates)))
    except Conflict as e:
        return _to_next(request, db, p, project, str(e))
    except Invalid as e:
        if a.status != "pending":
            raise
        return _label_page(request, p, db, project, a, error=str(e), key=first(fields, "idempotency_key"), status=422)
    return _to_next(request, db, p, project)


@router.post("/projects/{project_id}/skip")
def skip_task(request: Request, project_id: int, fields: dict = Depends(form_fields),
              p: Principal = Depends(page_writer), db: Session = Depends(get_db)) -> Response:
    project = get_project(db, p.user, project_id)
    aid = _form_int(fields, "assignment_id")
    if aid is None:
        raise Invalid("assignment_id missing")
    try:
        skip(db, p.user, aid)
    except Conflict as e:
        return _to_next(request, db, p, project, str(e))
    return _to_next(request, db, p, project)


# ----------------------------------------------------------------------------- admin


@router.get("/admin")
def admin(request: Request, p: Principal = Depends(page_admin), db: Session = Depends(get_db)) -> HTMLResponse:
    projects = db.scalars(select(Project).order_by(Project.id)).all()
    stats = [quality.project_stats(db, x) for x in projects]
    users = db.scalars(select(User).order_by(User.name)).all()
    members = {x.id: sorted(db.scalars(select(User.name).join(Membership, Membership.user_id == User.id)
                                       .where(Membership.project_id == x.id))) for x in projects}
    return render(request, "admin.html", p, stats=stats, users=users, members=members)


def _admin_action(request: Request, fn) -> Response:
    try:
        msg = fn()
    except Refused as e:
        return redirect(request, "/admin", f"Error: {e}")
    except DataError as e:
        return redirect(request, "/admin", f"Error: {e}")
    return redirect(request, "/admin", msg)


@router.post("/admin/users")
def admin_create_user(request: Request, fields: dict = Depends(form_fields),
                      p: Principal = Depends(page_admin_writer), db: Session = Depends(get_db)) -> Response:
    def act() -> str:
        user = accounts.create_user(db, first(fields, "name", ""), first(fields, "role", "annotator"),
                                    first(fields, "password", ""))
        return f"Created {user.role} {user.name}."
    return _admin_action(request, act)


@router.post("/admin/users/{user_id}/access")
def admin_user_access(request: Request, user_id: int, fields: dict = Depends(form_fields),
                      p: Principal = Depends(page_admin_writer), db: Session = Depends(get_db)) -> Response:
    """revoke: end the user's API tokens and browser sessions; deactivate (also revokes) / activate."""
    def act() -> str:
        user = by_id(db, User, user_id)
        if user is None:
            raise NotFound(f"no user {user_id}")
        action = first(fields, "action", "")
        if action not in ("revoke", "deactivate", "activate"):
            raise Invalid("action must be revoke, deactivate or activate")
        if action == "deactivate" and user.id == p.user.id:
            raise Invalid("you cannot deactivate your own account")
        active = {"deactivate": False, "activate": True}.get(action)
        out = accounts.set_access(db, user, revoke=action == "revoke", active=active)
        state = "active" if out["active"] else "deactivated"
        return (f"{user.name}: {state}; revoked {out['tokens_revoked']} API token(s), ended "
                f"{out['sessions_ended']} browser session(s).")
    return _admin_action(request, act)


@router.post("/admin/projects")
def admin_create_project(request: Request, fields: dict = Depends(form_fields),
                         p: Principal = Depends(page_admin_writer), db: Session = Depends(get_db)) -> Response:
    def act() -> str:
        overlap = _form_int(fields, "overlap")
        try:
            gold_rate = float(first(fields, "gold_rate", "") or "0.1")
        except ValueError:
            raise Invalid("gold_rate must be a number from 0 to 1") from None
        project = accounts.create_project(db, first(fields, "name", ""), overlap=3 if overlap is None else overlap,
                                          gold_rate=gold_rate,
                                          instructions=first(fields, "instructions", ""))
        return f"Created project {project.name}."
    return _admin_action(request, act)


@router.post("/admin/projects/{project_id}/members")
def admin_add_members(request: Request, project_id: int, fields: dict = Depends(form_fields),
                      p: Principal = Depends(page_admin_writer), db: Session = Depends(get_db)) -> Response:
    def act() -> str:
        project = get_project(db, p.user, project_id)
        names = [n.strip() for n in (first(fields, "users", "") or "").split(",") if n.strip()]
        return f"Added {', '.join(accounts.add_members(db, project, names)) or 'nobody'} to {project.name}."
    return _admin_action(request, act)


@router.post("/admin/projects/{project_id}/import")
def admin_import(request: Request, project_id: int, fields: dict = Depends(form_fields),
                 p: Principal = Depends(page_admin_writer), db: Session = Depends(get_db)) -> Response:
    def act() -> str:
        project = get_project(db, p.user, project_id)
        upload = (fields.get("file") or [None])[0]
        name = Path(upload.filename.replace("\\", "/")).name if upload and not isinstance(upload, str) else ""
        suffix = Path(name).suffix.lower()
        if suffix not in importing.SUFFIXES:  # anything else would be tried as a datasets hub name
            raise Invalid("choose a .jsonl, .json, .csv or .parquet file")
        with tempfile.TemporaryDirectory() as tmp:  # the shared reader works on paths
            path = Path(tmp) / f"upload{suffix}"
            path.write_bytes(upload.file.read())
            gold = first(fields, "gold_from_chosen") == "on"
            # messages name the uploaded file, never the server's temporary path
            specs, identical = importing.read_tasks(str(path), gold_from_chosen=gold, name=name)
        counts = importing.add_tasks(db, project, specs)
        return (f"Imported {counts['added']} task(s) into {project.name} ({counts['duplicates']} already there, "
                f"{identical} with identical responses skipped).")
    return _admin_action(request, act)


@router.get("/admin/projects/{project_id}/export.jsonl")
def admin_export(project_id: int, aggregate: str = "all", p: Principal = Depends(page_admin),
                 db: Session = Depends(get_db)) -> Response:
    if aggregate not in ("all", "majority"):
        raise Invalid("aggregate must be all or majority")
    project = get_project(db, p.user, project_id)
    records = export_project(db, project, ExportOptions(aggregate=aggregate))  # type: ignore[arg-type]
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return Response(body, media_type="application/x-ndjson", headers={
        "Content-Disposition": f'attachment; filename="{quote(project.name)}-{aggregate}.jsonl"'})
