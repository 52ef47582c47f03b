import re

import pytest
import torch

from attnkit.cli import demo
from attnkit.cli.demo_api import DemoCase, Prepared
from attnkit.cli.main import main


def test_every_demo_case_has_a_unique_name():
    names = [c.variant for c in demo.all_cases()]
    assert len(names) == len(set(names)), names


def test_demo_runs_selected_rows_and_checks_them(capsys, tmp_path):
    csv = tmp_path / "demo.csv"
    assert main(["demo", "--only", "causal", "--repeats", "1", "--csv", str(csv)]) == 0
    out = capsys.readouterr().out
    assert "sliding window 128 (causal)" in out and "FAIL" not in out
    assert csv.read_text().startswith("variant,backend,max_error")


def test_demo_reports_a_wrong_result_as_failure(monkeypatch, capsys):
    bad = DemoCase("deliberately wrong", lambda: Prepared(run=lambda: torch.ones(3), reference=lambda: torch.zeros(3, dtype=torch.float64), backend="x"))
    monkeypatch.setattr(demo, "all_cases", lambda: [bad])
    assert main(["demo", "--repeats", "1"]) == 1
    assert "FAILED the float64 check: deliberately wrong" in capsys.readouterr().out


def _case(name, err, expected=None, source=""):
    def prepare():
        return Prepared(run=lambda: torch.full((3,), err), reference=lambda: torch.zeros(3, dtype=torch.float64),
                        backend=f"{name} backend", expected_error=expected, bound_source=source)
    return DemoCase(name, prepare)


def test_demo_streams_each_row_as_it_finishes(monkeypatch, capsys):
    """Each row is printed when its case finishes, before the next case starts."""
    seen = []

    def watching(name):
        case = _case(name, 0.0)

        def prepare():
            seen.append(capsys.readouterr().out)  # what was printed before this case ran
            return case.prepare()
        return DemoCase(name, prepare)

    monkeypatch.setattr(demo, "all_cases", lambda: [watching("row one"), watching("row two")])
    assert main(["demo", "--repeats", "1"]) == 0
    assert "variant" in seen[0] and "row one" not in seen[0]
    assert seen[1].lstrip().startswith("row one") and "ok" in seen[1]
    assert capsys.readouterr().out.lstrip().startswith("row two")


def test_demo_labels_approximations_with_their_documented_bound(monkeypatch, capsys):
    monkeypatch.setattr(demo, "all_cases", lambda: [
        _case("exact row", 0.0), _case("approx row", 0.5, expected=0.7, source="docs/x.md table"),
        _case("approx row out of bound", 0.9, expected=0.7, source="docs/x.md table")])
    assert main(["demo", "--repeats", "1"]) == 1
    out = capsys.readouterr().out
    cells = [re.split(r"\s{2,}", line) for line in out.splitlines()]
    rows = {c[0]: c[1:4] for c in cells if len(c) == 7}  # variant: max error, bound, check
    assert rows["exact row"][2] == "ok"
    assert rows["approx row"] == ["5.00e-01", "7.0e-01", "approx"]  # not "ok" next to a large error
    assert rows["approx row out of bound"] == ["9.00e-01", "7.0e-01", "FAIL"]
    assert "approx row: max error 5.00e-01, documented bound 0.7 (docs/x.md table)" in out
    assert "FAILED the float64 check: approx row out of bound" in out


def test_demo_approximate_rows_name_where_their_bound_is_documented():
    approx = []
    for case in demo.all_cases():
        if any(word in case.variant.lower() for word in ("performer", "nystrom", "lsh")):
            prep = case.prepare()
            if prep.expected_error is not None:
                approx.append(case.variant)
                assert prep.bound_source, case.variant
    assert len(approx) >= 3, approx  # Performer vs exact, Nystrom m=N, LSH with 8 rounds
    with pytest.raises(ValueError, match="bound_source"):
        Prepared(run=lambda: None, reference=lambda: None, backend="x", expected_error=0.1)


@pytest.mark.parametrize("argv, message", [
    (["--only", "zzz"], "--only 'zzz' matches no demo variant"),
    (["--repeats", "0"], "--repeats must be >= 1, got 0"),
    (["--repeats", "-1"], "--repeats must be >= 1, got -1"),
    (["--threads", "0"], "--threads must be >= 1, got 0"),
    (["--threads", "-2"], "--threads must be >= 1, got -2"),
    (["--only", "causal", "--csv", "/nonexistent-dir/demo.csv"], "No such file or directory"),
])
def test_demo_bad_options_are_one_line_errors(argv, message, capsys):
    assert main(["demo", *argv]) == 2
    cap = capsys.readouterr()
    assert cap.err.count("\n") == 1 and cap.err.startswith("attnkit demo: error: ") and message in cap.err, cap.err
    assert cap.out == ""  # rejected before anything ran


def test_demo_list(capsys):
    assert main(["demo", "--list", "--only", "Performer"]) == 0
    names = capsys.readouterr().out.splitlines()
    assert names and all("Performer" in n for n in names)
