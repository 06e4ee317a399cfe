"""Agreement statistics against textbook examples, with the arithmetic written out."""

from __future__ import annotations

import pytest

from posttrain.feedback.agreement import (
    cohens_kappa,
    fleiss_kappa,
    fleiss_kappa_counts,
    gold_accuracy,
    krippendorff_alpha_nominal,
    mean_pairwise_kappa,
    percent_agreement,
)


def test_cohens_kappa_textbook():
    # Wikipedia "Cohen's kappa", first example: 50 proposals, two readers.
    #            B yes  B no
    #   A yes     20     5      A said yes 25 times
    #   A no      10    15      A said no  25 times
    # p_o = (20 + 15) / 50 = 0.70
    # p_yes = (25/50)·(30/50) = 0.5·0.6 = 0.30 ; p_no = (25/50)·(20/50) = 0.5·0.4 = 0.20 ; p_e = 0.50
    # κ = (0.70 − 0.50) / (1 − 0.50) = 0.40
    a = ["yes"] * 25 + ["no"] * 25
    b = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert cohens_kappa(a, b) == pytest.approx(0.40, abs=1e-12)
    # Wikipedia's second pair of examples: same p_o = 0.60, different marginals.
    #   45 15 / 25 15 : p_e = (60/100)(70/100) + (40/100)(30/100) = 0.42 + 0.12 = 0.54 ; κ = 0.06/0.46 = 0.1304
    a = ["y"] * 60 + ["n"] * 40
    b = ["y"] * 45 + ["n"] * 15 + ["y"] * 25 + ["n"] * 15
    assert cohens_kappa(a, b) == pytest.approx(0.06 / 0.46, abs=1e-12)


def test_cohens_kappa_edges():
    assert cohens_kappa(["a", "b"], ["a", "b"]) == pytest.approx(1.0)
    # perfect disagreement on a balanced set: p_o = 0, p_e = 0.5 -> κ = −1
    assert cohens_kappa(["a", "b"], ["b", "a"]) == pytest.approx(-1.0)
    assert cohens_kappa(["a", "a"], ["a", "a"]) is None  # p_e = 1: undefined, not 0/0
    assert cohens_kappa([], []) is None
    with pytest.raises(ValueError):
        cohens_kappa(["a"], ["a", "b"])


# Wikipedia "Fleiss' kappa" worked example: 10 subjects, 14 raters each, 5 categories.
FLEISS_TABLE = [
    [0, 0, 0, 0, 14],
    [0, 2, 6, 4, 2],
    [0, 0, 3, 5, 6],
    [0, 3, 9, 2, 0],
    [2, 2, 8, 1, 1],
    [7, 7, 0, 0, 0],
    [3, 2, 6, 3, 0],
    [2, 5, 3, 2, 2],
    [6, 5, 2, 1, 0],
    [0, 2, 2, 3, 7],
]


def test_fleiss_kappa_textbook():
    # Column totals 20, 28, 39, 21, 32 of N·n = 140 ratings:
    #   p_j = 0.143, 0.200, 0.279, 0.150, 0.229 ;
    #   P̄_e = Σ p_j² = (20² + 28² + 39² + 21² + 32²)/140² = 4170/19600 = 0.21276 (Wikipedia rounds: 0.213)
    # P_1 = (14² − 14)/(14·13) = 182/182 = 1.000 ; P_2 = (4+36+16+4 − 14)/182 = 46/182 = 0.253 ; ...
    # P̄ = (1.000+0.253+0.308+0.440+0.330+0.462+0.242+0.176+0.286+0.286)/10 = 0.3780
    # κ = (0.37802 − 0.21276)/(1 − 0.21276) = 0.16526/0.78724 = 0.2099
    p_e = sum((c / 140) ** 2 for c in (20, 28, 39, 21, 32))
    assert p_e == pytest.approx(4170 / 19600, abs=1e-12)
    assert fleiss_kappa_counts(FLEISS_TABLE) == pytest.approx(0.20993, abs=1e-5)
    # the same data given as label lists per item
    items = [[c for c, n in zip("abcde", row, strict=True) for _ in range(n)] for row in FLEISS_TABLE]
    assert fleiss_kappa(items) == pytest.approx(0.20993, abs=1e-5)


