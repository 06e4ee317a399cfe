"""Reading a data source into rows that remember where they came from.

Every row carries the location a user can go to: the **line number their editor shows** for JSONL,
JSON and CSV files (blank lines counted; a CSV row whose quoted cell spans lines is at the line it
starts on), and the 1-based row number for Parquet files and ``datasets``. A line that is not valid
JSON is a row with a problem, not the end of reading, so one pass reports every bad row.

Sources: ``.jsonl``/``.json``/``.csv``/``.parquet`` files, a folder written by
``datasets.save_to_disk`` (a ``Dataset`` or a ``DatasetDict``; read in place, never copied into a
cache), a ``datasets`` hub name, or ``builtin:<name>``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.errors import DataError
from posttrain.tasks.builtin import BUILTIN_SOURCES

FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


@dataclass
class Row:
    """One record: ``value`` (a dict when readable), its ``line`` (editor line or row number) and,
    when it could not be read at all, the ``problem``."""

    line: int
    value: Any
    problem: str | None = None


@dataclass
class Source:
    name: str           # used in messages: the path, or "name[split]"
    kind: str           # jsonl | json | csv | parquet | dataset | builtin
    rows: list[Row]

    @property
    def by_line(self) -> bool:
        """Whether ``Row.line`` is a text-file line number (else a 1-based row number)."""
        return self.kind in ("jsonl", "json", "csv")

    def where(self, row: Row) -> str:
        return f"{self.name}:{row.line}" if self.by_line else f"{self.name}:row {row.line}"


def read_source(source: str, split: str = "train", split_key: str = "data.split") -> Source:
    """All rows of ``source``; unreadable lines become rows with a ``problem``."""
    if source.startswith("builtin:"):
        name = source.split(":", 1)[1]
        if name not in BUILTIN_SOURCES:
            raise DataError(f"unknown built-in dataset '{name}'", where=source,
                            fix=f"use one of: {', '.join('builtin:' + k for k in BUILTIN_SOURCES)}")
        return Source(source, "builtin", [Row(i, r) for i, r in enumerate(BUILTIN_SOURCES[name](), 1)])
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix in FILE_SUFFIXES and not path.is_dir():
        if not path.exists():
            raise DataError(f"data file {path} does not exist", where=str(path),
                            fix="check the path (relative paths start at the current directory)")
        reader = {".jsonl": _jsonl, ".json": _json, ".csv": _csv, ".parquet": _parquet}[suffix]
        return Source(str(path), suffix[1:], reader(path))
    return _datasets(source, split, split_key)


# ----------------------------------------------------------------------------- files


def _jsonl(path: Path) -> list[Row]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):  # i is the editor's line number: blank lines count
            if not line.strip():
                continue
            try:
                rows.append(Row(i, json.loads(line.rstrip("\r\n"))))
            except json.JSONDecodeError as e:
                rows.append(Row(i, None, f"record: not valid JSON ({e.msg} at column {e.colno}); each line "
                                         "of a .jsonl file must be one JSON object"))
    return rows


def _json(path: Path) -> list[Row]:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})", where=str(path),
                        fix="fix the file, or write one object per line as .jsonl (then every bad line is "
                            "reported on its own)") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError("a .json data file must hold a list of records", where=str(path),
                        fix="write [ {...}, {...} ] or use .jsonl")
    return [Row(line, value) for line, value in zip(_element_lines(text, len(data)), data)]


def _element_lines(text: str, n: int) -> list[int]:
    """The line each element of the file's record array starts on."""
    decoder, lines = json.JSONDecoder(), []
    try:
        if text.lstrip().startswith("["):
            pos = text.index("[") + 1
        else:  # {"data": [...]}
            pos = text.index("[", text.index('"data"')) + 1
        for _ in range(n):
            while text[pos] in " \t\r\n,":
                pos += 1
            lines.append(text.count("\n", 0, pos) + 1)
            _, pos = decoder.raw_decode(text, pos)
    except (ValueError, IndexError):  # an unusual layout: fall back to the record's position
        return list(range(1, n + 1))
    return lines


def _csv(path: Path) -> list[Row]:
    import csv

    import pandas as pd

    # pandas reads the values (numbers, booleans); csv finds the line each record starts on
    starts, prev = [], 0
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        for rec in reader:
            if rec:  # pandas skips blank lines too
                starts.append(prev + 1)
            prev = reader.line_num
    df = pd.read_csv(path, keep_default_na=False, na_values=[""])
    return [Row(line, _plain(r)) for line, r in zip(starts[1:], df.to_dict(orient="records"))]


def _parquet(path: Path) -> list[Row]:
    import pandas as pd

    df = pd.read_parquet(path)
    return [Row(i, _plain(r)) for i, r in enumerate(df.to_dict(orient="records"), 1)]


def _plain(row: dict) -> dict:
    """Parquet/CSV cells -> plain Python (numpy arrays of message structs -> lists of dicts; an
    empty CSV cell -> None)."""
    import numpy as np

    def conv(v):
        if isinstance(v, np.ndarray):
            return [conv(x) for x in v.tolist()]
        if isinstance(v, list):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, np.generic):
            v = v.item()
        if isinstance(v, float) and math.isnan(v):
            return None
        return v

    return {k: conv(v) for k, v in row.items()}


# ----------------------------------------------------------------------------- datasets


def _datasets(source: str, split: str, split_key: str) -> Source:
    import datasets

    folder = Path(source)
    on_disk = folder.is_dir() and ((folder / "dataset_info.json").exists() or (folder / "dataset_dict.json").exists())
    try:
        if on_disk:  # read in place: load_dataset would copy it into the cache
            ds = datasets.load_from_disk(source)
        else:
            ds = datasets.load_dataset(source, split=split)
    except Exception as e:  # datasets raises many types; the message is what matters
        msg = str(e)
        if not on_disk and "split" in msg.lower() and "available" in msg.lower():
            raise DataError(f"cannot load split '{split}' of '{source}': {msg}", where=split_key,
                            fix=f"set {split_key} to one of the splits named above") from None
        raise DataError(f"cannot load dataset '{source}': {msg}", where=source,
                        fix="give a .jsonl/.json/.parquet/.csv file, a folder written by save_to_disk, "
                            "or a hub dataset available offline") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"'{source}' has no split '{split}'; its splits are: {', '.join(ds)}",
                            where=split_key, fix=f"set {split_key} to one of: {', '.join(ds)}")
        ds = ds[split]
    return Source(f"{source}[{split}]", "dataset", [Row(i, _plain(dict(r))) for i, r in enumerate(ds, 1)])
