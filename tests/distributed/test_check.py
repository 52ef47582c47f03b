"""The check command spawns its ranks, compares with one process and prints one line per rank."""

import pytest

from attnkit.distributed.check import main, mask_from_name


def test_check_command_runs_a_small_ring_and_reports_every_rank(capsys):
    code = main(["--seq-len", "48", "--heads", "2", "--kv-heads", "1", "--dim", "8", "--nproc", "2",
                 "--dtype", "float64", "--mask", "document:3", "--timeout", "60"])
    text = capsys.readouterr().out
    assert code == 0, text
    rows = [line.split() for line in text.splitlines()[2:]]
    assert [r[0] for r in rows] == ["0", "1"] and all(r[-1] == "yes" for r in rows)
    assert all(r[7] == r[8] for r in rows)  # bytes sent (fwd/bwd) equal the schedule's expectation


def test_mask_names():
    assert mask_from_name("none", 8) is None
    assert repr(mask_from_name("window:4", 8)) == "sliding_window(3, 0)"
    with pytest.raises(ValueError, match="window:W"):
        mask_from_name("window", 8)
