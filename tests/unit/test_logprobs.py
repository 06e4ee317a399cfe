"""selective_log_softmax / entropy_from_logits / token_logps against naive full-softmax references."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from posttrain.logprobs import entropy_from_logits, selective_log_softmax, token_logps


def naive(logits, ids):
    return torch.log_softmax(logits.float(), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def _data(b=3, t=5, v=11, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(b, t, v, generator=g)).to(dtype)
    ids = torch.randint(0, v, (b, t), generator=g)
    return logits, ids


@pytest.mark.parametrize("chunk", [1, 2, 4, 5, 7, 15, 4096])
def test_value_and_gradient_match_log_softmax_gather(chunk):
    logits, ids = _data()
    up = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    a = logits.clone().requires_grad_(True)
    out = selective_log_softmax(a, ids, chunk_size=chunk)
    (out * up).sum().backward()
    b = logits.clone().requires_grad_(True)
    ref = naive(b, ids)
    (ref * up).sum().backward()
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-6)


def test_gradcheck_float64():
    logits, ids = _data(2, 3, 5, torch.float64)
    x = logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: selective_log_softmax(z, ids, chunk_size=2), (x,))


def test_hand_value_uniform_logits():
    # uniform over V = 4: log p = −log 4 = −1.3862944 whatever the id
    out = selective_log_softmax(torch.zeros(1, 2, 4), torch.tensor([[0, 3]]))
    torch.testing.assert_close(out, torch.full((1, 2), -math.log(4)), rtol=0, atol=1e-7)


def test_bf16_upcast_is_precise_where_bf16_softmax_is_not():
    logits, ids = _data(2, 4, 5000, torch.bfloat16, seed=3)
    ref = naive(logits.double(), ids).double()  # exact answer for these bf16 inputs
    out = selective_log_softmax(logits, ids, chunk_size=3)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)
    in_bf16 = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    assert (in_bf16.double() - ref).abs().max() > 1e-3  # why we upcast


def test_bf16_gradient_keeps_input_dtype():
    logits, ids = _data(2, 3, 50, torch.bfloat16)
    a = logits.clone().requires_grad_(True)
    selective_log_softmax(a, ids, chunk_size=2).sum().backward()
    assert a.grad.dtype == torch.bfloat16
    b = logits.float().requires_grad_(True)
    naive(b, ids).sum().backward()
    torch.testing.assert_close(a.grad.float(), b.grad, rtol=0, atol=4e-3)  # bf16 rounding of values ≤ 1


def test_no_grad_path_and_flat_and_noncontiguous_inputs():
    logits, ids = _data()
    with torch.no_grad():
        out = selective_log_softmax(logits.requires_grad_(True), ids, chunk_size=4)
    assert not out.requires_grad
    torch.testing.assert_close(out, naive(logits.detach(), ids), rtol=0, atol=1e-5)
    flat = selective_log_softmax(logits.detach()[0], ids[0], chunk_size=2)  # [T, V] -> [T]
    torch.testing.assert_close(flat, naive(logits.detach()[0], ids[0]), rtol=0, atol=1e-5)
    sliced = logits.detach()[:, 1:]  # not contiguous
    torch.testing.assert_close(selective_log_softmax(sliced, ids[:, 1:], 3), naive(sliced, ids[:, 1:]),
                               rtol=0, atol=1e-5)


class _Sizes(TorchDispatchMode):
    """Records the element count of every tensor an op allocates (views share storage: skipped)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:
            return out
        for o in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(o, torch.Tensor):
                self.sizes.append((str(func), o.numel(), o.dtype))
        return out


