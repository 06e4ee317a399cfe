"""Inter-annotator agreement and gold accuracy: pure functions on plain label values.

Labels are any hashable values (e.g. "0", "1", "tie", "both_bad"). Every function returns None where
the statistic is undefined (no data, or no variation so chance agreement is 1), never NaN, so the
dashboard and JSON show "n/a" rather than a misleading number.

* Cohen's κ (two raters, same items):       κ = (p_o − p_e) / (1 − p_e),  p_e = Σ_c p_x(c)·p_y(c)
  Cohen 1960, "A coefficient of agreement for nominal scales".
* Fleiss' κ (n raters per item, any raters): κ = (P̄ − P̄_e) / (1 − P̄_e),
  P_i = (Σ_j n_ij² − n) / (n(n − 1)),  P̄_e = Σ_j p_j²,  p_j = Σ_i n_ij / (N n). Fleiss 1971.
* Krippendorff's α, nominal, missing data allowed: α = 1 − D_o / D_e from the coincidence matrix
  o_ck = Σ_u (number of c–k pairs in unit u) / (m_u − 1) over units with m_u ≥ 2 values;
  α = 1 − (n − 1) · Σ_{c≠k} o_ck / Σ_{c≠k} n_c n_k. Krippendorff 2011, "Computing Krippendorff's
  Alpha-Reliability". Read ≥ 0.8 as reliable, ≥ 0.667 as tentative (his guidance).
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from collections.abc import Hashable, Iterable, Mapping, Sequence


def cohens_kappa(x: Sequence[Hashable], y: Sequence[Hashable]) -> float | None:
    """Cohen's κ of two raters who labeled the same items in the same order."""
    if len(x) != len(y):
        raise ValueError(f"both raters must label the same items ({len(x)} vs {len(y)} labels)")
    n = len(x)
    if n == 0:
        return None
    p_o = sum(a == b for a, b in zip(x, y, strict=True)) / n
    cx, cy = Counter(x), Counter(y)
    p_e = sum(cx[c] * cy[c] for c in cx) / (n * n)
    if p_e >= 1.0:  # both raters used one and the same class throughout
        return None
    return (p_o - p_e) / (1 - p_e)


def fleiss_kappa_counts(table: Sequence[Sequence[int]]) -> float | None:
    """Fleiss' κ from an items × categories table of counts; every row must sum to the same n ≥ 2."""
    if not table:
        return None
    n = sum(table[0])
    if n < 2 or any(sum(row) != n for row in table):
        raise ValueError("Fleiss' κ needs the same number (≥ 2) of ratings for every item")
    big_n = len(table)
    p_bar = sum((sum(c * c for c in row) - n) / (n * (n - 1)) for row in table) / big_n
    p_j = [sum(row[j] for row in table) / (big_n * n) for j in range(len(table[0]))]
    p_e = sum(p * p for p in p_j)
    if p_e >= 1.0:
        return None
    return (p_bar - p_e) / (1 - p_e)


def fleiss_kappa(items: Sequence[Sequence[Hashable]]) -> float | None:
    """Fleiss' κ from the labels each item received (the same number of labels per item)."""
    cats = sorted({v for item in items for v in item}, key=repr)
    return fleiss_kappa_counts([[Counter(item)[c] for c in cats] for item in items])


def krippendorff_alpha_nominal(units: Iterable[Iterable[Hashable | None]]) -> float | None:
    """Krippendorff's α for nominal data. ``units`` holds each unit's values (one per rater; None =
    missing). Units with fewer than two values carry no pairs and are ignored."""
    o: dict[tuple, float] = defaultdict(float)  # coincidence matrix
    for unit in units:
        values = [v for v in unit if v is not None]
        m = len(values)
        if m < 2:
            continue
        for a, b in itertools.permutations(range(m), 2):
            o[(values[a], values[b])] += 1.0 / (m - 1)
    n_c: dict[Hashable, float] = defaultdict(float)
    for (c, _), w in o.items():
        n_c[c] += w
    n = sum(n_c.values())
    disagree = sum(w for (c, k), w in o.items() if c != k)
    expected = sum(n_c[c] * n_c[k] for c in n_c for k in n_c if c != k)
    if n == 0 or expected == 0:  # no pairable values, or a single value used throughout
        return None
    return 1.0 - (n - 1) * disagree / expected


def percent_agreement(units: Iterable[Sequence[Hashable]]) -> float | None:
    """Share of agreeing rater pairs, pooled over units with ≥ 2 labels."""
    agree = pairs = 0
    for unit in units:
        for a, b in itertools.combinations(unit, 2):
            pairs += 1
            agree += a == b
    return agree / pairs if pairs else None


def mean_pairwise_kappa(ratings: Mapping[Hashable, Mapping[Hashable, Hashable]],
                        min_shared: int = 2) -> tuple[float | None, int]:
    """Cohen's κ averaged over every pair of raters sharing ≥ ``min_shared`` items (Light 1971).

    ``ratings[rater][item] = label``. Returns (mean κ, number of rater pairs averaged); pairs whose
    κ is undefined are left out."""
    values = []
    for r1, r2 in itertools.combinations(sorted(ratings, key=repr), 2):
        shared = sorted(set(ratings[r1]) & set(ratings[r2]), key=repr)
        if len(shared) < min_shared:
            continue
        k = cohens_kappa([ratings[r1][i] for i in shared], [ratings[r2][i] for i in shared])
        if k is not None:
            values.append(k)
    return (sum(values) / len(values) if values else None), len(values)


def gold_accuracy(answers: Iterable[tuple[Hashable, Hashable]]) -> tuple[float | None, int]:
    """(share of (given, gold) pairs that match, count)."""
    pairs = list(answers)
    if not pairs:
        return None, 0
    return sum(g == t for g, t in pairs) / len(pairs), len(pairs)
