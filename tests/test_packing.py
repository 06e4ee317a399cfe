"""Packed rows isolate sequences: the same logits and per-sequence losses as one padded row each,
through the packed attention path and through a dense mask on the sdpa and eager backends."""

import pytest
import torch

from posttrain.data.batching import StepSampler, attention_layout, collate, pack_shared, row_padding, shard
from posttrain.data.chat import encode_sft
from posttrain.models.attention import PACKED_SDPA, model_inputs
from posttrain.tasks.builtin import sft_records


def per_sequence_nll(model, batch, n):
    logits = model(**model_inputs(model, batch)).logits.float()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    same = batch["seq_index"][:, 1:] == batch["seq_index"][:, :-1]
    mask = batch["loss_mask"][:, 1:].bool() & same
    seq = batch["seq_index"][:, 1:]
    return torch.stack([-(logp[(seq == i) & mask]).sum() for i in range(n)])


@pytest.fixture()
def examples(tokenizer):
    exs = [encode_sft(tokenizer, r, 256) for r in sft_records(12, seed=3)]
    exs[0] = encode_sft(tokenizer, {"prompt": "a much longer prompt " * 6, "completion": "x"}, 256)  # 2+ buckets
    return exs


def test_packed_equals_padded(tiny_model, tokenizer, examples):
    exs = examples
    packed = collate(exs, packing=True, pad_id=tokenizer.pad_token_id)
    padded = collate(exs, packing=False, pad_id=tokenizer.pad_token_id)
    assert tiny_model.config._attn_implementation == PACKED_SDPA
    T = sum(len(e) for e in exs)
    assert packed["input_ids"].shape == (1, T + row_padding(T)) and int(packed["n_pad"]) == row_padding(T) > 0
    assert len(packed["attn_layout"].buckets) >= 2
    with torch.no_grad():
        a = per_sequence_nll(tiny_model, packed, len(exs))
        b = per_sequence_nll(tiny_model, padded, len(exs))
        alone = torch.stack([per_sequence_nll(tiny_model, collate([e], packing=False), 1)[0] for e in exs])
    assert torch.allclose(a, b, atol=1e-5, rtol=0)
    assert torch.allclose(a, alone, atol=1e-5, rtol=0)
    # the check can fail: without the layout, sequences attend across boundaries
    with torch.no_grad():
        logits = tiny_model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits
        ref = tiny_model(**model_inputs(tiny_model, packed)).logits
    assert (logits - ref).abs().max() > 1e-3


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_other_backends_get_the_same_pattern_as_a_dense_mask(tiny_model, tokenizer, examples, backend):
    packed = collate(examples, packing=True, pad_id=tokenizer.pad_token_id)
    with torch.no_grad():
        fast = tiny_model(**model_inputs(tiny_model, packed)).logits
        tiny_model.set_attn_implementation(backend)
        kw = model_inputs(tiny_model, packed)
        assert "attn_layout" not in kw and kw["attention_mask"].shape[-1] == packed["input_ids"].shape[1]
        dense = tiny_model(**kw).logits
    assert (fast - dense).abs().max() < 1e-5


def test_packed_gradients_equal_padded(tiny_model, tokenizer, examples):
    grads = []
    for packing in (True, False):
        tiny_model.zero_grad()
        batch = collate(examples, packing=packing, pad_id=tokenizer.pad_token_id)
        per_sequence_nll(tiny_model, batch, len(examples)).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in tiny_model.parameters()]))
    assert (grads[0] - grads[1]).abs().max() < 1e-5 * grads[1].abs().max()


def test_shared_prompt_tree_matches_separate_sequences(tiny_model):
    """A prompt stored once and attended by each branch gives each branch its logits alone."""
    prompts = [[5, 6, 7, 8], [9, 10]]
    branches = [[[11, 12, 13], [14, 15]], [[16], [17, 18, 19, 20], [21, 22]]]
    packed = pack_shared(prompts, branches)
    assert packed["input_ids"].shape[1] == 6 + 5 + 1 + 4 + 2 + packed["n_pad"]
    with torch.no_grad():
        logits = tiny_model(**model_inputs(tiny_model, packed)).logits[0]
        for p, group, p0, starts in zip(prompts, branches, packed["prompt_start"], packed["branch_start"]):
            for b, c0 in zip(group, starts):
                alone = tiny_model(input_ids=torch.tensor([p + b])).logits[0]
                assert (logits[p0:p0 + len(p)] - alone[:len(p)]).abs().max() < 1e-5
                assert (logits[c0:c0 + len(b)] - alone[len(p):]).abs().max() < 1e-5


def test_row_padding_rounds_to_sixteen_lengths_per_doubling():
    assert [row_padding(t) for t in (7, 16, 31, 33, 100, 946, 1024, 1025)] == [0, 0, 0, 1, 0, 14, 0, 63]
    assert all(row_padding(t) <= t / 16 for t in range(1, 5000))
    sizes = {t + row_padding(t) for t in range(513, 1025)}
    assert len(sizes) == 16


def test_layout_by_hand():
    """Two sequences [0,1,2] and [3,4]: buckets, output slots and the dense mask."""
    lay = attention_layout([torch.arange(0, 3), torch.arange(3, 5)], torch.tensor([0, 0, 0, 1, 1]),
                           torch.tensor([0, 1, 2, 0, 1]))
    assert [b.keys.tolist() for b in lay.buckets] == [[[0, 1, 2]], [[3, 4]]]  # 2 < 0.75 * 3: own bucket
    assert lay.out.tolist() == [0, 1, 2, 3, 4]
    expect = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]])
    assert torch.equal(lay.dense_mask(), expect.bool())
    same = attention_layout([torch.arange(0, 4), torch.arange(4, 7)], torch.tensor([0] * 4 + [1] * 3),
                            torch.tensor([0, 1, 2, 3, 0, 1, 2]))
    assert [b.keys.tolist() for b in same.buckets] == [[[0, 1, 2, 3], [4, 5, 6, 0]]]  # padded slot -> position 0
    assert same.out.tolist() == [0, 1, 2, 3, 4, 5, 6]


def test_shared_prompt_layout_by_hand():
    """Prompt [p0 p1], branches [c0 c1] and [e0]: the prompt's queries once (a causal bucket of its
    own), each branch's queries over prompt + own keys (a masked bucket), and the dense mask."""
    packed = pack_shared([[7, 8]], [[[9, 10], [11]]])
    lay = packed["attn_layout"]
    assert packed["input_ids"].tolist() == [[7, 8, 9, 10, 11]] and packed["n_pad"] == 0
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 2]]  # a branch continues from the prompt
    prompt, branch = lay.buckets
    assert prompt.keys.tolist() == [[0, 1]] and prompt.queries is None and prompt.mask is None
    assert branch.keys.tolist() == [[0, 1, 2, 3], [0, 1, 4, 0]] and branch.q_start.tolist() == [2, 2]
    assert branch.queries.tolist() == [[2, 3], [4, 0]]  # the second row's padded query repeats a slot
    assert branch.mask[:, 0].int().tolist() == [[[1, 1, 1, 0], [1, 1, 1, 1]], [[1, 1, 1, 0], [1, 1, 1, 1]]]
    assert lay.out.tolist() == [0, 1, 2, 3, 4]
    expect = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 0, 0, 1]])
    assert torch.equal(lay.dense_mask(), expect.bool())


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
