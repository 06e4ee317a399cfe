"""``posttrain data inspect``: how a command will read a data file, before any training.

An interface module (like ``cli.py``): it uses the data reader, the encoders and a tokenizer.

It reads the file with the commands' own reader and encoders, so what it shows is exactly what the
command trains on: the detected layout, the number of records and every bad row
(``file:line: field: problem``), token-length statistics with the number of examples that
``max_length`` truncates or drops, and rendered examples through the model's chat template with the
trained tokens marked. ``report()`` returns the JSON object ``--json`` prints (docs/data.md).
"""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import dataclass, field

import click

from posttrain.config import ModelConfig
from posttrain.data.chat import encode_prompt, encode_sft
from posttrain.data.formats import load_data
from posttrain.data.preference import encode_pair, encode_ranking, encode_unpaired, unpair
from posttrain.data.records import ReadOptions
from posttrain.data.sources import read_source
from posttrain.errors import PosttrainError
from posttrain.models.loading import load_tokenizer

TASKS = {"sft": "sft", "dpo": "preference", "reward": "preference", "kto": "unpaired", "prompts": "prompt"}


@dataclass
class InspectOptions:
    task: str = "sft"
    model: str = "tiny"
    rows: int = 3
    max_length: int = 256
    split: str = "train"
    columns: dict[str, str] = field(default_factory=dict)
    format: str = "auto"
    prompt_from: str = "auto"
    scores_as_margin: bool = False


def _spans(ids: list[int], mask: list[int]) -> list[tuple[list[int], bool]]:
    """Consecutive runs of (token ids, trained)."""
    out: list[tuple[list[int], bool]] = []
    for t, m in zip(ids, mask):
        if out and out[-1][1] == bool(m):
            out[-1][0].append(t)
        else:
            out.append(([t], bool(m)))
    return out


def _lengths(values: list[int]) -> dict:
    if not values:
        return {}
    s = sorted(values)
    return {"min": s[0], "mean": round(statistics.fmean(s), 1), "p50": s[len(s) // 2],
            "p95": s[min(len(s) - 1, int(0.95 * len(s)))], "max": s[-1]}


def report(file: str, o: InspectOptions) -> dict:
    """The inspection of ``file`` for task ``o.task`` (see the module docstring)."""
    if o.task not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}")
    opts = ReadOptions(format=o.format, prompt_from=o.prompt_from, scores_as_margin=o.scores_as_margin,
                       prefix=None)
    kind = TASKS[o.task]
    if o.task == "kto":  # paired data: kto unpairs it (chosen desirable, rejected undesirable)

        first = next((r.value for r in read_source(file, o.split).rows if isinstance(r.value, dict)), {})
        first = {o.columns.get(k, k): v for k, v in first.items()}
        kind = "preference" if "chosen" in first and "rejected" in first else kind
    loaded = load_data(file, kind, columns=o.columns, split=o.split, options=opts,
                       allow_rankings=o.task == "reward")
    cfg = ModelConfig(name_or_path=o.model)
    tok = load_tokenizer(cfg.name_or_path)
    dec = lambda ids: tok.decode(ids, skip_special_tokens=False)  # noqa: E731

    records, lines = loaded.records, loaded.lines
    unpaired = o.task == "kto" and loaded.kind == "preference"
    if unpaired:
        records = unpair(records)
        lines = [ln for ln, r in zip(loaded.lines, loaded.records) if not r.get("tie") for _ in (0, 1)]
    full_len, truncated, dropped, examples = [], 0, 0, []
    huge = 10 ** 9
    for i, (rec, line) in enumerate(zip(records, lines)):
        ex: dict = {"line": line}
        if kind == "sft":
            whole, fit = encode_sft(tok, rec, huge), encode_sft(tok, rec, o.max_length)
            full_len.append(len(whole))
            truncated += fit.truncated
            dropped += fit.n_trained == 0
            first = fit.loss_mask.index(1) if 1 in fit.loss_mask else len(fit)
            ex.update(prompt=dec(fit.input_ids[:first]),
                      completion=dec([t for t, m in zip(fit.input_ids, fit.loss_mask) if m]),
                      trained_tokens=fit.n_trained, dropped_turns=fit.dropped_turns,
                      spans=[(dec(ids), m) for ids, m in _spans(fit.input_ids, fit.loss_mask)])
        elif kind == "prompt":
            ids = encode_prompt(tok, rec["prompt"])
            full_len.append(len(ids))
            truncated += len(ids) > o.max_length
            ex.update(prompt=dec(ids), trained_tokens=0, spans=[(dec(ids), False)])
        else:
            if unpaired or loaded.kind == "unpaired":
                enc, parts = encode_unpaired, ["completion"]
            elif loaded.kind == "ranking":
                enc, parts = encode_ranking, [f"response_{k}" for k in range(len(rec["responses"]))]
            else:
                enc, parts = encode_pair, ["chosen", "rejected"]
            whole, fit = enc(tok, rec, huge), enc(tok, rec, o.max_length)
            full_len.append(len(whole.prompt_ids) + max(len(r) for r in whole.responses))
            truncated += fit.truncated
            ex["prompt"] = dec(fit.prompt_ids)
            for name, ids in zip(parts, fit.responses):
                ex[name] = dec(ids)
            ex["trained_tokens"] = sum(len(r) for r in fit.responses)
            ex["dropped_turns"] = fit.dropped_turns
            if fit.label is not None:
                ex["label"] = fit.label
            ex["spans"] = [(dec(fit.prompt_ids), False)] + [(dec(r), True) for r in fit.responses]
            ex["parts"] = parts
        if i < o.rows:
            examples.append(ex)
    layouts = dict(loaded.layouts.most_common())
    return {
        "file": loaded.name, "task": o.task, "model": o.model, "max_length": o.max_length,
        "format": (next(iter(layouts)) if len(layouts) == 1 else "mixed: " + ", ".join(layouts)) if layouts else None,
        "layouts": layouts, "records": len(loaded.records), "unpaired_examples": len(records) if unpaired else None,
        "bad_rows": [{"line": b.line, "field": b.field, "problem": b.problem} for b in loaded.bad],
        "readings": loaded.readings(opts),
        "token_lengths": _lengths(full_len), "truncated": truncated, "dropped": dropped,
        "examples": examples, "by_line": loaded.source.by_line,
    }


