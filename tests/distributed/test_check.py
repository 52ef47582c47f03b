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


def test_seeded_rows_are_the_global_tensors_rows_for_every_layout_and_world_size():
    import torch

    from attnkit.distributed.check import ROWS_PER_SEED, seeded_rows
    from attnkit.distributed.layout import local_positions

    N = 2 * 3 * 4 * 50  # divisible by 2P for P = 1..4; chunks that cut the seed groups
    whole = seeded_rows(2, 3, 5, torch.arange(N), seed=7, dtype=torch.float64)  # (2, 3, N, 5)
    assert whole.shape == (2, 3, N, 5) and whole.dtype == torch.float64
    assert not torch.equal(whole[:, :, :ROWS_PER_SEED], whole[:, :, ROWS_PER_SEED:2 * ROWS_PER_SEED])
    for world in (1, 2, 3, 4):
        for layout in ("contiguous", "zigzag"):
            for rank in range(world):
                pos = local_positions(layout, N // world, rank, world)
                assert torch.equal(seeded_rows(2, 3, 5, pos, seed=7, dtype=torch.float64), whole[:, :, pos])
    assert not torch.equal(seeded_rows(2, 3, 5, torch.arange(N), seed=8), whole.float())
