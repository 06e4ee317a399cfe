"""Import labeling tasks from JSONL / JSON / CSV / Parquet (the files ``posttrain collect`` and
``posttrain label generate`` write, and plain preference datasets).

Accepted records::

    {"prompt": str | [{"role", "content"}, ...],
     "responses": [{"text": str, "model": str}, ... | str, ...],   # 2..9 candidates
     "gold": 0,                 # optional: index of the better response (annotator QC)
     "id": "...", ...}          # optional external id; other keys are kept as task metadata

    {"prompt", "chosen", "rejected"}   # a preference pair -> 2 candidates (chosen first), in every
                                       # layout the trainers read (docs/data.md): implicit prompt,
                                       # UltraFeedback-style conversations, Anthropic HH strings, CSV

The order in the file does not leak to annotators: every assignment shows the candidates in its own
random order. Importing the same file twice adds nothing (tasks are unique by content).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from posttrain.data.layouts import RowProblem, decode_cell
from posttrain.data.records import ReadOptions, read_record
from posttrain.data.sources import read_source
from posttrain.errors import DataError
from posttrain.feedback.db import MAX_CANDIDATES, MAX_DEPTH, Candidate, Project, Task, find_text_problem

ROLES = {"system", "user", "assistant", "tool"}
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
KNOWN_KEYS = {"prompt", "responses", "chosen", "rejected", "gold", "id", "meta", "chosen_model",
              "rejected_model"}


@dataclass
class TaskSpec:
    prompt: str | list[dict]
    candidates: list[tuple[str, str | None]]  # (text, model or source)
    gold: int | None = None
    external_id: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def fingerprint(self) -> str:
        blob = json.dumps({"prompt": self.prompt, "candidates": self.candidates, "gold": self.gold},
                          sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()


class _Bad(Exception):
    """A problem with one record, as 'field: what is wrong'."""


def _prompt(value: Any) -> str | list[dict]:
    if isinstance(value, str):
        if not value.strip():
            raise _Bad("prompt: empty string")
        return value
    if isinstance(value, list) and value:
        out = []
        for j, m in enumerate(value):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
                raise _Bad(f"prompt[{j}]: expected {{role: one of {sorted(ROLES)}, content: string}}")
            out.append({"role": m["role"], "content": m["content"]})
        return out
    raise _Bad("prompt: expected a non-empty string or a list of {role, content} messages")


def _response_text(value: Any, where: str) -> str:
    """A response as text: a string, {"text"/"content": str}, or a one-message assistant list."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        text = value.get("text", value.get("content"))
        if isinstance(text, str):
            return text
    if isinstance(value, list) and len(value) == 1:
        return _response_text(value[0], where)
    raise _Bad(f"{where}: expected a string, {{\"text\": ...}} or one assistant message")


def _from_responses(row: dict) -> tuple[list[tuple[str, str | None]], int | None]:
    responses = row["responses"]
    if not isinstance(responses, list) or not 2 <= len(responses) <= MAX_CANDIDATES:
        raise _Bad(f"responses: expected a list of 2..{MAX_CANDIDATES} candidates")
    cands = []
    for j, r in enumerate(responses):
        model = r.get("model", r.get("source")) if isinstance(r, dict) else None
        cands.append((_response_text(r, f"responses[{j}]"), None if model is None else str(model)))
    return cands, None


def _from_pair(row: dict, gold_from_chosen: bool) -> tuple[Any, list[tuple[str, str | None]], int | None]:
    """A preference pair in any layout the trainers read (docs/data.md: explicit or implicit prompt,
    conversations that repeat the prompt column, Anthropic HH transcripts, CSV-encoded lists)."""
    try:
        rec = read_record(row, "preference", ReadOptions(prefix=None)).record
    except RowProblem as e:
        raise _Bad(str(e)) from None
    prompt, chosen, rejected = rec["prompt"], rec["chosen"], rec["rejected"]
    source = row.get("source")
    cands = [(_response_text(chosen, "chosen"), row.get("chosen_model", source)),
             (_response_text(rejected, "rejected"), row.get("rejected_model", source))]
    return prompt, cands, 0 if gold_from_chosen else None


