"""Labels -> the preference records the trainers read (JSONL or Parquet).

Pair record (``posttrain reward`` / ``dpo`` read it as is)::

    {"prompt", "chosen", "rejected", "margin", "tie", "both_bad", "annotator", "source", ...}

* ``margin`` = strength / 3 (1 slightly -> 0.33, 2 clearly -> 0.67, 3 much better -> 1.0; the scale of
  Llama 2's margin loss); 0 for ties, both-bad and pairs expanded from rankings (a ranking gives an
  order, not a strength). ``strength`` keeps the raw 1..3.
* Ties are kept: ``tie: true`` with chosen/rejected in the order the annotator saw them (A, B).
* Both-bad: ``both_bad="flag"`` (default) writes ``tie: true, both_bad: true`` (Chatbot Arena counts
  "both bad" as a tie); ``both_bad="exclude"`` leaves those records out.
* ``aggregate="all"``: one record per label, with the annotator's name. ``aggregate="majority"``: one
  record per task pair with the most-voted outcome, ``votes`` (counts), ``n_labels``, ``agreement``
  (share of votes for the winning outcome) and ``annotators``; a split vote becomes a tie
  (``split: true``) in the candidates' import order.
* Rankings (3+ candidates): ``ranking_as="pairs"`` expands each into all C(K, 2) pairs;
  ``ranking_as="ranking"`` writes ``{"prompt", "responses", "ranking"}`` (1 = best; the mean rank
  over annotators when aggregated).
* Gold tasks are left out unless ``include_gold`` (they are planted QC items).
"""

from __future__ import annotations

import itertools
import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from posttrain.errors import ConfigError
from posttrain.feedback.db import Assignment, Label, Project, Task, User


@dataclass
class ExportOptions:
    aggregate: Literal["all", "majority"] = "all"
    ranking_as: Literal["pairs", "ranking"] = "pairs"
    both_bad: Literal["flag", "exclude"] = "flag"
    include_gold: bool = False
    min_labels: int = 1  # majority: tasks with fewer labels are left out


@dataclass
class LabelRow:
    """One label with what export needs, detached from the database."""

    label_id: int
    task_id: int
    prompt: Any
    texts: list[str]
    models: list[str | None]
    gold: int | None
    annotator: str
    display_order: list[int]
    choice: str
    winner: int | None
    strength: int | None
    ranks: list[int] | None
    rationale: str | None
    flags: dict[str, list[str]]
    client_ms: int | None
    created_at: str


def load_rows(db: Session, project: Project) -> list[LabelRow]:
    q = (select(Label, Assignment, Task, User.name).join(Assignment, Assignment.id == Label.assignment_id)
         .join(Task, Task.id == Label.task_id).join(User, User.id == Label.user_id)
         .where(Task.project_id == project.id).options(selectinload(Task.candidates))
         .order_by(Label.task_id, Label.id))
    rows = []
    for label, a, task, name in db.execute(q):
        rows.append(LabelRow(label.id, task.id, task.prompt, [c.text for c in task.candidates],
                             [c.model for c in task.candidates], task.gold, name, list(a.display_order),
                             label.choice, label.winner, label.strength, label.ranks, label.rationale,
                             dict(label.flags or {}), label.client_ms, label.created_at.isoformat() + "Z"))
    return rows


# ----------------------------------------------------------------------------- votes on pairs


@dataclass
class Vote:
    """One annotator's outcome on one candidate pair (i < j): i, j, 'tie' or 'both_bad'."""

    row: LabelRow
    i: int
    j: int
    outcome: int | str
    margin: float
    strength: int | None


def votes_of(row: LabelRow) -> list[Vote]:
    if row.ranks is None:  # a pairwise label
        i, j = 0, 1
        if row.choice in ("tie", "both_bad"):
            return [Vote(row, i, j, row.choice, 0.0, None)]
        return [Vote(row, i, j, row.winner, (row.strength or 0) / 3, row.strength)]
    out = []
    for i, j in itertools.combinations(range(len(row.texts)), 2):
        out.append(Vote(row, i, j, i if row.ranks[i] < row.ranks[j] else j, 0.0, None))
    return out


def _pair(row: LabelRow, win: int, lose: int, source: str) -> dict:
    return {"prompt": row.prompt, "chosen": row.texts[win], "rejected": row.texts[lose], "source": source,
            "chosen_model": row.models[win], "rejected_model": row.models[lose], "task_id": row.task_id}


def _vote_record(v: Vote, source: str) -> dict:
    row = v.row
    tie = v.outcome in ("tie", "both_bad")
    if tie:  # ties keep the order the annotator saw (A first)
        win, lose = row.display_order[0], row.display_order[1]
    else:
        win, lose = v.outcome, v.j if v.outcome == v.i else v.i
    rec = _pair(row, win, lose, source)
    rec.update(margin=round(v.margin, 4), tie=tie, both_bad=v.outcome == "both_bad", strength=v.strength,
               annotator=row.annotator, rationale=row.rationale, time_ms=row.client_ms,
               flags={"chosen": row.flags.get(str(win), []), "rejected": row.flags.get(str(lose), [])},
               label_id=row.label_id, gold_task=row.gold is not None, labeled_at=row.created_at)
    if row.ranks is not None:
        rec["rank_gap"] = abs(row.ranks[win] - row.ranks[lose])
    return rec


