"""Batches without compute on padding: packing with isolated sequences, or padding.

Packing concatenates a micro-batch's sequences into ONE row with no padding at all: every linear layer
(most of the compute) sees exactly the real tokens. ``position_ids`` restart at each sequence, and an
:class:`AttentionLayout` says which tokens attend to which; the model's attention
(``posttrain.models.attention``) gathers each sequence's queries, keys and values into length buckets
and runs SDPA's fused causal kernel on them, so no token attends across a sequence boundary and no
dense T x T mask is built. Transformers' own packing detection is not relied on: it silently attends
across sequences whenever a KV cache or a 2-D mask is present (see docs/data.md, Packing).

Every batch carries ``seq_index`` ([R, L], -1 on padding) so per-sequence quantities (sequence
log-probs, per-sequence losses) can be reduced from a packed batch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import torch

from posttrain.data.chat import Example
from posttrain.errors import ConfigError, DataError

# A bucket holds attention sequences at least this fraction of its longest one: its padding (inside
# attention only) stays under 1 - BUCKET_FILL per sequence, with a handful of kernel calls per layer.
BUCKET_FILL = 0.75


@dataclass(frozen=True)
class Bucket:
    """Attention sequences of similar length, attended by one SDPA call.

    ``keys`` [n, Lk]: each sequence's row positions, right-padded with position 0 (a padded slot
    comes after every real slot, so no real query sees it). ``q_start`` [n]: the sequence's first
    *query* slot; the slots before it are keys only (a shared prompt whose own outputs come from
    another sequence). ``queries`` [n, Lq] (row positions of slots ``q_start..``, right-padded) and
    ``mask`` [n, 1, Lq, Lk] (query i sees key slots j <= q_start + i) are None when every q_start is
    0: the queries are then the keys and the fused causal kernel needs no mask.
    """

    keys: torch.Tensor
    q_start: torch.Tensor
    queries: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    @property
    def n_queries(self) -> int:
        return (self.keys if self.queries is None else self.queries).shape[1]

    def to(self, device) -> "Bucket":
        move = (lambda t: None if t is None else t.to(device))
        return Bucket(self.keys.to(device), self.q_start.to(device), move(self.queries), move(self.mask))


@dataclass(frozen=True)
class AttentionLayout:
    """Who attends to whom in a packed row of T tokens.

    An *attention sequence* is an ordered list of row positions attended causally: a plain packed
    sequence is its own tokens; a response that shares a prompt is the prompt's positions followed by
    its own (the prompt is stored once in the row and appears in every response's sequence as keys;
    its queries are computed once, in a sequence of the prompt alone).

    ``buckets``: the sequences grouped into :class:`Bucket` s. ``out`` is [T]: for each row token,
    the query slot (flat index over the concatenated [n_b * Lq_b] bucket queries) whose attention
    output becomes that token's output.
    """

    buckets: tuple[Bucket, ...]
    out: torch.Tensor

    def to(self, device) -> "AttentionLayout":
        return AttentionLayout(tuple(b.to(device) for b in self.buckets), self.out.to(device))

    def dense_mask(self) -> torch.Tensor:
        """[T, T] boolean mask (True = query t may attend key s) equal to this layout, for attention
        backends without the packed path (slower: the whole row's T x T scores are computed)."""
        T = self.out.numel()
        mask = torch.zeros(T, T, dtype=torch.bool)
        offset = 0
        for b in self.buckets:
            (n, Lk), Lq = b.keys.shape, b.n_queries
            mine = ((self.out >= offset) & (self.out < offset + n * Lq)).nonzero().squeeze(1)
            seq, i = (self.out[mine] - offset).div(Lq, rounding_mode="floor"), (self.out[mine] - offset) % Lq
            keep = torch.arange(Lk)[None] <= (b.q_start[seq] + i)[:, None]  # causal within the sequence
            mask[mine[:, None].expand(-1, Lk)[keep], b.keys[seq][keep]] = True
            offset += n * Lq
        return mask


def attention_layout(seqs: Sequence[torch.Tensor], out_seq: torch.Tensor, out_pos: torch.Tensor,
                     q_start: Sequence[int] | None = None) -> AttentionLayout:
    """Bucket attention sequences (row positions, see :class:`AttentionLayout`) by kind and length;
    token t's output is query ``out_pos[t]`` of sequence ``out_seq[t]``, counted from the sequence's
    ``q_start`` (default 0: every slot is a query)."""
    q0 = [0] * len(seqs) if q_start is None else list(q_start)
    order = sorted(range(len(seqs)), key=lambda s: (q0[s] > 0, -len(seqs[s])))
    groups: list[list[int]] = []
    for s in order:
        g = groups[-1] if groups else None
        if g and (q0[g[0]] > 0) == (q0[s] > 0) and len(seqs[s]) >= BUCKET_FILL * len(seqs[g[0]]):
            g.append(s)
        else:
            groups.append([s])
    first_slot = torch.zeros(len(seqs), dtype=torch.long)
    buckets, offset = [], 0
    for g in groups:
        Lk, Lq = len(seqs[g[0]]), max(len(seqs[s]) - q0[s] for s in g)
        keys = torch.zeros(len(g), Lk, dtype=torch.long)
        for r, s in enumerate(g):
            keys[r, :len(seqs[s])] = seqs[s]
        starts = torch.tensor([q0[s] for s in g], dtype=torch.long)
        if q0[g[0]] == 0:
            buckets.append(Bucket(keys, starts))
        else:
            slot = (starts[:, None] + torch.arange(Lq)[None]).clamp(max=Lk - 1)  # padded queries repeat a slot
            mask = torch.arange(Lk)[None, None] <= (starts[:, None, None] + torch.arange(Lq)[None, :, None])
            buckets.append(Bucket(keys, starts, keys.gather(1, slot), mask[:, None]))
        for r, s in enumerate(g):
            first_slot[s] = offset + r * Lq
        offset += len(g) * Lq
    return AttentionLayout(tuple(buckets), first_slot[out_seq] + out_pos)


def to_device(obj, device):
    """A batch on ``device``: tensors and :class:`AttentionLayout` s moved (non-blocking where the copy
    allows it), dicts, lists and tuples rebuilt around them, anything else (ints, strings) unchanged.
    A tensor already there is returned as is. The one helper every trainer, reference pass, scorer and
    evaluation uses, so no path leaves a batch on the CPU while the model is on a GPU."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, AttentionLayout):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def row_padding(T: int) -> int:
    """Pad tokens that round a packed row of T tokens up to a multiple of 2^(bits(T) - 5): at most
    1/16 extra, and only 16 row lengths per doubling. Every new length makes oneDNN (bf16 matmuls
    on CPU) build and cache new kernels: with exact lengths a bf16 DPO run's memory grew by 300 MB
    in 40 steps; with rounded lengths it stays flat."""
    step = 1 << max(0, T.bit_length() - 5)
    return -T % step


def collate(examples: Sequence[Example], *, packing: bool, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Build one micro-batch.

    Packed: one row [1, T] of all sequences back to back, ``attn_layout`` (each sequence attends to
    itself only: :func:`pack_shared` with empty prompts), then ``row_padding`` pad tokens
    (``n_pad``). Not packed: one right-padded row per example and a 2-D ``attention_mask`` [R, L]. Both carry input_ids, position_ids, loss_mask and seq_index ([R, L],
    -1 on padding) plus ``n_seqs`` and ``n_pad``.
    """
    lengths = [len(e) for e in examples]
    if packing:
        packed = pack_shared([[]] * len(examples), [[e.input_ids] for e in examples], pad_id)
        pad = packed["n_pad"]
        loss_mask = torch.tensor([m for e in examples for m in e.loss_mask] + [0] * pad)[None]
        seq_index = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)] + [torch.full((pad,), -1)])
        return {"input_ids": packed["input_ids"], "position_ids": packed["position_ids"], "loss_mask": loss_mask,
                "seq_index": seq_index[None], "n_seqs": torch.tensor(len(examples)), "n_pad": torch.tensor(pad),
                "attn_layout": packed["attn_layout"]}
    R, width = len(examples), max(lengths)
    ids = torch.full((R, width), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((R, width), dtype=torch.long)
    seq_index = torch.full((R, width), -1, dtype=torch.long)
    for r, (e, n) in enumerate(zip(examples, lengths)):
        ids[r, :n] = torch.tensor(e.input_ids)
        loss_mask[r, :n] = torch.tensor(e.loss_mask)
        seq_index[r, :n] = r
    valid = seq_index >= 0
    pos = torch.arange(width).expand(R, width).clone()
    return {"input_ids": ids, "position_ids": pos, "loss_mask": loss_mask, "seq_index": seq_index,
            "n_seqs": torch.tensor(R), "n_pad": (~valid).sum(), "attention_mask": valid.long()}


def pack_shared(prompts: Sequence[Sequence[int]], branches: Sequence[Sequence[Sequence[int]]],
                pad_id: int = 0) -> dict:
    """One packed row of prompt-sharing trees: each prompt once, then its branches (responses or
    completions). A branch token attends to its prompt and to its own earlier tokens only, at
    positions continuing from the prompt's length, so it sees exactly what it would alone; a group
    of G branches of C tokens after a P-token prompt costs P + G*C tokens instead of G*(P + C) in the
    linear layers. In attention the prompt's queries are computed once (a sequence of the prompt
    alone) and each branch's sequence has the prompt as keys only (``q_start = P``).

    Returns ``input_ids``/``position_ids`` [1, T], ``attn_layout``, the flat row offsets
    ``prompt_start`` [n_trees] and ``branch_start`` (one list per tree), and ``n_pad`` (the
    ``row_padding`` tokens at the end of the row)."""
    ids: list[int] = []
    seqs, q_start, out_seq, out_pos, positions = [], [], [], [], []

    def add(keys: torch.Tensor, first_query: int) -> None:  # one attention sequence; its queries' outputs
        out_seq.append(torch.full((len(keys) - first_query,), len(seqs)))
        out_pos.append(torch.arange(len(keys) - first_query))
        positions.append(torch.arange(first_query, len(keys)))
        seqs.append(keys)
        q_start.append(first_query)

    prompt_start, branch_start = [], []
    for prompt, group in zip(prompts, branches):
        P, p0 = len(prompt), len(ids)
        prompt_start.append(p0)
        ids += prompt
        if P:
            add(torch.arange(p0, p0 + P), 0)
        starts = []
        for b in group:
            C, c0 = len(b), len(ids)
            starts.append(c0)
            ids += b
            if C:
                add(torch.cat([torch.arange(p0, p0 + P), torch.arange(c0, c0 + C)]), P)
        branch_start.append(starts)
    T = len(ids)
    pad = row_padding(T)
    if pad:  # the pad tokens: one more attention sequence of their own, never trained
        ids += [pad_id] * pad
        add(torch.arange(T, T + pad), 0)
    layout = attention_layout(seqs, torch.cat(out_seq), torch.cat(out_pos), q_start)
    return {"input_ids": torch.tensor(ids, dtype=torch.long)[None], "position_ids": torch.cat(positions)[None],
            "attn_layout": layout, "prompt_start": prompt_start, "branch_start": branch_start, "n_pad": pad}


def length_grouped_order(lengths: Sequence[int], batch_size: int, rng: random.Random) -> list[int]:
    """Shuffle, then sort within windows of 50 batches by length, so each batch holds similar
    lengths (less padding) while batch order stays random."""
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    window = batch_size * 50
    out = []
    for s in range(0, len(idx), window):
        out += sorted(idx[s:s + window], key=lambda i: -lengths[i])
    batches = [out[s:s + batch_size] for s in range(0, len(out), batch_size)]
    rng.shuffle(batches)
    return [i for b in batches for i in b]


class StepSampler:
    """Which examples form global batch number ``step``: a pure function of (seed, step), so the
    data position saved in a checkpoint is just the step and resuming replays nothing.

    Each epoch is a fresh seeded permutation (length-grouped when ``lengths`` is given); the last
    partial batch of an epoch is dropped so every step has the same global batch size.
    """

    def __init__(self, n: int, batch_size: int, seed: int, lengths: Sequence[int] | None = None):
        if n < batch_size:
            raise DataError(f"only {n} training examples for a global batch of {batch_size}",
                            where="data.train", fix=f"lower train.batch_size to at most {n} or add data")
        self.n, self.batch_size, self.seed, self.lengths = n, batch_size, seed, lengths
        self.steps_per_epoch = n // batch_size
        self._epoch, self._order = -1, []

    def _order_for(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            rng = random.Random(self.seed * 1_000_003 + epoch)
            if self.lengths is not None:
                self._order = length_grouped_order(self.lengths, self.batch_size, rng)
            else:
                self._order = list(range(self.n))
                rng.shuffle(self._order)
            self._epoch = epoch
        return self._order

    def batch(self, step: int) -> list[int]:
        epoch, k = divmod(step, self.steps_per_epoch)
        return self._order_for(epoch)[k * self.batch_size:(k + 1) * self.batch_size]


def shard(indices: Sequence[int], rank: int, world: int, micro: int) -> list[list[int]]:
    """This process's contiguous share of a global batch, split into micro-batches."""
    if len(indices) % (world * micro):
        raise ConfigError(f"a global batch of {len(indices)} cannot be split into {world} process(es) x "
                          f"micro-batches of {micro}", where="train.micro_batch_size",
                          fix=f"make train.batch_size a multiple of micro_batch_size x {world}")
    per = len(indices) // world
    mine = list(indices[rank * per:(rank + 1) * per])
    return [mine[s:s + micro] for s in range(0, per, micro)]
