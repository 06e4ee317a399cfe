"""Reward-model losses: Bradley–Terry (margin, ties), K-wise pairs, Plackett–Luce, centering."""

import itertools
import math

import pytest
import torch

from posttrain.losses.reward import bradley_terry_loss, kwise_pairwise_loss, plackett_luce_loss, reward_centering_loss

F64 = torch.float64


def sp(x):  # softplus(x) = −log σ(−x), for hand values
    return math.log1p(math.exp(x))


def test_bt_hand_values_and_metrics():
    rc = torch.tensor([2.0, 0.0], dtype=F64)
    rr = torch.tensor([1.0, 1.0], dtype=F64)
    loss, m = bradley_terry_loss(rc, rr)
    # d = [1, −1]: −log σ(1) = 0.3132617, −log σ(−1) = 1.3132617; mean 0.8132617
    assert loss.item() == pytest.approx((sp(-1) + sp(1)) / 2, abs=1e-12)
    assert m["accuracy"].item() == 0.5 and m["margin"].item() == 0.0
    assert m["chosen"].item() == 1.0 and m["rejected"].item() == 1.0
    assert all(not v.requires_grad and v.dim() == 0 for v in m.values())


def test_bt_margin_llama2():
    rc, rr = torch.tensor([2.0, 0.0], dtype=F64), torch.tensor([1.0, 1.0], dtype=F64)
    loss, m = bradley_terry_loss(rc, rr, margin=torch.tensor([0.5, 0.5], dtype=F64))
    # d = [0.5, −1.5]: softplus(−0.5) = 0.4740770, softplus(1.5) = 1.7014133
    assert loss.item() == pytest.approx((sp(-0.5) + sp(1.5)) / 2, abs=1e-12)
    assert m["margin"].item() == 0.0  # the metric is r_c − r_r, without the margin


def test_bt_tie_pulls_rewards_together_and_is_not_a_win():
    rc = torch.tensor([2.0, 3.0], dtype=F64, requires_grad=True)
    rr = torch.tensor([1.0, 5.0], dtype=F64)
    loss, m = bradley_terry_loss(rc, rr, target=torch.tensor([1.0, 0.5], dtype=F64))
    # pair 1: −log σ(1) = sp(−1); pair 2 (tie, d = −2): ½[sp(2) + sp(−2)]
    assert loss.item() == pytest.approx((sp(-1) + 0.5 * (sp(2) + sp(-2))) / 2, abs=1e-12)
    assert m["accuracy"].item() == 1.0  # only the non-tie pair counts
    loss.backward()
    # ∂/∂r_c of the tie term = ½[σ(d) − σ(−d)] / N = ½(σ(−2) − σ(2)) / 2 < 0: descent raises r_c toward r_r
    s = 1 / (1 + math.exp(2))
    assert rc.grad[1].item() == pytest.approx(0.5 * (s - (1 - s)) / 2, abs=1e-12)
    # the tie loss is smallest at equal rewards, where it is log 2
    tie, _ = bradley_terry_loss(torch.tensor([1.0]), torch.tensor([1.0]), target=0.5)
    assert tie.item() == pytest.approx(math.log(2), abs=1e-7)


