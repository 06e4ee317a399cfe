"""Evaluation statistics against hand-computed values and brute-force references."""

import itertools
import math

import numpy as np
import pytest

from posttrain.evaluation import stats as S
from posttrain.evaluation.stats import EvaluationError


def test_win_rate_counts_ties_half():
    r = S.win_rate([1, 1, 0.5, 0, 0.5])
    assert r == dict(win_rate=(2 + 0.5 * 2) / 5, wins=2, ties=2, losses=1, n=5)
    with pytest.raises(EvaluationError, match="index"):
        S.win_rate([1, 0.7])


def test_bootstrap_two_values_hand_distribution():
    # Resampling two rows {0, 1}: the mean is 0, ½, 1 with probability ¼, ½, ¼, so both 2.5 % tails
    # sit on the end points and the 95 % interval is exactly [0, 1].
    point, lo, hi = S.bootstrap_ci([0.0, 1.0], n_boot=4000, seed=1)
    assert (point, lo, hi) == (0.5, 0.0, 1.0)
    assert S.bootstrap_ci([3.0] * 7) == (3.0, 3.0, 3.0)
    assert S.bootstrap_ci(np.arange(50.0), seed=3) == S.bootstrap_ci(np.arange(50.0), seed=3)


def test_bootstrap_width_matches_normal_theory():
    x = np.random.default_rng(0).normal(size=400)
    point, lo, hi = S.bootstrap_ci(x, n_boot=2000)
    se = x.std() / math.sqrt(len(x))
    assert point == pytest.approx(x.mean())
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.1)


def test_bootstrap_custom_stat_and_rows():
    rows = np.array([[1.0, 0.0], [3.0, 2.0], [5.0, 4.0]])  # rows resampled together: col0 − col1 ≡ 1
    point, lo, hi = S.bootstrap_ci(rows, stat=lambda r: np.mean(r[:, 0] - r[:, 1]))
    assert (point, lo, hi) == (1.0, 1.0, 1.0)
    assert S.bootstrap_ci([1.0, 2.0, 10.0], stat=np.median)[0] == 2.0


def test_paired_bootstrap_p_value_and_interval():
    # d = a − b ∈ {+1, −1}: resampled mean is 1, 0, −1 w.p. ¼, ½, ¼, so P*(mean ≤ 0) = ¾.
    r = S.paired_bootstrap([2.0, 0.0], [1.0, 1.0], n_boot=8000, seed=0)
    assert r["diff"] == 0.0 and r["n"] == 2
    assert r["p_value"] == pytest.approx(0.75, abs=0.02)
    assert (r["lo"], r["hi"]) == (-1.0, 1.0)
    assert S.paired_bootstrap([1, 2, 3], [0, 1, 2])["p_value"] == 0.0
    assert S.paired_bootstrap([0, 1, 2], [1, 2, 3])["p_value"] == 1.0


def test_paired_interval_is_narrower_than_unpaired():
    # Prompt difficulty dominates the variance; pairing cancels it.
    rng = np.random.default_rng(0)
    difficulty = rng.normal(scale=3.0, size=200)
    a = difficulty + 0.3 + rng.normal(scale=0.2, size=200)
    b = difficulty + rng.normal(scale=0.2, size=200)
    r = S.paired_bootstrap(a, b)
    _, lo_a, hi_a = S.bootstrap_ci(a)
    assert r["lo"] > 0 and r["p_value"] < 0.01
    assert (r["hi"] - r["lo"]) < 0.2 * (hi_a - lo_a)
    with pytest.raises(EvaluationError, match="same order"):
        S.paired_bootstrap([1, 2], [1])


def _lengths(seed=0, n=200):
    """Model longer on ~80 % of prompts, equal on ~10 %, shorter on ~10 %."""
    rng = np.random.default_rng(seed)
    base = rng.integers(100, 400, n).astype(float)
    u = rng.random(n)
    delta = np.where(u < 0.8, rng.integers(1, 300, n), np.where(u < 0.9, 0, -rng.integers(1, 300, n)))
    return base + delta, base, delta


def test_lc_two_groups_hand_computed():
    # Δℓ = ±50 in equal halves → sd = 50, feature x = ±tanh(1). Two groups, two parameters: the
    # unregularized fit is saturated, θ ± φ·tanh(1) = logit(group win rate), so with win rates
    # 0.9 and 0.5: θ = (logit 0.9 + logit 0.5)/2 = log(9)/2 and LC = σ(θ) = 3/4; φ = log(9)/(2 tanh 1).
    delta = np.array([50.0] * 10 + [-50.0] * 10)
    y = np.array([1.0] * 9 + [0.0] + [1.0] * 5 + [0.0] * 5)
    r = S.length_controlled_win_rate(y, 100 + delta, np.full(20, 100.0), l2=0.0)
    assert r["raw_win_rate"] == pytest.approx(0.7, abs=1e-12)
    assert r["theta"] == pytest.approx(math.log(9) / 2, abs=1e-8)
    assert r["phi"] == pytest.approx(math.log(9) / (2 * math.tanh(1)), abs=1e-8)
    assert r["lc_win_rate"] == pytest.approx(0.75, abs=1e-8)