def parse_record(row: Any, *, gold_from_chosen: bool = False) -> TaskSpec | None:
    """One record -> a TaskSpec; None when its candidates are identical (nothing to compare).

    Raises ``_Bad`` with 'field: problem'."""
    if not isinstance(row, dict):
        raise _Bad(f"record: expected an object, got {type(row).__name__}")
    problem = find_text_problem(row)  # NUL cannot be stored in PostgreSQL text: refuse, never a 500
    if problem:
        raise _Bad(problem)
    if "responses" in row:
        try:  # CSV cells hold the text of lists
            row = {**row, "prompt": decode_cell(row.get("prompt"), "prompt", False, set()),
                   "responses": decode_cell(row["responses"], "responses", True, set())}
        except RowProblem as e:
            raise _Bad(str(e)) from None
        prompt, (cands, gold) = row.get("prompt"), _from_responses(row)
    elif "chosen" in row and "rejected" in row and row["chosen"] == row["rejected"]:
        return None  # identical candidates: nothing to compare
    elif "chosen" in row and "rejected" in row:
        prompt, cands, gold = _from_pair(row, gold_from_chosen)
    else:
        raise _Bad("record: needs 'prompt' + 'responses' or 'prompt' + 'chosen' + 'rejected'")
    prompt = _prompt(prompt)
    if row.get("gold") is not None:
        gold = row["gold"]
        if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(cands):
            raise _Bad(f"gold: expected the index of the better response (0..{len(cands) - 1}), got {gold!r}")
    if len({text for text, _ in cands}) < len(cands):
        return None
    cands = [(text, None if model is None else str(model)[:200]) for text, model in cands]
    meta = {k: v for k, v in row.items() if k not in KNOWN_KEYS and _jsonable(v)}
    if isinstance(row.get("meta"), dict):
        meta.update(row["meta"])
    ext = row.get("id")
    return TaskSpec(prompt, cands, gold, None if ext is None else str(ext)[:200], meta)


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def parse_records(rows: list, name: str, *, gold_from_chosen: bool = False, max_errors: int = 20,
                  lines: list[int] | None = None) -> tuple[list[TaskSpec], int]:
    """(task specs, records skipped for identical candidates); one DataError lists the bad rows
    (``lines``: each row's line in the file, else its position)."""
    specs, identical, problems = [], 0, []
    for i, row in zip(lines or range(1, len(rows) + 1), rows):
        try:
            spec = parse_record(row, gold_from_chosen=gold_from_chosen)
        except _Bad as e:
            problems.append(f"{name}:{i}: {e}")
            if len(problems) >= max_errors:
                break
            continue
        if spec is None:
            identical += 1
        else:
            specs.append(spec)
    if problems:
        raise DataError(f"{len(problems)} bad task record(s):\n  " + "\n  ".join(problems), where=name,
                        fix="each record needs a prompt and 2..9 responses (or chosen/rejected); "
                            "see docs/labeling.md")
    if not specs and not identical:
        raise DataError("no task records found", where=name)
    return specs, identical


def _read(path: str, shown: str):
    """read_source, with a corrupt file (bad Parquet, invalid UTF-8, JSON nested past the parser's
    recursion limit) as one DataError naming ``shown`` instead of an exception from the reader."""
    try:
        src = read_source(path)
    except DataError as e:
        raise DataError(e.what.replace(path, shown), where=(e.where or "").replace(path, shown) or None,
                        fix=e.fix) from None
    except UnicodeDecodeError as e:
        raise DataError(f"not valid UTF-8 text (byte {e.start})", where=shown, fix="save the file as UTF-8") from None
    except RecursionError:
        raise DataError("JSON nested too deeply to read", where=shown,
                        fix=f"records nest at most {MAX_DEPTH} levels") from None
    except (ValueError, TypeError, LookupError, OSError, NotImplementedError) as e:  # pyarrow, pandas
        problem = str(e).replace(path, shown)[:300] or type(e).__name__
        raise DataError(f"cannot read the file ({problem})", where=shown,
                        fix="check that the file is complete and in the format its suffix says") from None
    src.name = shown
    return src


def read_tasks(path: str, *, gold_from_chosen: bool = False, max_records: int | None = None,
               name: str | None = None) -> tuple[list[TaskSpec], int]:
    """Task specs from a .jsonl/.json/.csv/.parquet file or a save_to_disk folder (the trainers' reader).
    ``name``: how messages call the file (an upload's own name rather than its temporary path)."""
    src = _read(path, name or path)
    rows = src.rows[:max_records] if max_records else src.rows
    bad = [f"{src.where(r)}: {r.problem}" for r in rows if r.problem is not None]
    if bad:
        raise DataError(f"{len(bad)} unreadable line(s):\n  " + "\n  ".join(bad[:20]), where=src.name,
                        fix="each line of a .jsonl file must be one JSON object")
    return parse_records([r.value for r in rows], src.name, gold_from_chosen=gold_from_chosen,
                         lines=[r.line for r in rows])


def add_tasks(db: Session, project: Project, specs: list[TaskSpec]) -> dict[str, int]:
    """Insert the tasks ``project`` does not have yet (one transaction); counts added/duplicates."""
    seen = set(db.scalars(select(Task.fingerprint).where(Task.project_id == project.id)))
    added = 0
    for spec in specs:
        fp = spec.fingerprint()
        if fp in seen:
            continue
        seen.add(fp)
        db.add(Task(project_id=project.id, fingerprint=fp, prompt=spec.prompt, gold=spec.gold,
                    external_id=spec.external_id, meta=spec.meta,
                    candidates=[Candidate(position=i, text=t, model=m) for i, (t, m) in enumerate(spec.candidates)]))
        added += 1
    db.commit()
    return {"added": added, "duplicates": len(specs) - added}
