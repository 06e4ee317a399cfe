"""Record formats and loading, with validation that names the file, row and field.

Formats (the Hugging Face ecosystem's, unchanged):

=============  ==============================================================================
kind           accepted records
=============  ==============================================================================
sft            ``{"messages": [{"role", "content"}, ...]}`` | ``{"prompt", "completion"}`` | ``{"text"}``
preference     ``{"prompt", "chosen", "rejected"}`` (strings or message lists; the implicit-prompt
               form has whole conversations in chosen/rejected and no prompt); optional
               ``margin``/``strength``, ``tie``, ``annotator``, ``source``, ``subset``
unpaired       ``{"prompt", "completion", "label": bool}``
prompt         ``{"prompt"}`` plus any extra columns (passed to reward functions)
=============  ==============================================================================

Sources: ``.jsonl``/``.json``/``.parquet``/``.csv`` files, a ``datasets`` name or saved path, or
``builtin:<name>`` (the built-in task). Validation stops the run before any model is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from posttrain.errors import DataError

KINDS = ("sft", "preference", "unpaired", "prompt")
ROLES = {"system", "user", "assistant", "tool"}


# ----------------------------------------------------------------------------- reading


def read_rows(source: str, split: str = "train") -> tuple[list[dict], str]:
    """Rows of ``source`` as dicts, and the name used in error messages."""
    if source.startswith("builtin:"):
        from posttrain.tasks.builtin import BUILTIN_SOURCES

        name = source.split(":", 1)[1]
        if name not in BUILTIN_SOURCES:
            raise DataError(f"unknown built-in dataset '{name}'", where=source,
                            fix=f"use one of: {', '.join('builtin:' + k for k in BUILTIN_SOURCES)}")
        return BUILTIN_SOURCES[name](), source
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".parquet", ".csv"):
        if not path.exists():
            raise DataError(f"data file {path} does not exist", where=str(path),
                            fix="check the path (relative paths start at the current directory)")
        return _read_file(path, suffix), str(path)
    return _read_datasets(source, split), f"{source}[{split}]"


def _read_file(path: Path, suffix: str) -> list[dict]:
    if suffix == ".jsonl":
        rows = []
        with path.open() as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"line is not valid JSON ({e.msg})", where=f"{path}:{i}",
                                    fix="each line of a .jsonl file must be one JSON object") from None
        return rows
    if suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"not valid JSON ({e.msg} at line {e.lineno})", where=str(path)) from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise DataError("a .json data file must hold a list of records", where=str(path),
                            fix="write [ {...}, {...} ] or use .jsonl")
        return data
    import pandas as pd

    df = pd.read_parquet(path) if suffix == ".parquet" else pd.read_csv(path)
    return [_plain(r) for r in df.to_dict(orient="records")]


def _plain(row: dict) -> dict:
    """Parquet/CSV cells -> plain Python (numpy arrays of message structs -> lists of dicts)."""
    import numpy as np

    def conv(v):
        if isinstance(v, np.ndarray):
            return [conv(x) for x in v.tolist()]
        if isinstance(v, list):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, np.generic):
            return v.item()
        return v

    return {k: conv(v) for k, v in row.items()}


def _read_datasets(source: str, split: str) -> list[dict]:
    import datasets

    try:
        if Path(source).is_dir() and (Path(source) / "dataset_info.json").exists():
            ds = datasets.load_from_disk(source)
        else:
            ds = datasets.load_dataset(source, split=split)
    except Exception as e:  # datasets raises many types; the message is what matters
        raise DataError(f"cannot load dataset '{source}': {e}", where=source,
                        fix="give a .jsonl/.json/.parquet/.csv file, a dataset saved with "
                            "save_to_disk, or a hub dataset available offline") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"split '{split}' not found (have {list(ds)})", where=source,
                            fix=f"set data.split to one of {list(ds)}")
        ds = ds[split]
    return [dict(r) for r in ds]


# ----------------------------------------------------------------------------- validation


def _check_messages(value: Any, field: str, need_assistant: bool) -> str | None:
    if not isinstance(value, list) or not value:
        return f"{field}: expected a non-empty list of {{role, content}} messages"
    for j, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            return f"{field}[{j}]: expected an object with 'role' and 'content'"
        if m["role"] not in ROLES:
            return f"{field}[{j}].role: '{m['role']}' is not one of {sorted(ROLES)}"
        if not isinstance(m["content"], str):
            return f"{field}[{j}].content: expected a string, got {type(m['content']).__name__}"
    if need_assistant and not any(m["role"] == "assistant" for m in value):
        return f"{field}: no assistant message, so nothing would be trained"
    return None


def _check_text(row: dict, field: str, allow_messages: bool = True) -> str | None:
    if field not in row or row[field] is None:
        return f"{field}: missing"
    v = row[field]
    if isinstance(v, str):
        return None if v.strip() or field != "prompt" else f"{field}: empty string"
    if allow_messages and isinstance(v, list):
        return _check_messages(v, field, need_assistant=False)
    return f"{field}: expected a string{' or a message list' if allow_messages else ''}, got {type(v).__name__}"


def check_row(row: Any, kind: str) -> str | None:
    """The first problem with ``row`` as a ``kind`` record, as 'field: problem', or None."""
    if not isinstance(row, dict):
        return f"record: expected an object, got {type(row).__name__}"
    if kind == "sft":
        if "messages" in row:
            return _check_messages(row["messages"], "messages", need_assistant=True)
        if "prompt" in row or "completion" in row:
            return _check_text(row, "prompt") or _check_text(row, "completion")
        if "text" in row:
            return None if isinstance(row["text"], str) and row["text"] else "text: expected a non-empty string"
        return "record: needs 'messages', 'prompt'+'completion', or 'text' (set data.columns to map yours)"
    if kind == "preference":
        problem = _check_text(row, "chosen") or _check_text(row, "rejected")
        if problem:
            return problem
        if "prompt" in row and row["prompt"] is not None:
            problem = _check_text(row, "prompt")
        elif not (isinstance(row["chosen"], list) and isinstance(row["rejected"], list)):
            return "prompt: missing (only allowed when chosen/rejected are whole conversations)"
        for key in ("margin", "strength"):
            if key in row and row[key] is not None and not isinstance(row[key], (int, float)):
                return f"{key}: expected a number, got {row[key]!r}"
        return problem
    if kind == "unpaired":
        problem = _check_text(row, "prompt") or _check_text(row, "completion")
        if problem:
            return problem
        if not isinstance(row.get("label"), bool):
            return f"label: expected true/false, got {row.get('label')!r}"
        return None
    if kind == "prompt":
        return _check_text(row, "prompt")
    raise ValueError(f"unknown record kind {kind}")


def rename_columns(rows: Iterable[dict], columns: dict[str, str]) -> list[dict]:
    if not columns:
        return list(rows)
    return [{columns.get(k, k): v for k, v in r.items()} for r in rows]


def load_records(source: str, kind: str, *, columns: dict[str, str] | None = None,
                 split: str = "train", max_rows: int | None = None, max_errors: int = 20) -> list[dict]:
    """Read, rename and validate every row; raise one DataError listing up to ``max_errors`` bad rows."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    rows, name = read_rows(source, split)
    rows = rename_columns(rows, columns or {})
    if max_rows is not None:
        rows = rows[:max_rows]
    if not rows:
        raise DataError("no records found", where=name, fix="check the file or the split")
    problems = []
    for i, row in enumerate(rows, 1):
        problem = check_row(row, kind)
        if problem:
            problems.append(f"{name}:{i}: {problem}")
            if len(problems) >= max_errors:
                break
    if problems:
        more = " (stopped listing)" if len(problems) >= max_errors else ""
        raise DataError(f"{len(problems)} bad {kind} record(s){more}:\n  " + "\n  ".join(problems),
                        where=name, fix="correct these rows, or map your column names with "
                                        "data.columns={yours: ours}")
    return rows