def test_lc_length_only_outcomes_give_parity():
    lm, lb, delta = _lengths()
    y = np.where(delta > 0, 1.0, np.where(delta == 0, 0.5, 0.0))  # longer always wins, equal ties
    r = S.length_controlled_win_rate(y, lm, lb)
    assert r["raw_win_rate"] > 0.75
    assert r["lc_win_rate"] == pytest.approx(0.5, abs=0.02)
    assert r["phi"] > 20


def test_lc_length_independent_wins_stay_high():
    lm, lb, _ = _lengths()
    y = (np.random.default_rng(5).random(len(lm)) < 0.9).astype(float)
    r = S.length_controlled_win_rate(y, lm, lb)
    assert r["lc_win_rate"] > 0.85
    assert abs(r["lc_win_rate"] - r["raw_win_rate"]) < 0.05


def test_lc_fit_satisfies_optimality_conditions():
    # Gradient of mean cross-entropy + (l2/2)‖w‖² must vanish at the returned (θ, φ).
    lm, lb, delta = _lengths(seed=2)
    y = np.clip(0.6 + 0.002 * delta + np.random.default_rng(2).normal(0, 0.2, len(lm)), 0, 1)  # soft labels
    l2 = 1e-3
    r = S.length_controlled_win_rate(y, lm, lb, l2=l2)
    x = np.tanh(delta / delta.std())
    p = 1 / (1 + np.exp(-(r["theta"] + r["phi"] * x)))
    assert np.mean(p - y) + l2 * r["theta"] == pytest.approx(0, abs=1e-9)
    assert np.mean((p - y) * x) + l2 * r["phi"] == pytest.approx(0, abs=1e-9)
    # No length variation: only θ is identified; LC = σ(θ) with mean(σ(θ) − y) + l2·θ = 0.
    r0 = S.length_controlled_win_rate([1, 1, 1, 0], [5] * 4, [5] * 4, l2=l2)
    assert r0["phi"] == 0.0
    assert 0.75 - r0["lc_win_rate"] == pytest.approx(l2 * r0["theta"], abs=1e-12)


def test_pairwise_accuracy_strict_with_subsets():
    r = S.pairwise_accuracy([1, 2, 3, 0], [0, 2, 4, -1], subsets=["a", "a", "a", "b"])
    assert r["accuracy"] == 0.5 and r["n"] == 4 and r["ties"] == 1  # the tie (2 vs 2) is wrong
    assert r["subsets"] == {"a": dict(accuracy=1 / 3, n=3), "b": dict(accuracy=1.0, n=1)}
    assert S.pairwise_accuracy([1, 1], [1, 1])["accuracy"] == 0.0  # constant reward: 0, not ½


def test_length_baseline_counts_equal_lengths_half():
    assert S.length_baseline_accuracy([10, 5, 7, 9], [3, 5, 9, 2]) == (1 + 0.5 + 0 + 1) / 4


def test_ece_hand_computed():
    # bins: [0, .1): p̄ .05, freq 0 → .05·¼; [.1, .2): .15·¼; [.9, 1]: p̄ .95 vs freq .5 → .45·½
    ece = S.expected_calibration_error([0.05, 0.15, 0.95, 0.95], [0, 0, 1, 0])
    assert ece == pytest.approx(0.0125 + 0.0375 + 0.225, abs=1e-12)
    b = S.calibration_bins([0.0, 1.0, 0.5], [0, 1, 1], n_bins=4)  # p = 1 lands in the last bin
    assert b["count"].tolist() == [1, 0, 1, 1]
    assert S.expected_calibration_error([0.0, 1.0, 0.5], [0, 1, 1], n_bins=4) == pytest.approx(0.5 / 3)
    with pytest.raises(EvaluationError):
        S.expected_calibration_error([0.2], [2])


def test_kl_from_samples_mean_and_se():
    r = S.kl_from_samples([-1.0, -2.0, -3.0], [-1.5, -2.5, -2.0])  # diffs .5, .5, −1
    assert r["kl"] == pytest.approx(0.0, abs=1e-12)
    assert r["se"] == pytest.approx(0.5, abs=1e-12)  # sd = √.75, /√3
    tok = S.kl_from_samples([[-1.0, -1.0, -9.0]], [[-2.0, -1.5, 0.0]], mask=[[1, 1, 0]])
    assert tok["kl"] == pytest.approx(1.5) and math.isnan(tok["se"])


