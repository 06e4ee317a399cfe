"""Users' layouts inside one field: the text of a message list (what pandas writes into CSV cells,
JSON or a Python literal), Anthropic HH transcripts ("\\n\\nHuman: ...\\n\\nAssistant: ..."), and OpenAI-style
tool calls. Each function raises :class:`RowProblem` ("field: problem") for the row's report."""

from __future__ import annotations

import ast
import json
import re
from typing import Any


class RowProblem(Exception):
    """'field: problem' for one record."""


_MESSAGE_TEXT = re.compile(r"""^\s*\[\s*\{\s*['"](role|content)['"]\s*:""")


_LIST_TEXT = re.compile(r"^\s*\[")


def _literal(text: str):
    for parse in (json.loads, ast.literal_eval):
        try:
            return parse(text), None
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
            err = e
    return None, err


def decode_cell(value: Any, name: str, must_be_list: bool, notes: set[str]) -> Any:
    """A string holding the text of a message list (or, for list-only fields, of any list) -> the list."""
    if not isinstance(value, str):
        return value
    if not (_MESSAGE_TEXT.match(value) or (must_be_list and _LIST_TEXT.match(value))):
        return value
    out, err = _literal(value)
    if not isinstance(out, list):
        raise RowProblem(f"{name}: holds the text of a list ({value[:48]!r}...) that is neither JSON nor a "
                         f"Python literal ({type(err).__name__ if err else 'not a list'}), so it cannot be "
                         "read as messages; write the cell as a JSON list")
    notes.add("decoded")
    return out


def _tool_call(call: Any, where: str) -> dict:
    """OpenAI-style tool call -> {"type": "function", "function": {"name", "arguments": dict|str}}."""
    fn = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise RowProblem(f"{where}: expected {{'function': {{'name', 'arguments'}}}}")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        parsed, _ = _literal(args) if args.strip().startswith("{") else (None, None)
        args = parsed if isinstance(parsed, dict) else args
    out = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
    if "id" in call:
        out["id"] = call["id"]
    return out


_HH_MARK = re.compile(r"\n\n(Human|Assistant):[ \t]?")


def is_hh(text: Any) -> bool:
    return (isinstance(text, str) and re.match(r"^(\s*\n\n|\s*)Human:", text) is not None
            and "\n\nAssistant:" in text)


def parse_hh(text: str, name: str) -> list[dict]:
    """'\\n\\nHuman: a\\n\\nAssistant: b ...' -> [{user: a}, {assistant: b}, ...]; a trailing empty
    'Assistant:' (a prompt) is left out."""
    body = "\n\n" + text.lstrip(" \t\r\n")
    parts = _HH_MARK.split(body)
    if parts[0].strip():
        raise RowProblem(f"{name}: text before the first 'Human:' turn")
    msgs = [{"role": "user" if r == "Human" else "assistant", "content": c.strip()}
            for r, c in zip(parts[1::2], parts[2::2])]
    if msgs and msgs[-1]["role"] == "assistant" and not msgs[-1]["content"]:
        msgs.pop()
    if not msgs:
        raise RowProblem(f"{name}: an Anthropic HH transcript with no turns")
    return msgs
