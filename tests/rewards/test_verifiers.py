import doctest

import pytest

import posttrain.rewards.verifiers as verifiers
from posttrain.errors import ConfigError, DataError
from posttrain.rewards import (exact_match, extract_answer, format_reward, length_penalty, normalize_answer,
                               outcome_metrics, regex_reward, reward_name)


def test_docstring_examples():
    assert doctest.testmod(verifiers).failed == 0


@pytest.mark.parametrize("text, expected", [
    (r"so the result is \boxed{72}.", "72"),
    (r"\boxed{\frac{a}{b^{2}}} then \boxed{ 5 }", " 5 "),          # last box wins, braces balanced
    (r"x = \boxed{\left\{1, 2\right\}}", r"\left\{1, 2\right\}"),
    (r"\fbox{7}", "7"),
    (r"the box \boxed 9 here", "9"),
    (r"cut off \boxed{\frac{1}{2}", "cut off \\boxed{\\frac{1}{2}"),  # unbalanced: falls to last line
    ("Step 1...\n#### 18", "18"),
    ("The answer is: -4", "-4"),
    ("So the answer is 3.5.\nThanks", "3.5"),
    ("so THE ANSWER IS $x+1$", "$x+1$"),
    ("<answer> 12 </answer>", "12"),
    (r"<answer>The value is \boxed{3}</answer> trailing \boxed{9}", "3"),  # the tag narrows the search
    ("one\ntwo\n\n", "two"),
    ("   ", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("72", "72"), ("72.0", "72"), ("0.50", "0.5"), ("-0.0", "0"), ("1,234,567", "1234567"),
    ("$ 5 $.", "5"), (r"\text{Blue}", "blue"), ("A  B", "a b"), ("1,23", "1,23"), ("inf", "inf"),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_scores_and_none_for_missing_gold():
    reward = exact_match()
    got = reward(["q"] * 5,
                 [r"\boxed{1,000}", "#### 7", "The answer is Paris.", "I think 4", "anything"],
                 answer=["1000", "8", "paris", "4", None])
    assert got == [1.0, 0.0, 1.0, 0.0, None]  # "I think 4": last line is the whole sentence


def test_exact_match_options():
    assert exact_match(normalize=False)(["q"], ["#### 72.0"], answer=["72"]) == [0.0]
    assert exact_match(extract=None)(["q"], [" 4 "], answer=["4"]) == [1.0]
    assert exact_match(extract="answer_is")(["q"], ["no marker 4"], answer=["4"]) == [0.0]
    last_word = exact_match(extract=lambda s: s.split()[-1] if s.split() else None, extract_gold=False)
    assert last_word(["q", "q"], ["it is 4", ""], answer=["4", "4"]) == [1.0, 0.0]
    assert exact_match(answer_column="gold")(["q"], ["5"], gold=[5]) == [1.0]  # non-string gold


def test_exact_match_errors():
    with pytest.raises(DataError, match="needs the dataset column 'answer'; the batch has columns: tests"):
        exact_match()(["q"], ["4"], tests=["x"])
    with pytest.raises(DataError, match="1 prompts but 2 completions"):
        exact_match()(["q"], ["4", "5"], answer=["4"])
    with pytest.raises(DataError, match="2 values for 1 completions"):
        exact_match()(["q"], ["4"], answer=["4", "5"])
    with pytest.raises(ConfigError, match="unknown answer extractor"):
        exact_match(extract=["boxed", "nope"])


def test_regex_reward():
    reward = regex_reward(r"\bdone\b", score_match=0.5, score_miss=-1.0)
    assert reward(["q", "q"], ["all done.", "undone"]) == [0.5, -1.0]
    assert reward.name == "regex"
    with pytest.raises(ConfigError, match="invalid regular expression"):
        regex_reward("(unclosed")


def test_format_reward():
    reward = format_reward()
    completions = [
        "<think>a</think><answer>b</answer>",
        "  <think>\nlong\n</think>\n\n<answer>b</answer>\n",
        "<think>a</think>",
        "<think>a</think><answer>b</answer> extra text",        # text outside the layout
        "<think>a</think><think>b</think><answer>c</answer>",  # repeated tag: counts 2 of 4 once
        "<answer>b</answer>",
        "",
    ]
    assert reward(["q"] * len(completions), completions) == [1.0, 1.0, 0.5, 0.75, 0.5, 0.5, 0.0]
    strict = format_reward(think_tag="reasoning", answer_tag="final", partial=0.0)
    assert strict(["q", "q"], ["<reasoning>x</reasoning><final>y</final>", "<think>x</think><answer>y</answer>"]) == [1.0, 0.0]


def test_length_penalty():
    reward = length_penalty(max_len=100, buffer=20)
    assert reward(["q"] * 4, ["x" * 80, "x" * 85, "x" * 100, "x" * 500]) == [0.0, -0.25, -1.0, -1.0]
    hard = length_penalty(max_len=3)
    assert hard(["q", "q"], ["abc", "abcd"]) == [0.0, -1.0]
    words = length_penalty(max_len=2, buffer=1, count=lambda s: len(s.split()))
    assert words(["q", "q"], ["one", "one two three"]) == [0.0, -1.0]
    with pytest.raises(ConfigError):
        length_penalty(max_len=10, buffer=11)


def test_names_and_outcome_metrics():
    assert [reward_name(r) for r in (exact_match(), format_reward(), length_penalty(5), regex_reward("a", name="has_a"))] \
        == ["exact_match", "format", "length_penalty", "has_a"]
    assert reward_name(lambda p, c: []) == "<lambda>"
    assert outcome_metrics(exact_match()) == {}  # no last_stats: nothing to log

    class Counted:
        name = "code"
        last_stats = {"passed": 1, "timeout": 3}

    assert outcome_metrics(Counted(), prefix="eval/") == {"eval/code_passed_frac": 0.25, "eval/code_timeout_frac": 0.75}
