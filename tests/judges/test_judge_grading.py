"""Single-answer grading: score parsing, per-criterion rubric means, pair outcomes from scores."""

import pytest

from posttrain.judges.grading import (Criterion, Grade, grade, grading_messages, outcome_from_grades,
                                      parse_score, summarize_grades)


@pytest.mark.parametrize("text, expected", [
    ("Solid answer. Rating: [[7]]", 7.0),
    ("[[8.5]]", 8.5),
    ("[[ 3/10 ]]", 3.0),
    ("[[4]] at first, then [[9]]", 9.0),  # last one wins
    ("[[10]]", 10.0),
    ("[[1]]", 1.0),
    ("[[11]]", None),  # out of range is a format failure
    ("[[0]]", None),
    ("I give it 7 out of 10", None),
    ("[[seven]]", None),
    ("", None),
    (None, None),
])
def test_parse_score(text, expected):
    assert parse_score(text) == expected


class RubricJudge:
    """Scores by criterion name found in the system prompt; 'style' is never parseable."""

    name = "rubric"

    def __init__(self):
        self.seen = []

    def complete(self, messages_list, max_tokens=256, temperature=0.0):
        out = []
        for m in messages_list:
            system, user = m[0]["content"], m[-1]["content"]
            self.seen.append(user)
            bonus = 1 if "[Response]\nlong" in user else 0
            if "be correct" in system:
                out.append(f"[[{8 + bonus}]]")
            elif "be brief" in system:
                out.append(f"ok [[{4 + bonus}]]")
            else:
                out.append("looks nice")
        return out


def test_rubric_scores_each_criterion_and_averages_parsed_ones():
    crits = [Criterion("correct", "be correct"), Criterion("brief", "be brief"),
             Criterion("style", "be stylish")]
    judge = RubricJudge()
    grades = grade(judge, [("q", "short"), ("q", "long")], crits)
    assert len(judge.seen) == 6
    assert grades[0].scores == {"correct": 8.0, "brief": 4.0, "style": None}
    assert grades[0].score == pytest.approx(6.0) and grades[0].unparseable == 1
    assert grades[1].score == pytest.approx(7.0)
    assert outcome_from_grades(grades[0], grades[1]) == "b"
    s = summarize_grades(grades)
    assert (s["scored"], s["unparseable_items"], s["unparseable_scores"], s["scores_asked"]) == (2, 0, 2, 6)
    assert s["mean_score"] == pytest.approx(6.5)


def test_outcome_from_grades():
    g = lambda s: Grade(s, {"overall": s})  # noqa: E731
    assert outcome_from_grades(g(7.0), g(7.05)) == "tie"  # within MT-Bench's 0.1
    assert outcome_from_grades(g(7.0), g(6.0)) == "a"
    assert outcome_from_grades(g(None), g(6.0)) is None
    assert outcome_from_grades(g(7.0), g(6.5), tie_margin=1.0) == "tie"


def test_overall_prompt_has_no_criterion_clause():
    overall = grading_messages("q", "r")[0]["content"]
    focused = grading_messages("q", "r", Criterion("c", "be exact"))[0]["content"]
    assert "criterion" not in overall and "be exact" in focused and "[[6]]" in overall
