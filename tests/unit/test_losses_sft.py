"""nll_loss: hand values and gradient-accumulation equivalence."""

import pytest
import torch

from posttrain.losses.sft import nll_loss

F64 = torch.float64


def test_hand_values():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -9.0, -9.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    loss, m = nll_loss(logp, mask)
    assert loss.item() == pytest.approx(3.5 / 3, abs=1e-12)  # −(−1 − 2 − 0.5) / 3 tokens
    assert m["nll"].item() == pytest.approx(3.5 / 3, abs=1e-12)
    loss, m = nll_loss(logp, mask, num_items=7)
    assert loss.item() == pytest.approx(0.5, abs=1e-12)  # 3.5 / 7
    assert m["nll"].item() == pytest.approx(3.5 / 3, abs=1e-12)  # the batch's per-token NLL
    assert not m["nll"].requires_grad


def test_padding_with_minus_inf_is_ignored():
    logp = torch.tensor([[-1.0, float("-inf")]], requires_grad=True)
    loss, _ = nll_loss(logp, torch.tensor([[1, 0]]))
    loss.backward()
    assert loss.item() == 1.0
    assert logp.grad.tolist() == [[-1.0, 0.0]]


def test_micro_batches_with_step_token_count_add_up_to_full_batch():
    g = torch.Generator().manual_seed(0)
    base = -torch.rand(8, 6, generator=g, dtype=F64) * 3
    lengths = torch.tensor([1, 6, 2, 5, 3, 3, 6, 1])
    mask = (torch.arange(6)[None, :] < lengths[:, None]).long()
    full_p = base.clone().requires_grad_(True)
    full, _ = nll_loss(full_p, mask)
    full.backward()

    micro_p = base.clone().requires_grad_(True)
    total = mask.sum()  # tokens of the whole optimizer step
    acc = 0.0
    naive = 0.0
    for s in range(0, 8, 2):  # 4 micro-batches of 2
        part, _ = nll_loss(micro_p[s:s + 2], mask[s:s + 2], num_items=total)
        part.backward()
        acc = acc + part.detach()
        naive = naive + nll_loss(base[s:s + 2], mask[s:s + 2])[0] / 4
    assert acc.item() == pytest.approx(full.item(), abs=1e-7)
    torch.testing.assert_close(micro_p.grad, full_p.grad, rtol=0, atol=1e-12)
    assert abs(naive.item() - full.item()) > 1e-3  # averaging per-micro-batch means is not the same


def test_runs_on_meta_tensors_so_no_host_sync():
    logp = torch.randn(2, 3, device="meta", requires_grad=True)
    loss, _ = nll_loss(logp, torch.ones(2, 3, device="meta"))
    loss.backward()
