"""GAE, returns, group baselines (GRPO / Dr. GRPO / RLOO) and the DAPO helpers."""

import math

import pytest
import torch

from posttrain.advantages import (best_of_n_kl, discounted_returns, expand_to_tokens, gae, group_advantages, group_scale,
                                  overlong_penalty, reinforce_advantages, rloo_advantages, turn_credit_advantages,
                                  zero_variance_groups)
from posttrain.errors import ConfigError

F64 = torch.float64


def test_gae_hand_values():
    # γ = 0.9, λ = 0.8, γλ = 0.72; V after the last token = 0
    # δ2 = 1 − 0.7 = 0.3; δ1 = 0.9·0.7 − 0.6 = 0.03; δ0 = 0.9·0.6 − 0.5 = 0.04
    # A2 = 0.3; A1 = 0.03 + 0.72·0.3 = 0.246; A0 = 0.04 + 0.72·0.246 = 0.21712
    r = torch.tensor([[0.0, 0.0, 1.0, 7.0]], dtype=F64)  # position 3 is padding with junk
    v = torch.tensor([[0.5, 0.6, 0.7, 9.0]], dtype=F64)
    m = torch.tensor([[1, 1, 1, 0]])
    adv, ret = gae(r, v, m, gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, torch.tensor([[0.21712, 0.246, 0.3, 0.0]], dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(ret, torch.tensor([[0.71712, 0.846, 1.0, 0.0]], dtype=F64), rtol=0, atol=1e-12)


def gae_loop(rewards, values, mask, gamma, lam):
    """Plain-Python reference: each row's valid tokens in order form the trajectory."""
    adv = [[0.0] * len(row) for row in rewards]
    for i in range(len(rewards)):
        idx = [t for t in range(len(rewards[i])) if mask[i][t]]
        last, next_v = 0.0, 0.0
        for t in reversed(idx):
            delta = rewards[i][t] + gamma * next_v - values[i][t]
            last = delta + gamma * lam * last
            adv[i][t] = last
            next_v = values[i][t]
    return adv


def _ragged(seed=0):
    g = torch.Generator().manual_seed(seed)
    r, v = torch.randn(5, 9, generator=g, dtype=F64), torch.randn(5, 9, generator=g, dtype=F64)
    m = torch.ones(5, 9, dtype=torch.long)
    m[0, 6:] = 0  # right padding
    m[1, :3] = 0  # left padding
    m[2, 4:6] = 0  # a masked hole (e.g. tool output)
    m[3, :] = 0  # empty row
    m[4, 0] = 0
    m[4, 8] = 0
    return r, v, m


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (0.99, 1.0), (1.0, 0.0)])
def test_gae_matches_python_loop(gamma, lam):
    r, v, m = _ragged()
    adv, ret = gae(r, v, m, gamma, lam)
    ref = torch.tensor(gae_loop(r.tolist(), v.tolist(), m.tolist(), gamma, lam), dtype=F64)
    torch.testing.assert_close(adv, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(ret, torch.where(m.bool(), ref + v, 0.0), rtol=0, atol=1e-12)


def test_gae_lambda1_gamma1_is_monte_carlo_return_minus_value():
    r, v, m = _ragged(1)
    adv, ret = gae(r, v, m, gamma=1.0, lam=1.0)
    mc = discounted_returns(r, m, gamma=1.0)
    torch.testing.assert_close(adv, torch.where(m.bool(), mc - v, 0.0), rtol=0, atol=1e-12)
    torch.testing.assert_close(ret, mc, rtol=0, atol=1e-12)


def test_gae_lambda0_is_td_residual():
    r = torch.tensor([[1.0, 2.0, 3.0]], dtype=F64)
    v = torch.tensor([[0.5, 1.0, 1.5]], dtype=F64)
    adv, _ = gae(r, v, torch.ones(1, 3), gamma=0.5, lam=0.0)
    # δ = r_t + γ V_{t+1} − V_t = [1 + 0.5 − 0.5, 2 + 0.75 − 1, 3 + 0 − 1.5]
    torch.testing.assert_close(adv, torch.tensor([[1.0, 1.75, 1.5]], dtype=F64), rtol=0, atol=1e-12)


def test_discounted_returns_hand_values():
    # G2 = 3; G1 = 2 + 0.5·3 = 3.5; G0 = 1 + 0.5·3.5 = 2.75
    r = torch.tensor([[1.0, 2.0, 3.0, 5.0]], dtype=F64)
    out = discounted_returns(r, torch.tensor([[1, 1, 1, 0]]), gamma=0.5)
    torch.testing.assert_close(out, torch.tensor([[2.75, 3.5, 3.0, 0.0]], dtype=F64), rtol=0, atol=1e-12)


def test_grpo_advantages_hand_values_sample_std():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0], dtype=F64)
    # group 1: mean 0.5, sample std √((4 · 0.25)/3) = √(1/3) = 0.5773503 (population std would be 0.5)
    a = 0.5 / (math.sqrt(1 / 3) + 1e-6)  # 0.8660239
    expected = torch.tensor([a, -a, -a, a, 0.0, 0.0, 0.0, 0.0], dtype=F64)
    torch.testing.assert_close(group_advantages(r, 4), expected, rtol=0, atol=1e-12)


def test_dr_grpo_is_mean_only():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 1.0], dtype=F64)
    out = group_advantages(r, 2, scale_by_std=False)
    torch.testing.assert_close(out, torch.tensor([0.5, -0.5, -0.5, 0.5, 1.0, -1.0], dtype=F64), rtol=0, atol=0)


