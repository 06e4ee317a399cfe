"""Evaluation statistics: win rates, bootstrap intervals, length control, reward-model accuracy,
calibration, KL, best-of-n and over-optimization fits.

Pure numpy. Every function takes plain arrays (lists are fine) and returns floats, arrays or a
dict of floats; none reads a model or a config. Each docstring carries the formula it computes;
docs/evaluation.md explains how to read the numbers.

Conventions: an *outcome* is the evaluated model's score in one comparison, 1 = win, ½ = tie,
0 = loss (soft values in [0, 1], e.g. a judge's probability, are accepted where stated).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from posttrain.errors import PosttrainError

ArrayLike = Sequence[float] | np.ndarray


class EvaluationError(PosttrainError, ValueError):
    """Evaluation inputs are malformed (wrong shape, out-of-range outcome, too few samples)."""


def _vec(x: ArrayLike, name: str, min_len: int = 1) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise EvaluationError(f"{name} must be 1-D, got shape {a.shape}")
    if a.size < min_len:
        raise EvaluationError(f"{name} needs at least {min_len} value(s), got {a.size}")
    if not np.all(np.isfinite(a)):
        raise EvaluationError(f"{name} contains NaN or infinite values",
                              fix="drop or repair those rows before evaluating")
    return a


def _same_len(*pairs: tuple[np.ndarray, str]) -> None:
    n = len(pairs[0][0])
    for a, name in pairs[1:]:
        if len(a) != n:
            raise EvaluationError(f"{name} has {len(a)} values but {pairs[0][1]} has {n}",
                                  fix="pass one value per comparison, in the same order")


def _sigmoid(z: np.ndarray | float) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z)))  # overflow-free σ(z)


# --------------------------------------------------------------------------------------------
# Win rates


def win_rate(outcomes: ArrayLike) -> dict[str, float]:
    """Win rate with ties as half a win.

    ``WR = (W + ½·T) / N`` where W, T, L count outcomes 1, ½, 0 and N = W + T + L.
    Returns ``dict(win_rate, wins, ties, losses, n)``.
    """
    o = _vec(outcomes, "outcomes")
    bad = ~(np.isclose(o, 0.0) | np.isclose(o, 0.5) | np.isclose(o, 1.0))
    if bad.any():
        raise EvaluationError(f"outcomes must be 1 (win), 0.5 (tie) or 0 (loss); "
                              f"got {o[bad][:3].tolist()} at index {np.flatnonzero(bad)[:3].tolist()}")
    wins, ties = int(np.isclose(o, 1.0).sum()), int(np.isclose(o, 0.5).sum())
    n = o.size
    return dict(win_rate=(wins + 0.5 * ties) / n, wins=wins, ties=ties, losses=n - wins - ties, n=n)


# --------------------------------------------------------------------------------------------
# Bootstrap


def _bootstrap(values: np.ndarray, stat: Callable[[np.ndarray], Any], n_boot: int, seed: int) -> np.ndarray:
    if n_boot < 1:
        raise EvaluationError(f"n_boot must be >= 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    n = len(values)
    return np.array([float(stat(values[rng.integers(0, n, size=n)])) for _ in range(n_boot)])


def bootstrap_ci(values: ArrayLike, stat: Callable[[np.ndarray], Any] = np.mean, n_boot: int = 2000,
                 alpha: float = 0.05, seed: int = 0) -> tuple[float, float, float]:
    """Percentile bootstrap interval of ``stat`` over rows.

    Draw B = ``n_boot`` resamples of the N rows with replacement (rows of a 2-D array stay
    together), compute θ*_b = stat(resample_b), and return
    ``(stat(values), quantile(θ*, α/2), quantile(θ*, 1 − α/2))``.
    The interval reflects prompt-sampling noise only (not judge or generation randomness unless
    each row already averages over those).
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim == 0 or len(v) < 1:
        raise EvaluationError("bootstrap_ci needs at least one row")
    if not 0 < alpha < 1:
        raise EvaluationError(f"alpha must be in (0, 1), got {alpha}")
    boots = _bootstrap(v, stat, n_boot, seed)
    lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return float(stat(v)), float(lo), float(hi)


