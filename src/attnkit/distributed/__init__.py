"""Context parallelism over torch.distributed: exact ring attention and sequence sharding.

Legend: P ranks in the process group, N global sequence length, n = N / P per rank.

- ``ring_attention(q, k, v, *, group, mask, bias, scale, softcap, layout)``: each rank passes its
  shard (B, H, n, D) and gets its shard of ``attnkit.attention`` on the whole sequence, forward
  and backward, with every mask and bias spec evaluated at global positions.
- ``shard_sequence`` / ``gather_sequence`` / ``shard_positions``: the layouts ("zigzag",
  "contiguous") and the global position ids of a shard (for RoPE).
- ``ContextParallel(group, layout)``: pass it as ``context_parallel=`` to ``MultiHeadAttention``
  (softmax variants) or ``DecoderLM`` to run them on a shard.
- ``python -m attnkit.distributed.check`` (or under ``torchrun``) checks a ring against one
  process and prints per-rank peak memory and error.

Runs on any torch.distributed backend with point-to-point support: gloo on CPU, NCCL on GPUs.
"""

from .comm import RingMismatchError, RingTimeoutError, count_bytes
from .context import ContextParallel
from .layout import LAYOUTS, gather_sequence, shard_positions, shard_sequence
from .offsets import ShiftedBias, ShiftedMask, Window, shift_bias, shift_mask
from .ring import RingOptions, ring_attention

__all__ = [
    "ring_attention", "RingOptions", "ContextParallel", "RingMismatchError", "RingTimeoutError", "count_bytes",
    "LAYOUTS", "shard_sequence", "gather_sequence", "shard_positions",
    "Window", "shift_mask", "shift_bias", "ShiftedMask", "ShiftedBias",
]
