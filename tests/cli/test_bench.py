"""``attnkit bench`` options and output: every option value is checked before anything runs, the
results are printed once (progress goes to stderr), and ``--quick`` (one process for all tasks)
reports no peak RSS, which would be the process's cumulative high-water mark."""

from __future__ import annotations

import argparse
import csv

import pytest

from attnkit.bench import report, runner
from attnkit.bench.runner import Result
from attnkit.cli import bench as cli
from attnkit.cli.main import main


@pytest.mark.parametrize("argv, message", [
    (["--repeats", "-1"], "--repeats must be >= 1, got -1"),
    (["--repeats", "0"], "--repeats must be >= 1, got 0"),
    (["--quick", "--repeats", "0"], "--repeats must be >= 1, got 0"),
    (["--threads", "0"], "--threads must be >= 1, got 0"),
    (["--timeout", "-5"], "--timeout must be > 0, got -5.0"),
    (["--timeout", "0"], "--timeout must be > 0, got 0.0"),
    (["--timeout", "nan"], "--timeout must be > 0, got nan"),
    (["--batch", "0"], "--batch must be >= 1, got 0"),
    (["--heads", "0"], "--heads must be >= 1, got 0"),
    (["--head-dim", "0"], "--head-dim must be >= 1, got 0"),
    (["--head-dim", "-64"], "--head-dim must be >= 1, got -64"),
    (["--warmup", "-1"], "--warmup must be >= 0, got -1"),
    (["--max-rss-gib", "0"], "--max-rss-gib must be > 0, got 0.0"),
    (["--sizes", "0,512"], "--sizes must be positive, got 0,512"),
    (["--sizes", ""], "--sizes needs at least one sequence length"),
    (["--modes", ""], "--modes needs at least one of fwd, bwd"),
    (["--modes", "fwd,sideways"], "--modes takes fwd and/or bwd, got 'sideways'"),
    (["--variants", "no-such-variant"], "no case matches the filters"),
])
def test_bad_options_are_rejected_before_running(argv, message, monkeypatch, capsys):
    monkeypatch.setattr(runner, "run", lambda *a, **k: pytest.fail("ran despite a bad option"))
    assert main(["bench", *argv]) == 2
    cap = capsys.readouterr()
    assert cap.err.count("\n") == 1 and cap.err.startswith("attnkit bench: error: ") and message in cap.err, cap.err
    assert cap.out == ""


def test_out_that_is_a_file_is_rejected_before_running(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runner, "run", lambda *a, **k: pytest.fail("ran despite a bad option"))
    f = tmp_path / "bench-out"
    f.write_text("")
    assert main(["bench", "--out", str(f)]) == 2
    assert "is a file; it must be a directory" in capsys.readouterr().err


def test_quick_honours_explicit_repeats_and_warmup():
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    cfg = cli.config_from_args(p.parse_args(["--quick", "--repeats", "4", "--warmup", "0"]))
    assert (cfg.repeats, cfg.warmup, cfg.per_process) == (4, 0, "all")
    cfg = cli.config_from_args(p.parse_args([]))
    assert (cfg.repeats, cfg.warmup, cfg.per_process) == (3, 1, "task")


def _result(**kw):
    base = dict(family="softmax", variant="dense", impl="sdpa", N=512, mode="fwd", status="ok", median_s=0.5,
                min_s=0.4, max_s=0.6, first_s=0.7, peak_rss_mib=1234.0, rss_before_mib=1000.0, gflops=12.0)
    return Result(**{**base, **kw})


def test_report_without_memory_drops_peak_rss_everywhere(tmp_path):
    results = [_result()]
    assert "/ 1234 /" in report.markdown(results, None)
    md = report.markdown(results, None, memory=False)
    assert "1234" not in md and "| 0.500 (0.400-0.600) / 12 |" in md and "no peak RSS" in md
    report.write_csv(results, tmp_path / "a.csv", memory=False)
    row = next(csv.DictReader(open(tmp_path / "a.csv")))
    assert row["peak_rss_mib"] == row["rss_before_mib"] == "" and row["median_s"] == "0.5"


def test_progress_line_names_the_task_not_its_numbers():
    assert report.progress(_result(), 3, 24) == "[3/24] softmax/dense/sdpa N=512 fwd: ok"
    assert report.progress(_result(status="fail", reason="> 1 GiB"), 4, 24).endswith("fwd: fail (> 1 GiB)")


@pytest.mark.parametrize("quick", [True, False])
def test_run_prints_results_once(quick, tmp_path, monkeypatch, capsys):
    """Progress on stderr as tasks finish (no numbers), the table once on stdout; with --quick
    (one process for all tasks) no peak RSS in the table or the CSV."""
    fake = [_result(impl="sdpa"), _result(impl="attnkit.auto", peak_rss_mib=777.0, median_s=0.25)]

    def run(cfg, log=print, on_result=None):
        assert cfg.per_process == ("all" if quick else "task")
        log("fp32 matmul 2048^3 on 1 threads: 100.0 GFLOP/s")
        for r in fake:
            on_result(r)
        return fake, 100.0

    monkeypatch.setattr(runner, "run", run)
    out = tmp_path / "b"
    argv = ["bench", "--variants", "dense", "--impls", "sdpa,attnkit.auto", "--modes", "fwd", "--sizes", "512",
            "--out", str(out)]
    assert main(argv + (["--quick"] if quick else [])) == 0
    cap = capsys.readouterr()
    for r in fake:
        assert cap.out.count(r.impl) == 1  # its table row; no per-task result line on stdout
        assert f"softmax/dense/{r.impl} N=512 fwd: ok" in cap.err
    assert "[2/2]" in cap.err and "0.250" not in cap.err  # progress, not results
    row = next(line for line in cap.out.splitlines() if "| attnkit.auto |" in line)
    cell = "0.250 (0.400-0.600) / 12" if quick else "0.250 (0.400-0.600) / 777 / 12"
    assert row.split("|")[5].strip() == cell + " / 0.50x SDPA"  # and its ratio to sdpa in the same run
    assert (out / "bench.md").read_text() in cap.out
    rss = [r["peak_rss_mib"] for r in csv.DictReader(open(out / "bench.csv"))]
    assert rss == (["", ""] if quick else ["1234.0", "777.0"])