def test_rloo_hand_values():
    # A_0 = 1 − (0 + 0 + 1)/3 = 2/3; A_1 = 0 − (1 + 0 + 1)/3 = −2/3
    out = rloo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=F64), 4)
    torch.testing.assert_close(out, torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3], dtype=F64), rtol=0, atol=1e-15)


@pytest.mark.parametrize("group_size", [2, 3, 8])
def test_dr_grpo_times_g_over_g_minus_1_equals_rloo(group_size):
    r = torch.randn(group_size * 5, dtype=F64, generator=torch.Generator().manual_seed(group_size))
    dr = group_advantages(r, group_size, scale_by_std=False)
    torch.testing.assert_close(dr * group_size / (group_size - 1), rloo_advantages(r, group_size),
                               rtol=0, atol=1e-12)


def test_group_shape_errors():
    with pytest.raises(ConfigError, match="groups of 3"):
        group_advantages(torch.zeros(8), 3)
    with pytest.raises(ConfigError):
        rloo_advantages(torch.zeros(4), 1)


def test_reinforce_and_expand():
    r = torch.tensor([1.0, 3.0])
    torch.testing.assert_close(reinforce_advantages(r, 2.0), torch.tensor([-1.0, 1.0]))
    torch.testing.assert_close(reinforce_advantages(r, torch.tensor([0.5, 0.5])), torch.tensor([0.5, 2.5]))
    out = expand_to_tokens(torch.tensor([2.0, -1.0]), torch.tensor([[1, 1, 0], [0, 1, 1]]))
    torch.testing.assert_close(out, torch.tensor([[2.0, 2.0, 0.0], [0.0, -1.0, -1.0]]), rtol=0, atol=0)


def test_zero_variance_groups():
    r = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 2.0, 2.0, 2.0])
    assert zero_variance_groups(r, 3).tolist() == [True, False, True]


def test_overlong_penalty_hand_values():
    # L_max = 20, L_cache = 4: free up to 16, then −(L − 16)/4, −1 beyond 20
    lengths = torch.tensor([10, 16, 17, 18, 20, 21])
    out = overlong_penalty(lengths, max_len=20, cache_len=4)
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0, -1.0]), rtol=0, atol=0)
    with pytest.raises(ConfigError):
        overlong_penalty(lengths, max_len=4, cache_len=8)


def test_best_of_n_kl():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5, abs=1e-15)  # 0.1931472
    assert best_of_n_kl(4) == pytest.approx(1.3862944 - 0.75, abs=1e-7)  # 0.6362944


def test_runs_on_meta_tensors_so_no_host_sync():
    x = torch.randn(2, 4, device="meta")
    m = torch.ones(2, 4, device="meta")
    adv, ret = gae(x, x, m, 1.0, 0.95)
    r = torch.randn(6, device="meta")
    assert adv.shape == ret.shape == discounted_returns(x, m, 1.0).shape == (2, 4)
    assert group_advantages(r, 3).shape == rloo_advantages(r, 3).shape == (6,)
    assert zero_variance_groups(r, 3).shape == (2,) and overlong_penalty(r, 10, 2).shape == (6,)


def test_turn_credit_hand_values():
    # row 0: turns end at t=1 (r 0.5) and t=4 (r 1.0), t=2 an observation token; R = 1.5, s = 2
    #   rewards earned before each token E = [0, 0, -, 0.5, 0.5] -> A = 0.3 − E/2 = [0.3, 0.3, 0, 0.05, 0.05]
    # row 1: one turn rewarded at its end (t=3, r 2); E = 0 -> A = Â = −0.3 on its valid tokens
    mask = torch.tensor([[1, 1, 0, 1, 1], [1, 1, 1, 1, 0]], dtype=F64)
    r = torch.zeros(2, 5, dtype=F64)
    r[0, 1], r[0, 4], r[1, 3] = 0.5, 1.0, 2.0
    a = turn_credit_advantages(torch.tensor([0.3, -0.3], dtype=F64), r, mask, torch.tensor([2.0, 2.0], dtype=F64))
    assert torch.allclose(a, torch.tensor([[0.3, 0.3, 0, 0.05, 0.05], [-0.3, -0.3, -0.3, -0.3, 0]], dtype=F64))


def test_turn_credit_with_only_a_final_reward_is_the_episode_advantage():
    mask = torch.tensor([[1, 1, 0, 0, 1, 1], [1, 1, 1, 0, 0, 0]], dtype=F64)
    r = torch.zeros(2, 6, dtype=F64)
    r[0, 5], r[1, 2] = 1.0, 0.0
    adv = group_advantages(torch.tensor([1.0, 0.0], dtype=F64), 2)
    assert torch.equal(turn_credit_advantages(adv, r, mask, group_scale(torch.tensor([1.0, 0.0], dtype=F64), 2)),
                       expand_to_tokens(adv, mask))


def test_group_scale_is_the_grpo_divisor_and_one_for_constant_groups():
    r = torch.tensor([1.0, 0.0, 1.0, 0.0, 2.0, 2.0, 2.0, 2.0], dtype=F64)
    s = group_scale(r, 4)
    assert torch.allclose(s, torch.tensor([math.sqrt(1 / 3) + 1e-6] * 4 + [1.0] * 4, dtype=F64))
    assert torch.allclose(group_advantages(r, 4)[:4], (r[:4] - 0.5) / s[:4])
