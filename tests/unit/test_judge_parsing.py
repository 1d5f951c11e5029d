"""Judge replies that a lenient parser turns into wrong scores: each row is a reply and what it must
parse to (None: unparseable, recorded as `parsed: false`)."""

from __future__ import annotations

import pytest

from corral.eval.parsing import (Scale, own_mask, own_text, parse_score, parse_two_scores, parse_verdict,
                                 unparsed_reason, verdict_span)

ECHOED_JSON = """The assistant returned:
{"product": "Phone X", "review": {"text": "a rating of 4.7 from users", "stars": 4.7}}
It extracted the fields correctly. Rating: [[8]]"""

GRADE_LIST = """The essay covers three points:
Grade 1
Grade 2
Grade 3"""

SCORES = [
    # what the prompt asks for
    ("Clear and correct. Rating: [[8]]", 8.0),
    ("[[10]]", 10.0),
    ("Rating: [[ 7 ]]", 7.0),
    ("Rating: [[9/10]]", 9.0),  # the prompt's own scale written out
    ("First [[6]]; having checked again, still [[6]].", 6.0),  # the same verdict twice
    ('My rating: "[[5]]"', 5.0),  # a quoted marker is the judge's, not an echo
    # labelled verdicts on the last line
    ("Mostly right.\nRating: 8", 8.0),
    ("Mostly right.\n**Score:** 7/10", 7.0),
    ("Good.\nFinal grade: 6 out of 10.", 6.0),
    ("Good.\nMy rating is [4]", 4.0),
    ("Weak but on topic. Rating: 2/10", 2.0),
    ("The user's rating is 7 and the answer repeats it", None),
    # echoed or quoted content is never read
    (ECHOED_JSON, 8.0),
    ('{"rating": 4.7, "comment": "fine"}', None),
    ('The answer says "a rating of 4.7".', None),
    (GRADE_LIST, None),  # "Grade 3" is the last item of a list, not a verdict
    ("```\nRating: [[9]]\n```", None),  # a verdict inside a code block
    ("> Rating: [[9]]\nAs quoted above.", None),
    ("The answer prints `score = 7`.", None),
    # numbers that are not verdicts
    ("8 out of 10 would be too high for this.", None),
    ("It scores 3 out of 10 in my view, but let me think.", None),
    ("Rating: 8\nThe answer is too long though.", None),  # a label not on the last line
    ("I'd give it [5].", None),
    ("Steps: 1. read 2. think 3. answer", None),
    ("The answer is fine.", None),
    # two different verdicts
    ("first thought [[2]] but on reflection [[6]]", None),
    # type and range the prompt did not ask for
    ("Rating: [[8.5]]", None),
    ("Rating: [[11]]", None),
    ("Rating: [[0]]", None),
    ("Rating: [[8/20]]", None),
    ("Rating: 12", None),
    ("[[8]] and [[8.5]]", None),
]


@pytest.mark.parametrize("reply,expected", SCORES)
def test_parse_score(reply, expected):
    assert parse_score(reply) == expected


def test_score_scale_is_the_prompts():
    assert parse_score("[[8.5]]", Scale(integer=False)) == 8.5
    assert parse_score("[[4]]", Scale(1, 5)) == 4.0 and parse_score("[[6]]", Scale(1, 5)) is None


VERDICTS = [
    ("A is more accurate. [[A]]", "A"),
    ("[[B]]", "B"),
    ("Both are equally vague. [[C]]", "tie"),
    ("[[tie]]", "tie"),
    ('Final verdict: "[[A]]"', "A"),
    ("Comparing both...\nVerdict: [[A]]", "A"),
    ("Comparing both...\nFinal verdict: B", "B"),
    ("Comparing both...\nThe winner is Assistant A.", "A"),
    ("**Verdict:** tie", "tie"),
    ("A is clearer. Verdict: A", "A"),
    ("[[A]] ... actually [[B]]", None),  # contradictory: unparseable, not a guess
    ("Assistant A wrote [[B]] in its answer, but [[A]] is better.", None),
    ('Output "[[A]]" if A is better, "[[B]]" if B is better. I pick [[A]].', None),  # the instructions echoed
    ("```\n[[A]]\n```\nSee above.", None),
    ("[[D]]", None),
    ("[[A]] [[rating]]", "A"),  # an echoed placeholder is not a verdict
    ("Verdict: A\nBut B has merits too.", None),
    ("Assistant A is better in some ways.", None),
    ("They both have merits.", None),
]


@pytest.mark.parametrize("reply,expected", VERDICTS)
def test_parse_verdict(reply, expected):
    assert parse_verdict(reply) == expected


TWO_SCORES = [
    ("Both fine. [[8, 6]]", (8.0, 6.0)),
    ("[[7]] and [[9]]", (7.0, 9.0)),
    ("Comments.\nAssistant 1: 5/10, concise. Assistant 2: 9/10, thorough.", (5.0, 9.0)),
    ("[[8, 12]]", None),
    ("[[7.5, 6]]", None),
    ("[[8, 6]] then [[6, 8]]", None),
    ("[[8]] [[6]] [[7]]", None),
    ('{"assistant_1": 8, "assistant_2": 6}', None),
    ("8 6\nAssistant 1 is more detailed.", None),  # bare numbers are not a labelled verdict
    ("Assistant 1 is better.", None),
]


@pytest.mark.parametrize("reply,expected", TWO_SCORES)
def test_parse_two_scores(reply, expected):
    assert parse_two_scores(reply) == expected


def test_own_text_drops_echoes():
    text = own_text('keep ```drop``` `drop` "drop" {"a": {"b": 1}} "[[A]]"\n> drop\nkeep')
    assert "drop" not in text and text.count("keep") == 2 and "[[A]]" in text


@pytest.mark.parametrize("reply,expected", [row for row in SCORES if row[1] is not None])
def test_verdict_span_points_at_the_parsed_score(reply, expected):
    """Where scoring=expected reads the judge's token probabilities: at the score the parser read."""
    start, end = verdict_span(reply, "[[rating]]")
    assert float(reply[start:end]) == expected


@pytest.mark.parametrize("reply,expected", [row for row in VERDICTS if row[1] is not None])
def test_verdict_span_points_at_the_parsed_verdict(reply, expected):
    start, end = verdict_span(reply, "[[A]]")
    assert {"A": "A", "B": "B", "C": "tie", "tie": "tie"}[reply[start:end]] == expected


def test_own_mask_keeps_offsets():
    reply = 'keep ```drop``` `drop` "drop" {"a": {"b": 1}} "[[A]]"\n> drop\nkeep'
    mask = own_mask(reply)
    assert len(mask) == len(reply) and mask.count("\n") == reply.count("\n")
    assert "drop" not in mask and mask.split() == own_text(reply).split()


def test_unparsed_reasons():
    assert unparsed_reason("The answer is fine.", "[[rating]]") == ("no [[rating]] marker and no labelled verdict "
                                                                    "on the last line")  # fmt: skip
    assert unparsed_reason("first [[2]] then [[6]]", "[[rating]]") == (
        "verdict markers [[2]], [[6]]: different ones, or outside what the prompt asks for ([[rating]])")
    assert unparsed_reason("[[D]]", "[[A]]").startswith("verdict markers [[D]]:")
    assert unparsed_reason("```\n[[A]]\n```", "[[A]]") == "only quoted or echoed content, no verdict of the judge's own"
    assert unparsed_reason("  ", "[[A]]") == "empty reply"
