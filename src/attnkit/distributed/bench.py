"""``python -m attnkit.distributed.bench``: memory, traffic and a comparison with torch's context_parallel.

    python -m attnkit.distributed.bench memory --seq-len 65536 --heads 8 --dim 64 --procs 1 2 4
    python -m attnkit.distributed.bench torch --seq-len 16384 --heads 8 --dim 64 --procs 2 4

Legend: B batch, H heads, N global length, D head dim, P processes (gloo on CPU, one thread each).

memory: for each P, a ring forward + backward (``--mask``, ``--layout``) where every rank makes
only its own shard (rows seeded by global position: the same global problem for every P, no
global tensor anywhere). Per rank: the baseline (resident memory after imports and the rank's
q, k, v, dout shards), the attention's memory (peak resident memory of the step above that
baseline: output, gradients, ring buffers, block workspace) and its ratio to P = 1, time, and
bytes sent against the schedule's expectation and the (P-1)/P share of the global K/V volume.
The ranks run with ``MALLOC_MMAP_THRESHOLD_`` = 1 MiB, so a freed tensor leaves the resident
set and the peak is the tensors' peak: with glibc's default the threshold adapts up to 32 MiB
and freed blocks below it stay resident and fragment (``--glibc-default`` measures that).

torch: non-causal attention, the case torch 2.13's ``context_parallel`` runs on CPU (its CPU
SDPA has a forward sharding rule only; causal and backward raise). Per implementation and P, in
fresh processes: max error of the output against a float64 single-process run, forward time
(the first call, and the best of the ``--repeats`` later ones) and peak memory of the first call
above the memory before it (later calls reuse what the first one grew). On CPU torch's ring is
not used: SDPA's CPU operator
(``_scaled_dot_product_flash_attention_for_cpu``) is not among the operators its context-parallel
handler maps to a ring, so DTensor propagates the sharding through SDPA's decomposition (the
first call of a shape spends a minute or more there) and redistributes q, k, v; with H divisible
by P it returns a head shard of the whole sequence instead of the sequence shard (reported in
the table's "output per rank" column, and compared with the matching slice).
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import tempfile
import time

import torch


def _load() -> str:
    try:
        out = subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
        return out.split("load average:")[-1].strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


MMAP_THRESHOLD = 1 << 20  # bytes: glibc serves larger blocks by mmap and unmaps them when freed


def memory(args) -> list[dict]:
    from .check import run_rank
    from .launch import spawn

    if args.glibc_default:
        os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
    else:  # read by the spawned ranks at start-up: freed tensors leave the resident set (see module doc)
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    print(f"ring attention memory: B={args.batch}, H={args.heads}, N={args.seq_len}, D={args.dim}, mask={args.mask}, "
          f"layout={args.layout}, {args.dtype}, gloo, 1 thread per rank, "
          f"{'glibc default malloc' if args.glibc_default else f'MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}'}")
    print("| P | rank | baseline MiB (imports + inputs) | inputs MiB | attention MiB (peak - baseline) | x P=1 | fwd s "
          "| bwd s | sent fwd MiB (expected) | sent bwd MiB (expected) | fwd sent / global K,V | load before |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    rows, first = [], None
    for P in args.procs:  # each P's rows print when it ends (a long run keeps what it measured)
        cfg = {"n": args.seq_len, "batch": args.batch, "heads": args.heads, "kv_heads": None, "dim": args.dim,
               "mask": args.mask, "layout": args.layout, "dtype": args.dtype, "device": "cpu",
               "timeout": args.timeout, "no_reference": True}
        load = _load()
        reports = spawn(run_rank, P, cfg, timeout_s=args.timeout, threads=1, deadline_s=4 * args.timeout)
        kv_global = 2 * args.batch * args.heads * args.seq_len * args.dim * torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
        for r in reports:
            attn = r["peak_rss_mib"] - r["rss_before_mib"]
            first = attn if first is None and P == 1 else first
            row = {"P": P, "rank": r["rank"], "base_mib": r["rss_before_mib"], "inputs_mib": r["inputs_mib"],
                   "attn_mib": attn, "x_p1": None if first is None else attn / first, "fwd_s": r["forward_s"],
                   "bwd_s": r["backward_s"], "sent_fwd": r["sent_forward"], "exp_fwd": r["expected_forward"],
                   "sent_bwd": r["sent_backward"], "exp_bwd": r["expected_backward"],
                   "share_fwd": r["sent_forward"] / kv_global, "load": load}
            rows.append(row)
            ratio = "-" if row["x_p1"] is None else f"{row['x_p1']:.2f}"
            print(f"| {P} | {row['rank']} | {row['base_mib']:.0f} | {row['inputs_mib']:.0f} | {attn:.0f} | {ratio} "
                  f"| {row['fwd_s']:.1f} | {row['bwd_s']:.1f} | {row['sent_fwd'] / 2**20:.0f} ({row['exp_fwd'] / 2**20:.0f}) "
                  f"| {row['sent_bwd'] / 2**20:.0f} ({row['exp_bwd'] / 2**20:.0f}) | {row['share_fwd']:.3f} "
                  f"| {load.split(',')[0]} |", flush=True)
    return rows


def _global(cfg, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(cfg["batch"], cfg["heads"], cfg["n"], cfg["dim"], generator=g, dtype=torch.float32)


def _timed(fn, repeats: int, times: list, peaks: list):
    """Call fn() repeats + 1 times (the first is the warm-up), appending each call's seconds and its
    peak RSS above the RSS before it (MiB); returns the last result (dropped before each call)."""
    from .._memory import peak_rss_mib, reset_peak_rss, rss_mib

    out = None
    for _ in range(repeats + 1):
        out = None
        gc.collect()
        before = rss_mib()
        reset_peak_rss()
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        peaks.append(peak_rss_mib() - before)
    return out


def cp_forward(rank: int, world: int, cfg: dict, impl: str, ref_path: str) -> dict:
    """One rank: non-causal forward by ``impl`` ("attnkit" or "torch"), the first call and repeats."""
    import torch.nn.functional as F

    from .layout import local_positions
    from .ring import RingOptions, ring_attention

    q, k, v = (_global(cfg, s) for s in (1, 2, 3))
    pos = local_positions("zigzag", cfg["n"] // world, rank, world)
    times, peaks, out = [], [], None
    if impl == "attnkit":
        q, k, v = (t[:, :, pos].contiguous() for t in (q, k, v))
        gc.collect()
        out = _timed(lambda: ring_attention(q, k, v, layout="zigzag", options=RingOptions(timeout_s=cfg["timeout"])),
                     cfg["repeats"], times, peaks)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.experimental import context_parallel

        mesh = init_device_mesh("cpu", (world,))
        bufs = [q, k, v]  # global tensors, sharded in place (head-tail = our zigzag) by the context
        with context_parallel(mesh, buffers=bufs, buffer_seq_dims=[2, 2, 2], no_restore_buffers=set(bufs)):
            out = _timed(lambda: F.scaled_dot_product_attention(q, k, v), cfg["repeats"], times, peaks)
    ref = torch.load(ref_path)  # (B, H, N, D)
    B, H, N, D = ref.shape
    if tuple(out.shape) == (B, H, N // world, D):  # this rank's sequence shard (zigzag = torch's head-tail)
        got, ref = "sequence shard", ref[:, :, pos]
    elif tuple(out.shape) == (B, H // world, N, D):  # DTensor chose to shard heads: every position, H / P heads,
        # in the order of the head-tail shards it gathered (rank 0's positions, then rank 1's, ...)
        order = torch.cat([local_positions("zigzag", N // world, r, world) for r in range(world)])
        got, ref = "head shard (all N, head-tail order)", ref[:, rank * (H // world):(rank + 1) * (H // world)][:, :, order]
    else:
        raise RuntimeError(f"{impl} returned shape {tuple(out.shape)} for a ({B}, {H}, {N}, {D}) problem on {world} ranks")
    return {"rank": rank, "err": float((out.double() - ref).abs().max()), "first_s": times[0],
            "time_s": min(times[1:]), "step_mib": peaks[0], "output": f"{got} {tuple(out.shape)}"}


def compare_torch(args) -> list[dict]:
    from ..backends.blockwise import blockwise_attention
    from .launch import spawn

    cfg = {"n": args.seq_len, "batch": args.batch, "heads": args.heads, "dim": args.dim, "timeout": args.timeout,
           "repeats": args.repeats}
    torch.set_num_threads(1)
    with torch.no_grad():  # float64 single-process reference, memory-bounded
        ref = blockwise_attention(*(_global(cfg, s).double() for s in (1, 2, 3)))
    fd, path = tempfile.mkstemp(suffix=".pt")
    os.close(fd)
    torch.save(ref, path)
    del ref
    rows = []
    try:
        for P in args.procs:
            for impl in ("attnkit", "torch"):
                load = _load()
                reports = spawn(cp_forward, P, cfg, impl, path, timeout_s=args.timeout, threads=1,
                                deadline_s=4 * args.timeout)
                rows.append({"P": P, "impl": impl, "err": max(r["err"] for r in reports), "output": reports[0]["output"],
                             "first_s": max(r["first_s"] for r in reports), "time_s": max(r["time_s"] for r in reports),
                             "step_mib": max(r["step_mib"] for r in reports), "load": load})
                print(f"# P={P} {impl} done, load average before: {load}", file=sys.stderr, flush=True)
    finally:
        os.unlink(path)
    print(f"non-causal forward, B={args.batch}, H={args.heads}, N={args.seq_len}, D={args.dim}, float32, gloo, "
          f"1 thread per rank; max over ranks")
    print(f"| P | implementation | output per rank | max error vs float64 | first call s | forward s (best of "
          f"{args.repeats} more) | peak MiB of the first call |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['P']} | {r['impl']} | {r['output']} | {r['err']:.2e} | {r['first_s']:.1f} | {r['time_s']:.2f} "
              f"| {r['step_mib']:.0f} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m attnkit.distributed.bench", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    for name in ("memory", "torch"):
        s = sub.add_parser(name)
        s.add_argument("--seq-len", type=int, default=65536 if name == "memory" else 16384)
        s.add_argument("--batch", type=int, default=1)
        s.add_argument("--heads", type=int, default=8)
        s.add_argument("--dim", type=int, default=64)
        s.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4] if name == "memory" else [2, 4])
        s.add_argument("--timeout", type=float, default=1800.0)
        if name == "memory":
            s.add_argument("--mask", default="causal")
            s.add_argument("--layout", default="zigzag", choices=("zigzag", "contiguous"))
            s.add_argument("--dtype", default="float32")
            s.add_argument("--glibc-default", action="store_true",
                           help="keep glibc's adaptive mmap threshold (freed blocks up to 32 MiB stay resident)")
        else:
            s.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    (memory if args.what == "memory" else compare_torch)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