def paired_bootstrap(a: ArrayLike, b: ArrayLike, n_boot: int = 2000, seed: int = 0,
                     alpha: float = 0.05) -> dict[str, float]:
    """Paired comparison of two checkpoints scored on the SAME prompts (row i of ``a`` and ``b``
    is prompt i).

    With per-prompt differences dᵢ = aᵢ − bᵢ, resample prompts (so both scores of a prompt move
    together, which cancels the prompt-difficulty variance that an unpaired comparison keeps):
    ``diff = mean(d)``, ``[lo, hi]`` = percentile interval of the resampled means at level 1 − α,
    ``p_value = P*(mean(d*) ≤ 0) = k / B``, the share k/B of the B = ``n_boot`` resamples in which
    ``a`` is not better than ``b``. A small p-value supports "a > b"; it is a bootstrap one-sided
    p-value for H₀: E[d] ≤ 0 (percentile method, so it is approximate for small N and has
    resolution 1/B).

    ``p_value`` is 0.0 when no resample had mean(d*) ≤ 0 (k = 0). That does not mean p = 0, only
    p < 1/B: ``p_value_is_bound`` is then True, and ``n_boot`` (B) travels with the result so that
    every place that shows it writes ``p < 1/B`` (:func:`posttrain.evaluation.report.format_p`).
    Returns ``dict(diff, lo, hi, p_value, p_value_is_bound, n_boot, n)``.
    """
    x, y = _vec(a, "a"), _vec(b, "b")
    _same_len((x, "a"), (y, "b"))
    d = x - y
    boots = _bootstrap(d, np.mean, n_boot, seed)
    lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    k = int(np.sum(boots <= 0))
    return dict(diff=float(d.mean()), lo=float(lo), hi=float(hi), p_value=k / n_boot,
                p_value_is_bound=k == 0, n_boot=int(n_boot), n=int(d.size))


# --------------------------------------------------------------------------------------------
# Length-controlled win rate


def _fit_logistic(X: np.ndarray, y: np.ndarray, l2: float, max_iter: int = 100) -> np.ndarray:
    """Minimize mean_i[−yᵢ log σ(zᵢ) − (1−yᵢ) log σ(−zᵢ)] + (l2/2)‖w‖², z = Xw, for soft labels
    y ∈ [0, 1] by Newton's method with a backtracking line search (the objective is convex)."""
    n, k = X.shape

    def objective(w: np.ndarray) -> float:
        z = X @ w
        return float(np.mean(y * np.logaddexp(0, -z) + (1 - y) * np.logaddexp(0, z)) + 0.5 * l2 * w @ w)

    w = np.zeros(k)
    f = objective(w)
    for _ in range(max_iter):
        p = _sigmoid(X @ w)
        grad = X.T @ (p - y) / n + l2 * w
        hess = (X * (p * (1 - p))[:, None]).T @ X / n + l2 * np.eye(k)
        try:
            step = np.linalg.solve(hess, grad)
        except np.linalg.LinAlgError as e:
            raise EvaluationError("the length-control fit is singular",
                                  fix="use l2 > 0 or pass outcomes with some variation") from e
        t = 1.0
        while True:  # backtracking: Newton can overshoot when the data are (nearly) separable
            f_new = objective(w - t * step)
            if f_new <= f - 1e-4 * t * (grad @ step) or t < 1e-10:
                break
            t *= 0.5
        w, f = w - t * step, f_new
        if np.max(np.abs(t * step)) < 1e-10:
            return w
    raise EvaluationError(f"the length-control fit did not converge in {max_iter} Newton steps",
                          fix="raise l2 (the data are close to separable)")