def test_kwise_hand_values():
    rewards = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, float("nan")]], dtype=F64, requires_grad=True)
    ranks = torch.tensor([[0, 1, 2], [1, 0, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    loss, m = kwise_pairwise_loss(rewards, ranks, mask)
    # prompt 1, 3 pairs: (0≻1) d=2, (0≻2) d=1, (1≻2) d=−1  ->  (sp(−2) + sp(−1) + sp(1)) / 3 = 0.5844838
    # prompt 2, 1 pair: (1≻0) d=5  ->  sp(−5) = 0.0067153
    p1 = (sp(-2) + sp(-1) + sp(1)) / 3
    p2 = sp(-5)
    assert loss.item() == pytest.approx((p1 + p2) / 2, abs=1e-12)
    assert m["accuracy"].item() == 0.75  # 3 of the 4 pairs ordered correctly
    loss.backward()
    assert torch.isfinite(rewards.grad).all() and rewards.grad[1, 2].item() == 0.0


def kwise_slow(rewards, ranks, mask):
    per_prompt = []
    for r, k, v in zip(rewards.tolist(), ranks.tolist(), mask.tolist()):
        idx = [i for i in range(len(r)) if v[i]]
        terms = []
        for a, b in itertools.combinations(idx, 2):
            d = r[a] - r[b]
            if k[a] == k[b]:
                terms.append(0.5 * (sp(-d) + sp(d)))
            else:
                terms.append(sp(-d) if k[a] < k[b] else sp(d))
        if terms:
            per_prompt.append(sum(terms) / len(terms))
    return sum(per_prompt) / len(per_prompt)


def test_kwise_matches_slow_reference_with_ties_and_padding():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(6, 5, generator=g, dtype=F64)
    ranks = torch.randint(0, 3, (6, 5), generator=g)  # many ties
    mask = torch.ones(6, 5, dtype=torch.long)
    mask[1, 3:] = 0
    mask[4, 1:] = 0  # one valid candidate: no pair, left out of the mean
    loss, _ = kwise_pairwise_loss(rewards, ranks, mask)
    assert loss.item() == pytest.approx(kwise_slow(rewards, ranks, mask), abs=1e-12)


def test_kwise_with_two_candidates_is_bradley_terry():
    rc, rr = torch.randn(4, dtype=F64), torch.randn(4, dtype=F64)
    loss, _ = kwise_pairwise_loss(torch.stack([rc, rr], 1), torch.tensor([[0, 1]] * 4), torch.ones(4, 2))
    assert loss.item() == pytest.approx(bradley_terry_loss(rc, rr)[0].item(), abs=1e-12)


def test_plackett_luce_hand_value():
    # order: candidate 1 (r=2) ≻ candidate 0 (r=1) ≻ candidate 2 (r=0)
    # −[2 − log(e² + e + 1)] − [1 − log(e + 1)] − 0 = 0.4076059 + 0.3132617 = 0.7208676
    rewards = torch.tensor([[1.0, 2.0, 0.0]], dtype=F64)
    loss, m = plackett_luce_loss(rewards, torch.tensor([[1, 0, 2]]), torch.ones(1, 3))
    e = math.e
    expected = -(2 - math.log(e ** 2 + e + 1)) - (1 - math.log(e + 1))
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert m["accuracy"].item() == 1.0


def test_plackett_luce_with_two_candidates_is_bradley_terry():
    rc, rr = torch.randn(5, dtype=F64), torch.randn(5, dtype=F64)
    loss, _ = plackett_luce_loss(torch.stack([rr, rc], 1), torch.tensor([[1, 0]] * 5), torch.ones(5, 2))
    assert loss.item() == pytest.approx(bradley_terry_loss(rc, rr)[0].item(), abs=1e-12)


def test_plackett_luce_invalid_candidate_equals_dropping_it():
    # a masked candidate in the middle of the order (reward nan) must not change loss or gradients
    r = torch.tensor([[0.3, float("nan"), -1.0, 2.0]], dtype=F64, requires_grad=True)
    loss, _ = plackett_luce_loss(r, torch.tensor([[3, 1, 0, 2]]), torch.tensor([[1, 0, 1, 1]]))
    r2 = torch.tensor([[0.3, -1.0, 2.0]], dtype=F64, requires_grad=True)
    ref, _ = plackett_luce_loss(r2, torch.tensor([[2, 0, 1]]), torch.ones(1, 3))
    assert loss.item() == pytest.approx(ref.item(), abs=1e-12)
    loss.backward()
    ref.backward()
    assert torch.isfinite(r.grad).all() and r.grad[0, 1].item() == 0.0
    torch.testing.assert_close(r.grad[0, [0, 2, 3]], r2.grad[0], rtol=0, atol=1e-12)


def test_plackett_luce_matches_slow_reference():
    g = torch.Generator().manual_seed(3)
    rewards = torch.randn(4, 5, generator=g, dtype=F64)
    order = torch.stack([torch.randperm(5, generator=g) for _ in range(4)])
    loss, _ = plackett_luce_loss(rewards, order, torch.ones(4, 5))
    total = 0.0
    for r, o in zip(rewards.tolist(), order.tolist()):
        s = [r[i] for i in o]
        total += -sum(s[k] - math.log(sum(math.exp(x) for x in s[k:])) for k in range(len(s)))
    assert loss.item() == pytest.approx(total / 4, abs=1e-12)


def test_reward_centering_hand_value():
    # (r_c + r_r) = [1.5, −1]: mean of squares (2.25 + 1)/2 = 1.625; × 0.01
    loss, m = reward_centering_loss(torch.tensor([1.0, -2.0]), torch.tensor([0.5, 1.0]), 0.01)
    assert loss.item() == pytest.approx(0.01625, abs=1e-9)
    assert m["reward_sum"].item() == pytest.approx(0.25, abs=1e-9)


def test_runs_on_meta_tensors_so_no_host_sync():
    r = torch.randn(4, device="meta", requires_grad=True)
    R = torch.randn(2, 3, device="meta", requires_grad=True)
    ones = torch.ones(2, 3, device="meta")
    losses = [bradley_terry_loss(r, r.detach(), margin=r.detach(), target=r.detach())[0],
              kwise_pairwise_loss(R, ones, ones)[0],
              plackett_luce_loss(R, torch.zeros(2, 3, dtype=torch.long, device="meta"), ones)[0],
              reward_centering_loss(r, r, 0.1)[0]]
    sum(losses).backward()
