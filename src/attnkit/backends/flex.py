"""The flex backend: torch.nn.attention.flex_attention under torch.compile, fed from the specs.

Legend: B batch, Hq query heads, Hk key/value heads, Nq queries, Nk keys, D head dim, Dv value dim,
Tq / Tk = ceil(Nq / 128) / ceil(Nk / 128) flex blocks.

The mask spec becomes flex's mask_mod, ``lambda b, h, q_idx, kv_idx: spec.allows(b, h, q_idx +
(Nk - Nq), kv_idx, num_keys=Nk)`` (flex numbers queries by row; attnkit's specs take key
coordinates), and its block mask is built directly from the spec's ``tiles()`` map (EMPTY tiles
skipped, FULL tiles run without mask_mod) instead of ``create_block_mask``, which would evaluate
the mask densely (about 2.9 GiB at N=16384) or needs an extra compile. Block masks are cached per
(spec, shape, device) and by the content of the tensors the spec reads (``block_mask_for``). Bias specs and softcap become the score_mod: softcap(score) + bias.

Cost: like FlashAttention, O(non-empty tiles * 128^2 * D) time and O(N * D) memory; but every new
(shape, spec) pair triggers a torch.compile of about 10 s on CPU. On CPU flex has no backward, so
``static_reasons`` refuses calls that need gradients there. No dropout (flex has none that
matches the counter-based pattern), no returned weights.
"""

from __future__ import annotations

import functools
from collections import OrderedDict

import torch

from ..masks import FULL, PARTIAL
from .base import AttentionCall, Backend

BLOCK = 128
_CACHE_SIZE = 32


def _vmapped(fn):
    """fn(b, h, q, k) on 0-d index tensors, vmapped over each index the way flex does."""
    for dims in ((None, None, None, 0), (None, None, 0, None), (None, 0, None, None), (0, None, None, None)):
        fn = torch.vmap(fn, in_dims=dims, out_dims=0)
    return fn


def _probe_reason(what: str, fn, B: int, Hq: int, Nq: int, Nk: int, device) -> str | None:
    """Flex evaluates mask_mod / score_mod elementwise under vmap; specs that call .item() or
    branch on values cannot be traced. Probe on a 2 x 2 x 2 x 2 index grid (cheap)."""
    idx = [torch.arange(min(2, n), device=device) for n in (B, Hq, Nq, Nk)]
    try:
        _vmapped(fn)(*idx)
    except Exception as e:  # noqa: BLE001 - any failure means flex cannot use the spec
        return f"{what} cannot be traced elementwise for flex ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    return None


def _flex_call(q, k, v, score_mod, block_mask, scale, enable_gqa, kernel_options):
    """attnkit's own frame around flex_attention. torch.compile keeps its specialisations (and
    counts them against the recompile limit) per compiled function; compiling this wrapper, not
    ``flex_attention`` itself, keeps a user's own compiled flex calls from using up attnkit's
    budget, past which dynamo would silently run flex unfused (an Nq x Nk score matrix: 53 GB at
    N=16384, H=16 on the GPU check)."""
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa,
                          kernel_options=kernel_options)


