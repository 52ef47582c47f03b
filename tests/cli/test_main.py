"""The ``attnkit`` entry points and the CLI's error contract: a user error is one line on stderr
and exit status 2, a bug is one line and exit 1, ``-v`` shows the traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import attnkit
from attnkit.cli import show
from attnkit.cli.main import main

SRC = os.path.join(os.path.dirname(__file__), "..", "..", "src")


def _one_line_error(capsys, prefix: str) -> str:
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1, cap.err
    assert lines[0].startswith(prefix), lines[0]
    assert "Traceback" not in cap.err + cap.out
    return lines[0]


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"attnkit {attnkit.__version__}"


def test_python_dash_m_attnkit_runs_the_cli():
    env = dict(os.environ, PYTHONPATH=os.path.abspath(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-m", "attnkit", "--version"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"attnkit {attnkit.__version__}"
    assert done.stderr == ""  # no warning on start-up (e.g. torch's "Failed to initialize NumPy")


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


@pytest.mark.parametrize("argv, prefix", [
    (["nope"], "attnkit: error: argument COMMAND: invalid choice"),
    (["--nope"], "attnkit: error: unrecognized arguments"),
    (["show"], "attnkit show: error: the following arguments are required: spec"),
    (["show", "causal", "--size", "x"], "attnkit show: error: argument --size: invalid int value"),
    (["show", "causal", "--size"], "attnkit show: error: argument --size: expected one argument"),
    (["demo", "--repeats", "1.5"], "attnkit demo: error: argument --repeats: invalid int value"),
    (["bench", "--dtype", "int8"], "attnkit bench: error: argument --dtype: invalid choice"),
    (["bench", "--sizes", "1,x"], "attnkit bench: error: argument --sizes: expected a comma-separated list of int"),
])
def test_parse_errors_are_one_line(argv, prefix, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    _one_line_error(capsys, prefix)


def test_no_backend_error_is_a_user_error(monkeypatch, capsys):
    """NoBackendError is a RuntimeError; the CLI reports it like any bad input: one line, exit 2."""
    def run(args):
        q = torch.randn(1, 1, 4, 8)
        return attnkit.attention(q, q, q, backend="sdpa", return_weights=True)

    monkeypatch.setattr(show, "run", run)
    assert main(["show", "causal"]) == 2
    line = _one_line_error(capsys, "attnkit show: error: backend 'sdpa' cannot run this call")
    assert "does not return attention weights" in line


@pytest.mark.parametrize("exc", [ValueError("bad\nvalue"), TypeError("bad type"),
                                 FileNotFoundError(2, "No such file or directory"), PermissionError(13, "denied")])
def test_user_errors_are_one_line_exit_2(exc, monkeypatch, capsys):
    def run(args):
        raise exc
    monkeypatch.setattr(show, "run", run)
    assert main(["show", "causal"]) == 2
    _one_line_error(capsys, "attnkit show: error: ")


def test_a_bug_is_one_line_exit_1_and_v_shows_the_traceback(monkeypatch, capsys):
    def run(args):
        raise RuntimeError("boom")
    monkeypatch.setattr(show, "run", run)
    assert main(["show", "causal"]) == 1
    line = _one_line_error(capsys, "attnkit show: internal error (RuntimeError): boom")
    assert "-v" in line
    monkeypatch.setattr(show, "run", lambda args: {}["missing"])
    assert main(["show", "causal"]) == 1
    _one_line_error(capsys, "attnkit show: internal error (KeyError): 'missing'")
    monkeypatch.setattr(show, "run", run)
    with pytest.raises(RuntimeError, match="boom"):
        main(["-v", "show", "causal"])


def test_keyboard_interrupt_is_one_line(monkeypatch, capsys):
    def run(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(show, "run", run)
    assert main(["show", "causal"]) == 130
    _one_line_error(capsys, "attnkit show: interrupted")
