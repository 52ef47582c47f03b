"""Run a function on P local processes joined in a process group (tests, the check command, benches).

``spawn(fn, world_size, *args)`` starts P processes (torch.multiprocessing, "spawn" start method),
each with MASTER_ADDR=127.0.0.1, a free port, a process group of ``backend`` with a finite
timeout and ``threads`` torch threads; it calls ``fn(rank, world_size, *args)`` on each and
returns their results in rank order. A rank that raises makes ``spawn`` raise with every failing
rank's traceback; ranks still running after ``deadline_s`` are terminated and reported, so a
hang becomes an error. ``fn`` and its results must be picklable (results travel as torch.save
bytes, so tensors are fine).

``torchrun`` users do not need this: they call ``ring_attention`` in their own processes.
"""

from __future__ import annotations

import io
import os
import queue
import socket
import time
import traceback
from datetime import timedelta


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, backend, timeout_s, threads, fn, args, results):
    import torch
    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(threads)
    try:
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
        value = fn(rank, world, *args)
        buf = io.BytesIO()
        torch.save(value, buf)
        results.put((rank, "ok", buf.getvalue()))
    except BaseException:  # report everything, including KeyboardInterrupt in a child
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(fn, world_size: int, *args, backend: str = "gloo", timeout_s: float = 60.0, threads: int = 1,
          deadline_s: float | None = None) -> list:
    """Results of ``fn(rank, world_size, *args)`` on ``world_size`` fresh processes, rank order.

    timeout_s: the process group's timeout. deadline_s: wall-clock limit for the whole run
    (default 4 * timeout_s + 60 s for start-up).
    """
    import torch
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, backend, timeout_s, threads, fn, args, results),
                         daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + (deadline_s if deadline_s is not None else 4 * timeout_s + 60)
    got = {}
    try:
        while len(got) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                rank, status, value = results.get(timeout=min(left, 1.0))
            except queue.Empty:
                if all(not p.is_alive() for p in procs) and results.empty():
                    break
                continue
            got[rank] = (status, value)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
    missing = [r for r in range(world_size) if r not in got]
    errors = [f"--- rank {r} ---\n{v}" for r, (s, v) in sorted(got.items()) if s == "error"]
    if missing or errors:
        head = f"spawn: ranks {missing} gave no result before the deadline or died\n" if missing else ""
        raise RuntimeError(head + "\n".join(errors))
    return [torch.load(io.BytesIO(got[r][1]), weights_only=False) for r in range(world_size)]
