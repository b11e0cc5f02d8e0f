"""stdin/stdout answers compared as APPS's checker (``eval/testing_util.py``) compares them.

Each case names the APPS check that decides it: (join) the stripped output equals the stripped
expected text, lines stripped; (lines) the non-empty stripped lines are equal; (allclose) every
line is one number and ``np.allclose`` holds line by line; (sets) each line's token set, as a set
of lines, is equal; (round) the same with every token rounded to 3 decimals. A case passes in
APPS if any check passes. Negative controls fail every check.
"""

import pytest

from mcl_runtime.agents.datasets import problem_from_record, stated_tolerance
from mcl_runtime.agents.judge import outputs_match

APPS_PASSES = [
    ("42\n", "42"),  # join
    ("  1 2  \n\n3\n\n", "1 2\n3"),  # lines: outer blanks and empty lines do not count
    ("1  2\n", "1 2"),  # sets: runs of spaces inside a line do not count
    ("4.0\n", "4"),  # allclose
    ("0.3333333\n", "0.333333333"),  # allclose
    ("100001\n", "100000"),  # allclose: 1 <= 1e-8 + 1e-5 * 100000
    ("-0.0\n", "0"),  # allclose
    ("1e3\n", "1000"),  # allclose
    ("2 0.3334\n", "2 0.333333333"),  # round: 0.3334 -> 0.333
    ("3\n1.5000000\n2.25\n", "3\n1.5\n2.25"),  # allclose line by line
]
APPS_FAILS = [
    ("43\n", "42"),
    ("5\n", "4"),
    ("0.33\n", "0.333333333"),  # round: 0.33 != 0.333; allclose: 3.3e-3 too far
    ("100002\n", "100000"),  # allclose: 2 > 1.00001
    ("1 2\n", "1\n2"),  # lines are kept: one line is not two
    ("1\n2\n", "1 2"),
    ("YES\n", "yes"),  # case matters
    ("1 2 3\n", "1 2"),  # a token too many
    ("\n", "0"),
    ("4.0 x\n", "4 y"),
]


@pytest.mark.parametrize("actual,expected", APPS_PASSES)
def test_what_apps_accepts_is_accepted(actual, expected):
    assert outputs_match(actual, expected)


@pytest.mark.parametrize("actual,expected", APPS_FAILS)
def test_negative_controls_are_rejected(actual, expected):
    assert not outputs_match(actual, expected)


def test_order_and_repeats_matter_where_apps_sets_would_not():
    # APPS's set-based checks accept these; the judge, by design, does not (see outputs_match)
    assert not outputs_match("2 1\n", "1 2")
    assert not outputs_match("b\na\n", "a\nb")
    assert not outputs_match("1 1 2\n", "1 2 2")


def test_numbers_are_compared_per_token_anywhere():
    assert outputs_match("Case 1: 4.0\n", "Case 1: 4")
    assert outputs_match("x 0.3333333 y\n", "x 0.333333333 y")
    assert not outputs_match("x 0.34 y\n", "x 0.333333333 y")


def test_a_stated_tolerance_replaces_apps_rules():
    assert outputs_match("0.3333338\n", "0.333333333", tolerance=1e-6)  # absolute 4.7e-7
    assert outputs_match("1000000.5\n", "1000000", tolerance=1e-6)  # relative 5e-7
    assert not outputs_match("0.3334\n", "0.333333333", tolerance=1e-6)  # APPS's round would pass it
    assert not outputs_match("100001\n", "100000", tolerance=1e-6)  # APPS's allclose would pass it
    assert outputs_match("7\n", "7", tolerance=1e-6) and not outputs_match("8\n", "7", tolerance=1e-6)


@pytest.mark.parametrize(
    "text,tol",
    [
        ("Your output must have relative or absolute error less than 10 - 6.", 1e-6),
        ("The answer is correct if its absolute or relative error does not exceed $10^{-9}$.", 1e-9),
        ("absolute and relative error at most 1e-4", 1e-4),
        ("Print the answer modulo $10^9 + 7$.", None),
        ("Output the error message.", None),
    ],
)
def test_stated_tolerance(text, tol):
    assert stated_tolerance(text) == tol


def test_problems_carry_their_stated_tolerance():
    rec = {
        "src_uid": "own-geo",
        "description": "Print the distance.",
        "input_spec": "Two numbers.",
        "output_spec": "Your answer must have absolute or relative error at most 10^{-6}.",
        "notes": "",
        "sample_inputs": ["1 2"],
        "sample_outputs": ["1.0"],
        "time_limit": "1 second",
    }
    problem = problem_from_record(rec)
    assert all(t.tolerance == 1e-6 for t in problem.hidden_tests + problem.sample_tests)