def _kernel_options(device, Hq: int, Hk: int, Nq: int) -> dict | None:
    """Inductor lowers CUDA calls with Nq < 128 to its flex-decoding kernel, which packs the G = Hq/Hk
    query heads of a group into one tile of next_pow2(Nq * G) rows. Above the block mask's 128
    query rows, torch <= 2.11 filters out every tile choice and raises NoValidChoicesError (found
    by tools/gpu_check.py at Nq=100, G=2; fixed upstream in pytorch#185349). Those calls take
    the main flex kernel instead, as torch's docs allow with FORCE_USE_FLEX_ATTENTION."""
    if device.type == "cuda" and Nq < BLOCK and Nq * (Hq // Hk) > BLOCK:
        return {"FORCE_USE_FLEX_ATTENTION": True}
    return None


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    return torch.compile(_flex_call, dynamic=False)


def flex_available() -> str | None:
    """None if flex_attention can be imported, else the reason."""
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the torch build
        return f"torch.nn.attention.flex_attention is not available ({e})"
    return None


def _depends_on(mask, B: int, Hq: int, Nk: int) -> tuple[bool, bool]:
    """Whether the spec's result varies with batch / head (from the shape allows() returns)."""
    dev = mask.device
    b = torch.arange(B, device=dev).view(-1, 1, 1, 1)
    h = torch.arange(Hq, device=dev).view(1, -1, 1, 1)
    z = torch.full((1, 1, 1, 1), Nk - 1, dtype=torch.int64, device=dev)
    out = mask.allows(b, h, z, z, num_keys=Nk)
    while out.dim() < 4:
        out = out.unsqueeze(0)
    return out.shape[0] > 1, out.shape[1] > 1


class _Cache:
    """LRU of block masks and score mods keyed by (id(spec), shape, device); each value holds the
    spec so its id stays unique while cached."""

    def __init__(self, size: int):
        self.size, self.data = size, OrderedDict()

    def get(self, key, build):
        if key in self.data:
            self.data.move_to_end(key)
            return self.data[key][1]
        value = build()
        self.data[key] = (key, value)
        if len(self.data) > self.size:
            self.data.popitem(last=False)
        return value


_BLOCK_MASKS = _Cache(_CACHE_SIZE)
_MASK_MODS = _Cache(_CACHE_SIZE)
_SCORE_MODS = _Cache(_CACHE_SIZE)
_PROBES = _Cache(_CACHE_SIZE)
_COMPILED_KEYS: set = set()  # what torch.compile has specialised flex_attention on so far


def _recompile_limit() -> int:
    cfg = torch._dynamo.config
    return int(getattr(cfg, "recompile_limit", None) or getattr(cfg, "cache_size_limit", 8))


def reset_compile_cache() -> None:
    """Forget every compiled flex specialisation (torch._dynamo.reset()) and our block masks."""
    torch._dynamo.reset()
    _COMPILED_KEYS.clear()
    _BLOCK_MASKS.data.clear()
    _MASK_MODS.data.clear()
    _SCORE_MODS.data.clear()
    _PROBES.data.clear()


def _compile_key(call: AttentionCall) -> tuple:
    """What dynamo guards on for our flex call: shapes, dtype, device, scale, the specs' mods, and
    grad mode (training and ``no_grad`` evaluation of one shape are two specialisations)."""
    return (tuple(call.q.shape), tuple(call.k.shape), tuple(call.v.shape), call.q.dtype, str(call.q.device),
            call.scale, call.softcap, id(call.mask), id(call.bias), torch.is_grad_enabled())


def block_mask_for(mask, B: int, Hq: int, Nq: int, Nk: int, device):
    """A flex BlockMask equal to ``mask`` for (B, Hq, Nq, Nk), built from ``mask.tiles``.

    Cached per (spec, shape, device) *and content*: an entry keeps a copy of the tensors the spec
    reads (``mask.data_tensors()``: lengths, ids, layouts) and is rebuilt when they differ, so a
    spec whose data was edited in place never gets a stale block mask. A spec that cannot list
    its data (``from_function``, a user subclass) is rebuilt on every call."""
    data = mask.data_tensors()
    if data is None:
        return _build_block_mask(mask, B, Hq, Nq, Nk, device)
    key = (id(mask), B, Hq, Nq, Nk, str(device))
    hit = _BLOCK_MASKS.data.get(key)
    if hit is not None:
        _, (held, snapshot, bm) = hit
        if held is mask and _same_data(snapshot, data):
            _BLOCK_MASKS.data.move_to_end(key)
            return bm
        del _BLOCK_MASKS.data[key]
    value = (mask, tuple(t.detach().clone() for t in data), _build_block_mask(mask, B, Hq, Nq, Nk, device))
    return _BLOCK_MASKS.get(key, lambda: value)[2]


def _same_data(snapshot: tuple, data: tuple) -> bool:
    return len(snapshot) == len(data) and all(
        a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
        for a, b in zip(snapshot, data))


def _mask_mod_for(mask, Nq: int, Nk: int):
    """flex's mask_mod for the spec, one function object per (spec, Nq, Nk): it reads the spec's
    data when called (never stale), and reusing it keeps torch.compile from specialising again
    when only the block lists are rebuilt."""
    def build():
        off = Nk - Nq

        def mask_mod(b, h, q_idx, kv_idx):
            return mask.allows(b, h, q_idx + off, kv_idx, num_keys=Nk)

        return (mask, mask_mod)

    return _MASK_MODS.get((id(mask), Nq, Nk), build)[1]


def _build_block_mask(mask, B, Hq, Nq, Nk, device):
    from torch.nn.attention.flex_attention import BlockMask

    mask_mod = _mask_mod_for(mask, Nq, Nk)
    dep_b, dep_h = _depends_on(mask, B, Hq, Nk)
    tm = mask.tiles(Nq, Nk, BLOCK, BLOCK, batch=B if dep_b else 1, heads=Hq if dep_h else 1, device=device)
    tm = tm.to(device)
    if Nk % BLOCK:  # a tail key block is never FULL for flex: it must see mask_mod's bounds
        tail = tm[..., -1]
        tm[..., -1] = torch.where(tail == FULL, torch.full_like(tail, PARTIAL), tail)
    Tk = tm.shape[-1]
    ar = torch.arange(Tk, device=device)

    def lists(sel):  # (B', H', Tq, Tk) bool -> counts (B', H', Tq) and indices, selected first
        order = torch.argsort((~sel).to(torch.int32) * Tk + ar, dim=-1, stable=True)
        return sel.sum(dim=-1).to(torch.int32), order.to(torch.int32)

    kv_num, kv_idx = lists(tm == PARTIAL)
    full_num, full_idx = lists(tm == FULL)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=BLOCK, mask_mod=mask_mod,
                                    seq_lengths=(Nq, Nk))


