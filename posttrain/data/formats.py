"""Loading records for a command: read the source, map columns, read each record, report every bad row.

This is the one reader every command (and ``posttrain data inspect`` and ``posttrain label import``)
uses. Kinds and the layouts accepted for each are in :mod:`posttrain.data.records` and
docs/data.md; sources in :mod:`posttrain.data.sources`.

Every row is read before any model loads. The problems of all bad rows (a line that is not JSON, a
missing field, a wrong type, ...) are collected in one pass and reported together, each as
``file:line: field: problem`` with the line number the user's editor shows; the run then stops. A
reading that could be ambiguous (Anthropic HH strings, a prompt column beside conversations that
already hold it, decoded CSV cells) is stated in one line, with the key that overrides it.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

from posttrain.data.records import ReadOptions, RowProblem, note_text, read_record
from posttrain.data.sources import Source, read_source
from posttrain.errors import DataError

KINDS = ("sft", "preference", "unpaired", "prompt")


# ----------------------------------------------------------------------------- loading


@dataclass
class BadRow:
    line: int
    field: str
    problem: str


@dataclass
class Loaded:
    """Every readable record of a source (canonical form), where each came from, and every bad row."""

    source: Source
    kind: str
    records: list[dict] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    layouts: Counter = field(default_factory=Counter)
    notes: set[str] = field(default_factory=set)
    bad: list[BadRow] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.source.name

    def where(self, line: int) -> str:
        return f"{self.name}:{line}" if self.source.by_line else f"{self.name}:row {line}"

    def layout_text(self) -> str:
        return ", ".join(f"{n} {k}" for k, n in self.layouts.most_common())

    def readings(self, opts: ReadOptions) -> list[str]:
        """One line per reading the user should know about (empty when the layout is unambiguous)."""
        return [f"{self.name} ({self.layout_text()}): {note_text(n, opts)}" for n in sorted(self.notes)]

    def raise_if_bad(self, opts: ReadOptions, max_errors: int = 20) -> None:
        if not self.bad:
            return
        shown = [f"{self.where(b.line)}: {b.field}: {b.problem}" if b.field else f"{self.where(b.line)}: {b.problem}"
                 for b in self.bad[:max_errors]]
        more = f" (the first {max_errors} listed)" if len(self.bad) > max_errors else ""
        raise DataError(f"{len(self.bad)} bad {self.kind} record(s){more}:\n  " + "\n  ".join(shown),
                        where=self.name, fix=f"correct these rows (no model was loaded), or {opts.columns_hint()}")


def rename_columns(rows: Iterable[dict], columns: dict[str, str]) -> list[dict]:
    if not columns:
        return list(rows)
    return [{columns.get(k, k): v for k, v in r.items()} if isinstance(r, dict) else r for r in rows]


def load_data(source: str, kind: str, *, columns: dict[str, str] | None = None, split: str = "train",
              max_rows: int | None = None, options: ReadOptions | None = None,
              allow_rankings: bool = False) -> Loaded:
    """Read every row of ``source`` as a ``kind`` record, collecting (not raising) row problems.

    ``kind`` "preference" with ``allow_rankings`` reads K-wise ranking records when the first record
    has ``responses`` and ``ranking``."""
    opts = options or ReadOptions()
    src = read_source(source, split, split_key=f"{opts.prefix or ''}split")
    rows = src.rows[:max_rows] if max_rows is not None else src.rows
    if not rows:
        raise DataError("no records found", where=src.name,
                        fix="check the file" + (f" or {opts.prefix}split" if opts.prefix is not None else ""))
    columns = columns or {}
    values = rename_columns([r.value for r in rows], columns)
    if columns:
        present = {k for r in rows if isinstance(r.value, dict) for k in r.value}
        missing = [k for k in columns if k not in present]
        if missing:
            raise DataError(f"the column mapping names {', '.join(map(repr, missing))} but no record has that "
                            f"column (columns: {', '.join(sorted(map(str, present))) or 'none'})",
                            where=f"{opts.prefix or ''}columns", fix="map the column names your file has")
    task = kind
    if kind == "preference":
        first = next((v for r, v in zip(rows, values) if r.problem is None and isinstance(v, dict)), {})
        if "responses" in first and "ranking" in first:
            if not allow_rankings:
                raise DataError("K-wise ranking records are only used by `posttrain reward`", where=src.name,
                                fix="give {prompt, chosen, rejected} pairs")
            task = "ranking"
    out = Loaded(src, task)
    for row, value in zip(rows, values):
        if row.problem is not None:
            out.bad.append(BadRow(row.line, "", row.problem))
            continue
        try:
            reading = read_record(value, task, opts)
        except RowProblem as e:
            fld, _, problem = str(e).partition(": ")
            out.bad.append(BadRow(row.line, fld, problem))
            continue
        out.records.append(reading.record)
        out.lines.append(row.line)
        out.layouts[reading.layout] += 1
        out.notes |= reading.notes
    return out


def load_records(source: str, kind: str, *, columns: dict[str, str] | None = None, split: str = "train",
                 max_rows: int | None = None, max_errors: int = 20, options: ReadOptions | None = None,
                 allow_rankings: bool = False, quiet: bool = False) -> list[dict]:
    """Canonical records of ``source``; one DataError lists the bad rows (up to ``max_errors``).
    Readings worth knowing are printed as one line each on stderr."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    opts = options or ReadOptions()
    loaded = load_data(source, kind, columns=columns, split=split, max_rows=max_rows, options=opts,
                       allow_rankings=allow_rankings)
    loaded.raise_if_bad(opts, max_errors)
    if not quiet:
        for line in loaded.readings(opts):
            print(f"data: {line}", file=sys.stderr)
    return loaded.records


