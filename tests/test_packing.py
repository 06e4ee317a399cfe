"""Packed rows isolate sequences: the same logits and per-sequence losses as one padded row each."""

import torch

from posttrain.data.batching import StepSampler, collate, model_inputs, shard
from posttrain.data.chat import encode_sft
from posttrain.tasks.builtin import sft_records


def per_sequence_nll(model, batch, n):
    logits = model(**model_inputs(batch)).logits.float()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    same = batch["seq_index"][:, 1:] == batch["seq_index"][:, :-1]
    mask = batch["loss_mask"][:, 1:].bool() & same
    seq = batch["seq_index"][:, 1:]
    return torch.stack([-(logp[(seq == i) & mask]).sum() for i in range(n)])


def test_packed_equals_padded(tiny_model, tokenizer):
    exs = [encode_sft(tokenizer, r, 256) for r in sft_records(12, seed=3)]
    packed = collate(exs, packing=True, row_tokens=96, pad_id=tokenizer.pad_token_id, min_saving=0.0)
    padded = collate(exs, packing=False, pad_id=tokenizer.pad_token_id)
    assert packed["input_ids"].shape[0] < len(exs)  # really packed several per row
    with torch.no_grad():
        a = per_sequence_nll(tiny_model, packed, len(exs))
        b = per_sequence_nll(tiny_model, padded, len(exs))
        alone = torch.stack([per_sequence_nll(tiny_model, collate([e], packing=False), 1)[0] for e in exs])
    assert torch.allclose(a, b, atol=1e-5, rtol=0)
    assert torch.allclose(a, alone, atol=1e-5, rtol=0)
    # the check can fail: without the block mask, sequences attend across boundaries
    leaky = dict(packed)
    leaky["attention_mask"] = None
    with torch.no_grad():
        logits = tiny_model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits
        ref = tiny_model(**model_inputs(packed)).logits
    assert (logits - ref).abs().max() > 1e-3


def test_similar_lengths_run_pure_causal_with_the_same_losses(tiny_model, tokenizer):
    """Packing that would save little falls back to right padding with no mask (fused causal kernel)."""
    exs = [encode_sft(tokenizer, r, 256) for r in sft_records(12, seed=3)]
    lens = [len(e) for e in exs]
    waste = 1 - sum(lens) / (len(lens) * max(lens))
    causal = collate(exs, packing=True, row_tokens=96, pad_id=tokenizer.pad_token_id, min_saving=waste + 0.01)
    packed = collate(exs, packing=True, row_tokens=96, pad_id=tokenizer.pad_token_id, min_saving=waste - 0.01)
    assert "attention_mask" not in causal and causal["input_ids"].shape == (len(exs), max(lens))
    assert packed["attention_mask"].dim() == 4
    assert int(causal["n_pad"]) == len(exs) * max(lens) - sum(lens)
    with torch.no_grad():
        a = per_sequence_nll(tiny_model, causal, len(exs))
        b = per_sequence_nll(tiny_model, packed, len(exs))
    assert torch.allclose(a, b, atol=1e-5, rtol=0)


def test_padding_fraction_counted(tokenizer):
    exs = [encode_sft(tokenizer, r, 256) for r in sft_records(8, seed=1)]
    padded = collate(exs, packing=False)
    total = padded["input_ids"].numel()
    assert int(padded["n_pad"]) == total - sum(len(e) for e in exs)


def test_step_sampler_is_a_function_of_step():
    s1, s2 = StepSampler(100, 8, seed=3), StepSampler(100, 8, seed=3)
    assert s1.steps_per_epoch == 12
    seq = [s1.batch(k) for k in range(30)]
    assert [s2.batch(k) for k in reversed(range(30))][::-1] == seq
    epoch0 = sorted(i for k in range(12) for i in seq[k])
    assert len(set(epoch0)) == 96  # no repeats within an epoch
    assert seq[12] != seq[0]  # a new permutation next epoch


def test_shard_splits_global_batch():
    assert shard(list(range(8)), 1, 2, 2) == [[4, 5], [6, 7]]
    import pytest
    from posttrain.errors import ConfigError

    with pytest.raises(ConfigError, match="multiple of micro_batch_size"):
        shard(list(range(8)), 0, 2, 3)
