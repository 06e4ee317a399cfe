"""Active selection rules of the loop: hand-computed scores and the orders they give."""

import math

import pytest

from posttrain.loop.selection import choose, ensemble_disagreement, order, policy_margin, split_by_share


def sig(x):
    return 1 / (1 + math.exp(-x))


def test_ensemble_disagreement_hand_values():
    # pair 0: members agree (Δ = 1, 1, 1) -> 0; pair 1: Δ = 2, 0, −2 -> p = σ(2), 1/2, σ(−2)
    u = ensemble_disagreement([[1.0, 2.0], [1.0, 0.0], [1.0, -2.0]], [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    p = [sig(2), 0.5, sig(-2)]
    assert u[0] == pytest.approx(0.0)
    assert u[1] == pytest.approx(math.sqrt(sum((x - 0.5) ** 2 for x in p) / 3))
    assert ensemble_disagreement([[0.0, 3.0]], [[0.0, 0.0]]) == pytest.approx([0.5, 0.5 - (sig(3) - 0.5)])


def test_policy_margin_is_the_per_token_loglik_difference():
    assert policy_margin([-4.0, -9.0], [2, 3], [-6.0, -3.0], [3, 1]) == pytest.approx([0.0, 0.0])
    assert policy_margin([-4.0], [4], [-1.0], [2]) == pytest.approx([0.5])


PAIRS = [{"pair_id": f"p{i}", "prompt": f"q{i // 2}"} for i in range(6)]  # two pairs per prompt


def test_rules_order_by_their_scores_and_cap_per_prompt():
    scores = {"p0": 0.1, "p1": 0.4, "p2": 0.3, "p3": 0.0, "p4": 0.2, "p5": 0.25}
    assert order(PAIRS, "rm_uncertainty", scores, 0) == ["p1", "p2", "p5", "p4", "p0", "p3"]
    assert order(PAIRS, "policy_margin", scores, 0) == ["p3", "p0", "p4", "p5", "p2", "p1"]
    chosen, passed = choose(PAIRS, 4, "rm_uncertainty", scores, 0, max_per_prompt=1)  # 3 prompts: 3 pairs
    assert chosen == ["p1", "p2", "p5"] and passed == ["p4", "p0", "p3"]
    assert choose(PAIRS, 4, "rm_uncertainty", scores, 0)[0] == ["p1", "p2", "p5", "p4"]


def test_diversity_takes_one_pair_per_prompt_first_and_random_is_seeded():
    first = order(PAIRS, "diversity", None, 3)[:3]
    assert sorted(int(p[1]) // 2 for p in first) == [0, 1, 2]
    assert order(PAIRS, "random", None, 5) == order(PAIRS, "random", None, 5) != order(PAIRS, "random", None, 6)


def test_split_by_share_is_proportional_and_complete():
    parts = split_by_share([f"p{i}" for i in range(10)], [3.0, 1.0], 0)
    assert [len(p) for p in parts] == [8, 2] or [len(p) for p in parts] == [7, 3]
    assert sorted(parts[0] + parts[1]) == sorted(f"p{i}" for i in range(10))
    assert [len(p) for p in split_by_share([f"p{i}" for i in range(9)], [1, 1, 1], 0)] == [3, 3, 3]
