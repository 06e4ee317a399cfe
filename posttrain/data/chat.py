"""Chat templating and loss masks.

Token masks come from rendering the conversation turn by turn with the tokenizer's own template:
the text an assistant turn adds (its content and end-of-turn token) is the span between
``template(messages[:i], add_generation_prompt=True)`` and ``template(messages[:i+1])``; tokens whose
character offsets fall in such a span are trained. System and user turns and the template's glue
are masked. This works for any template whose rendering of a prefix is a prefix of the whole
(ChatML, Llama 3, Qwen, ...); one that rewrites earlier turns is reported as an error.

Tokenizers without a template get :data:`DEFAULT_TEMPLATE` (ChatML-style markers as plain text and
the tokenizer's EOS after each assistant turn).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from posttrain.errors import DataError

DEFAULT_TEMPLATE = (
    "{% if tools %}{{ '<|tools|>\n' + (tools | tojson) + '\n' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + (message['content'] or '') }}"
    "{% for call in message['tool_calls'] or [] %}"
    "{{ '<tool_call>' + ({'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson)"
    " + '</tool_call>' }}{% endfor %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@dataclass
class Example:
    """One tokenized sequence; ``loss_mask[t] = 1`` when token t is a training target."""

    input_ids: list[int]
    loss_mask: list[int]
    truncated: bool = False   # tokens were cut (after any whole turns were dropped)
    dropped_turns: int = 0    # whole earliest turns left out to fit max_length

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_trained(self) -> int:
        return sum(self.loss_mask)


def ensure_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_TEMPLATE


def as_messages(value, role: str) -> list[dict]:
    return value if isinstance(value, list) else [{"role": role, "content": value}]


def record_messages(record: dict) -> tuple[list[dict] | None, str | None]:
    """SFT record -> (messages, None) or (None, text) for raw-text records."""
    if record.get("messages") is not None:
        return record["messages"], None
    if "prompt" in record:
        return as_messages(record["prompt"], "user") + as_messages(record["completion"], "assistant"), None
    return None, record["text"]


def _render(tokenizer, messages, add_generation_prompt=False, tools=None) -> str:
    kw = {"tools": tools} if tools else {}
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=add_generation_prompt, **kw)


def encode_chat(tokenizer, messages: list[dict],
                train: Literal["all_assistant", "last_assistant"] = "all_assistant", tools=None) -> Example:
    """Tokenize a conversation; train every assistant turn (or only the last one). ``tools`` (function
    schemas) go to the chat template; an assistant turn's tool calls are trained like its text."""
    ensure_template(tokenizer)
    full = _render(tokenizer, messages, tools=tools)
    spans = []
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if train == "last_assistant":
        turns = turns[-1:]
    for i in turns:
        start = len(_render(tokenizer, messages[:i], add_generation_prompt=True, tools=tools))
        upto = _render(tokenizer, messages[: i + 1], tools=tools)
        if not full.startswith(upto) or not upto.startswith(full[:start]):
            raise DataError("the chat template renders earlier turns differently once later turns "
                            "are added, so assistant tokens cannot be located",
                            where="tokenizer chat template",
                            fix="use a template whose prefix renderings are stable, or train on "
                                "prompt/completion records")
        end = len(upto.rstrip())  # the turn's trailing newline is template glue, not a target
        spans.append((start, end))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(a < e and b > s for s, e in spans) and b > a) for a, b in enc["offset_mapping"]]
    return Example(list(enc["input_ids"]), mask)


def encode_text(tokenizer, text: str) -> Example:
    """Plain text (continued pretraining style): every token trained, EOS appended."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    return Example(ids, [1] * len(ids))


def encode_prompt(tokenizer, prompt) -> list[int]:
    """Prompt ids ending in the assistant header, ready for generation."""
    ensure_template(tokenizer)
    text = _render(tokenizer, as_messages(prompt, "user"), add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_response(tokenizer, prompt, response) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) where response ids include the end-of-turn token."""
    ex = encode_chat(tokenizer, as_messages(prompt, "user") + as_messages(response, "assistant"),
                     train="last_assistant")
    first = ex.loss_mask.index(1) if 1 in ex.loss_mask else len(ex.input_ids)
    last = len(ex.loss_mask) - ex.loss_mask[::-1].index(1) if 1 in ex.loss_mask else first
    return ex.input_ids[:first], ex.input_ids[first:last]


def split_implicit_prompt(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], dict, dict]:
    """Implicit-prompt preference records: shared prefix -> prompt; last turns -> responses."""
    if chosen[:-1] != rejected[:-1] or chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise DataError("chosen and rejected conversations must share every turn but the last "
                        "assistant turn", where="chosen/rejected",
                        fix="give an explicit 'prompt' column")
    return chosen[:-1], chosen[-1], rejected[-1]


def turns(messages: list[dict]) -> tuple[list[dict], list[list[dict]]]:
    """(leading system messages, turns): a turn starts at a user message and runs to the next one."""
    k = 0
    while k < len(messages) and messages[k]["role"] == "system":
        k += 1
    out: list[list[dict]] = []
    for m in messages[k:]:
        if m["role"] == "user" or not out:
            out.append([])
        out[-1].append(m)
    return messages[:k], out


def drop_early_turns(messages: list[dict], fits) -> tuple[list[dict], int]:
    """Leave out whole earliest turns until ``fits(messages)``; system messages and the last turn stay."""
    system, ts = turns(messages)
    dropped = 0
    while len(ts) > 1 and not fits(system + [m for t in ts for m in t]):
        ts = ts[1:]
        dropped += 1
    return system + [m for t in ts for m in t], dropped


def truncate(ex: Example, max_length: int) -> Example:
    """Token-level truncation: drop prompt tokens from the start (before the first trained token),
    then tokens from the end."""
    over = len(ex) - max_length
    if over <= 0:
        return ex
    first = ex.loss_mask.index(1) if 1 in ex.loss_mask else len(ex)
    cut = min(over, first)
    ids, mask = ex.input_ids[cut:][:max_length], ex.loss_mask[cut:][:max_length]
    return Example(ids, mask, truncated=True, dropped_turns=ex.dropped_turns)


def encode_sft(tokenizer, record: dict, max_length: int) -> Example:
    """An SFT record as trained tokens within ``max_length``: a conversation first loses whole
    earliest turns (system messages and the final turn are kept), then :func:`truncate` applies."""
    messages, text = record_messages(record)
    if messages is None:
        return truncate(encode_text(tokenizer, text), max_length)
    tools = record.get("tools")
    ex = encode_chat(tokenizer, messages, tools=tools)
    if len(ex) > max_length:
        messages, dropped = drop_early_turns(
            messages, lambda m: len(encode_chat(tokenizer, m, tools=tools)) <= max_length)
        if dropped:
            ex = encode_chat(tokenizer, messages, tools=tools)
            ex.dropped_turns, ex.truncated = dropped, True
    return truncate(ex, max_length)


def truncation_counts(examples: list[Example]) -> dict[str, int]:
    """What truncation did, for summary.json."""
    return {"truncated_examples": sum(e.truncated for e in examples),
            "dropped_turns": sum(e.dropped_turns for e in examples),
            "dropped_examples": sum(e.n_trained == 0 for e in examples)}
