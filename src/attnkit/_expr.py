"""Safe reading of small spec expressions typed on a command line.

``causal & sliding_window(63)``, ``bigbird(block_size=4)``, ``num_features=64, causal=True``:
parsed with ``ast``; only whitelisted constructor names, literals, ``&`` and ``|`` are accepted
(nothing is eval'ed); masks combine with ``&`` and ``|``, biases with ``+``. Lists become tensors (0/1 matrices become bool layouts). Used by
``attnkit show`` (mask and bias specs) and by ``attnkit train`` / ``compare`` (variant, position
and task words with options).
"""

from __future__ import annotations

import ast

import torch

from .biases import Bias
from .masks import Mask


def to_value(node: ast.AST, where: str = ""):
    """A literal (number, string, bool, None, list, tuple); lists become tensors."""
    try:
        value = ast.literal_eval(node)
    except ValueError:
        raise ValueError(f"{where + ': ' if where else ''}{ast.unparse(node)!r} is not a literal (use numbers, "
                         "strings, lists, True/False/None)") from None
    if isinstance(value, list):
        value = torch.tensor(value)
        if value.dtype == torch.int64 and value.dim() == 2 and set(value.unique().tolist()) <= {0, 1}:
            value = value.bool()  # 0/1 matrices are layouts
    return value


_OPERATORS = {ast.BitAnd: ("&", lambda a, b: a & b), ast.BitOr: ("|", lambda a, b: a | b),
              ast.Add: ("+", lambda a, b: a + b)}


def build(node: ast.AST, names: dict):
    """Evaluate ``node``: constructor calls from ``names`` with literal arguments; masks combined
    by & and |, biases by +."""
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        symbol, op = _OPERATORS[type(node.op)]
        left, right = build(node.left, names), build(node.right, names)
        kinds = {type(x).__name__ for x in (left, right)}
        ok = (isinstance(left, Mask) and isinstance(right, Mask) and symbol != "+") or (
            isinstance(left, Bias) and isinstance(right, Bias) and symbol == "+")
        if not ok:
            raise ValueError(f"cannot combine {' and '.join(sorted(kinds))} with {symbol!r}: masks combine "
                             "with & and |, biases with +; draw a bias under a mask with --mask")
        return op(left, right)
    if isinstance(node, ast.Name):
        node = ast.Call(func=node, args=[], keywords=[])
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        name = node.func.id
        if name not in names:
            raise ValueError(f"unknown spec {name!r}; known: {', '.join(sorted(names))}")
        args = [to_value(a, name) for a in node.args]
        kwargs = {kw.arg: to_value(kw.value, name) for kw in node.keywords}
        return names[name](*args, **kwargs)
    raise ValueError(f"cannot read {ast.unparse(node)!r}: use constructor calls combined with & and | "
                     "(masks) or + (biases)")


def parse_expr(text: str, names: dict):
    """Build a spec from an expression such as ``causal & sliding_window(3)``."""
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as e:
        raise ValueError(f"SPEC {text!r} is not a valid expression: {e.msg}") from None
    return build(tree.body, names)


def parse_arguments(text: str) -> tuple[list[ast.AST], dict[str, ast.AST]]:
    """Split an argument list ``"sliding_window(63), softcap=30.0"`` into positional nodes and
    keyword nodes (not evaluated: the caller decides what each may be)."""
    if not text.strip():
        return [], {}
    try:
        call = ast.parse(f"f({text})", mode="eval").body
    except SyntaxError as e:
        raise ValueError(f"{text!r} is not an argument list (expected e.g. 'sliding_window(63)' or "
                         f"'num_features=64'): {e.msg}") from None
    if any(kw.arg is None for kw in call.keywords) or any(isinstance(a, ast.Starred) for a in call.args):
        raise ValueError(f"{text!r}: * and ** are not accepted")
    return list(call.args), {kw.arg: kw.value for kw in call.keywords}


def split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split at ``sep`` outside parentheses and brackets: "a(1, 2),b" -> ["a(1, 2)", "b"]."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts]


__all__ = ["to_value", "build", "parse_expr", "parse_arguments", "split_top_level"]
