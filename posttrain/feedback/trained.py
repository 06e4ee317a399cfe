"""Models trained on the app's labels (``POST``/``GET /api/models``): ``posttrain loop`` records each
model it trains, with the ids of this app's labels it was trained on, so the database can answer
"which models did this label (or this project's labels) train?".

Recording is an idempotent upsert keyed by (loop, model path, run id): the row's fields are replaced
and the label ids are *added* (a union), so a re-sent record changes nothing and a long id list may
be sent in several parts. A retrained model has a new run id, hence a new row; the old one stays.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from posttrain.feedback.assign import Conflict, Invalid, NotFound
from posttrain.feedback.db import Label, Project, Task, TrainedModel, TrainedModelLabel, utcnow, valid_id

COLUMNS = ("loop", "model", "run_id", "kind", "stage", "round", "labels", "per_annotator", "per_source",
           "per_round", "source_versions", "excluded_annotators")
CHUNK = 900  # ids per IN (...) query: under SQLite's oldest bound-parameter limit (999)
SHOWN = 20  # unknown ids named in a 422


def identity(loop: str, model: str, run_id: str) -> str:
    return hashlib.sha256(json.dumps([loop, model, run_id]).encode()).hexdigest()


def unknown_labels(db: Session, ids: list[int]) -> list[int]:
    """The ids in ``ids`` that are not labels of this app (in order)."""
    valid = [i for i in ids if valid_id(i)]
    found: set[int] = set()
    for k in range(0, len(valid), CHUNK):
        found.update(db.scalars(select(Label.id).where(Label.id.in_(valid[k:k + CHUNK]))))
    return [i for i in ids if i not in found]


def record_model(db: Session, fields: dict[str, Any], label_ids: list[int]) -> tuple[TrainedModel, str, int, int]:
    """Upsert one trained model: (row, "created" | "updated" | "unchanged", label ids added, label ids
    in all). ``fields``: COLUMNS, the rest goes to ``details``. Unknown label ids: Invalid (422), nothing stored."""
    ids = sorted(set(label_ids))
    unknown = unknown_labels(db, ids)
    if unknown:
        more = f" ... ({len(unknown)} in all)" if len(unknown) > SHOWN else ""
        raise Invalid(f"label_ids: no such labels in this app: {', '.join(map(str, unknown[:SHOWN]))}{more}",
                      field="label_ids")
    values = {k: fields[k] for k in COLUMNS}
    values["details"] = {k: v for k, v in fields.items() if k not in COLUMNS}
    key = identity(values["loop"], values["model"], values["run_id"])
    for attempt in range(3):  # a concurrent post of the same record wins a race: read it back and go on
        try:
            row = db.scalar(select(TrainedModel).where(TrainedModel.identity == key))
            created = row is None
            if created:
                row = TrainedModel(identity=key, **values)
                db.add(row)
                db.flush()
                changed = True
            else:
                changed = any(getattr(row, k) != v for k, v in values.items())
                for k, v in values.items():
                    setattr(row, k, v)
            have = set(db.scalars(select(TrainedModelLabel.label_id).where(TrainedModelLabel.model_id == row.id)))
            new = [i for i in ids if i not in have]
            if new:
                db.execute(insert(TrainedModelLabel), [{"model_id": row.id, "label_id": i} for i in new])
            if (changed or new) and not created:
                row.updated_at = utcnow()
            db.commit()
        except IntegrityError:
            db.rollback()
            if attempt == 2:
                raise Conflict("the model was being recorded by another request at the same time: retry") from None
            continue
        status = "created" if created else "updated" if changed or new else "unchanged"
        return row, status, len(new), len(have) + len(new)
    raise AssertionError("unreachable")


def list_models(db: Session, *, label_id: int | None = None, project: str | None = None, loop: str | None = None,
                ids: bool = False) -> list[dict]:
    """The recorded models, oldest first: those trained on label ``label_id``, on a label of project
    ``project``, of loop ``loop`` (each filter optional). ``ids``: with each model's label ids."""
    conds = []
    if label_id is not None:
        if not valid_id(label_id) or db.get(Label, label_id) is None:
            raise NotFound(f"no label {label_id}")
        conds.append(TrainedModel.id.in_(select(TrainedModelLabel.model_id)
                                         .where(TrainedModelLabel.label_id == label_id)))
    if project is not None:
        p = db.scalar(select(Project).where(Project.name == project))
        if p is None:
            raise NotFound(f"no project {project!r}")
        conds.append(TrainedModel.id.in_(
            select(TrainedModelLabel.model_id).join(Label, Label.id == TrainedModelLabel.label_id)
            .join(Task, Task.id == Label.task_id).where(Task.project_id == p.id)))
    if loop is not None:
        conds.append(TrainedModel.loop == loop)
    rows = list(db.scalars(select(TrainedModel).where(*conds).order_by(TrainedModel.id)))
    chosen = select(TrainedModel.id).where(*conds)
    counts = dict(db.execute(select(TrainedModelLabel.model_id, func.count()).where(
        TrainedModelLabel.model_id.in_(chosen)).group_by(TrainedModelLabel.model_id)).all())
    by_model: dict[int, list[int]] = {}
    if ids:
        for mid, lid in db.execute(select(TrainedModelLabel.model_id, TrainedModelLabel.label_id).where(
                TrainedModelLabel.model_id.in_(chosen)).order_by(TrainedModelLabel.label_id)):
            by_model.setdefault(mid, []).append(lid)
    return [view(r, counts.get(r.id, 0), by_model.get(r.id, []) if ids else None) for r in rows]


def view(row: TrainedModel, app_labels: int, label_ids: list[int] | None = None) -> dict:
    out = {"id": row.id, **{k: getattr(row, k) for k in COLUMNS}, **(row.details or {}), "app_labels": app_labels,
           "created_at": row.created_at.isoformat() + "Z", "updated_at": row.updated_at.isoformat() + "Z"}
    if label_ids is not None:
        out["label_ids"] = label_ids
    return out