def _score_mod_for(call: AttentionCall):
    if call.bias is None and call.softcap is None:
        return None
    B, Hq, Hk, Nq, Nk, D = call.shape
    key = (id(call.bias), call.softcap, Nq, Nk)

    def build():
        bias, cap, off = call.bias, call.softcap, Nk - Nq

        def score_mod(score, b, h, q_idx, kv_idx):
            if cap is not None:
                score = cap * torch.tanh(score / cap)
            if bias is not None:
                score = score + bias(b, h, q_idx + off, kv_idx).to(score.dtype)
            return score

        return (call.bias, score_mod)

    return _SCORE_MODS.get(key, build)[1]


class FlexBackend(Backend):
    name = "flex"

    def static_reasons(self, call: AttentionCall) -> list[str]:
        reasons = []
        why = flex_available()
        if why:
            return [why]
        if call.return_weights:
            reasons.append("flex does not return attention weights")
        if call.dropout_p > 0:
            reasons.append("flex has no dropout that reproduces attnkit's seeded pattern")
        if call.q.device.type == "cpu" and call.needs_grad:
            reasons.append("flex_attention has no backward on CPU (forward only); use blockwise to train")
        if call.q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            reasons.append(f"flex is compiled for float32/float16/bfloat16, got {call.q.dtype}")
        key = _compile_key(call)
        if key not in _COMPILED_KEYS and len(_COMPILED_KEYS) >= _recompile_limit():
            reasons.append(f"torch.compile has specialised flex_attention {len(_COMPILED_KEYS)} times (its recompile "
                           "limit); another shape or spec would run the unfused eager fallback, which materialises "
                           "the scores")
        if call.bias is not None and torch.is_grad_enabled() and any(t.requires_grad for t in call.bias.tensors()):
            reasons.append("gradients of bias-spec tensors (a learnable T5 table or ALiBi slopes) through flex's "
                           "score_mod are not routed by attnkit; blockwise computes them")
        return reasons

    def data_reasons(self, call: AttentionCall) -> list[str]:
        """Whether the specs can be traced elementwise (a probe on a 2 x 2 x 2 x 2 grid)."""
        B, Hq, Hk, Nq, Nk, D = call.shape
        off, dev = Nk - Nq, call.q.device
        m, bias = call.mask, call.bias
        probes = []
        if m is not None:
            probes.append((m, f"mask spec {m!r}", lambda b, h, i, j: m.allows(b, h, i + off, j, num_keys=Nk)))
        if bias is not None:
            probes.append((bias, f"bias spec {bias!r}", lambda b, h, i, j: bias(b, h, i + off, j)))
        # Traceability is a property of the spec's code, not of its data: probed once per spec and
        # shape (a vmap probe costs about 1 ms of Python, more than a short flex call on a GPU).
        reasons = [_PROBES.get((id(spec), B, Hq, Nq, Nk, str(dev)),
                               lambda spec=spec, what=what, fn=fn: (spec, _probe_reason(what, fn, B, Hq, Nq, Nk, dev)))[1]
                   for spec, what, fn in probes]
        return [r for r in reasons if r]

    def run(self, call: AttentionCall):
        B, Hq, Hk, Nq, Nk, D = call.shape
        block_mask = None
        if call.mask is not None:
            block_mask = block_mask_for(call.mask, B, Hq, Nq, Nk, call.q.device)
        _COMPILED_KEYS.add(_compile_key(call))
        out = _compiled_flex()(call.q, call.k, call.v, _score_mod_for(call), block_mask, call.scale, Hq != Hk,
                               _kernel_options(call.q.device, Hq, Hk, Nq))
        return out
