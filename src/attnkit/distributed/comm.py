"""Communication of the ring over torch.distributed: agreement, point-to-point steps, byte counts.

Legend: P ranks in the group, r this rank; "peer" is a rank of the group (not the global rank).

- ``agree``: before the first step every rank all-gathers a small JSON record (shapes, dtypes,
  options, spec descriptions, its local error if any, and which key shards its queries need).
  A local error or a field that differs between ranks raises the same ``RingMismatchError`` on
  every rank, instead of one rank raising while the others hang in the next step.
- ``Comm.start``: one step's sends and receives as one ``batch_isend_irecv`` (NCCL needs the
  batch when two ranks send to each other), returning a handle whose ``wait`` has a finite
  timeout and turns a timeout into an error that says what was awaited.
- ``count_bytes``: a context manager recording the bytes this process sends, per phase.

Works with any backend torch.distributed offers for point-to-point (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 300.0


class RingMismatchError(ValueError):
    """The ranks of a ring call disagree (shapes, dtypes, specs, options) or one rank's input is
    invalid; raised with the same message on every rank."""


class RingTimeoutError(RuntimeError):
    """A rank waited longer than the timeout for a peer."""


@dataclass
class ByteCounter:
    """Bytes sent by this process, per phase ("forward", "backward", ...), and message counts."""

    sent: dict = field(default_factory=dict)
    messages: dict = field(default_factory=dict)

    def add(self, phase: str, nbytes: int) -> None:
        self.sent[phase] = self.sent.get(phase, 0) + nbytes
        self.messages[phase] = self.messages.get(phase, 0) + 1


_COUNTERS: list[ByteCounter] = []


@contextlib.contextmanager
def count_bytes():
    """``with count_bytes() as c: ...`` records the bytes the ring sends in c.sent[phase]."""
    c = ByteCounter()
    _COUNTERS.append(c)
    try:
        yield c
    finally:
        _COUNTERS.remove(c)


def _timeout_error(what: str, timeout: float, rank: int, err: Exception) -> RingTimeoutError:
    return RingTimeoutError(
        f"ring attention: rank {rank} waited more than {timeout:g} s for {what}. Every rank of the group "
        "must make the same ring_attention calls, forward and backward, in the same order "
        f"(raise RingOptions.timeout_s for slow steps). Cause: {err}"
    )


def _wait(work, timeout: float, what: str, rank: int) -> None:
    try:
        work.wait(timeout=timedelta(seconds=timeout))
    except RuntimeError as e:
        raise _timeout_error(what, timeout, rank, e) from e


class Pending:
    """Handle of one step's sends/receives; ``wait`` blocks (with the timeout) until all finish."""

    def __init__(self, works, comm: Comm, what: str, buffers):
        self.works, self.comm, self.what, self.buffers = works, comm, what, buffers

    def wait(self) -> None:
        for w in self.works:
            _wait(w, self.comm.timeout, self.what, self.comm.rank)
        self.works, self.buffers = [], None


class Comm:
    """Point-to-point steps within ``group`` with a timeout (seconds) and byte counting."""

    def __init__(self, group, timeout: float):
        self.group, self.timeout = group, float(timeout)
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)

    def _global(self, peer: int) -> int:
        return peer if self.group is None else dist.get_global_rank(self.group, peer)

    def start(self, sends, recvs, *, phase: str, what: str) -> Pending:
        """sends / recvs: lists of (tensor, peer, tag); tensors must stay alive until ``wait``."""
        ops = [dist.P2POp(dist.isend, t, self._global(p), self.group, tag) for t, p, tag in sends]
        ops += [dist.P2POp(dist.irecv, t, self._global(p), self.group, tag) for t, p, tag in recvs]
        for t, _, _ in sends:
            for c in _COUNTERS:
                c.add(phase, t.numel() * t.element_size())
        works = dist.batch_isend_irecv(ops) if ops else []
        return Pending(works, self, what, [t for t, _, _ in sends + recvs])


def agree(record: dict, error: str | None, *, group, timeout: float, device) -> list[dict]:
    """All-gather ``record`` (JSON-serialisable) from every rank; raise ``RingMismatchError`` on
    every rank if any rank reported an ``error`` or a field differs between ranks (fields whose
    name starts with "_" are exchanged but not compared). Returns the records in rank order."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    payload = json.dumps({"record": record, "error": error}).encode()
    dev = device if torch.device(device).type != "cpu" else "cpu"
    size = torch.tensor([len(payload)], dtype=torch.int64, device=dev)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    _wait(dist.all_gather(sizes, size, group=group, async_op=True), timeout, "the other ranks' call records", rank)
    n = int(max(int(s) for s in sizes))
    buf = torch.zeros(n, dtype=torch.uint8, device=dev)
    buf[:len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(dev)
    bufs = [torch.empty_like(buf) for _ in range(world)]
    _wait(dist.all_gather(bufs, buf, group=group, async_op=True), timeout, "the other ranks' call records", rank)
    got = [json.loads(bytes(b[:int(s)].cpu().tolist()).decode()) for b, s in zip(bufs, sizes)]
    by_error: dict[str, list[int]] = {}
    for r, g in enumerate(got):
        if g["error"]:
            by_error.setdefault(g["error"], []).append(r)
    if by_error:
        said = [f"{'rank' if len(rs) == 1 else 'ranks'} {', '.join(map(str, rs))}: {e}" for e, rs in by_error.items()]
        raise RingMismatchError("ring attention: invalid input on " + "; ".join(said))
    records = [g["record"] for g in got]
    diffs = []
    for key in records[0]:
        if key.startswith("_"):
            continue
        vals = [r.get(key) for r in records]
        if any(v != vals[0] for v in vals):
            diffs.append(f"{key}: " + ", ".join(f"rank {r}={v}" for r, v in enumerate(vals)))
    if diffs:
        raise RingMismatchError("ring attention: the ranks' calls differ (every rank must pass its shard of "
                                "one global problem): " + "; ".join(diffs))
    return records
