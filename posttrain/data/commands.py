"""``posttrain data ...``: look at a data file the way the commands will read it.

Only click is imported here, so ``posttrain --help`` stays fast.
"""

from __future__ import annotations

import json
import sys

import click

from posttrain.errors import PosttrainError


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
    from posttrain.data.inspect import InspectOptions, format_text, public, report

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