def read_rows(source: str, split: str = "train") -> tuple[list[dict], str]:
    """Raw rows (no reading) and the source's name; a line that is not JSON is an error here."""
    src = read_source(source, split)
    bad = [r for r in src.rows if r.problem is not None]
    if bad:
        raise DataError(f"{src.where(bad[0])}: {bad[0].problem}", where=src.name)
    return [r.value for r in src.rows], src.name


def check_row(row, kind: str) -> str | None:
    """The first problem with ``row`` as a ``kind`` record, as 'field: problem', or None."""
    try:
        read_record(row, kind)
    except RowProblem as e:
        return str(e)
    return None


def holdout(rows: list, eval_rows: list, n: int = 0, fraction: float = 0.0, where: str = "data.eval_fraction"
            ) -> tuple[list, list]:
    """(train, held-out): ``eval_rows`` when given, else the last ``n`` rows or ``fraction`` of them."""
    if eval_rows or not (n or fraction):
        return rows, eval_rows
    k = n or max(1, round(fraction * len(rows)))
    if k >= len(rows):
        raise DataError(f"holding out {k} of {len(rows)} records leaves none to train on", where=where,
                        fix=f"hold out fewer than {len(rows)}")
    return rows[:-k], rows[-k:]


def read_options(d, prefix: str = "data.") -> ReadOptions:
    """The ReadOptions of a DataConfig (its format, prompt_from and scores_as_margin keys)."""
    return ReadOptions(format=d.format, prompt_from=d.prompt_from, scores_as_margin=d.scores_as_margin, prefix=prefix)


def load_train_eval(d, kind: str, *, eval_holdout: int = 0, allow_rankings: bool = False,
                    prefix: str = "data.") -> tuple[list[dict], list[dict]]:
    """(train records, held-out records) of a DataConfig ``d``: data.eval when given (or resolved by
    'auto'), else the last ``eval_holdout`` records or ``d.eval_fraction`` of them, else none."""
    opts = read_options(d, prefix)
    kw = dict(columns=d.columns, max_errors=d.max_errors, options=opts, allow_rankings=allow_rankings)
    train = load_records(d.train, kind, split=d.split, max_rows=d.max_rows, **kw)
    source = d.eval_source()
    held = load_records(source, kind, **kw) if source else []
    where = "eval_holdout" if eval_holdout else f"{prefix}eval_fraction"
    return holdout(train, held, n=eval_holdout, fraction=d.eval_fraction, where=where)
