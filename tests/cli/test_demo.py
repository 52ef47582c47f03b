from attnkit.cli import demo
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
    import torch

    from attnkit.cli.demo_api import DemoCase, Prepared

    bad = DemoCase("deliberately wrong", lambda: Prepared(run=lambda: torch.ones(3), reference=lambda: torch.zeros(3, dtype=torch.float64), backend="x"))
    monkeypatch.setattr(demo, "all_cases", lambda: [bad])
    assert main(["demo", "--repeats", "1"]) == 1
    assert "FAILED the float64 check: deliberately wrong" in capsys.readouterr().out
