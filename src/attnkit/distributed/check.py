"""``python -m attnkit.distributed.check``: ring attention forward + backward against one process.

    torchrun --nproc-per-node 4 -m attnkit.distributed.check      # the processes torchrun starts
    python -m attnkit.distributed.check --nproc 4                  # spawns 4 local processes itself

Legend: B batch, H query heads, Hk key/value heads, N global length, D head dim, P processes.

Every rank makes its shard (``--layout``) of one seeded global q, k, v (rows seeded by global
position, ``seeded_rows``: no rank builds the global tensors), runs ``ring_attention`` forward
and backward (gloo on CPU; NCCL when torchrun starts GPU processes and ``--device cuda``), and
reports: the resident memory of the process with its inputs (the baseline) and the peak of the
ring step (VmHWM, reset just before the step), bytes sent against what the schedule expects,
and max |ring - single process| of out, dq, dk, dv, where rank 0 runs ``attnkit.attention`` on
the whole sequence (from the same seeded rows) and broadcasts the result. Rank 0 prints one
line per rank; the exit code is 1 when any rank is outside the dtype's tolerance.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import torch


def mask_from_name(name: str, n: int):
    """none | causal | window:W (causal window of W keys) | document:K (K equal causal documents)."""
    from .. import masks as M

    kind, _, arg = name.partition(":")
    if kind == "none":
        return None
    if kind == "causal":
        return M.causal()
    if kind == "window" and arg.isdigit() and int(arg) > 0:
        return M.sliding_window(int(arg) - 1)
    if kind == "document" and arg.isdigit() and int(arg) > 0:
        return M.document(torch.arange(n) * int(arg) // n) & M.causal()
    raise ValueError(f"--mask must be none, causal, window:W or document:K (W, K > 0 integers), got {name!r}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seq-len", dest="n", type=int, default=4096, help="global sequence length N (default 4096)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8, help="query heads H")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads Hk (default H)")
    p.add_argument("--dim", type=int, default=64, help="head dim D")
    p.add_argument("--mask", default="causal", help="none | causal | window:W | document:K (default causal)")
    p.add_argument("--layout", default="zigzag", choices=("zigzag", "contiguous"))
    p.add_argument("--dtype", default="float32", choices=("float32", "float64", "bfloat16", "float16"))
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per rank)")
    p.add_argument("--nproc", type=int, default=4, help="processes to spawn when not under torchrun (default 4)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a rank waits for a peer")
    p.add_argument("--no-reference", action="store_true",
                   help="skip the single-process run (memory measurements at sizes one process cannot hold)")


def _rss_mib() -> tuple:
    from .._memory import peak_rss_mib, rss_mib

    return rss_mib(), peak_rss_mib()


def run_rank(rank: int, world: int, cfg: dict) -> dict:
    """One rank of the check (also used by ``attnkit.distributed.bench``); returns its report."""
    import torch.distributed as dist

    from .._memory import reset_peak_rss
    from .._numerics import compute_dtype
    from ..tolerances import tol
    from .blocks import need_matrix
    from .comm import count_bytes
    from .layout import local_positions
    from .ring import RingOptions, expected_bytes, ring_attention

    warm = torch.ones(1, requires_grad=True)  # torch's first backward(gradient) imports for ~1 s: not ours to time
    (warm * 2).backward(torch.ones(1))
    base, _ = _rss_mib()  # after imports, before any tensor of the check exists
    dtype, dev = getattr(torch, cfg["dtype"]), torch.device(cfg["device"])
    if dev.type == "cuda":
        dev = torch.device("cuda", torch.cuda.current_device())
    B, H, N, D = cfg["batch"], cfg["heads"], cfg["n"], cfg["dim"]
    Hk, layout = cfg["kv_heads"] or H, cfg["layout"]
    mask = mask_from_name(cfg["mask"], N)
    pos = local_positions(layout, N // world, rank, world, device=dev)
    every = torch.arange(N, device=dev)
    make = lambda heads, seed, at=pos: seeded_rows(B, heads, D, at, seed, dtype=dtype, device=dev)  # noqa: E731
    q, k, v = make(H, 1).requires_grad_(), make(Hk, 2).requires_grad_(), make(Hk, 3).requires_grad_()
    dout = make(H, 4)
    opts = RingOptions(timeout_s=cfg["timeout"])
    gc.collect()
    dist.barrier()
    before, _ = _rss_mib()  # the process baseline: imports and this rank's inputs
    reset = reset_peak_rss()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    with count_bytes() as sent:
        out = ring_attention(q, k, v, mask=mask, layout=layout, options=opts)
        t1 = time.perf_counter()
        out.backward(dout)
    t2 = time.perf_counter()
    _, peak = _rss_mib()
    need = need_matrix(mask, world=world, layout=layout, nq=N // world, nk=N // world, batch=B, heads=H)
    kv_bytes = (k.numel() + v.numel()) * k.element_size()
    acc_bytes = (k.numel() + v.numel()) * torch.empty((), dtype=compute_dtype(dtype)).element_size()
    exp_f, exp_b = expected_bytes(need, kv_bytes, acc_bytes)[rank]
    report = {
        "rank": rank, "world": world, "rows": list(q.shape), "forward_s": t1 - t0, "backward_s": t2 - t1,
        "rss_base_mib": base, "rss_before_mib": before, "peak_rss_mib": peak if reset else None,
        "inputs_mib": sum(t.numel() * t.element_size() for t in (q, k, v, dout)) / 2**20,
        "cuda_peak_mib": torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None,
        "sent_forward": sent.sent.get("forward", 0), "sent_backward": sent.sent.get("backward", 0),
        "expected_forward": exp_f, "expected_backward": exp_b, "kv_shard_bytes": kv_bytes,
        "errors": None, "ok": None,
    }
    if cfg["no_reference"]:
        return report
    results = [out.detach(), q.grad, k.grad, v.grad]
    del out
    gc.collect()
    refs = [torch.empty(B, H, N, D, dtype=dtype, device=dev)] * 2 + [torch.empty(B, Hk, N, D, dtype=dtype, device=dev)] * 2
    refs = [r.clone() for r in refs]
    if rank == 0:
        from ..functional import attention

        leaves = [make(h, seed, every).requires_grad_() for h, seed in ((H, 1), (Hk, 2), (Hk, 3))]
        ref = attention(*leaves, mask=mask)
        ref.backward(make(H, 4, every))
        refs = [ref.detach(), *(t.grad for t in leaves)]
    for r in refs:
        dist.broadcast(r, 0)
    errors, ok = {}, True
    for name, a, r in zip(("out", "dq", "dk", "dv"), results, refs):
        want = r[:, :, pos].to(torch.float64)
        err = (a.to(torch.float64) - want).abs()
        t = tol(dtype, "blockwise", grad=name != "out")
        errors[name] = float(err.max())
        ok &= bool((err <= t["atol"] + t["rtol"] * want.abs()).all())
    report.update(errors=errors, ok=ok)
    return report


ROWS_PER_SEED = 256  # positions per generator seed of ``seeded_rows``


def seeded_rows(B: int, heads: int, D: int, positions: torch.Tensor, seed: int, *, dtype=torch.float32,
                device="cpu") -> torch.Tensor:
    """(B, heads, len(positions), D) standard normal rows of a global tensor whose rows depend only
    on (seed, global position): rows are drawn in groups of ROWS_PER_SEED positions, each from
    its own generator, so a rank makes its shard without the global tensor (memory O(shard)) and
    every layout and P see the same global q, k, v. The single-process reference passes all
    positions."""
    blocks = torch.unique(positions.cpu() // ROWS_PER_SEED)  # sorted
    drawn = torch.empty(B, heads, len(blocks) * ROWS_PER_SEED, D, dtype=torch.float32, device=device)  # (B, H, n', D)
    gen = torch.Generator(device=device)
    for i, b in enumerate(blocks.tolist()):
        gen.manual_seed(seed * 1_000_003 + b)
        torch.randn(B, heads, ROWS_PER_SEED, D, generator=gen, device=device, dtype=torch.float32,
                    out=drawn[:, :, i * ROWS_PER_SEED:(i + 1) * ROWS_PER_SEED])
    slot = torch.searchsorted(blocks.to(positions.device), positions // ROWS_PER_SEED)  # block index per position
    rows = drawn[:, :, slot * ROWS_PER_SEED + positions % ROWS_PER_SEED]  # (B, H, len(positions), D)
    return rows.to(dtype)


def format_reports(reports: list, cfg: dict) -> str:
    mib = lambda x: "-" if x is None else f"{x:.0f}"
    lines = [f"ring attention check: P={len(reports)}, B={cfg['batch']}, H={cfg['heads']}, Hk={cfg['kv_heads'] or cfg['heads']}, "
             f"N={cfg['n']}, D={cfg['dim']}, mask={cfg['mask']}, layout={cfg['layout']}, dtype={cfg['dtype']}, "
             f"device={cfg['device']}",
             f"{'rank':>4} {'fwd s':>7} {'bwd s':>7} {'RSS MiB':>8} {'peak MiB':>9} {'step MiB':>9} "
             f"{'sent fwd/bwd MiB':>17} {'expected':>15} {'err out':>9} {'err dq':>9} {'err dk':>9} {'err dv':>9}  ok"]
    for r in reports:
        step = None if r["peak_rss_mib"] is None else r["peak_rss_mib"] - r["rss_before_mib"]
        sent = f"{r['sent_forward'] / 2**20:.1f}/{r['sent_backward'] / 2**20:.1f}"
        exp = f"{r['expected_forward'] / 2**20:.1f}/{r['expected_backward'] / 2**20:.1f}"
        errs = r["errors"] or {}
        e = lambda k, errs=errs: f"{errs[k]:9.2e}" if k in errs else f"{'-':>9}"
        lines.append(f"{r['rank']:>4} {r['forward_s']:7.2f} {r['backward_s']:7.2f} {mib(r['rss_before_mib']):>8} "
                     f"{mib(r['peak_rss_mib'] if r['cuda_peak_mib'] is None else r['cuda_peak_mib']):>9} {mib(step):>9} "
                     f"{sent:>17} {exp:>15} {e('out')} {e('dq')} {e('dk')} {e('dv')}  "
                     f"{'-' if r['ok'] is None else 'yes' if r['ok'] else 'NO'}")
    return "\n".join(lines)


def config(argv: list[str] | None = None) -> tuple[dict, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="python -m attnkit.distributed.check", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    cfg = {k: getattr(args, k) for k in ("n", "batch", "heads", "kv_heads", "dim", "mask", "layout", "dtype",
                                          "device", "timeout", "no_reference")}
    try:
        mask_from_name(cfg["mask"], cfg["n"])
    except ValueError as e:
        p.error(str(e))
    return cfg, args


def main(argv: list[str] | None = None) -> int:
    cfg, args = config(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun
        import torch.distributed as dist

        torch.set_num_threads(args.threads)
        backend = "nccl" if cfg["device"] == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        from datetime import timedelta

        dist.init_process_group(backend, timeout=timedelta(seconds=args.timeout))
        rank, world = dist.get_rank(), dist.get_world_size()
        report = run_rank(rank, world, cfg)
        reports = [None] * world
        dist.all_gather_object(reports, report)
        dist.destroy_process_group()
        if rank != 0:
            return 0 if all(r["ok"] is not False for r in reports) else 1
    else:
        from .launch import spawn

        reports = spawn(run_rank, args.nproc, cfg, timeout_s=args.timeout, threads=args.threads)
    print(format_reports(reports, cfg))
    return 0 if all(r["ok"] is not False for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
