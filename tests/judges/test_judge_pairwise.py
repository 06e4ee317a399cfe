"""Verdict parsing, position-swap logic and aggregation, on scripted judges (hand-checked counts)."""

import math
import re

import pytest

from posttrain.errors import ConfigError
from posttrain.judges.pairwise import (Pair, combine, judge_pairs, pairwise_messages, parse_verdict,
                                       summarize, verdict_outcome)


@pytest.mark.parametrize("text, expected", [
    ("[[A]]", "A"),
    ("Both are fine, but B explains more. [[B]]", "B"),
    ("At first [[A]] seemed right, but on reflection [[C]]", "C"),  # the last verdict wins
    ("[[A]][[B]]", "B"),
    ("Final verdict: [[ b ]]", "B"),  # spaces and lower case
    ("[A]", None),
    ("[[D]]", None),
    ("[[AB]]", None),
    ("A is better.", None),
    ("\x00\ufffd garbage ]]] [[[", None),
    ("", None),
    (None, None),
])
def test_parse_verdict(text, expected):
    assert parse_verdict(text) == expected


def test_verdict_outcome_maps_positions_back_to_responses():
    assert [verdict_outcome(v, "ab") for v in ("A", "B", "C", None)] == ["a", "b", "tie", None]
    assert [verdict_outcome(v, "ba") for v in ("A", "B", "C", None)] == ["b", "a", "tie", None]


def test_combine():
    assert combine(["a", "a"]) == ("a", True)
    assert combine(["tie", "tie"]) == ("tie", True)
    assert combine(["a", "b"]) == ("tie", False)
    assert combine(["a", "tie"]) == ("tie", False)
    assert combine(["a", None]) == (None, None)
    assert combine(["b"]) == ("b", None)


class ScriptedJudge:
    """Answers from a table keyed by (response shown first, response shown second)."""

    name = "scripted"

    def __init__(self, table):
        self.table, self.calls = table, []

    def complete(self, messages_list, max_tokens=256, temperature=0.0):
        out = []
        for messages in messages_list:
            user = messages[-1]["content"]
            first, second = re.search(r"\[Response A\]\n(.*?)\n\n\[Response B\]\n(.*?)\n\n", user,
                                      re.S).groups()
            self.calls.append((first, second))
            out.append(self.table[(first, second)])
        return out


TABLE = {
    # pair 0: prefers "good" in both orders -> a, consistent
    ("good", "bad"): "A is clearly better. [[A]]", ("bad", "good"): "[[B]]",
    # pair 1: prefers "fine" (the second verdict changes its mind; the last one counts) -> a
    ("fine", "meh"): "[[A]]", ("meh", "fine"): "maybe [[A]]... no: [[B]]",
    # pair 2: tie in both orders -> tie, consistent
    ("s1", "s2"): "[[C]]", ("s2", "s1"): "[[C]]",
    # pair 3: always the first position -> swap-inconsistent -> tie
    ("x", "y"): "[[A]]", ("y", "x"): "[[A]]",
    # pair 4: one order unparseable -> no outcome
    ("u", "v"): "[[A]]", ("v", "u"): "I cannot decide.",
}
PAIRS = [Pair("q", "good", "bad"), Pair("q", "fine", "meh"), Pair("q", "s1", "s2"),
         Pair("q", "x", "y"), Pair("q", "u", "v")]


def test_swap_logic_and_counts():
    judge = ScriptedJudge(TABLE)
    js = judge_pairs(judge, PAIRS)
    assert len(judge.calls) == 10 and set(judge.calls) == set(TABLE)
    assert [j.winner for j in js] == ["a", "a", "tie", "tie", None]
    assert [j.consistent for j in js] == [True, True, True, False, None]
    assert js[1].verdicts == {"ab": "A", "ba": "B"}
    assert js[4].verdicts == {"ab": "A", "ba": None} and js[4].unparseable
    s = summarize(js)
    assert (s["pairs"], s["judged"], s["wins_a"], s["wins_b"], s["ties"]) == (5, 4, 2, 0, 2)
    assert s["win_rate_a"] == pytest.approx((2 + 0.5 * 2) / 4)  # 0.75
    assert s["swap_inconsistent"] == 1 and s["swap_inconsistency_rate"] == pytest.approx(1 / 4)
    assert s["unparseable_pairs"] == 1 and s["unparseable_rate"] == pytest.approx(1 / 5)
    assert s["verdicts"] == 10 and s["unparseable_verdicts"] == 1
    assert s["mean_prob_a"] is None


def test_single_order_keeps_the_position_bias():
    js = judge_pairs(ScriptedJudge(TABLE), PAIRS, both_orders=False)
    assert [j.winner for j in js] == ["a", "a", "tie", "a", "a"]
    assert all(j.consistent is None for j in js)
    assert summarize(js)["swap_inconsistency_rate"] is None


def test_empty_summary_has_no_rates():
    s = summarize([])
    assert s["pairs"] == 0 and s["win_rate_a"] is None and s["unparseable_rate"] is None


class LetterJudge:
    """choice_logprobs from fixed letter probabilities per position of response 'a'."""

    name = "letters"

    def __init__(self, when_a_first, when_a_second):
        self.tables = {True: when_a_first, False: when_a_second}

    def complete(self, messages_list, max_tokens=256, temperature=0.0):
        raise AssertionError("logprob mode must not generate")

    def choice_logprobs(self, messages, choices):
        a_first = "[Response A]\nalpha" in messages[-1]["content"]
        probs = self.tables[a_first]
        return {c: math.log(probs[c]) if probs[c] > 0 else -math.inf for c in choices}


def test_logprob_mode_averages_both_orders():
    # order ab: P(a) = p(A) + p(C)/2 = 0.6 + 0.1; order ba (a shown as B): P(a) = 0.5 + 0.1
    judge = LetterJudge({"A": 0.6, "B": 0.2, "C": 0.2}, {"A": 0.3, "B": 0.5, "C": 0.2})
    (j,) = judge_pairs(judge, [Pair("q", "alpha", "beta")], logprobs=True)
    assert j.prob_a == pytest.approx((0.7 + 0.6) / 2)
    assert j.verdicts == {"ab": "A", "ba": "B"} and j.winner == "a" and j.consistent
    assert summarize([j])["mean_prob_a"] == pytest.approx(0.65)


def test_logprob_mode_with_no_letter_possible_is_unparseable():
    nothing = {"A": 0.0, "B": 0.0, "C": 0.0}
    (j,) = judge_pairs(LetterJudge(nothing, nothing), [Pair("q", "alpha", "beta")], logprobs=True)
    assert j.winner is None and j.prob_a is None


def test_logprob_mode_needs_a_capable_backend():
    with pytest.raises(ConfigError, match="cannot score choices"):
        judge_pairs(ScriptedJudge(TABLE), PAIRS[:1], logprobs=True)


def test_prompt_shows_criteria_and_swaps_positions():
    pair = Pair([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                 {"role": "user", "content": "sort 2 1"}], "1 2", "2 1", ["Be correct."])
    ab, ba = pairwise_messages(pair, "ab")[-1]["content"], pairwise_messages(pair, "ba")[-1]["content"]
    assert "[Response A]\n1 2" in ab and "[Response A]\n2 1" in ba
    assert "- Be correct." in ab and "User: sort 2 1" in ab and "Assistant: hello" in ab
    assert "[[C]]" in pairwise_messages(pair)[0]["content"]
