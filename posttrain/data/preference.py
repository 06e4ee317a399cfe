"""Preference data for the reward-model and direct-alignment commands: encoding pairs, rankings and
unpaired records into token ids, and per-sequence reductions of a packed batch.

Every response is tokenized as ``prompt ids + response ids`` with the tokenizer's chat template
(``chat.encode_response``: the response ids end with the end-of-turn token), so a reward model, a
DPO policy and the reward scorer used in RL all see exactly the same tokens for the same text.
Chosen and rejected responses of a batch go into ONE packed forward pass: the micro-batch's examples
are ``[chosen_0..chosen_{n-1}, rejected_0..rejected_{n-1}]`` and ``seq_index`` tells them apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from posttrain.data.batching import collate, pack_shared
from posttrain.data.chat import (
    Example,
    as_messages,
    drop_early_turns,
    encode_response,
    split_implicit_prompt,
)
from posttrain.data.formats import check_row, load_records
from posttrain.errors import DataError


@dataclass
class Encoded:
    """One record as token ids: a prompt and K >= 1 responses (K = 2 for a pair: chosen, rejected)."""

    prompt_ids: list[int]
    responses: list[list[int]]
    ranks: list[float] = field(default_factory=list)  # per response, lower = better
    margin: float = 0.0
    tie: bool = False
    label: bool | None = None  # unpaired (KTO) records
    prompt: object = None  # original prompt (text or messages), for gold rewards / length baselines
    texts: list = field(default_factory=list)  # original responses
    subset: str | None = None
    truncated: bool = False  # tokens were cut to fit max_length
    dropped_turns: int = 0   # whole earliest prompt turns left out to fit max_length

    def example(self, k: int) -> Example:
        ids = self.responses[k]
        return Example(self.prompt_ids + ids, [0] * len(self.prompt_ids) + [1] * len(ids))


def split_record(record: dict) -> tuple[object, object, object]:
    """(prompt, chosen, rejected) of an explicit- or implicit-prompt preference record."""
    if record.get("prompt") is not None:
        return record["prompt"], record["chosen"], record["rejected"]
    prompt, chosen, rejected = split_implicit_prompt(record["chosen"], record["rejected"])
    return prompt, [chosen], [rejected]


def _fit(prompt_ids: list[int], responses: list[list[int]], max_length: int) -> tuple[list[int], list[list[int]]]:
    """Token-level truncation: drop prompt tokens from the start first, leaving at least one prompt
    token when possible, then cut responses from the end."""
    longest = max(len(r) for r in responses)
    over = len(prompt_ids) + longest - max_length
    if over > 0:
        cut = min(over, max(len(prompt_ids) - 1, 0))
        prompt_ids = prompt_ids[cut:]
        room = max_length - len(prompt_ids)
        responses = [r[:room] for r in responses]
    return prompt_ids, responses


def _encode_all(tokenizer, prompt, responses: list) -> tuple[list[int], list[list[int]]]:
    p_ids, outs = None, []
    for resp in responses:
        p, r = encode_response(tokenizer, prompt, resp)
        if p_ids is None:
            p_ids = p
        elif p != p_ids:  # the template renders the prompt differently per response: keep each own
            raise DataError("the chat template renders the prompt differently depending on the response",
                            where="tokenizer chat template", fix="use a template with a stable prompt prefix")
        if not r:
            raise DataError("a response encodes to no tokens", where="data")
        outs.append(r)
    return p_ids, outs


def encode_responses(tokenizer, prompt, responses: list, max_length: int, stats: dict | None = None
                     ) -> tuple[list[int], list[list[int]]]:
    """Prompt ids and response ids within ``max_length``. A conversation prompt first loses whole
    earliest turns (system messages and the latest turn stay), then ``_fit`` cuts tokens.
    ``stats`` receives ``truncated`` / ``dropped_turns``."""
    p_ids, outs = _encode_all(tokenizer, prompt, responses)
    longest = max(len(r) for r in outs)
    dropped = 0
    if len(p_ids) + longest > max_length and isinstance(prompt, list):
        prompt, dropped = drop_early_turns(
            prompt, lambda m: len(_encode_all(tokenizer, m, responses[:1])[0]) + longest <= max_length)
        if dropped:
            p_ids, outs = _encode_all(tokenizer, prompt, responses)
    fitted = _fit(p_ids, outs, max_length)
    if stats is not None:
        stats["dropped_turns"] = dropped
        stats["truncated"] = bool(dropped) or len(fitted[0]) < len(p_ids) or any(
            len(a) < len(b) for a, b in zip(fitted[1], outs))
    return fitted


def encode_pair(tokenizer, record: dict, max_length: int,
                margin_key: tuple[str, ...] = ("margin", "strength")) -> Encoded:
    prompt, chosen, rejected = split_record(record)
    st: dict = {}
    p_ids, (c_ids, r_ids) = encode_responses(tokenizer, prompt, [chosen, rejected], max_length, st)
    margin = next((float(record[k]) for k in margin_key if record.get(k) is not None), 0.0)
    tie = bool(record.get("tie", False))
    return Encoded(p_ids, [c_ids, r_ids], ranks=[0.0, 0.0] if tie else [0.0, 1.0], margin=margin, tie=tie,
                   prompt=prompt, texts=[chosen, rejected], subset=record.get("subset"), **st)


def encode_ranking(tokenizer, record: dict, max_length: int) -> Encoded:
    st: dict = {}
    p_ids, outs = encode_responses(tokenizer, record["prompt"], list(record["responses"]), max_length, st)
    return Encoded(p_ids, outs, ranks=[float(r) for r in record["ranking"]], prompt=record["prompt"],
                   texts=list(record["responses"]), subset=record.get("subset"), **st)


def encode_unpaired(tokenizer, record: dict, max_length: int) -> Encoded:
    st: dict = {}
    p_ids, (c_ids,) = encode_responses(tokenizer, record["prompt"], [record["completion"]], max_length, st)
    return Encoded(p_ids, [c_ids], label=bool(record["label"]), prompt=record["prompt"],
                   texts=[record["completion"]], **st)


def truncation_counts(encs: list[Encoded]) -> dict[str, int]:
    return {"truncated_records": sum(e.truncated for e in encs), "dropped_turns": sum(e.dropped_turns for e in encs)}


def check_ranking_row(row: dict) -> str | None:
    """'field: problem' for a K-wise ranking record {"prompt", "responses": [...], "ranking": [...]}."""
    return check_row(row, "ranking")


def unpair(records: list[dict]) -> list[dict]:
    """Paired preference records -> unpaired ones: chosen is desirable, rejected undesirable (the
    conversion TRL's KTO applies to paired data)."""
    out = []
    for r in records:
        if r.get("tie"):
            continue  # a tie says nothing about either response's desirability
        prompt, chosen, rejected = split_record(r)
        out.append({"prompt": prompt, "completion": chosen, "label": True})
        out.append({"prompt": prompt, "completion": rejected, "label": False})
    return out


def is_paired(rows: list[dict]) -> bool:
    return bool(rows) and "chosen" in rows[0] and "rejected" in rows[0]


def is_ranking(rows: list[dict]) -> bool:
    return bool(rows) and "responses" in rows[0] and "ranking" in rows[0]


def response_chars(text) -> int:
    return sum(len(m["content"]) for m in as_messages(text, "assistant"))


# ----------------------------------------------------------------------------- packed reductions


# ----------------------------------------------------------------------------- loading and batching


def load_preference_rows(source: str, *, columns: dict[str, str] | None = None, split: str = "train",
                         max_rows: int | None = None, max_errors: int = 20, allow_rankings: bool = True,
                         options=None) -> list[dict]:
    """Preference pairs ({"prompt", "chosen", "rejected"} in any layout docs/data.md lists, with optional
    margin, tie, subset) or K-wise rankings ({"prompt", "responses", "ranking"}); the first record
    decides which. Bad rows raise one DataError naming file:line: field."""
    return load_records(source, "preference", columns=columns, split=split, max_rows=max_rows,
                        max_errors=max_errors, options=options, allow_rankings=allow_rankings)


def collate_responses(encs: list[Encoded], *, packing: bool, pad_id: int) -> dict:
    """One packed forward for every response of every record.

    Adds to ``collate``'s batch: ``slot`` [N, K] (sequence index of record i's response k, -1 when
    record i has fewer responses), ``ranks`` [N, K] (lower = better, +inf on empty slots), ``margin``
    [N], ``tie`` [N] bool, ``label`` [N] bool (unpaired records) and ``n_records``. For pairs
    (K = 2) the sequences are ordered chosen_0..chosen_{N-1}, rejected_0..rejected_{N-1}, so
    ``rewards[:N]`` / ``rewards[N:]`` are the chosen / rejected halves."""
    K = max(len(e.responses) for e in encs)
    N = len(encs)
    slot = torch.full((N, K), -1, dtype=torch.long)
    exs: list[Example] = []
    # response-major order: slot k of every record, then slot k+1 (pairs: all chosen, then all rejected)
    for k in range(K):
        for i, e in enumerate(encs):
            if k < len(e.responses):
                slot[i, k] = len(exs)
                exs.append(e.example(k))
    batch = collate(exs, packing=packing, pad_id=pad_id)
    ranks = torch.full((N, K), float("inf"))
    for i, e in enumerate(encs):
        if e.ranks:
            ranks[i, :len(e.ranks)] = torch.tensor(e.ranks, dtype=torch.float)
    batch.update(slot=slot, ranks=ranks, margin=torch.tensor([e.margin for e in encs], dtype=torch.float),
                 tie=torch.tensor([e.tie for e in encs]),
                 label=torch.tensor([bool(e.label) for e in encs]), n_records=torch.tensor(N))
    return batch


def count_records(batch: dict) -> torch.Tensor:
    return batch["n_records"].float()


def by_slot(values: torch.Tensor, batch: dict, fill: float = 0.0) -> torch.Tensor:
    """[n_seqs] per-sequence values -> [N, K] per record and response slot (``fill`` on empty slots)."""
    slot = batch["slot"]
    out = values[slot.clamp(min=0)]
    return out.masked_fill(slot < 0, fill)


def micro_batches_of(encs: list[Encoded], micro: int, shared_prompt: bool = False, **kw) -> list[dict]:
    return [batch_records(encs[s:s + micro], shared_prompt=shared_prompt, **kw) for s in range(0, len(encs), micro)]


# ----------------------------------------------------------------------------- shared prompt


def collate_shared(encs: list[Encoded], *, pad_id: int) -> dict:
    """Like :func:`collate_responses`, but each record's prompt is computed ONCE: a record is laid
    out as ``[prompt | response_0 | response_1 | ...]`` in the packed row (``batching.pack_shared``);
    a response token attends to its prompt and to earlier tokens of its own response only, at the
    positions it would have alone. Saves the prompt's tokens K − 1 times per record.

    Log-probs need one change: the first token of response k is predicted from the prompt's last
    position, not from the token before it in the row. The batch therefore carries explicit
    ``src`` (predicting position) / ``tgt`` (target token) flat indices and ``tgt_seq`` (which
    sequence, numbered like ``collate_responses``: slot k of record i is k * N + i), plus ``last_pos``
    (each sequence's last non-pad token, for reward heads)."""
    N, K = len(encs), max(len(e.responses) for e in encs)
    packed = pack_shared([e.prompt_ids for e in encs], [e.responses for e in encs], pad_id)
    T = packed["input_ids"].shape[1]
    seq_index = torch.full((T,), -2, dtype=torch.long)  # prompt tokens belong to no sequence (-2)
    seq_index[T - packed["n_pad"]:] = -1  # row padding
    slot = torch.full((N, K), -1, dtype=torch.long)
    src, tgt, tgt_seq = [], [], []
    last = torch.zeros(N * K, dtype=torch.long)
    for i, e in enumerate(encs):
        prompt_end = packed["prompt_start"][i] + len(e.prompt_ids) - 1
        for k, (resp, c0) in enumerate(zip(e.responses, packed["branch_start"][i])):
            n, seq = len(resp), k * N + i
            slot[i, k] = seq
            seq_index[c0:c0 + n] = seq
            flat = list(range(c0, c0 + n))
            src += [prompt_end] + flat[:-1]
            tgt += flat
            tgt_seq += [seq] * n
            keep = [f for f, tok in zip(flat, resp) if tok != pad_id]
            last[seq] = (keep or flat)[-1]
    ranks = torch.full((N, K), float("inf"))
    for i, e in enumerate(encs):
        if e.ranks:
            ranks[i, :len(e.ranks)] = torch.tensor(e.ranks, dtype=torch.float)
    return {"input_ids": packed["input_ids"], "position_ids": packed["position_ids"],
            "attn_layout": packed["attn_layout"], "seq_index": seq_index[None],
            "loss_mask": (seq_index >= 0).long()[None], "src": torch.tensor(src), "tgt": torch.tensor(tgt),
            "tgt_seq": torch.tensor(tgt_seq), "last_pos": last,
            "n_seqs": torch.tensor(N * K), "n_pad": torch.tensor(packed["n_pad"]), "slot": slot, "ranks": ranks,
            "margin": torch.tensor([e.margin for e in encs], dtype=torch.float),
            "tie": torch.tensor([e.tie for e in encs]), "label": torch.tensor([bool(e.label) for e in encs]),
            "n_records": torch.tensor(N)}


def batch_records(encs: list[Encoded], *, shared_prompt: bool, packing: bool, pad_id: int) -> dict:
    """The micro-batch of ``encs``: prompt shared across responses (packed) or one sequence each."""
    if shared_prompt:
        if any(len(e.responses) != len(encs[0].responses) for e in encs):
            # slots must be dense for k * N + i numbering; rankings of mixed K use separate sequences
            return collate_responses(encs, packing=packing, pad_id=pad_id)
        return collate_shared(encs, pad_id=pad_id)
    return collate_responses(encs, packing=packing, pad_id=pad_id)
