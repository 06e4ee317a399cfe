"""masked_sum / masked_mean / masked_var / masked_whiten against hand-computed values."""

import math

import pytest
import torch

from posttrain.masked import masked_mean, masked_sum, masked_var, masked_whiten

X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.float64)
M = torch.tensor([[1, 1, 0], [1, 0, 0]])  # valid: 1, 2, 4


def test_sum_and_mean_all_and_per_row():
    assert masked_sum(X, M).item() == 7.0  # 1 + 2 + 4
    assert masked_mean(X, M).item() == pytest.approx(7 / 3, abs=1e-12)
    torch.testing.assert_close(masked_sum(X, M, dim=1), torch.tensor([3.0, 4.0], dtype=torch.float64))
    torch.testing.assert_close(masked_mean(X, M, dim=1), torch.tensor([1.5, 4.0], dtype=torch.float64))


def test_masked_values_cannot_leak_even_if_nan_or_inf():
    x = X.clone().requires_grad_(True)
    bad = torch.where(M.bool(), x, torch.tensor([float("nan")], dtype=torch.float64))
    bad = bad + torch.tensor([[0, 0, float("-inf")], [0, 0, 0]], dtype=torch.float64)
    s = masked_sum(bad, M)
    assert s.item() == 7.0
    s.backward()
    # d/dx of the sum: 1 on valid entries, exactly 0 (not nan) on masked ones
    torch.testing.assert_close(x.grad, M.to(torch.float64), rtol=0, atol=0)


def test_mean_of_empty_mask_is_nan_unless_eps():
    empty = torch.zeros_like(M)
    assert math.isnan(masked_mean(X, empty).item())
    assert masked_mean(X, empty, eps=1e-8).item() == 0.0


def test_var_unbiased_and_biased():
    # valid {1, 2, 4}: mean 7/3, squared deviations 16/9 + 1/9 + 25/9 = 42/9 = 14/3
    assert masked_var(X, M).item() == pytest.approx(7 / 3, abs=1e-12)  # / (n − 1) = / 2
    assert masked_var(X, M, unbiased=False).item() == pytest.approx(14 / 9, abs=1e-12)  # / n = / 3
    assert masked_var(X, M).item() == pytest.approx(torch.tensor([1.0, 2.0, 4.0]).var().item(), abs=1e-6)


def test_whiten_hand_values_and_zero_padding():
    w = masked_whiten(X, M, eps=0.0)
    sd = math.sqrt(7 / 3)
    expected = torch.tensor([[(1 - 7 / 3) / sd, (2 - 7 / 3) / sd, 0.0], [(4 - 7 / 3) / sd, 0.0, 0.0]],
                            dtype=torch.float64)
    torch.testing.assert_close(w, expected, rtol=0, atol=1e-12)  # e.g. (1 − 7/3)/√(7/3) = −0.872872
    assert masked_mean(w, M).item() == pytest.approx(0.0, abs=1e-12)
    assert masked_var(w, M).item() == pytest.approx(1.0, abs=1e-12)


def test_whiten_without_shift_keeps_the_mean():
    w = masked_whiten(X, M, shift_mean=False, eps=0.0)
    assert masked_mean(w, M).item() == pytest.approx(7 / 3, abs=1e-12)
    assert masked_var(w, M).item() == pytest.approx(1.0, abs=1e-12)
    assert w[0, 2].item() == 0.0 and w[1, 1].item() == 0.0


def test_runs_on_meta_tensors_so_no_host_sync():
    x = torch.randn(2, 3, device="meta")
    m = torch.ones(2, 3, device="meta")
    assert masked_whiten(x, m).shape == (2, 3) and masked_var(x, m).shape == ()
