"""The JSON API (``/api/...``). Annotators: next task, label, skip, their own assignments.
Admins: users, projects, members, task import, stats, export, the models trained on the labels.
See docs/labeling.md for examples."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from posttrain.errors import DataError
from posttrain.feedback import accounts, auth, importing, quality, trained
from posttrain.feedback.assign import (
    Invalid,
    LabelInput,
    MethodNotAllowed,
    NotFound,
    by_id,
    get_project,
    next_assignment,
    own_assignment,
    record_label,
    skip,
)
from posttrain.feedback.accounts import MAX_OVERLAP, MAX_TTL_S
from posttrain.feedback.db import (
    FLAGS,
    LETTERS,
    MAX_CLIENT_MS,
    MAX_ID,
    MAX_KEY,
    MAX_RATIONALE,
    Assignment,
    Label,
    Membership,
    Project,
    find_text_problem,
)
from posttrain.feedback.deps import (
    Principal,
    Unauthorized,
    api_admin,
    api_admin_writer,
    api_user,
    api_writer,
    client_address,
    from_header,
    get_db,
    login_limits,
    token_days,
)
from posttrain.feedback.export import ExportOptions, export_project

router = APIRouter()


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelled field is a 422, not silently ignored

    @model_validator(mode="before")
    @classmethod
    def _storable_text(cls, data: Any) -> Any:
        # NUL or a lone surrogate anywhere in the body would fail in the database (a 500): 422 here
        problem = find_text_problem(data)
        if problem:
            raise ValueError(problem)
        return data


class Credentials(Strict):
    username: str = Field(max_length=256)
    password: str = Field(max_length=1024)


class LabelBody(Strict):
    idempotency_key: str | None = Field(None, min_length=1, max_length=MAX_KEY,
                                        description="Client-chosen key; a retry with the same key is a success.")
    choice: Literal["A", "B", "tie", "both_bad"] | None = None
    strength: int | None = Field(None, ge=1, le=3)
    ranking: list[str] | None = None
    rationale: str | None = Field(None, max_length=MAX_RATIONALE)
    flags: dict[str, list[Literal[FLAGS]]] = {}  # type: ignore[valid-type]
    client_ms: int | None = Field(None, ge=0, le=MAX_CLIENT_MS)


class UserBody(Strict):
    name: str
    role: Literal["admin", "annotator"] = "annotator"
    password: str
    projects: list[str] = []


class ProjectBody(Strict):
    name: str = Field(min_length=1, max_length=128)
    overlap: int = Field(3, ge=1, le=MAX_OVERLAP)
    gold_rate: float = Field(0.1, ge=0.0, le=1.0)
    instructions: str = ""
    assignment_ttl_s: int = Field(3600, ge=60, le=MAX_TTL_S)
    annotators: list[str] = []


class MembersBody(Strict):
    users: list[str]


class TasksBody(Strict):
    records: list[Any]
    gold_from_chosen: bool = False


Count = Annotated[int, Field(strict=True, ge=0, le=MAX_ID)]
LongText = Annotated[str, Field(max_length=1000)]


class ModelBody(Strict):
    """A model ``posttrain loop`` trained (its lineage.json record) and this app's labels it was trained on."""

    loop: str = Field(min_length=1, max_length=200)
    model: str = Field(min_length=1, max_length=1000, description="Path of the model's final/.")
    run_id: str = Field(min_length=1, max_length=200, description="New every time the model is trained.")
    kind: Literal["reward", "policy"]
    stage: str = Field(min_length=1, max_length=64)
    round: Count
    label_ids: list[Annotated[int, Field(strict=True)]] = Field(
        description="This app's label ids (added to those already recorded for the model).")
    labels: Count = Field(0, description="Labels trained on, from every source of the loop.")
    distinct_labels: Count | None = None
    per_annotator: dict[str, Count] = {}
    per_source: dict[str, Count] = {}
    per_round: dict[str, Count] = {}
    source_versions: list[Annotated[str, Field(max_length=1000)]] = []
    excluded_annotators: list[Annotated[str, Field(max_length=200)]] = []
    started_from: LongText | None = None
    command: str | None = Field(None, max_length=64)
    candidates_model: LongText | None = None
    candidates_model_id: str | None = Field(None, max_length=200)
    loop_dir: LongText | None = None