def _majority_record(votes: list[Vote], source: str) -> dict:
    first = votes[0]
    counts = Counter(v.outcome for v in votes)
    top = counts.most_common()
    split = len(top) > 1 and top[0][1] == top[1][1]
    best = "tie" if split else top[0][0]
    tie = best in ("tie", "both_bad")
    win, lose = (first.i, first.j) if tie else (best, first.j if best == first.i else first.i)
    rec = _pair(first.row, win, lose, source)
    agreeing = [v.margin for v in votes if v.outcome == best]
    rec.update(margin=round(sum(agreeing) / len(agreeing), 4) if agreeing and not tie else 0.0, tie=tie,
               both_bad=best == "both_bad", split=split,
               votes={"chosen": counts.get(win, 0) if not tie else counts.get(first.i, 0),
                      "rejected": counts.get(lose, 0) if not tie else counts.get(first.j, 0),
                      "tie": counts.get("tie", 0), "both_bad": counts.get("both_bad", 0)},
               n_labels=len(votes), agreement=round(top[0][1] / len(votes), 4),
               annotators=sorted({v.row.annotator for v in votes}), gold_task=first.row.gold is not None)
    return rec


def _ranking_record(rows: list[LabelRow], source: str) -> dict:
    row = rows[0]
    k = len(row.texts)
    mean_ranks = [sum(r.ranks[c] for r in rows) / len(rows) for c in range(k)]
    mean_ranks = [int(m) if m.is_integer() else round(m, 4) for m in mean_ranks]
    rec = {"prompt": row.prompt, "responses": row.texts, "ranking": mean_ranks, "models": row.models,
           "source": source, "task_id": row.task_id, "gold_task": row.gold is not None}
    if len(rows) == 1:
        rec.update(annotator=row.annotator, rationale=row.rationale, time_ms=row.client_ms,
                   label_id=row.label_id, labeled_at=row.created_at)
    else:
        rec.update(n_labels=len(rows), annotators=sorted({r.annotator for r in rows}))
    return rec


def build_records(rows: list[LabelRow], opts: ExportOptions, project_name: str) -> list[dict]:
    source = f"human:{project_name}"
    rows = [r for r in rows if opts.include_gold or r.gold is None]
    by_task: dict[int, list[LabelRow]] = defaultdict(list)
    for r in rows:
        by_task[r.task_id].append(r)
    out: list[dict] = []
    for task_rows in by_task.values():
        if opts.aggregate == "majority" and len(task_rows) < opts.min_labels:
            continue
        rankings = [r for r in task_rows if r.ranks is not None]
        if rankings and opts.ranking_as == "ranking":
            groups = [rankings] if opts.aggregate == "majority" else [[r] for r in rankings]
            out += [_ranking_record(g, source) for g in groups]
            task_rows = [r for r in task_rows if r.ranks is None]
        votes = [v for r in task_rows for v in votes_of(r)]
        if opts.aggregate == "all":
            out += [_vote_record(v, source) for v in votes]
        else:
            per_pair: dict[tuple[int, int], list[Vote]] = defaultdict(list)
            for v in votes:
                per_pair[(v.i, v.j)].append(v)
            out += [_majority_record(vs, source) for _, vs in sorted(per_pair.items())]
    if opts.both_bad == "exclude":
        out = [r for r in out if not r.get("both_bad")]
    return out


# ----------------------------------------------------------------------------- writing


def _parquet_safe(records: list[dict]) -> list[dict]:
    """Same keys in every row, and one type per column (a mix of string and message-list prompts
    becomes message lists), which Parquet requires."""
    keys: dict[str, None] = {}
    for r in records:
        keys.update(dict.fromkeys(r))
    if len({type(r.get("prompt")) for r in records}) > 1:
        records = [{**r, "prompt": [{"role": "user", "content": r["prompt"]}]} if isinstance(r.get("prompt"), str)
                   else r for r in records]
    return [{k: r.get(k) for k in keys} for r in records]


def write_records(records: list[dict], path: str | Path, fmt: Literal["auto", "jsonl", "parquet"] = "auto") -> Path:
    path = Path(path)
    if fmt == "auto":
        fmt = "parquet" if path.suffix.lower() == ".parquet" else "jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if fmt == "jsonl":
        with tmp.open("w") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = _parquet_safe(records)
        table = pa.Table.from_pylist(rows) if rows else pa.table({})
        pq.write_table(table, tmp)
    else:
        raise ConfigError(f"unknown export format {fmt!r}", where="format", fix="use jsonl or parquet")
    tmp.replace(path)  # readers never see a half-written file
    return path


def export_project(db: Session, project: Project, opts: ExportOptions) -> list[dict]:
    return build_records(load_rows(db, project), opts, project.name)
