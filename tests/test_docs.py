"""Every ```python block of README.md and docs/**/*.md runs here, so no example can go stale.

A file's blocks run top to bottom in one namespace, as a reader pasting them in order would, in
a temporary working directory. A marker on the line before a block (an HTML comment, invisible
when rendered) changes that, explicitly:

- ``<!-- no-test: REASON -->``: the block is not run (an optional extra, a sketch); the reason is
  required and shows in the test output.
- ``<!-- signature -->``: the block lists call signatures, ``[out =] name(params)``; each must
  equal ``inspect.signature(name)`` (parameter names, order, kinds and defaults), with ``name``
  resolved in the namespace of the blocks above it, or imported when it is dotted (``attnkit.x``).

A fence that looks like Python but is not ```python, a marker not followed by a ```python block
and an unknown marker are errors, so nothing is skipped silently.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
FENCE = re.compile(r"^\s*```\s*([\w+-]*)")
MARKER = re.compile(r"^\s*<!--\s*(no-test|signature)\s*(?::\s*(.*?))?\s*-->\s*$")
ANY_MARKER = re.compile(r"^\s*<!--\s*(no-test|signature|test)\b")


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    code: str
    marker: str | None  # None, "no-test" or "signature"
    reason: str = ""

    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def python_blocks(path: Path) -> list[Block]:
    """The ```python blocks of a markdown file with their markers; raises on anything ambiguous."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    pending = None  # (marker, reason, line) waiting for its block
    while i < len(lines):
        line = lines[i]
        m = FENCE.match(line)
        if m:
            lang = m.group(1).lower()
            if lang.startswith("py") and lang != "python":
                raise ValueError(f"{path.name}:{i + 1}: fence ```{lang}: use ```python (run by tests/test_docs.py)")
            end = next((j for j in range(i + 1, len(lines)) if FENCE.match(lines[j])), None)
            if end is None:
                raise ValueError(f"{path.name}:{i + 1}: unclosed code fence")
            if lang == "python":
                marker, reason = (pending[0], pending[1]) if pending else (None, "")
                blocks.append(Block(path, i + 1, "\n".join(lines[i + 1:end]) + "\n", marker, reason))
            elif pending:
                raise ValueError(f"{path.name}:{pending[2]}: <!-- {pending[0]} --> precedes a ```{lang} block")
            pending, i = None, end + 1
            continue
        marker = MARKER.match(line)
        if marker:
            if marker.group(1) == "no-test" and not marker.group(2):
                raise ValueError(f"{path.name}:{i + 1}: <!-- no-test: REASON --> needs a reason")
            pending = (marker.group(1), marker.group(2) or "", i + 1)
        elif ANY_MARKER.match(line):
            raise ValueError(f"{path.name}:{i + 1}: unknown marker {line.strip()!r}")
        elif line.strip() and pending:
            raise ValueError(f"{path.name}:{pending[2]}: <!-- {pending[0]} --> is not directly before a ```python block")
        i += 1
    if pending:
        raise ValueError(f"{path.name}:{pending[2]}: <!-- {pending[0]} --> at the end of the file")
    return blocks


# ---------------------------------------------------------------------------------- signatures


def _statements(code: str) -> list[str]:
    """Split a signature block into statements (a statement ends where its parentheses close)."""
    out, cur, depth = [], [], 0
    for line in code.splitlines():
        text = re.sub(r"#.*$", "", line)  # comments (no default in these docs holds a '#')
        if not text.strip() and not cur:
            continue
        cur.append(text)
        depth += text.count("(") + text.count("[") + text.count("{") - text.count(")") - text.count("]") - text.count("}")
        if depth == 0:
            out.append(" ".join(s.strip() for s in cur))
            cur = []
    assert not cur, f"unbalanced parentheses in {' '.join(cur)!r}"
    return out


def _resolve(name: str, namespace: dict):
    head, *rest = name.split(".")
    if head in namespace:
        obj = namespace[head]
    else:
        obj = importlib.import_module(head)
    for part in rest:
        obj = getattr(obj, part)
    return obj


def check_signature(statement: str, namespace: dict) -> None:
    m = re.fullmatch(r"(?:[\w\s,]+=\s*)?([A-Za-z_][\w.]*)\((.*)\)", statement)
    assert m, f"not a signature: {statement!r} (expected [out =] name(params))"
    name, params = m.groups()
    documented = ast.parse(f"def _f({params}): pass").body[0].args
    actual = inspect.signature(_resolve(name, namespace))
    doc_params = []  # (name, kind, default expression or None)
    positional = documented.posonlyargs + documented.args
    defaults = [None] * (len(positional) - len(documented.defaults)) + list(documented.defaults)
    for a, d in zip(positional, defaults):
        doc_params.append((a.arg, "positional", d))
    if documented.vararg:
        doc_params.append((documented.vararg.arg, "*args", None))
    for a, d in zip(documented.kwonlyargs, documented.kw_defaults):
        doc_params.append((a.arg, "keyword-only", d))
    if documented.kwarg:
        doc_params.append((documented.kwarg.arg, "**kwargs", None))
    kinds = {inspect.Parameter.POSITIONAL_ONLY: "positional", inspect.Parameter.POSITIONAL_OR_KEYWORD: "positional",
             inspect.Parameter.VAR_POSITIONAL: "*args", inspect.Parameter.KEYWORD_ONLY: "keyword-only",
             inspect.Parameter.VAR_KEYWORD: "**kwargs"}
    assert [(p, k) for p, k, _ in doc_params] == [(p.name, kinds[p.kind]) for p in actual.parameters.values()], (
        f"{name}: the docs say ({params}), the code says {actual}")
    for (pname, _, expr), p in zip(doc_params, actual.parameters.values()):
        if expr is None:
            assert p.default is inspect.Parameter.empty, f"{name}: docs give {pname} no default, the code {p.default!r}"
            continue
        value = eval(compile(ast.Expression(expr), "<docs>", "eval"), dict(namespace))  # noqa: S307 - our own docs
        assert p.default is not inspect.Parameter.empty, f"{name}: docs give {pname} a default, the code none"
        same = value is p.default or (type(value) is type(p.default) and value == p.default)
        assert same, f"{name}: docs say {pname}={ast.unparse(expr)}, the code {p.default!r}"