def test_fleiss_equals_cohen_style_limits():
    assert fleiss_kappa([["a", "a"], ["b", "b"], ["a", "a"]]) == pytest.approx(1.0)
    assert fleiss_kappa([["a", "a"], ["a", "a"]]) is None  # one category only
    with pytest.raises(ValueError):
        fleiss_kappa_counts([[1, 1], [3, 0]])  # unequal raters per item


def test_krippendorff_alpha_nominal_textbook_with_missing_data():
    # Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", section C: 4 observers,
    # 12 units, nominal values 1..5, '.' = missing. Published result: α_nominal = 0.743.
    n = None
    A = [1, 2, 3, 3, 2, 1, 4, 1, 2, n, n, n]
    B = [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, n, 3]
    C = [n, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, n]
    D = [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, n]
    units = list(zip(A, B, C, D, strict=True))
    # Unit 12 has one value: not pairable. The other 11 units hold n = 40 pairable values:
    #   n_1 = 9, n_2 = 13, n_3 = 10, n_4 = 5, n_5 = 3.
    # Off-diagonal coincidences (each unit adds 1/(m_u − 1) per ordered pair of different values):
    #   unit 2 (2,2,3,2): o_23 = o_32 = 3/3 = 1 ; unit 6 (1,2,3,4): 12 ordered pairs, each 1/3 ;
    #   unit 8 (1,1,2,1): o_12 = o_21 = 3/3 = 1.
    #   Σ_{c≠k} o_ck = 2 + 12/3 + 2 = 8
    # Σ_{c≠k} n_c n_k = 40² − Σ n_c² = 1600 − (81 + 169 + 100 + 25 + 9) = 1216
    # α = 1 − (n − 1)·8/1216 = 1 − 39·8/1216 = 1 − 0.2566 = 0.7434
    assert krippendorff_alpha_nominal(units) == pytest.approx(1 - 39 * 8 / 1216, abs=1e-12)
    assert krippendorff_alpha_nominal(units) == pytest.approx(0.743, abs=5e-4)


def test_krippendorff_alpha_two_raters_no_missing_matches_known_relation():
    # Two raters, no missing data: α = 1 − (n − 1)·D/E. Data: (a,a) (a,b) (b,b) (b,b)
    # values a:3, b:5, n = 8 ; off-diagonal o_ab = o_ba = 1 ; Σ_{c≠k} n_c n_k = 2·3·5 = 30
    # α = 1 − 7·2/30 = 0.5333
    assert krippendorff_alpha_nominal([("a", "a"), ("a", "b"), ("b", "b"), ("b", "b")]) == pytest.approx(1 - 14 / 30)
    assert krippendorff_alpha_nominal([("a", "a"), ("a", "a")]) is None  # no variation
    assert krippendorff_alpha_nominal([("a", None), (None, "b")]) is None  # nothing pairable


def test_percent_agreement_mean_pairwise_kappa_and_gold():
    # unit 1: 3 raters a,a,b -> pairs (a,a) (a,b) (a,b): 1 of 3 agree ; unit 2: x,x -> 1 of 1
    assert percent_agreement([["a", "a", "b"], ["x", "x"], ["only one"]]) == pytest.approx(2 / 4)
    ratings = {"r1": {1: "a", 2: "b", 3: "a"}, "r2": {1: "a", 2: "b", 3: "b"}, "r3": {9: "a"}}
    # r1 vs r2 on items 1..3: p_o = 2/3 ; r1 has a:2 b:1, r2 a:1 b:2 -> p_e = (2·1 + 1·2)/9 = 4/9
    # κ = (2/3 − 4/9)/(1 − 4/9) = (2/9)/(5/9) = 0.4 ; r3 shares nothing and is left out
    assert mean_pairwise_kappa(ratings) == (pytest.approx(0.4), 1)
    assert gold_accuracy([(1, 1), (0, 1), (None, 0), (1, 1)]) == (0.5, 4)
    assert gold_accuracy([]) == (None, 0)
