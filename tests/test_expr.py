"""``attnkit._expr``: argument lists and top-level splitting (the expression builder is covered
through ``attnkit show``'s tests in tests/cli/test_show.py)."""

from __future__ import annotations

import ast

import pytest
import torch

from attnkit._expr import parse_arguments, split_top_level, to_value


def test_parse_arguments_keeps_nodes_unevaluated():
    args, kw = parse_arguments("sliding_window(63), softcap=30.0, causal=True")
    assert [ast.unparse(a) for a in args] == ["sliding_window(63)"]
    assert {k: to_value(v) for k, v in kw.items()} == {"softcap": 30.0, "causal": True}
    assert parse_arguments("  ") == ([], {})


@pytest.mark.parametrize("text, match", [
    ("num_features=", "is not an argument list"),
    ("**opts", "\\* and \\*\\* are not accepted"),
    ("*xs", "\\* and \\*\\* are not accepted"),
])
def test_parse_arguments_rejects(text, match):
    with pytest.raises(ValueError, match=match):
        parse_arguments(text)


def test_to_value_literals_only_and_layouts_become_bool():
    assert to_value(ast.parse("(1, 2)", mode="eval").body) == (1, 2)
    layout = to_value(ast.parse("[[1, 0], [1, 1]]", mode="eval").body)
    assert layout.dtype == torch.bool and layout.tolist() == [[True, False], [True, True]]
    assert to_value(ast.parse("[0.5, 2]", mode="eval").body).dtype == torch.float32
    with pytest.raises(ValueError, match="opts: 'open' is not a literal"):
        to_value(ast.parse("open", mode="eval").body, "opts")


def test_split_top_level_respects_parentheses_and_brackets():
    assert split_top_level("a(1, 2), b,c[3, 4]") == ["a(1, 2)", "b", "c[3, 4]"]
    assert split_top_level("x | y", sep="|") == ["x", "y"]
    assert split_top_level("") == [""]