def length_controlled_win_rate(outcomes: ArrayLike, len_model: ArrayLike, len_baseline: ArrayLike,
                               l2: float = 1e-6) -> dict[str, float]:
    """AlpacaEval-style length-controlled win rate.

    Fit the GLM ``logit P(model wins on prompt i) = θ + φ·tanh(Δℓᵢ / sd(Δℓ))`` with
    Δℓᵢ = len_model_i − len_baseline_i (sd with ddof 0; the feature is 0 when sd = 0) by logistic
    regression on soft labels yᵢ = outcome ∈ [0, 1] (a tie is ½), minimizing the mean
    cross-entropy + (l2/2)(θ² + φ²). Then ``LC-WR = σ(θ)``: the predicted win rate with the length
    term set to 0, i.e. "what if both answers were equally long". The light L2 keeps φ finite when
    length separates the outcomes exactly. Unlike AlpacaEval there is no instruction-difficulty
    term and no gamed-baseline augmentation.
    Returns ``dict(lc_win_rate, raw_win_rate, theta, phi, n)``.
    """
    y = _vec(outcomes, "outcomes")
    lm, lb = _vec(len_model, "len_model"), _vec(len_baseline, "len_baseline")
    _same_len((y, "outcomes"), (lm, "len_model"), (lb, "len_baseline"))
    if np.any((y < 0) | (y > 1)):
        raise EvaluationError("outcomes must lie in [0, 1] (1 win, 0.5 tie, 0 loss)")
    if l2 < 0:
        raise EvaluationError(f"l2 must be >= 0, got {l2}")
    delta = lm - lb
    sd = delta.std()
    x = np.tanh(delta / sd) if sd > 0 else np.zeros_like(delta)
    theta, phi = _fit_logistic(np.column_stack([np.ones_like(x), x]), y, l2)
    return dict(lc_win_rate=float(_sigmoid(theta)), raw_win_rate=float(y.mean()),
                theta=float(theta), phi=float(phi), n=int(y.size))


# --------------------------------------------------------------------------------------------
# Reward-model accuracy and calibration


def pairwise_accuracy(r_chosen: ArrayLike, r_rejected: ArrayLike,
                      subsets: Sequence[str] | None = None) -> dict[str, Any]:
    """RewardBench-v1 pairwise accuracy: ``acc = (1/N) Σᵢ 1[r(x, y⁺ᵢ) > r(x, y⁻ᵢ)]``.

    Strict: a tie (equal rewards) counts as wrong, so a constant reward scores 0, not 0.5.
    The overall accuracy is over all pairs, i.e. the example-weighted mean of the subset
    accuracies (Σ n_s·acc_s / Σ n_s). Returns ``dict(accuracy, n, ties, subsets)`` where
    ``subsets`` maps each subset name to ``dict(accuracy, n)`` (empty when none are given).
    """
    c, r = _vec(r_chosen, "r_chosen"), _vec(r_rejected, "r_rejected")
    _same_len((c, "r_chosen"), (r, "r_rejected"))
    correct = c > r
    per: dict[str, dict[str, float]] = {}
    if subsets is not None:
        names = np.asarray(subsets, dtype=object)
        if len(names) != len(c):
            raise EvaluationError(f"subsets has {len(names)} labels but there are {len(c)} pairs")
        for s in dict.fromkeys(names.tolist()):  # first-appearance order
            m = names == s
            per[str(s)] = dict(accuracy=float(correct[m].mean()), n=int(m.sum()))
    return dict(accuracy=float(correct.mean()), n=int(c.size), ties=int((c == r).sum()), subsets=per)


