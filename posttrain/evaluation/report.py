"""A generic evaluation report: text, tables, images and sample outputs, written as

- ``report.html``: one self-contained file (inline CSS, images as base64 data URIs, no scripts, no
  external URLs, and a Content-Security-Policy that forbids them); every piece of text is
  escaped, because model outputs and prompts can contain markup such as ``<script>``;
- ``report.md``: the same content as Markdown, images as ``fig-<section id>.png`` next to it;
- ``summary.json``: the structured content (headings, texts, tables, samples), merged with the
  caller's own summary dict.

Each section carries an ``id`` derived from its heading (see :func:`slugify`), so a test or a
pipeline can check that the required sections exist (:func:`parse_report_sections`).
"""

from __future__ import annotations

import base64
import html
import json
import math
import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np

from posttrain.evaluation.stats import EvaluationError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Defense in depth: even if some text escaped the escaping, the browser would refuse to run it.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:#1d1d1f;margin:0;background:#fafafa}
header,main{max-width:1100px;margin:0 auto;padding:0 20px}
header{padding-top:18px}
h1{font-size:1.6em;margin:.3em 0}
h2{font-size:1.2em;margin:0 0 .5em;border-bottom:1px solid #ddd;padding-bottom:.2em}
nav ul{margin:.3em 0 1em;padding-left:1.2em;columns:2}
section{background:#fff;border:1px solid #e3e3e3;border-radius:6px;padding:12px 16px;margin:14px 0}
table{border-collapse:collapse;font-size:13px;margin:.4em 0}
th,td{border:1px solid #ddd;padding:4px 8px;vertical-align:top;text-align:left}
th{background:#f2f2f2}
td.num{text-align:right;font-variant-numeric:tabular-nums}
table.samples{width:100%;table-layout:fixed}
table.samples pre{white-space:pre-wrap;word-break:break-word;max-height:22em;overflow:auto;margin:0;
font:12px/1.4 ui-monospace,Menlo,Consolas,monospace}
pre.code{background:#f5f5f5;padding:8px;overflow:auto}
code{background:#f2f2f2;padding:0 3px;border-radius:3px}
figure{margin:.4em 0}
figcaption{color:#555;font-size:13px}
img{max-width:100%;height:auto}
"""


def slugify(heading: str) -> str:
    """Section id: lower-case ASCII letters and digits, other runs become "-" ("Win rate (vs SFT)"
    → "win-rate-vs-sft"); "section" when nothing is left."""
    return re.sub(r"[^a-z0-9]+", "-", heading.lower()).strip("-") or "section"


def _fmt(v: Any) -> str:
    """Table cell text: floats to 4 significant digits, None empty, the rest via str()."""
    if v is None:
        return ""
    if isinstance(v, np.generic):
        v = v.item()  # numpy scalar → Python scalar
    if isinstance(v, float):
        return format(v, ".4g") if math.isfinite(v) else str(v)
    return str(v)


def _round_up(x: float, digits: int = 2) -> float:
    """``x`` > 0 rounded UP to ``digits`` significant digits (a bound must not shrink when shown)."""
    e = math.floor(math.log10(x)) - digits + 1
    return round(math.ceil(x / 10.0**e - 1e-9) * 10.0**e, 12)


def format_p(p: float | None, n_boot: int | None = None) -> str:
    """A resampling p-value as text, never "0".

    A p-value estimated from B resamples as k/B is 0 when no resample went the other way (k = 0);
    all that is known then is p < 1/B, so this returns ``"< 0.001"`` for B = 1000 (1/B rounded up
    to two significant digits). With B unknown (a result written before B was recorded) a zero
    p-value reads ``"< 1/B"``. Otherwise three decimals (two significant digits below 0.01).
    ``None`` (no test run) is empty.
    """
    if p is None:
        return ""
    p = float(p)
    if math.isnan(p):
        return "nan"
    if n_boot:
        if p * n_boot < 0.5:  # k = 0 of B resamples
            return f"< {_round_up(1.0 / n_boot):g}"
    elif p <= 0:
        return "< 1/B"
    return f"{p:.3f}" if p >= 0.01 else f"{p:.2g}"


def paired_p(paired: Mapping[str, Any] | None, n_boot: int | None = None) -> str:
    """:func:`format_p` of a :func:`~posttrain.evaluation.stats.paired_bootstrap` result, with the B
    it recorded (``n_boot`` is the fallback for results written before B was stored)."""
    if not paired or paired.get("p_value") is None:
        return ""
    return format_p(paired["p_value"], paired.get("n_boot") or n_boot)


def text_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], indent: str = "") -> str:
    """A plain-text table for the console: left-aligned columns two spaces apart, a dashed rule
    under the header, cells formatted like report tables (no colour, no box characters, so it reads
    the same in a terminal, a log file or a pipe)."""
    cells = [[str(c) for c in columns]] + [[_fmt(v) for v in r] for r in rows]
    widths = [max(len(r[i]) if i < len(r) else 0 for r in cells) for i in range(len(columns))]

    def line(r: Sequence[str]) -> str:
        return (indent + "  ".join(v.ljust(w) for v, w in zip(r, widths))).rstrip()

    return "\n".join([line(cells[0]), line(["-" * w for w in widths])] + [line(r) for r in cells[1:]])


def _is_num(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


def _jsonable(v: Any) -> Any:
    """Strict-JSON version of ``v``: numpy → Python, NaN/inf → None, unknown objects → str."""
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (np.ndarray, np.generic)):
        return _jsonable(v.tolist())
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if v is None or isinstance(v, (bool, int, str)):
        return v
    return str(v)


def _inline(text: str) -> str:
    """Escape one line of text, then render `code` and **bold**. Escaping comes first, so the
    only markup in the result is the markup added here."""
    out = []
    for i, part in enumerate(re.split(r"(`[^`]+`)", text)):
        if i % 2:
            out.append(f"<code>{html.escape(part[1:-1])}</code>")
        else:
            out.append(re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", html.escape(part)))
    return "".join(out)


def markdown_to_html(text: str) -> str:
    """A small, safe Markdown subset: paragraphs (blank-line separated), "- "/"* " bullet lists,
    ``` fenced code blocks, `code` and **bold**. Everything else is shown as plain text
    (links are not rendered: the report must not point outside itself)."""
    blocks: list[str] = []
    para: list[str] = []
    items: list[str] = []

    def flush() -> None:
        if para:
            blocks.append("<p>" + "<br>\n".join(_inline(x) for x in para) + "</p>")
            para.clear()
        if items:
            blocks.append("<ul>" + "".join(f"<li>{_inline(x)}</li>" for x in items) + "</ul>")
            items.clear()

    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped.startswith("```"):
            flush()
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith("```"):
                j += 1
            blocks.append(f'<pre class="code">{html.escape(chr(10).join(lines[i + 1:j]))}</pre>')
            i = j + 1
            continue
        if stripped.startswith(("- ", "* ")):
            if para:
                flush()
            items.append(stripped[2:])
        elif not stripped:
            flush()
        else:
            if items:
                flush()
            para.append(stripped)
        i += 1
    flush()
    return "\n".join(blocks)


def _md_fence(text: str) -> str:
    """A Markdown code fence longer than any backtick run in ``text``, so the text cannot close
    it (model outputs often contain ``` themselves)."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def _md_cell(v: Any) -> str:
    return _fmt(v).replace("|", "\\|").replace("\n", " ")


@dataclass
class Section:
    kind: str  # "text" | "table" | "image" | "samples"
    heading: str
    id: str
    data: dict[str, Any] = field(default_factory=dict)


class Report:
    """Collects sections in order; :meth:`write` renders HTML, Markdown and JSON.

    Every ``add_*`` returns the report, so calls chain. Headings may repeat; their ids get a
    numeric suffix ("results", "results-2").
    """

    def __init__(self, title: str):
        self.title = title
        self.sections: list[Section] = []

    def _add(self, kind: str, heading: str, **data: Any) -> Report:
        base, taken = slugify(heading), {s.id for s in self.sections}
        sid, k = base, 2
        while sid in taken:
            sid, k = f"{base}-{k}", k + 1
        self.sections.append(Section(kind, heading, sid, data))
        return self

    def add_text(self, heading: str, text: str) -> Report:
        """Prose in a small Markdown subset (see :func:`markdown_to_html`)."""
        return self._add("text", heading, text=str(text))

    def add_table(self, heading: str, columns: Sequence[str], rows: Sequence[Sequence[Any]],
                  caption: str = "") -> Report:
        """A table; each row has one value per column (floats shown to 4 significant digits)."""
        rows = [list(r) for r in rows]
        for i, r in enumerate(rows):
            if len(r) != len(columns):
                raise EvaluationError(f"table {heading!r} row {i} has {len(r)} values for {len(columns)} columns")
        return self._add("table", heading, columns=[str(c) for c in columns], rows=rows, caption=caption)

    def add_image(self, heading: str, png: bytes, caption: str = "") -> Report:
        """A PNG image (e.g. from posttrain.evaluation.plots), embedded as a data URI in HTML."""
        if not isinstance(png, (bytes, bytearray)) or not bytes(png).startswith(PNG_SIGNATURE):
            raise EvaluationError(f"image {heading!r} is not PNG bytes",
                                  fix="pass the bytes returned by a posttrain.evaluation.plots function")
        return self._add("image", heading, png=bytes(png), caption=caption)

    def add_samples(self, heading: str, samples: Sequence[Mapping[str, Any]],
                    fields: Sequence[str] | None = None) -> Report:
        """Example outputs, one row per sample with its fields side by side (default: every key,
        in order of first appearance, e.g. prompt / response / score)."""
        samples = [dict(s) for s in samples]
        if fields is None:
            fields = list(dict.fromkeys(k for s in samples for k in s))
        return self._add("samples", heading, samples=samples, fields=[str(f) for f in fields])

    # ---------------------------------------------------------------------------------------- HTML

    def _section_html(self, s: Section) -> str:
        e = html.escape
        body: list[str] = []
        if s.kind == "text":
            body.append(markdown_to_html(s.data["text"]))
        elif s.kind == "table":
            head = "".join(f"<th>{e(c)}</th>" for c in s.data["columns"])
            trs = "".join("<tr>" + "".join(f'<td{" class=num" if _is_num(v) else ""}>{e(_fmt(v))}</td>'
                                           for v in r) + "</tr>" for r in s.data["rows"])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{trs}</tbody></table>")
            if s.data["caption"]:
                body.append(f'<p class="caption">{e(s.data["caption"])}</p>')
        elif s.kind == "image":
            b64 = base64.b64encode(s.data["png"]).decode("ascii")
            cap = f"<figcaption>{e(s.data['caption'])}</figcaption>" if s.data["caption"] else ""
            body.append(f'<figure><img src="data:image/png;base64,{b64}" alt="{e(s.heading)}">{cap}</figure>')
        elif s.kind == "samples":
            fields = s.data["fields"]
            head = "".join(f"<th>{e(f)}</th>" for f in fields)
            trs = "".join("<tr>" + "".join(f"<td><pre>{e(_fmt(smp.get(f)))}</pre></td>" for f in fields) + "</tr>"
                          for smp in s.data["samples"])
            body.append(f'<table class="samples"><thead><tr>{head}</tr></thead><tbody>{trs}</tbody></table>')
        head = f'<section id="{e(s.id)}" class="{s.kind}">\n<h2>{e(s.heading)}</h2>\n'
        return head + "\n".join(body) + "\n</section>"

    def to_html(self) -> str:
        e = html.escape
        toc = "".join(f'<li><a href="#{e(s.id)}">{e(s.heading)}</a></li>' for s in self.sections)
        sections = "\n".join(self._section_html(s) for s in self.sections)
        return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n'
                f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
                f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
                f'<link rel="icon" href="data:,">\n'  # stops the browser from requesting /favicon.ico
                f"<title>{e(self.title)}</title>\n<style>{CSS}</style></head>\n<body>\n"
                f"<header><h1>{e(self.title)}</h1><nav><ul>{toc}</ul></nav></header>\n"
                f"<main>\n{sections}\n</main>\n</body></html>\n")

    # ------------------------------------------------------------------------------------ Markdown

    def to_markdown(self) -> str:
        """Markdown; image sections link ``fig-<id>.png`` (written by :meth:`write`)."""
        out = [f"# {self.title}", ""]
        for s in self.sections:
            out += [f"## {s.heading}", ""]
            if s.kind == "text":
                out.append(s.data["text"])
            elif s.kind == "table":
                cols = s.data["columns"]
                out.append("| " + " | ".join(_md_cell(c) for c in cols) + " |")
                out.append("|" + "---|" * len(cols))
                out += ["| " + " | ".join(_md_cell(v) for v in r) + " |" for r in s.data["rows"]]
                if s.data["caption"]:
                    out += ["", s.data["caption"]]
            elif s.kind == "image":
                out.append(f"![{s.data['caption'] or s.heading}](fig-{s.id}.png)")
                if s.data["caption"]:
                    out += ["", f"*{s.data['caption']}*"]
            elif s.kind == "samples":
                for i, smp in enumerate(s.data["samples"], 1):
                    out += [f"### Sample {i}", ""]
                    for f in s.data["fields"]:
                        text = _fmt(smp.get(f))
                        fence = _md_fence(text)  # model text goes in a fence: shown, never rendered
                        out += [f"**{f}**", "", fence, text, fence, ""]
            out.append("")
        return "\n".join(out)

    # ---------------------------------------------------------------------------------------- JSON

    def to_summary(self, summary: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """``{**summary, "report": {"title", "sections": [...]}}`` in strict JSON types."""
        extra = dict(summary or {})
        if "report" in extra:
            raise EvaluationError("summary must not contain the key 'report' (the report's own content goes there)")
        sections = []
        for s in self.sections:
            d: dict[str, Any] = {"id": s.id, "heading": s.heading, "kind": s.kind}
            if s.kind == "image":
                d.update(file=f"fig-{s.id}.png", caption=s.data["caption"])
            else:
                d.update(s.data)
            sections.append(d)
        return _jsonable({**extra, "report": {"title": self.title, "sections": sections}})

    def write(self, out_dir: str | Path, summary: Mapping[str, Any] | None = None) -> dict[str, Path]:
        """Write report.html, report.md (+ fig-<id>.png) and summary.json into ``out_dir``.

        summary.json replaces any file of that name, so when writing into a run directory pass
        the run's own summary as ``summary`` to keep it. Returns the written paths by kind.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths: dict[str, Path] = {"html": out / "report.html", "md": out / "report.md", "json": out / "summary.json"}
        content = json.dumps(self.to_summary(summary), indent=2, allow_nan=False)
        for s in self.sections:
            if s.kind == "image":
                paths[f"image:{s.id}"] = out / f"fig-{s.id}.png"
                paths[f"image:{s.id}"].write_bytes(s.data["png"])
        paths["html"].write_text(self.to_html(), encoding="utf-8")
        paths["md"].write_text(self.to_markdown(), encoding="utf-8")
        paths["json"].write_text(content + "\n", encoding="utf-8")
        return paths


class _SectionIds(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "section":
            self.ids += [v for k, v in attrs if k == "id" and v]


def parse_report_sections(html_text: str) -> list[str]:
    """The ``id`` of every ``<section>`` in a report's HTML, in document order."""
    p = _SectionIds()
    p.feed(html_text)
    p.close()
    return p.ids