def messages(prompt: Any) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def assignment_view(a: Assignment, label: Label | None = None) -> dict:
    cands = a.task.candidates
    view = {"assignment_id": a.id, "project_id": a.task.project_id, "status": a.status,
            "mode": "pairwise" if len(cands) == 2 else "ranking", "prompt": messages(a.task.prompt),
            "candidates": [{"slot": LETTERS[i], "text": cands[pos].text} for i, pos in enumerate(a.display_order)],
            "served_at": a.served_at.isoformat() + "Z"}
    if label is not None:
        view["label"] = {"label_id": label.id, "choice": label.choice, "strength": label.strength,
                         "created_at": label.created_at.isoformat() + "Z"}
    return view


def _project(db: Session, project_id: int) -> Project:
    project = by_id(db, Project, project_id)
    if project is None:
        raise NotFound(f"no project {project_id}")
    return project


def _project_json(p: Project) -> dict:
    return {"id": p.id, "name": p.name, "overlap": p.overlap, "gold_rate": p.gold_rate,
            "instructions": p.instructions, "assignment_ttl_s": p.assignment_ttl_s}


# ----------------------------------------------------------------------------- any user


@router.get("/healthz")
def healthz(db: Session = Depends(get_db)) -> dict:
    db.execute(text("SELECT 1"))
    return {"ok": True}


@router.post("/api/token", status_code=201)
def token(request: Request, body: Credentials | None = None, db: Session = Depends(get_db)) -> dict:
    """A new API token, for Basic credentials or a JSON {username, password} body."""
    address, limits = client_address(request.scope), login_limits(request.app.state.settings)
    if body is not None:
        user = auth.check_password(db, body.username, body.password, address=address, limits=limits)
        if user is None:
            raise Unauthorized("wrong user name or password")
    else:
        header = request.headers.get("authorization", "")
        if not header.lower().startswith("basic "):
            raise Unauthorized("send Basic credentials or a JSON body {username, password}")
        user = from_header(db, header, token_days(request), address=address, limits=limits).user
    return {"token": auth.issue_token(db, user), "user": user.name, "role": user.role}


@router.get("/api/me")
def me(p: Principal = Depends(api_user)) -> dict:
    return {"name": p.user.name, "role": p.user.role, "via": p.via}


@router.get("/api/projects")
def projects(p: Principal = Depends(api_user), db: Session = Depends(get_db)) -> list[dict]:
    q = select(Project).order_by(Project.id)
    if not p.is_admin:
        q = q.join(Membership, Membership.project_id == Project.id).where(Membership.user_id == p.user.id)
    return [_project_json(x) for x in db.scalars(q)]


@router.post("/api/projects/{project_id}/next")
def next_task(project_id: int, p: Principal = Depends(api_writer), db: Session = Depends(get_db)) -> dict:
    """The caller's pending assignment, else a new one, else {"done": true}. A POST (with the CSRF
    header for cookie sessions): it creates an assignment, which no link or image may do."""
    project = get_project(db, p.user, project_id)
    a = next_assignment(db, p.user, project)
    return {"done": True} if a is None else {"done": False, **assignment_view(a)}


@router.api_route("/api/projects/{project_id}/next", methods=["GET", "HEAD"], include_in_schema=False)
def next_task_get(project_id: str) -> None:
    raise MethodNotAllowed("use POST /api/projects/{id}/next: asking for a task creates an assignment, "
                           "so a GET never does")


@router.get("/api/assignments/{assignment_id}")
def get_assignment(assignment_id: int, p: Principal = Depends(api_user), db: Session = Depends(get_db)) -> dict:
    a = own_assignment(db, p.user, assignment_id, admin_ok=True)
    return assignment_view(a, db.scalar(select(Label).where(Label.assignment_id == a.id)))


@router.post("/api/assignments/{assignment_id}/label")
def label(assignment_id: int, body: LabelBody, request: Request, p: Principal = Depends(api_writer),
          db: Session = Depends(get_db)) -> JSONResponse:
    key = body.idempotency_key or request.headers.get("idempotency-key")
    if not key:
        raise Invalid("idempotency_key is required (in the body or an Idempotency-Key header)")
    inp = LabelInput(idempotency_key=key, choice=body.choice, strength=body.strength, ranking=body.ranking,
                     rationale=body.rationale, flags={k: list(v) for k, v in body.flags.items()},
                     client_ms=body.client_ms)
    row, created = record_label(db, p.user, assignment_id, inp)
    return JSONResponse({"status": "created" if created else "duplicate", "label_id": row.id,
                         "assignment_id": assignment_id, "idempotency_key": key},
                        status_code=201 if created else 200)