def length_baseline_accuracy(len_chosen: ArrayLike, len_rejected: ArrayLike) -> float:
    """Accuracy of the "longer answer wins" rule on preference pairs.

    ``acc = (1/N) Σᵢ (1[ℓ⁺ᵢ > ℓ⁻ᵢ] + ½·1[ℓ⁺ᵢ = ℓ⁻ᵢ])``. Equal lengths count half because the rule
    has no information there and a random tie-break is right half the time; this is the
    expected accuracy of that rule, so compare it with a reward model's accuracy as the score
    length alone explains (a gap near 0 means the RM may just be measuring length).
    """
    a, b = _vec(len_chosen, "len_chosen"), _vec(len_rejected, "len_rejected")
    _same_len((a, "len_chosen"), (b, "len_rejected"))
    return float(np.mean((a > b) + 0.5 * (a == b)))


def calibration_bins(probs: ArrayLike, labels: ArrayLike, n_bins: int = 10) -> dict[str, np.ndarray]:
    """Equal-width reliability bins on [0, 1]: bin k holds k/K ≤ p < (k+1)/K (p = 1 goes to the
    last bin). Returns arrays ``count``, ``mean_prob`` (confidence) and ``frac_pos`` (observed
    frequency of label 1) per bin; empty bins have NaN means."""
    p, y = _vec(probs, "probs"), _vec(labels, "labels")
    _same_len((p, "probs"), (y, "labels"))
    if np.any((p < 0) | (p > 1)):
        raise EvaluationError("probs must lie in [0, 1]")
    if not np.all((y == 0) | (y == 1)):
        raise EvaluationError("labels must be 0 or 1")
    if n_bins < 1:
        raise EvaluationError(f"n_bins must be >= 1, got {n_bins}")
    k = np.minimum(np.floor(p * n_bins).astype(int), n_bins - 1)
    count = np.bincount(k, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_prob = np.bincount(k, weights=p, minlength=n_bins) / count
        frac_pos = np.bincount(k, weights=y, minlength=n_bins) / count
    return dict(count=count, mean_prob=mean_prob, frac_pos=frac_pos)


def expected_calibration_error(probs: ArrayLike, labels: ArrayLike, n_bins: int = 10) -> float:
    """``ECE = Σ_k (n_k / N) · |frac_pos_k − mean_prob_k|`` over K equal-width bins of the
    predicted probability (see :func:`calibration_bins`). 0 = perfectly calibrated.

    For a reward model use p = σ(r⁺ − r⁻). If every label is 1 (chosen always first), ECE only
    measures under-confidence; score each pair in both orders, (p, 1) and (1 − p, 0), to
    measure both directions.
    """
    b = calibration_bins(probs, labels, n_bins)
    m = b["count"] > 0
    w = b["count"][m] / b["count"].sum()
    return float(np.sum(w * np.abs(b["frac_pos"][m] - b["mean_prob"][m])))


# --------------------------------------------------------------------------------------------
# KL and best-of-n


def kl_from_samples(logp: ArrayLike, ref_logp: ArrayLike, mask: ArrayLike | None = None) -> dict[str, float]:
    """Monte-Carlo KL(π ‖ π_ref) from sequences y ~ π.

    ``KL ≈ (1/N) Σᵢ [log π(yᵢ|x) − log π_ref(yᵢ|x)]`` with sequence log-probs (sum over the
    response tokens), ``se = sd(diff, ddof=1) / √N``. Inputs are per-sequence sums of shape [N],
    or per-token values [N, T] that are summed over T (times ``mask`` when given). Unbiased only
    when y is sampled from π itself at temperature 1; single-sample values can be negative.
    Returns ``dict(kl, se, n)``; se is NaN for N = 1.
    """
    lp, rp = np.asarray(logp, dtype=np.float64), np.asarray(ref_logp, dtype=np.float64)
    if lp.shape != rp.shape:
        raise EvaluationError(f"logp has shape {lp.shape} but ref_logp has {rp.shape}")
    diff = lp - rp
    if diff.ndim == 2:
        diff = (diff * (1.0 if mask is None else np.asarray(mask, dtype=np.float64))).sum(axis=1)
    diff = _vec(diff, "logp - ref_logp")
    se = float(diff.std(ddof=1) / math.sqrt(diff.size)) if diff.size > 1 else float("nan")
    return dict(kl=float(diff.mean()), se=se, n=int(diff.size))


def best_of_n_kl(n: int) -> float:
    """Analytic KL(π_BoN ‖ π) of best-of-n sampling (continuous reward, no ties):
    ``KL = log n − (n − 1)/n`` (Gao, Schulman & Hilton 2023, after Stiennon et al. 2020).
    It is an upper bound when rewards tie."""
    if int(n) != n or n < 1:
        raise EvaluationError(f"n must be a positive integer, got {n}")
    return math.log(n) - (n - 1) / n


def _order_weights(m: int, n: int) -> np.ndarray:
    """w_i = C(i−1, n−1) / C(m, n), i = 1..m: P(the i-th smallest of m is the max of a random
    n-subset). Exact big-int arithmetic, so large m does not overflow."""
    total = math.comb(m, n)
    return np.array([math.comb(i - 1, n - 1) / total for i in range(1, m + 1)])


def best_of_n_expected(values: ArrayLike, n: int, select_by: ArrayLike | None = None) -> np.ndarray:
    """Unbiased per-prompt estimate of the best-of-n score from M ≥ n samples per prompt.

    ``values`` is [P, M] (a 1-D array is one prompt). Without ``select_by``:
    ``E[max of n] = Σ_{i=n}^{M} C(i−1, n−1)/C(M, n) · v₍ᵢ₎`` with v₍₁₎ ≤ … ≤ v₍M₎ sorted, which is
    the average of the maximum over all C(M, n) subsets of size n (a U-statistic: unbiased for
    n i.i.d. draws, unlike taking the max of the first n).

    With ``select_by`` (same shape; e.g. a proxy RM) the sample with the highest selection score
    among the n is picked and its ``values`` (e.g. gold score) is averaged: sort by ``select_by``,
    apply the same weights to the values in that order. Ties in ``select_by`` are broken at
    random, which in expectation means replacing each value by the mean over its tie group.
    Returns an array [P].
    """
    v = np.atleast_2d(np.asarray(values, dtype=np.float64))
    if v.ndim != 2:
        raise EvaluationError(f"values must be [P, M], got shape {v.shape}")
    m = v.shape[1]
    if int(n) != n or not 1 <= n <= m:
        raise EvaluationError(f"n must be an integer in [1, M={m}], got {n}",
                              fix="draw at least n samples per prompt")
    w = _order_weights(m, int(n))
    if select_by is None:
        return np.sort(v, axis=1) @ w
    s = np.atleast_2d(np.asarray(select_by, dtype=np.float64))
    if s.shape != v.shape:
        raise EvaluationError(f"select_by has shape {s.shape} but values has {v.shape}")
    order = np.argsort(s, axis=1, kind="stable")
    s_sorted, v_sorted = np.take_along_axis(s, order, 1), np.take_along_axis(v, order, 1)
    for row in np.flatnonzero(np.any(np.diff(s_sorted, axis=1) == 0, axis=1)):  # rows with ties
        _, group = np.unique(s_sorted[row], return_inverse=True)
        v_sorted[row] = (np.bincount(group, weights=v_sorted[row]) / np.bincount(group))[group]
    return v_sorted @ w


# --------------------------------------------------------------------------------------------
# Over-optimization (Gao, Schulman & Hilton 2023)


def _lstsq_fit(d: np.ndarray, r: np.ndarray, features: np.ndarray) -> tuple[float, float, float]:
    coef, *_ = np.linalg.lstsq(features, r, rcond=None)
    rmse = float(np.sqrt(np.mean((features @ coef - r) ** 2)))
    return float(coef[0]), float(-coef[1]), rmse


def _gao_inputs(d: ArrayLike, r: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    dd, rr = _vec(d, "d", min_len=2), _vec(r, "r", min_len=2)
    _same_len((dd, "d"), (rr, "r"))
    if np.any(dd < 0):
        raise EvaluationError("d = sqrt(KL) must be >= 0")
    return dd, rr


def gao_fit_bon(d: ArrayLike, r: ArrayLike) -> dict[str, float]:
    """Least-squares fit of ``R_bon(d) = d(α − β d)`` with d = √KL(π‖π_init) and R the gold score
    gain over the initial policy (so R(0) = 0; there is no intercept).
    Peak: ``d* = α / (2β)``, ``R* = α² / (4β)`` (inf when β ≤ 0: no over-optimization seen yet).
    Returns ``dict(alpha, beta, d_peak, r_peak, rmse)``."""
    dd, rr = _gao_inputs(d, r)
    alpha, beta, rmse = _lstsq_fit(dd, rr, np.column_stack([dd, dd**2]))
    if beta > 0:
        d_peak, r_peak = alpha / (2 * beta), alpha**2 / (4 * beta)
    else:
        d_peak = r_peak = math.inf
    return dict(alpha=alpha, beta=beta, d_peak=d_peak, r_peak=r_peak, rmse=rmse)


def gao_fit_rl(d: ArrayLike, r: ArrayLike) -> dict[str, float]:
    """Least-squares fit of ``R_RL(d) = d(α − β log d)`` (d log d := 0 at d = 0), d and R as in
    :func:`gao_fit_bon`. Peak where dR/dd = α − β(log d + 1) = 0: ``d* = exp(α/β − 1)``,
    ``R* = β d*`` (inf when β ≤ 0). Returns ``dict(alpha, beta, d_peak, r_peak, rmse)``."""
    dd, rr = _gao_inputs(d, r)
    dlogd = np.where(dd > 0, dd * np.log(np.where(dd > 0, dd, 1.0)), 0.0)
    alpha, beta, rmse = _lstsq_fit(dd, rr, np.column_stack([dd, dlogd]))
    if beta > 0:
        d_peak = math.exp(min(alpha / beta - 1, 700.0))  # clamp: exp overflows past ~709
        r_peak = beta * d_peak
    else:
        d_peak = r_peak = math.inf
    return dict(alpha=alpha, beta=beta, d_peak=d_peak, r_peak=r_peak, rmse=rmse)


# --------------------------------------------------------------------------------------------
# Judge position swap


def swap_consistency(verdicts_ab: ArrayLike, verdicts_ba: ArrayLike) -> dict[str, Any]:
    """Combine a pairwise judge run in both presentation orders.

    Verdicts are POSITIONAL: the score of the response shown FIRST (1 first better, ½ tie,
    0 second better). In run ``ab`` the model is shown first, in run ``ba`` the baseline is, so
    the model's outcomes are ``o_ab = v_ab`` and ``o_ba = 1 − v_ba``.
    ``consistent_i = 1[o_ab,i = o_ba,i]``; ``outcomes_i = o_ab,i`` if consistent else ½
    (disagreement is a tie, the MT-Bench rule). ``first_position_rate = mean(v_ab ∪ v_ba)``:
    the judge's preference for the first slot, 0.5 when it has no position bias.
    Returns ``dict(consistency, outcomes, first_position_rate, n)``.
    """
    ab, ba = _vec(verdicts_ab, "verdicts_ab"), _vec(verdicts_ba, "verdicts_ba")
    _same_len((ab, "verdicts_ab"), (ba, "verdicts_ba"))
    for v, name in ((ab, "verdicts_ab"), (ba, "verdicts_ba")):
        if not np.all(np.isin(v, (0.0, 0.5, 1.0))):
            raise EvaluationError(f"{name} must hold 1, 0.5 or 0 (score of the first-shown response)")
    o_ab, o_ba = ab, 1.0 - ba
    consistent = o_ab == o_ba
    return dict(consistency=float(consistent.mean()), outcomes=np.where(consistent, o_ab, 0.5),
                first_position_rate=float(np.concatenate([ab, ba]).mean()), n=int(ab.size))
