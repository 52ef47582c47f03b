"""The check command spawns its ranks, compares with one process and reports every rank."""

import pytest

from attnkit.distributed.check import config, format_reports, mask_from_name, run_rank
from attnkit.distributed.launch import spawn


def test_check_runs_a_small_ring_and_reports_every_rank():
    cfg, _ = config(["--seq-len", "48", "--heads", "2", "--kv-heads", "1", "--dim", "8", "--dtype", "float64",
                     "--mask", "document:3", "--timeout", "60"])
    reports = spawn(run_rank, 2, cfg, timeout_s=60)
    for r in reports:
        assert r["ok"] and max(r["errors"].values()) < 1e-10, r
        assert (r["sent_forward"], r["sent_backward"]) == (r["expected_forward"], r["expected_backward"])
    rows = [line.split() for line in format_reports(reports, cfg).splitlines()[2:]]
    assert [r[0] for r in rows] == ["0", "1"] and all(r[-1] == "yes" for r in rows)


def test_mask_names():
    assert mask_from_name("none", 8) is None
    assert repr(mask_from_name("window:4", 8)) == "sliding_window(3, 0)"
    with pytest.raises(ValueError, match="window:W"):
        mask_from_name("window", 8)