@router.post("/api/assignments/{assignment_id}/skip")
def skip_assignment(assignment_id: int, p: Principal = Depends(api_writer), db: Session = Depends(get_db)) -> dict:
    a = skip(db, p.user, assignment_id)
    return {"status": a.status, "assignment_id": a.id}


# ----------------------------------------------------------------------------- admin


@router.post("/api/users", status_code=201)
def create_user(body: UserBody, p: Principal = Depends(api_admin_writer), db: Session = Depends(get_db)) -> dict:
    projects = [accounts.project_by_name(db, n) for n in body.projects]
    user = accounts.create_user(db, body.name, body.role, body.password)
    for project in projects:
        accounts.add_members(db, project, [user.name])
    return {"id": user.id, "name": user.name, "role": user.role, "projects": body.projects}


@router.post("/api/projects", status_code=201)
def create_project(body: ProjectBody, p: Principal = Depends(api_admin_writer), db: Session = Depends(get_db)) -> dict:
    for name in body.annotators:
        accounts.user_by_name(db, name)  # fail before creating anything
    project = accounts.create_project(db, body.name, overlap=body.overlap, gold_rate=body.gold_rate,
                                      instructions=body.instructions, assignment_ttl_s=body.assignment_ttl_s)
    accounts.add_members(db, project, body.annotators)
    return _project_json(project)


@router.post("/api/projects/{project_id}/members")
def add_members(project_id: int, body: MembersBody, p: Principal = Depends(api_admin_writer),
                db: Session = Depends(get_db)) -> dict:
    return {"added": accounts.add_members(db, _project(db, project_id), body.users)}


@router.post("/api/projects/{project_id}/tasks", status_code=201)
def import_tasks(project_id: int, body: TasksBody, p: Principal = Depends(api_admin_writer),
                 db: Session = Depends(get_db)) -> dict:
    project = _project(db, project_id)
    try:
        specs, identical = importing.parse_records(body.records, "records", gold_from_chosen=body.gold_from_chosen)
    except DataError as e:
        raise Invalid(e.what) from None
    return {**importing.add_tasks(db, project, specs), "identical_skipped": identical}


@router.get("/api/projects/{project_id}/stats")
def stats(project_id: int, p: Principal = Depends(api_admin), db: Session = Depends(get_db)) -> dict:
    return quality.project_stats(db, _project(db, project_id))


@router.get("/api/dashboard")
def dashboard(p: Principal = Depends(api_admin), db: Session = Depends(get_db)) -> list[dict]:
    return [quality.project_stats(db, x) for x in db.scalars(select(Project).order_by(Project.id))]


@router.get("/api/projects/{project_id}/export")
def export(project_id: int, aggregate: Literal["all", "majority"] = "all",
           ranking_as: Literal["pairs", "ranking"] = "pairs", both_bad: Literal["flag", "exclude"] = "flag",
           include_gold: bool = False, min_labels: int = 1,
           p: Principal = Depends(api_admin), db: Session = Depends(get_db)) -> Response:
    opts = ExportOptions(aggregate, ranking_as, both_bad, include_gold, min_labels)
    records = export_project(db, _project(db, project_id), opts)
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return Response(body, media_type="application/x-ndjson")



@router.post("/api/models", status_code=201)
def record_model(body: ModelBody, p: Principal = Depends(api_admin_writer),
                 db: Session = Depends(get_db)) -> JSONResponse:
    """Record a trained model and the label ids it was trained on: an upsert by (loop, model, run_id)."""
    fields = body.model_dump(exclude={"label_ids"}, exclude_none=True)
    row, status, added, total = trained.record_model(db, fields, body.label_ids)
    return JSONResponse({"status": status, "id": row.id, "label_ids_added": added, "app_labels": total},
                        status_code=201 if status == "created" else 200)


@router.get("/api/models")
def models(label_id: int | None = None, project: str | None = None, loop: str | None = None, ids: bool = False,
           p: Principal = Depends(api_admin), db: Session = Depends(get_db)) -> list[dict]:
    """The recorded models (optionally: trained on label ``label_id`` / on labels of ``project`` / of ``loop``)."""
    problem = find_text_problem({"project": project, "loop": loop})
    if problem:
        raise Invalid(problem)
    return trained.list_models(db, label_id=label_id, project=project, loop=loop, ids=ids)
