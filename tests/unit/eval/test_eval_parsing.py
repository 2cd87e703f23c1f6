"""Answer parsing: benchmark-prompted formats and sloppy outputs; unparsable is None."""

import pytest

from keye.eval.parsing import parse_choice, parse_span

OPTS = ["red", "blue", "green", "yellow"]


@pytest.mark.parametrize(
    "text,expected",
    [
        ("B", "B"),
        ("(B)", "B"),
        ("Answer: b.", "B"),
        ("b", "B"),
        ("The best answer is C", "C"),
        ("Final Answer: D.", "D"),
        ("**B**", "B"),
        ("c) green", "C"),
        ("B. blue", "B"),
        ("The correct option is (C) green", "C"),
        ("Option B is correct.", "B"),
        ("A man walks in. The answer is C.", "C"),  # the article 'A' is not an answer
        ("<think>maybe A ... no</think>Final Answer: B", "B"),
        ("Looking closely, answer: A. Final Answer: D", "D"),  # the last final answer wins
        ("yellow", "D"),  # the text of an option
        ("It is the blue one.", "B"),
    ],
)
def test_parse_choice(text, expected):
    assert parse_choice(text, 4, OPTS) == expected


@pytest.mark.parametrize(
    "text",
    ["", "   ", "I think the answer is a bit unclear", "E", "answer: f", "none of these", "<think>B</think>"],
)
def test_parse_choice_unparsable(text):
    assert parse_choice(text, 4, OPTS) is None


def test_parse_choice_eight_options():
    assert parse_choice("Final Answer: G.", 8) == "G"
    assert parse_choice("G", 4) is None  # out of range for a 4-option question


@pytest.mark.parametrize(
    "text,expected",
    [
        ("The event happens in 3.2 - 5.0 seconds", (3.2, 5.0)),
        ("The event happens in 3.2s - 5.0s.", (3.2, 5.0)),
        ("from 3.2s to 5 s", (3.2, 5.0)),
        ("3.2-5.0", (3.2, 5.0)),
        ("between 3 and 5 seconds", (3.0, 5.0)),
        ("starts at 3.2 and ends at 5", (3.2, 5.0)),
        ("00:03 - 00:05", (3.0, 5.0)),
        ("1:02:03.5 to 1:02:10", (3723.5, 3730.0)),
        ("6.0 - 2.0", (6.0, 2.0)),  # kept reversed: scored as IoU 0
        ("<think>maybe 1 - 2</think>The event happens in 7 - 9 seconds", (7.0, 9.0)),
    ],
)
def test_parse_span(text, expected):
    assert parse_span(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["", "The event happens in 3 seconds", "I cannot tell"])
def test_parse_span_unparsable(text):
    assert parse_span(text) is None