def test_never_materializes_a_full_BTV_tensor():
    b, t, v = 4, 8, 64
    logits, ids = _data(b, t, v, torch.bfloat16)
    x = logits.requires_grad_(True)
    with _Sizes() as fwd:
        out = selective_log_softmax(x, ids, chunk_size=4)
    assert max(n for _, n, _ in fwd.sizes) <= 4 * v  # one tile of 4 rows
    with _Sizes() as bwd:
        out.sum().backward()
    big = [(f, d) for f, n, d in bwd.sizes if n >= b * t * v]
    assert big and all(d == torch.bfloat16 for _, d in big)  # only the bf16 gradient itself
    # the check can fail: the naive path makes full-size fp32 tensors
    with _Sizes() as naive_fwd:
        naive(logits.detach(), ids)
    assert max(n for _, n, _ in naive_fwd.sizes) >= b * t * v


def test_entropy_matches_reference_value_and_gradient():
    logits, _ = _data(2, 5, 9, torch.float64)
    a = logits.clone().requires_grad_(True)
    h = entropy_from_logits(a, chunk_size=3)
    b = logits.clone().requires_grad_(True)
    ref = -(torch.softmax(b, -1) * torch.log_softmax(b, -1)).sum(-1)
    torch.testing.assert_close(h, ref, rtol=0, atol=1e-12)
    up = torch.randn(2, 5, dtype=torch.float64)
    (h * up).sum().backward()
    (ref * up).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-12)


def test_entropy_hand_values():
    # uniform over 8: log 8 = 2.0794415; a near one-hot distribution: ≈ 0
    h = entropy_from_logits(torch.tensor([[0.0] * 8, [100.0] + [0.0] * 7]), chunk_size=1)
    torch.testing.assert_close(h, torch.tensor([math.log(8), 0.0]), rtol=0, atol=1e-6)
    assert h.dtype == torch.float32
    assert entropy_from_logits(torch.zeros(1, 2, 8, dtype=torch.bfloat16)).dtype == torch.float32


def test_token_logps_is_the_causal_shift():
    logits, ids = _data(2, 6, 7)
    out = token_logps(logits, ids, chunk_size=5)
    assert out.shape == (2, 5)
    torch.testing.assert_close(out, naive(logits[:, :-1], ids[:, 1:]), rtol=0, atol=1e-5)


def test_token_logps_off_by_one_would_fail():
    # logits at t put mass 20 on token t+1: shifted log-probs ≈ 0, unshifted ones ≈ −20
    ids = torch.tensor([[1, 2, 3, 0]])
    logits = torch.zeros(1, 4, 5)
    for t in range(3):
        logits[0, t, ids[0, t + 1]] = 20.0
    out = token_logps(logits, ids)
    assert out.abs().max() < 1e-6  # log(e^20/(e^20+4)) = −8.2e-9
    assert naive(logits[:, :-1], ids[:, :-1]).max() < -19  # the unshifted (off-by-one) pairing


def test_token_logps_last_position_gets_no_gradient():
    logits, ids = _data(2, 4, 6)
    x = logits.requires_grad_(True)
    token_logps(x, ids).sum().backward()
    assert torch.count_nonzero(x.grad[:, -1]) == 0
    assert torch.count_nonzero(x.grad[:, :-1]) > 0


def test_temperature_matches_scaled_logits():
    logits, ids = _data(2, 3, 7, torch.float64)
    tau = 0.7
    a = logits.clone().requires_grad_(True)
    out = selective_log_softmax(a, ids, chunk_size=2, temperature=tau)
    b = logits.clone().requires_grad_(True)
    ref = torch.log_softmax(b / tau, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    out.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda z: selective_log_softmax(z, ids, 2, temperature=tau),
                                    (logits.clone().requires_grad_(True),))
    h = entropy_from_logits(logits, 2, temperature=tau)
    torch.testing.assert_close(h, entropy_from_logits(logits / tau, 2), rtol=0, atol=1e-12)


def test_runs_on_meta_tensors_so_no_host_sync():
    # a meta tensor has no data: any .item()/bool() in the code would raise here
    logits = torch.randn(2, 3, 5, device="meta", requires_grad=True)
    ids = torch.zeros(2, 3, dtype=torch.long, device="meta")
    selective_log_softmax(logits, ids, chunk_size=2).sum().backward()
    assert entropy_from_logits(logits, 2).shape == (2, 3) and token_logps(logits, ids).shape == (2, 2)
