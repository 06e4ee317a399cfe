"""Progress and quality numbers of a project, for the admin dashboard and its JSON endpoint.

Agreement compares outcomes in candidate space (display order already undone): the better
candidate's position, ``tie`` or ``both_bad``; a ranking counts by its top candidate. Gold accuracy
is the share of gold tasks where the annotator's better (or top-ranked) candidate is the gold one;
tie and both-bad count as wrong, since a gold pair has a clear answer by construction.
"""

from __future__ import annotations

import statistics
from collections import defaultdict

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from posttrain.feedback import agreement
from posttrain.feedback.db import Assignment, Label, Project, Task, User

FAST_MS = 3000  # labels faster than this are counted as "fast": a hint of careless clicking


def outcome(label: Label) -> str:
    return label.choice if label.choice in ("tie", "both_bad") else str(label.winner)


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def project_stats(db: Session, project: Project) -> dict:
    tasks = {t.id: t.gold for t in db.execute(select(Task.id, Task.gold).where(Task.project_id == project.id))}
    rows = db.execute(select(Label, User.name).join(User, User.id == Label.user_id)
                      .join(Task, Task.id == Label.task_id).where(Task.project_id == project.id)).all()
    skips = dict(db.execute(select(User.name, func.count()).select_from(Assignment)
                            .join(Task, Task.id == Assignment.task_id).join(User, User.id == Assignment.user_id)
                            .where(Task.project_id == project.id, Assignment.status == "skipped")
                            .group_by(User.name)).all())
    regular = [t for t, g in tasks.items() if g is None]
    per_task: dict[int, dict[str, str]] = defaultdict(dict)  # regular task -> annotator -> outcome
    people: dict[str, dict] = defaultdict(lambda: {"labels": 0, "gold": [], "ms": [], "server_ms": []})
    for label, name in rows:
        p = people[name]
        p["labels"] += 1
        if label.client_ms is not None:
            p["ms"].append(label.client_ms)
        p["server_ms"].append((label.created_at - label.served_at).total_seconds() * 1000)
        gold = tasks.get(label.task_id)
        if gold is None:
            per_task[label.task_id][name] = outcome(label)
        else:
            p["gold"].append((label.winner if label.choice not in ("tie", "both_bad") else None, gold))
    annotators = []
    for name in sorted(set(people) | set(skips)):
        p = people[name]
        acc, n_gold = agreement.gold_accuracy(p["gold"])
        annotators.append({"name": name, "labels": p["labels"], "skips": skips.get(name, 0),
                           "gold_n": n_gold, "gold_accuracy": acc, "mean_ms": _mean(p["ms"]),
                           "median_ms": statistics.median(p["ms"]) if p["ms"] else None,
                           "mean_server_ms": _mean(p["server_ms"]),
                           "fast_labels": sum(ms < FAST_MS for ms in p["ms"])})
    target = len(regular) * project.overlap
    regular_labels = sum(len(v) for v in per_task.values())
    complete = [list(v.values()) for v in per_task.values() if len(v) >= project.overlap]
    fleiss = None
    if project.overlap >= 2 and complete:
        fleiss = agreement.fleiss_kappa([c[: project.overlap] for c in complete])
    by_rater: dict[str, dict[int, str]] = defaultdict(dict)
    for task_id, votes in per_task.items():
        for name, value in votes.items():
            by_rater[name][task_id] = value
    cohen, n_pairs = agreement.mean_pairwise_kappa(by_rater)
    all_ms = [ms for p in people.values() for ms in p["ms"]]
    return {
        "project": project.name, "id": project.id, "overlap": project.overlap, "gold_rate": project.gold_rate,
        "tasks": len(regular), "gold_tasks": len(tasks) - len(regular),
        "labels": len(rows), "regular_labels": regular_labels, "target_labels": target,
        "tasks_done": len(complete), "skips": sum(skips.values()),
        "progress": min(regular_labels, target) / target if target else None,
        "mean_ms": _mean(all_ms),
        "agreement": {
            "percent": agreement.percent_agreement(list(v.values()) for v in per_task.values()),
            "cohen_kappa_mean_pairwise": cohen, "cohen_pairs": n_pairs,
            "fleiss_kappa": fleiss, "fleiss_tasks": len(complete),
            "krippendorff_alpha": agreement.krippendorff_alpha_nominal(list(v.values()) for v in per_task.values()),
        },
        "annotators": annotators,
    }