# --------------------------------------------------------------------------------------- tests


def _run_blocks(path: Path) -> list[str]:
    namespace: dict = {"__name__": f"docs_{path.stem}"}
    skipped = []
    for block in python_blocks(path):
        if block.marker == "no-test":
            skipped.append(f"{block.where()}: {block.reason}")
            continue
        try:
            if block.marker == "signature":
                for statement in _statements(block.code):
                    check_signature(statement, namespace)
            else:
                exec(compile(block.code, block.where(), "exec"), namespace)  # noqa: S102 - our own docs
        except Exception as e:
            raise AssertionError(f"the example at {block.where()} fails: {type(e).__name__}: {e}") from e
    return skipped


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_doc_examples_run(path, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # an example that writes a file writes it here
    torch.manual_seed(0)
    skipped = _run_blocks(path)
    with capsys.disabled():
        for s in skipped:
            print(f"\n  not run (marked): {s}")


def test_docs_have_python_examples():
    """The collection above is not empty: README.md and the docs carry their examples."""
    counts = {p.relative_to(ROOT).as_posix(): len(python_blocks(p)) for p in DOC_FILES}
    assert counts["README.md"] >= 1 and sum(counts.values()) >= 10, counts


# ------------------------------------------------------------------------- the parser itself


def _md(tmp_path, text: str) -> Path:
    p = tmp_path / "x.md"
    p.write_text(text)
    return p


def test_parser_reads_markers(tmp_path):
    blocks = python_blocks(_md(tmp_path, "a\n\n```python\nx = 1\n```\n<!-- no-test: needs transformers -->\n"
                                         "```python\nimport transformers\n```\n<!-- signature -->\n```python\n"
                                         "f(a, *, b=1)\n```\n```bash\nls\n```\n"))
    assert [(b.marker, b.reason, b.line) for b in blocks] == [(None, "", 3), ("no-test", "needs transformers", 7),
                                                              ("signature", "", 11)]


@pytest.mark.parametrize("text, message", [
    ("```py\nx = 1\n```\n", "use ```python"),
    ("```pycon\n>>> 1\n```\n", "use ```python"),
    ("<!-- no-test -->\n```python\nx\n```\n", "needs a reason"),
    ("<!-- no-test: why -->\n```bash\nls\n```\n", "precedes a ```bash block"),
    ("<!-- no-test: why -->\ntext\n```python\nx\n```\n", "not directly before"),
    ("<!-- notest: why -->\n```python\nx\n```\n", None),  # not a marker at all: the block runs
    ("<!-- test: why -->\n```python\nx\n```\n", "unknown marker"),
    ("```python\nx\n", "unclosed"),
    ("text\n<!-- signature -->\n", "end of the file"),
])
def test_parser_rejects_ambiguous_markdown(tmp_path, text, message):
    path = _md(tmp_path, text)
    if message is None:
        assert python_blocks(path)[0].marker is None
        return
    with pytest.raises(ValueError, match=re.escape(message)):
        python_blocks(path)


def _f(q, k, *, mask=None, scale=1.0, fn=torch.tanh):
    return q


@pytest.mark.parametrize("doc, ok", [
    ("out = f(q, k, *, mask=None, scale=1.0, fn=torch.tanh)", True),
    ("f(q, k, *, mask=None, scale=1.0, fn=torch.tanh)   # trailing comment", True),
    ("f(q, k, mask=None, scale=1.0, fn=torch.tanh)", False),  # mask is keyword-only
    ("f(q, k, *, mask=None, scale=2.0, fn=torch.tanh)", False),  # wrong default
    ("f(q, k, *, mask=None, scale=1, fn=torch.tanh)", False),  # 1 is not 1.0: a type change is a change
    ("f(q, k, *, mask=None, scale=1.0)", False),  # a parameter missing
    ("f(q, *, k, mask=None, scale=1.0, fn=torch.tanh)", False),
    ("f(q, kk, *, mask=None, scale=1.0, fn=torch.tanh)", False),
])
def test_signature_check(doc, ok):
    namespace = {"f": _f, "torch": torch}
    (statement,) = _statements(doc)
    if ok:
        check_signature(statement, namespace)
    else:
        with pytest.raises(AssertionError):
            check_signature(statement, namespace)
