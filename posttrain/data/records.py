"""One record at a time: which layout it is in, and the canonical record every command encodes.

Canonical records (what the encoders in ``chat.py`` and ``data/preference.py`` read):

- sft: ``{"messages": [...], "tools"?}``, ``{"prompt", "completion"}`` or ``{"text"}``
- preference: ``{"prompt", "chosen", "rejected", ...}``: ``prompt`` a string or message list, each
  response a string or a message list (its last message an assistant turn) that does **not** repeat
  the prompt; extra columns (``margin``, ``tie``, ``subset``, ``score_chosen``, ...) are kept
- ranking: ``{"prompt", "responses": [...], "ranking": [...]}``
- unpaired: ``{"prompt", "completion", "label": bool}``
- prompt: ``{"prompt", ...extra columns}``

Layouts read (each detected from the record itself; ``data.format`` overrides the guess):

- **shared turns are the prompt**: when ``chosen`` and ``rejected`` are conversations that share
  leading turns, those turns are the prompt whatever a ``prompt`` column holds (UltraFeedback-binarized
  repeats the prompt string beside conversations that already contain it: it is not added twice);
  ``data.prompt_from=column`` takes the column instead and the conversations as whole responses
- **Anthropic HH transcripts**: strings ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` become message
  lists (then the rule above: every turn before the last assistant turn is the prompt), and a prompt
  string ending in ``"\\n\\nAssistant:"`` beside plain response strings
- **cells holding the text of a message list** (CSV written by pandas: JSON or a Python literal) are
  decoded; a cell that looks like one and cannot be decoded is a bad row, never trained on as text
- OpenAI-style **tool calling** in SFT conversations: assistant turns with ``tool_calls`` (content may
  be empty), ``tool`` turns, and a ``tools`` column passed to the chat template
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from posttrain.data.layouts import RowProblem, _tool_call, decode_cell, is_hh, parse_hh

ROLES = {"system", "user", "assistant", "tool"}
TASKS = ("sft", "preference", "unpaired", "prompt", "ranking")

# layout names, as reported by the loaders and `posttrain data inspect`
MESSAGES, PROMPT_COMPLETION, TEXT = "messages", "prompt/completion", "text"
EXPLICIT, IMPLICIT, PROMPT_AND_CONVERSATIONS = "prompt/chosen/rejected", "implicit prompt", "prompt + conversations"
HH, HH_PROMPT = "anthropic-hh", "anthropic-hh prompt"
RANKING, UNPAIRED, PROMPT_ONLY = "ranking", "prompt/completion/label", "prompt"


@dataclass
class ReadOptions:
    """How ambiguous records are read, and the config keys hints name (they differ per command)."""

    format: str = "auto"          # auto | hh | plain
    prompt_from: str = "auto"     # auto | shared | column
    scores_as_margin: bool = False
    prefix: str | None = "data."  # prefix of the command's data keys (columns, split); None: it has none
    keys: tuple[str, ...] = ("format", "prompt_from", "scores_as_margin")  # which of these the command has

    def columns_hint(self, ours: str = "ours") -> str:
        if self.prefix is None:
            return f"rename your column to '{ours}'" if ours != "ours" else "rename your columns to ours"
        return f"map yours with {self.prefix}columns={{yours: {ours}}}"

    def override(self, key: str, value: str, what: str) -> str:
        return "" if self.prefix is None or key not in self.keys else f" ({self.prefix}{key}={value} {what})"


@dataclass
class Reading:
    record: dict
    layout: str
    notes: set[str] = field(default_factory=set)  # readings worth one line: see note_text


def note_text(note: str, opts: ReadOptions) -> str:
    """The one line that states a reading, and how to override it."""
    return {
        "decoded": "cells holding the text of a message list were decoded (JSON or Python literal)",
        "hh": "strings in Anthropic HH form ('\\n\\nHuman: ...\\n\\nAssistant: ...') were read as "
              "conversations; the prompt is every turn before the last assistant turn"
              + opts.override("format", "plain", "reads them as plain text"),
        "prompt_differs": "the prompt column differs from the turns chosen and rejected share; the shared "
                          "turns were used as the prompt" + opts.override("prompt_from", "column", "uses the column"),
        "shared_prompt": "chosen/rejected conversations already hold the prompt turns, so the prompt column "
                         "was not added again" + opts.override("prompt_from", "column", "adds it"),
        "scores": "score_chosen/score_rejected are kept as metadata"
                  + opts.override("scores_as_margin", "true", "uses their difference as the margin"),
    }[note]


# ----------------------------------------------------------------------------- cells


# ----------------------------------------------------------------------------- messages


def check_messages(value: Any, name: str, need_assistant: bool) -> list[dict]:
    """Validated copy of a message list (tool calls normalised; empty tool-call content -> "")."""
    if not isinstance(value, list) or not value:
        raise RowProblem(f"{name}: expected a non-empty list of {{role, content}} messages")
    out = []
    for j, m in enumerate(value):
        where = f"{name}[{j}]"
        if not isinstance(m, dict) or "role" not in m:
            raise RowProblem(f"{where}: expected an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise RowProblem(f"{where}.role: '{m['role']}' is not one of {sorted(ROLES)}")
        m = dict(m)
        calls = m.get("tool_calls")
        if calls is not None:
            if m["role"] != "assistant" or not isinstance(calls, list):
                raise RowProblem(f"{where}.tool_calls: expected a list on an assistant message")
            m["tool_calls"] = [_tool_call(c, f"{where}.tool_calls[{k}]") for k, c in enumerate(calls)]
            if m.get("content") is None:
                m["content"] = ""
        elif "tool_calls" in m:
            del m["tool_calls"]
        if "content" not in m:
            raise RowProblem(f"{where}: expected an object with 'role' and 'content'")
        if not isinstance(m["content"], str):
            kind = "a list of content parts" if isinstance(m["content"], list) else type(m["content"]).__name__
            raise RowProblem(f"{where}.content: expected a string, got {kind}")
        out.append(m)
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise RowProblem(f"{name}: no assistant message, so nothing would be trained")
    return out


def _text_or_messages(row: dict, name: str, *, required: bool = True, last_assistant: bool = False):
    v = row.get(name)
    if v is None:
        if required:
            raise RowProblem(f"{name}: missing")
        return None
    if isinstance(v, str):
        if not v.strip() and name == "prompt":
            raise RowProblem(f"{name}: empty string")
        return v
    if isinstance(v, list):
        msgs = check_messages(v, name, need_assistant=False)
        if last_assistant and msgs[-1]["role"] != "assistant":
            raise RowProblem(f"{name}: the last message must be the assistant's response, got "
                             f"'{msgs[-1]['role']}'")
        return msgs
    raise RowProblem(f"{name}: expected a string or a message list, got {type(v).__name__}")


def common_prefix(a: list[dict], b: list[dict]) -> int:
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return k


def strip_repeated_prompt(prompt, conversation: list[dict]) -> list[dict]:
    """``conversation`` without the leading turns that repeat ``prompt`` (a prompt string repeats a
    conversation's first user turn; a prompt list its leading messages)."""
    if isinstance(prompt, list):
        k = len(prompt)
        return conversation[k:] if conversation[:k] == prompt else conversation
    head = [m for m in conversation if m["role"] == "system"]
    rest = conversation[len(head):] if conversation[:len(head)] == head else conversation
    if rest and rest[0]["role"] == "user" and rest[0]["content"].strip() == str(prompt).strip():
        return rest[1:]
    return conversation


# ----------------------------------------------------------------------------- Anthropic HH


# ----------------------------------------------------------------------------- per task


def _number(row: dict, key: str) -> float | None:
    v = row.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise RowProblem(f"{key}: expected a number, got {v!r}")
    return float(v)


def _sft(row: dict, opts: ReadOptions, notes: set[str]) -> Reading:
    out = dict(row)
    if row.get("messages") is not None:
        out["messages"] = check_messages(decode_cell(row["messages"], "messages", True, notes), "messages",
                                         need_assistant=True)
        if row.get("tools") is not None:
            tools = decode_cell(row["tools"], "tools", True, notes)
            if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
                raise RowProblem("tools: expected a list of tool (function) schemas")
            out["tools"] = tools
        return Reading(out, MESSAGES, notes)
    if "prompt" in row or "completion" in row:
        for k in ("prompt", "completion"):
            out[k] = decode_cell(row.get(k), k, False, notes)
        prompt = _text_or_messages(out, "prompt")
        completion = _text_or_messages(out, "completion")
        if isinstance(completion, list):
            completion = strip_repeated_prompt(prompt, completion)
            if not any(m["role"] == "assistant" for m in completion):
                raise RowProblem("completion: no assistant message, so nothing would be trained")
        out.update(prompt=prompt, completion=completion)
        return Reading(out, PROMPT_COMPLETION, notes)
    if "text" in row:
        if not isinstance(row["text"], str) or not row["text"]:
            raise RowProblem("text: expected a non-empty string")
        return Reading(out, TEXT, notes)
    raise RowProblem(f"record: needs 'messages', 'prompt'+'completion', or 'text' (found columns: "
                     f"{', '.join(map(str, row)) or 'none'}; {opts.columns_hint()})")


def _preference(row: dict, opts: ReadOptions, notes: set[str]) -> Reading:
    out = dict(row)
    for k in ("prompt", "chosen", "rejected"):
        out[k] = decode_cell(row.get(k), k, False, notes)
    prompt, chosen, rejected = out.get("prompt"), out.get("chosen"), out.get("rejected")
    for k, v in (("chosen", chosen), ("rejected", rejected)):
        if v is None:
            raise RowProblem(f"{k}: missing")
    layout = None
    if opts.format == "hh" or (opts.format == "auto" and is_hh(chosen) and is_hh(rejected)):
        for k, v in (("chosen", chosen), ("rejected", rejected)):
            if not is_hh(v):
                raise RowProblem(f"{k}: not an Anthropic HH transcript ('\\n\\nHuman: ...\\n\\nAssistant: ...'), "
                                 "but the format is set to hh")
        chosen, rejected = parse_hh(chosen, "chosen"), parse_hh(rejected, "rejected")
        layout = HH
        notes.add("hh")
    elif (opts.format != "plain" and is_hh(prompt) and isinstance(chosen, str) and isinstance(rejected, str)
          and not is_hh(chosen)):
        prompt, chosen, rejected = parse_hh(prompt, "prompt"), chosen.strip(), rejected.strip()
        layout = HH_PROMPT
        notes.add("hh")
    tmp = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    chosen = _text_or_messages(tmp, "chosen")
    rejected = _text_or_messages(tmp, "rejected")
    if isinstance(chosen, list) != isinstance(rejected, list):
        raise RowProblem("chosen/rejected: one is a string and the other a message list; give both in one form")
    if isinstance(chosen, list):
        k = common_prefix(chosen, rejected)
        if k == len(chosen) and k == len(rejected):
            raise RowProblem("chosen/rejected: the two conversations are identical, so the pair carries no preference")
        if k > 0 and not (opts.prompt_from == "column" and prompt is not None):
            for name, rest in (("chosen", chosen[k:]), ("rejected", rejected[k:])):
                if len(rest) != 1 or rest[0]["role"] != "assistant":
                    raise RowProblem(
                        f"{name}: chosen and rejected first differ at message {k + 1}, which leaves "
                        f"{len(rest)} message(s) after the shared turns where one assistant response is "
                        "needed; give a prompt column with one-turn responses")
            shared = chosen[:k]
            if prompt is not None and opts.prompt_from == "auto":
                p = _text_or_messages(tmp, "prompt")
                same = p == shared or (isinstance(p, str) and any(
                    m["role"] == "user" and m["content"].strip() == p.strip() for m in shared))
                notes.add("shared_prompt" if same else "prompt_differs")
            layout = layout or (IMPLICIT if prompt is None else PROMPT_AND_CONVERSATIONS)
            prompt, chosen, rejected = shared, chosen[k:], rejected[k:]
        elif prompt is None:
            raise RowProblem("prompt: missing, and chosen/rejected share no leading turns to take it from")
        else:
            for name, msgs in (("chosen", chosen), ("rejected", rejected)):
                if msgs[-1]["role"] != "assistant":
                    raise RowProblem(f"{name}: the last message must be the assistant's response")
    elif prompt is None:
        raise RowProblem("prompt: missing (only conversations that share their leading turns, or Anthropic HH "
                         f"transcripts, may leave it out; {opts.columns_hint('prompt')})")
    tmp["prompt"] = prompt
    prompt = _text_or_messages(tmp, "prompt")
    for key in ("margin", "strength"):
        _number(row, key)
    if row.get("tie") is not None and not isinstance(row["tie"], bool):
        raise RowProblem(f"tie: expected true/false, got {row['tie']!r}")
    sc, sr = _number(row, "score_chosen"), _number(row, "score_rejected")
    if sc is not None or sr is not None:
        if opts.scores_as_margin:
            if sc is None or sr is None:
                raise RowProblem(f"score_{'rejected' if sc is not None else 'chosen'}: missing, but the scores "
                                 "are used as the margin (scores_as_margin)")
            out["margin"] = sc - sr
        else:
            notes.add("scores")
    out.update(prompt=prompt, chosen=chosen, rejected=rejected)
    return Reading(out, layout or EXPLICIT, notes)


def _ranking(row: dict, opts: ReadOptions, notes: set[str]) -> Reading:
    out = dict(row)
    out["prompt"] = decode_cell(row.get("prompt"), "prompt", False, notes)
    resp = decode_cell(row.get("responses"), "responses", True, notes)
    rank = decode_cell(row.get("ranking"), "ranking", True, notes)
    out["prompt"] = _text_or_messages(out, "prompt")
    if not isinstance(resp, list) or len(resp) < 2:
        raise RowProblem("responses: expected a list of at least 2 responses")
    resp = [decode_cell(r, f"responses[{i}]", False, notes) for i, r in enumerate(resp)]
    for i, r in enumerate(resp):
        if isinstance(r, list):
            resp[i] = check_messages(r, f"responses[{i}]", need_assistant=True)
        elif not isinstance(r, str):
            raise RowProblem("responses: every response must be a string or a message list")
    if not isinstance(rank, list) or len(rank) != len(resp):
        raise RowProblem(f"ranking: expected one rank per response ({len(resp)}), got {rank!r}")
    if not all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in rank):
        raise RowProblem("ranking: ranks must be numbers (1 = best; equal ranks are ties)")
    if len(set(rank)) == 1:
        raise RowProblem("ranking: all responses share one rank, so the record carries no preference")
    out.update(responses=resp, ranking=rank)
    return Reading(out, RANKING, notes)


