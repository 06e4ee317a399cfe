"""Batches without compute on padding: packing with isolated sequences, or padding.

Packing puts several sequences in one row, restarts ``position_ids`` at each sequence and passes an
explicit 4-D block-diagonal causal mask (boolean, True = may attend), so no token attends across a
sequence boundary. Transformers' own packing detection is not relied on: it silently attends across
sequences whenever a KV cache or a 2-D mask is present (see ENVIRONMENT.md). The boolean mask is the
form SDPA expects; eager attention needs an additive float mask (:func:`additive_mask`).

Every batch carries ``seq_index`` ([R, L], -1 on padding) so per-sequence quantities (sequence
log-probs, per-sequence losses) can be reduced from a packed batch.
"""

from __future__ import annotations

import random
from typing import Sequence

import torch

from posttrain.data.chat import Example


def _rows_first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing bin packing of sequence indices into rows of ``capacity`` tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = lengths[i]
        for r, space in enumerate(free):
            if n <= space:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(capacity - n)
    return [sorted(r) for r in rows]


PACK_MIN_SAVING = 0.2


def collate(examples: Sequence[Example], *, packing: bool, row_tokens: int | None = None,
            pad_id: int = 0, min_saving: float = PACK_MIN_SAVING) -> dict[str, torch.Tensor]:
    """Build one micro-batch.

    Returns input_ids, position_ids, attention_mask ([R,1,L,L] bool when packed, [R,L] long when
    ``packing`` is off, absent when packing is skipped), loss_mask and seq_index (all [R, L]), plus
    ``n_seqs`` and ``n_pad`` counts.

    With ``packing``, a batch whose plain padding would waste less than ``min_saving`` of its
    tokens (similar lengths) is not packed: one right-padded sequence per row and *no*
    attention_mask key, so the model runs pure causal attention (SDPA's fused kernel; a real token
    never attends to the padding after it). The explicit block mask forces the slower masked
    kernel, which costs more than packing saves there (benchmarks/sft.py, ~110-token examples).
    """
    lengths = [len(e) for e in examples]
    causal_only = packing and 1 - sum(lengths) / (len(lengths) * max(lengths)) < min_saving
    packing = packing and not causal_only
    if packing:
        # as many rows as row_tokens asks for, filled evenly: a half-empty last row is padding
        total, longest = sum(lengths), max(lengths)
        n_rows = max(1, -(-total // max(row_tokens or total, 1)))
        rows = _rows_first_fit(lengths, max(longest, -(-total // n_rows) + longest // 2))
    else:
        rows = [[i] for i in range(len(examples))]
    width = max(sum(lengths[i] for i in r) for r in rows)
    R = len(rows)
    ids = torch.full((R, width), pad_id, dtype=torch.long)
    pos = torch.zeros((R, width), dtype=torch.long)
    loss_mask = torch.zeros((R, width), dtype=torch.long)
    seq_index = torch.full((R, width), -1, dtype=torch.long)
    for r, members in enumerate(rows):
        t = 0
        for i in members:
            e, n = examples[i], lengths[i]
            ids[r, t:t + n] = torch.tensor(e.input_ids)
            loss_mask[r, t:t + n] = torch.tensor(e.loss_mask)
            pos[r, t:t + n] = torch.arange(n)
            seq_index[r, t:t + n] = i
            t += n
    valid = seq_index >= 0
    out = {"input_ids": ids, "position_ids": pos, "loss_mask": loss_mask, "seq_index": seq_index,
           "n_seqs": torch.tensor(len(examples)), "n_pad": (~valid).sum()}
    if causal_only:
        return out
    if packing:
        same = seq_index[:, :, None] == seq_index[:, None, :]  # [R, L, L]
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        attn = (same & causal & valid[:, :, None])[:, None]  # [R, 1, L, L]
        # padded query rows attend to themselves so softmax never sees an all-masked row
        attn |= torch.eye(width, dtype=torch.bool)[None, None] & ~valid[:, None, :, None]
    else:
        attn = valid.long()
    return {**out, "attention_mask": attn}


def additive_mask(bool_mask: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Boolean 4-D mask -> additive float mask (0 where allowed, -inf-like where not) for eager."""
    return torch.zeros(bool_mask.shape, dtype=dtype).masked_fill(~bool_mask, torch.finfo(dtype).min)


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keyword arguments a Hugging Face causal LM takes from a batch (cache off: see module doc)."""
    return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
            "attention_mask": batch.get("attention_mask"), "use_cache": False}


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
        from posttrain.errors import DataError

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
    from posttrain.errors import ConfigError

    if len(indices) % (world * micro):
        raise ConfigError(f"a global batch of {len(indices)} cannot be split into {world} process(es) x "
                          f"micro-batches of {micro}", where="train.micro_batch_size",
                          fix=f"make train.batch_size a multiple of micro_batch_size x {world}")
    per = len(indices) // world
    mine = list(indices[rank * per:(rank + 1) * per])
    return [mine[s:s + micro] for s in range(0, per, micro)]