def test_best_of_n_kl_formula_and_discrete_limit():
    assert S.best_of_n_kl(1) == 0.0
    assert S.best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5, abs=1e-12)
    assert S.best_of_n_kl(4) == pytest.approx(1.3862943611198906 - 0.75, abs=1e-12)
    # Exact KL of best-of-n over K equally likely, distinct rewards: P(rank i) = (i/K)^n − ((i−1)/K)^n.
    k = 200_000
    i = np.arange(1, k + 1)
    for n in (2, 8, 64):
        p = (i / k) ** n - ((i - 1) / k) ** n
        kl = np.sum(np.where(p > 0, p * np.log(np.maximum(p, 1e-300) * k), 0.0))
        assert kl == pytest.approx(S.best_of_n_kl(n), abs=2e-3)
    with pytest.raises(EvaluationError):
        S.best_of_n_kl(0)


def _brute_best_of_n(values, n, select_by):
    """Mean over all n-subsets of the value at the selection argmax (ties split evenly)."""
    out = []
    for subset in itertools.combinations(range(len(values)), n):
        top = max(select_by[j] for j in subset)
        out.append(np.mean([values[j] for j in subset if select_by[j] == top]))
    return np.mean(out)


def test_best_of_n_expected_matches_enumeration():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(3, 7))
    for n in range(1, 8):
        est = S.best_of_n_expected(v, n)
        assert est == pytest.approx([_brute_best_of_n(row, n, row) for row in v], abs=1e-12)
    assert S.best_of_n_expected(v, 1) == pytest.approx(v.mean(1))
    assert S.best_of_n_expected(v, 7) == pytest.approx(v.max(1))
    assert S.best_of_n_expected([1.0, 2.0, 3.0], 2) == pytest.approx([(2 + 3 + 3) / 3])  # by hand


def test_best_of_n_proxy_selection_matches_enumeration_with_ties():
    rng = np.random.default_rng(1)
    gold = rng.normal(size=(4, 6))
    proxy = rng.integers(0, 3, size=(4, 6)).astype(float)  # many ties
    for n in range(1, 7):
        est = S.best_of_n_expected(gold, n, select_by=proxy)
        assert est == pytest.approx([_brute_best_of_n(g, n, p) for g, p in zip(gold, proxy)], abs=1e-12)
    # Hand case: proxy ranks 3 > 1 > 2 on samples with gold 0, 10, 5; n=2 picks proxy-best of each
    # pair {0,1}→gold 0, {0,2}→0, {1,2}→5 (proxy 2 beats 1): mean 5/3.
    assert S.best_of_n_expected([[0.0, 10.0, 5.0]], 2, select_by=[[3.0, 1.0, 2.0]]) == pytest.approx([5 / 3])
    with pytest.raises(EvaluationError, match="at least n"):
        S.best_of_n_expected(gold, 7)


def test_gao_fits_recover_parameters_and_peaks():
    d = np.linspace(0.1, 6, 30)
    bon = S.gao_fit_bon(d, d * (2.0 - 0.5 * d))
    assert (bon["alpha"], bon["beta"]) == pytest.approx((2.0, 0.5), abs=1e-10)
    assert (bon["d_peak"], bon["r_peak"]) == pytest.approx((2.0, 2.0), abs=1e-9)
    assert bon["rmse"] < 1e-10
    rl = S.gao_fit_rl(np.append(d, 0.0), np.append(d * (1.0 - 0.5 * np.log(d)), 0.0))
    assert (rl["alpha"], rl["beta"]) == pytest.approx((1.0, 0.5), abs=1e-10)
    assert (rl["d_peak"], rl["r_peak"]) == pytest.approx((math.e, 0.5 * math.e), abs=1e-9)
    assert S.gao_fit_bon([1.0, 2.0], [1.0, 2.0])["d_peak"] == math.inf  # still rising: no peak


def test_swap_consistency_hand_computed():
    # Positional verdicts: score of the response shown first. Model first in ab, second in ba.
    r = S.swap_consistency([1, 1, 0.5, 0], [0, 1, 0.5, 1])
    assert r["consistency"] == 0.75  # model outcomes ab [1,1,.5,0] vs ba [1,0,.5,0]
    assert r["outcomes"].tolist() == [1.0, 0.5, 0.5, 0.0]
    assert r["first_position_rate"] == 5 / 8
    with pytest.raises(EvaluationError, match="first-shown"):
        S.swap_consistency([2], [0])