def _unpaired(row: dict, opts: ReadOptions, notes: set[str]) -> Reading:
    out = dict(row)
    for k in ("prompt", "completion"):
        out[k] = decode_cell(row.get(k), k, False, notes)
    completion = _text_or_messages(out, "completion")
    if out.get("prompt") is None and isinstance(completion, list) and len(completion) > 1:
        prompt, completion = completion[:-1], completion[-1:]  # implicit prompt: all but the last turn
    else:
        prompt = _text_or_messages(out, "prompt")
    if isinstance(completion, list):
        completion = strip_repeated_prompt(prompt, completion)
        if not completion or completion[-1]["role"] != "assistant":
            raise RowProblem("completion: the last message must be the assistant's response")
    if not isinstance(row.get("label"), bool):
        raise RowProblem(f"label: expected true/false, got {row.get('label')!r}")
    out.update(prompt=prompt, completion=completion)
    return Reading(out, UNPAIRED, notes)


def _prompt(row: dict, opts: ReadOptions, notes: set[str]) -> Reading:
    out = dict(row)
    out["prompt"] = decode_cell(row.get("prompt"), "prompt", False, notes)
    if out["prompt"] is None and row.get("messages") is not None:  # a conversation without its answer
        msgs = check_messages(decode_cell(row["messages"], "messages", True, notes), "messages", False)
        out["prompt"] = msgs[:-1] if msgs[-1]["role"] == "assistant" and len(msgs) > 1 else msgs
    layout = PROMPT_ONLY
    if out["prompt"] is None:
        raise RowProblem(f"prompt: missing ({opts.columns_hint('prompt')})")
    if opts.format == "hh" and not is_hh(out["prompt"]):
        raise RowProblem("prompt: not an Anthropic HH transcript, but the format is set to hh")
    if opts.format != "plain" and is_hh(out["prompt"]):
        out["prompt"] = parse_hh(out["prompt"], "prompt")
        layout = HH_PROMPT
        notes.add("hh")
    out["prompt"] = _text_or_messages(out, "prompt")
    return Reading(out, layout, notes)


READERS = {"sft": _sft, "preference": _preference, "ranking": _ranking, "unpaired": _unpaired, "prompt": _prompt}


def read_record(row: Any, task: str, opts: ReadOptions | None = None) -> Reading:
    """The canonical record of ``row`` for ``task``; raises :class:`RowProblem`."""
    if not isinstance(row, dict):
        raise RowProblem(f"record: expected an object, got {type(row).__name__}")
    return READERS[task](row, opts or ReadOptions(), set())
