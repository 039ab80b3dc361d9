from sdlab.prompts import parse_emphasis


def test_plain_text():
    assert parse_emphasis("a red circle") == [("a red circle", 1.0)]


def test_round_square_and_explicit_weights():
    parts = dict(parse_emphasis("a (red) [circle] (on:1.5) x"))
    assert abs(parts["red"] - 1.1) < 1e-9
    assert abs(parts["circle"] - 1 / 1.1) < 1e-9
    assert parts["on"] == 1.5


def test_nesting_multiplies():
    parts = dict(parse_emphasis("((red))"))
    assert abs(parts["red"] - 1.21) < 1e-9


def test_escaped_brackets_are_literal():
    assert parse_emphasis(r"a \(red\) circle") == [("a (red) circle", 1.0)]


def test_break_and_empty():
    assert ("BREAK", -1.0) in parse_emphasis("a BREAK b")
    assert parse_emphasis("") == [("", 1.0)]


def test_unclosed_bracket_still_weighted():
    parts = parse_emphasis("a (red circle")
    assert parts[-1][0] == "red circle" and abs(parts[-1][1] - 1.1) < 1e-9