def format_text(rep: dict, color: bool) -> str:
    """The human-readable inspection: trained tokens highlighted (reverse video on a terminal,
    ⟦…⟧ otherwise)."""
    on, off = ("\x1b[7m", "\x1b[0m") if color else ("⟦", "⟧")
    where = (lambda ln: f"{rep['file']}:{ln}") if rep["by_line"] else (lambda ln: f"{rep['file']}:row {ln}")
    out = [f"{rep['file']}: {rep['records']} record(s) for `{rep['task']}`, format: {rep['format']}"]
    if len(rep["layouts"]) > 1:
        out.append("  layouts: " + ", ".join(f"{k} {n}" for k, n in rep["layouts"].items()))
    if rep.get("unpaired_examples") is not None:
        out.append(f"  paired data: kto trains {rep['unpaired_examples']} unpaired examples (chosen desirable, "
                   "rejected undesirable)")
    out += [f"  reading: {r}" for r in rep["readings"]]
    out.append(f"{len(rep['bad_rows'])} bad row(s)")
    out += [f"  {where(b['line'])}: {b['field'] + ': ' if b['field'] else ''}{b['problem']}" for b in rep["bad_rows"]]
    L = rep["token_lengths"]
    if L:
        out.append(f"tokens per example ({rep['model']} tokenizer): min {L['min']}, mean {L['mean']}, p50 {L['p50']}, "
                   f"p95 {L['p95']}, max {L['max']}; at max_length {rep['max_length']}: {rep['truncated']} "
                   f"truncated, {rep['dropped']} dropped")
    for k, ex in enumerate(rep["examples"], 1):
        out.append(f"\n--- example {k} ({where(ex['line'])}; {ex['trained_tokens']} trained tokens"
                   + (f"; {ex['dropped_turns']} earliest turn(s) dropped" if ex.get("dropped_turns") else "")
                   + (f"; label {ex['label']}" if "label" in ex else "") + ") ---")
        if "parts" in ex:
            out += ["[prompt]", ex["prompt"]]
            for name in ex["parts"]:
                out += [f"[{name}]", f"{on}{ex[name]}{off}"]
        else:
            out.append("".join(f"{on}{text}{off}" if m else text for text, m in ex["spans"]))
    out.append(f"\n(trained tokens are shown {'highlighted' if color else 'between ⟦ and ⟧'})")
    return "\n".join(out)


def public(rep: dict) -> dict:
    """The --json object (no rendering helpers)."""
    out = {k: v for k, v in rep.items() if k != "by_line"}
    out["examples"] = [{k: v for k, v in ex.items() if k not in ("spans", "parts")} for ex in rep["examples"]]
    return out


# ----------------------------------------------------------------------------- the command


@click.group(name="data", help="Check data files before training: posttrain data inspect FILE.")
def group() -> None:
    pass


@group.command(name="inspect")
@click.argument("file")
@click.option("--task", type=click.Choice(["sft", "dpo", "reward", "kto", "prompts"]), default="sft",
              show_default=True, help="The command the data is for (prompts: grpo, ppo, rloo, reinforce, best-of-n).")
@click.option("--model", default="tiny", show_default=True, help="Tokenizer and chat template (path or hub id).")
@click.option("--rows", default=3, show_default=True, help="How many rendered examples to show.")
@click.option("--max-length", default=256, show_default=True, help="The command's data.max_length.")
@click.option("--split", default="train", show_default=True, help="Split of a datasets name or folder.")
@click.option("--column", "columns", multiple=True, metavar="YOURS=OURS", help="Column mapping (repeatable).")
@click.option("--format", "fmt", type=click.Choice(["auto", "hh", "plain"]), default="auto", show_default=True,
              help="data.format: how strings are read.")
@click.option("--prompt-from", type=click.Choice(["auto", "shared", "column"]), default="auto", show_default=True,
              help="data.prompt_from for conversations that share leading turns.")
@click.option("--json", "as_json", is_flag=True, help="End with one JSON object (the last line printed).")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def inspect_command(file, task, model, rows, max_length, split, columns, fmt, prompt_from, as_json, debug):
    """Detected format, bad rows (file:line: field: problem), token lengths and truncation, and rendered
    examples with the trained tokens marked. Exits 1 when there are bad rows."""
    mapping = {}
    for c in columns:
        yours, sep, ours = c.partition("=")
        if not sep:
            raise click.BadParameter(f"expected YOURS=OURS, got {c!r}", param_hint="--column")
        mapping[yours] = ours
    try:
        rep = report(file, InspectOptions(task=task, model=model, rows=rows, max_length=max_length, split=split,
                                          columns=mapping, format=fmt, prompt_from=prompt_from))
    except PosttrainError as e:
        if debug:
            raise
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    if as_json:
        click.echo(json.dumps(public(rep), ensure_ascii=False))
    else:
        click.echo(format_text(rep, color=sys.stdout.isatty()))
    if rep["bad_rows"]:
        sys.exit(1)
