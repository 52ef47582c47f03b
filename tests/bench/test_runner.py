"""Smoke tests of ``attnkit bench``: case discovery, one tiny task in a subprocess, the reports,
the CLI's options, and the softmax cases' useful-work counts (no timing asserts)."""

from __future__ import annotations

import argparse
import csv

import pytest
import torch

from attnkit.bench import report, runner
from attnkit.bench.cases_softmax import VARIANTS, allowed_pairs, specs
from attnkit.bench.registry import CASES
from attnkit.cli import bench as cli


def test_discover_imports_every_cases_module():
    import pkgutil

    import attnkit.bench as pkg

    runner.discover()
    names = [m.name for m in pkgutil.iter_modules(pkg.__path__) if m.name.startswith("cases_")]
    assert "cases_softmax" in names
    for name in names:
        assert f"attnkit.bench.{name}" in __import__("sys").modules or f"attnkit.bench.{name}" in runner.IMPORT_ERRORS
    assert "softmax/swa256/attnkit.blockwise" in CASES and "softmax/swa256/sdpa" in CASES


def test_one_tiny_task_end_to_end(tmp_path):
    cfg = runner.BenchConfig(sizes=(64,), modes=("fwd", "bwd"), families=("softmax",), variants=("swa256",),
                             impls=("attnkit.blockwise", "flex"), H=1, D=8, repeats=2, threads=1, timeout_s=120)
    results, matmul = runner.run(cfg, log=lambda s: None)
    assert matmul and matmul > 0
    by = {(r.impl, r.mode): r for r in results}
    ok = by[("attnkit.blockwise", "fwd")]
    assert ok.status == "ok", ok.reason
    assert len(ok.times) == 2 and ok.min_s <= ok.median_s <= ok.max_s and ok.peak_rss_mib > 0 and ok.gflops > 0
    assert by[("attnkit.blockwise", "bwd")].status == "ok"
    assert by[("flex", "bwd")].status == "skip" and "backward" in by[("flex", "bwd")].reason
    md = report.markdown(results, matmul, "hdr")
    assert "attnkit.blockwise" in md and "N=64" in md
    report.write_csv(results, tmp_path / "b.csv")
    rows = list(csv.DictReader(open(tmp_path / "b.csv")))
    assert len(rows) == len(results) and rows[0]["family"] == "softmax"
    why = report.plot(results, str(tmp_path / "b.png"))
    assert why is not None or (tmp_path / "b.png").stat().st_size > 0


def test_failed_task_is_reported_and_larger_sizes_skipped():
    cfg = runner.BenchConfig(sizes=(64, 128), modes=("fwd",), variants=("dense",), impls=("attnkit.reference",),
                             H=1, D=8, repeats=1, threads=1, max_rss_gib=0.01)
    results, _ = runner.run(cfg, log=lambda s: None)
    assert [r.status for r in results] == ["fail", "fail"]
    assert "GiB" in results[0].reason and "skipped" in results[1].reason


@pytest.mark.parametrize("variant", VARIANTS)
def test_allowed_pairs_equal_the_mask(variant):
    N = 700
    mask, _ = specs(variant, N)
    dense = N * N if mask is None else int(mask.to_dense(N).sum())
    assert allowed_pairs(variant, N) == pytest.approx(dense)


def test_cli_options():
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    cfg = cli.config_from_args(p.parse_args(["--quick"]))
    assert cfg.sizes == cli.QUICK_SIZES and cfg.repeats == 1 and cfg.per_process == "all"
    cfg = cli.config_from_args(p.parse_args(["--sizes", "256,512", "--modes", "fwd", "--impls", "attnkit.*,sdpa",
                                             "--threads", "1", "--out", "x"]))
    assert cfg.sizes == (256, 512) and cfg.modes == ("fwd",) and cfg.threads == 1
    assert "softmax/dense/attnkit.auto" in runner.select_cases(cfg) and "softmax/dense/flex" not in runner.select_cases(cfg)
    with pytest.raises(ValueError, match="--modes takes fwd and/or bwd, got 'sideways'"):
        cli.config_from_args(p.parse_args(["--modes", "sideways"]))
    assert torch.get_num_threads() >= 1


@pytest.mark.parametrize("variant", ["causal", "swa256", "docmask", "blocksparse", "causal_biasspec", "float_bias"])
def test_flex_mods_are_plain_and_equal_the_specs(variant):
    """The flex peer's mask_mod / score_mod (plain index functions, flex's idiom) compute the same
    mask and bias as the attnkit specs the other impls get."""
    from attnkit.bench.cases_softmax import _float_bias, flex_mods
    from attnkit.bench.registry import BenchShape

    N = 1024
    mask_mod, score_mod = flex_mods(variant, N)
    q = torch.arange(N).view(-1, 1)
    k = torch.arange(N).view(1, -1)
    zero = torch.zeros((), dtype=torch.int64)
    mask, bias = specs(variant, N)
    if mask is not None:
        assert torch.equal(mask_mod(zero, zero, q, k).expand(N, N), mask.to_dense(N)[0, 0])
    if variant == "float_bias":
        want = _float_bias(BenchShape(N=N))[0, 0]
    elif bias is not None:
        want = bias.to_dense(N)[0, 0]
    else:
        assert score_mod is None
        return
    got = score_mod(torch.zeros(N, N), zero, zero, q, k)
    assert torch.allclose(got, want, atol=1e-6)


def test_fla_naive_chunk_peer_equals_attnkit_linear():
    from attnkit.bench.cases_linear import fla_naive_chunk
    from attnkit.variants.linear import elu_plus_one, linear_attention

    fn = fla_naive_chunk()
    if fn is None:
        pytest.skip("fla-core not installed (peers extra)")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 128, 16, generator=g, dtype=torch.float64) for _ in range(3))
    ours = linear_attention(q, k, v, causal=True)
    peer = fn(elu_plus_one(q).transpose(1, 2), elu_plus_one(k).transpose(1, 2), v.transpose(1, 2),
              normalize=True).transpose(1, 2)
    torch.testing.assert_close(peer, ours, atol=1e-8, rtol=1e-8)


def test_rounds_interleave_and_ratios(tmp_path):
    """--rounds 2 runs every task twice (times of both rounds in one median), and each row gets
    its ratio to sdpa and to the fastest peer of the same run."""
    cfg = runner.BenchConfig(sizes=(64,), modes=("fwd",), variants=("causal",), impls=("attnkit.blockwise", "sdpa"),
                             H=2, D=8, warmup=0, repeats=1, rounds=2, timeout_s=120)
    results, _ = runner.run(cfg, log=lambda *_: None)
    assert {r.impl for r in results} == {"attnkit.blockwise", "sdpa"}
    assert all(r.status == "ok" and len(r.times) == 2 for r in results)
    rat = report.ratios(results)
    vs_sdpa, best, vs_best = rat[("softmax", "causal", "fwd", 64, "attnkit.blockwise")]
    sd = next(r for r in results if r.impl == "sdpa")
    bw = next(r for r in results if r.impl == "attnkit.blockwise")
    assert best == "sdpa" and vs_sdpa == pytest.approx(bw.median_s / sd.median_s) == vs_best
    md = report.markdown(results, None)
    assert "x SDPA" in md
