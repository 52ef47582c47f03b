"""Reformer LSH attention: exactness with one bucket and one chunk, a float64 naive version of the
bucketed algorithm (forward and backward), seeding, padding, errors, and reformer-pytorch."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from attnkit import LSHSelfAttention, attention, masks
from attnkit.variants.lsh import draw_rotations, lsh_attention, lsh_buckets, shared_qk_attention
from tests.tolerances import tol

F64 = torch.float64


def naive_lsh(qk, v, rotations, nb, c, causal=False, valid=None):
    """The bucketed algorithm written out with Python loops: per round a count matrix of how often
    key j sits in query i's window (own chunk + previous chunk of the rounds laid end to end),
    self only when no round offers another key, softmax per round, rounds combined by lse."""
    B, H, N, D = qk.shape
    R = rotations.shape[1]
    valid = torch.ones(B, N, dtype=torch.bool) if valid is None else valid
    rot = torch.einsum("bhnd,drk->bhrnk", qk.detach(), rotations)
    buckets = torch.cat([rot, -rot], -1).argmax(-1) if nb > 1 else torch.zeros(B, H, R, N, dtype=torch.long)
    C = -(-N // c)
    counts = torch.zeros(B, H, R, N, N, dtype=qk.dtype)
    for b in range(B):
        for h in range(H):
            chunks = []
            for r in range(R):
                order = sorted(range(N), key=lambda i: (int(buckets[b, h, r, i]), i)) + [None] * (C * c - N)
                chunks += [order[j * c:(j + 1) * c] for j in range(C)]
            for idx, chunk in enumerate(chunks):
                window = chunk + (chunks[idx - 1] if len(chunks) > 1 else [])
                for i in chunk:
                    for j in window:
                        if i is not None and j is not None and j != i and valid[b, j] and (not causal or j <= i):
                            counts[b, h, idx // C, i, j] += 1
            for i in range(N):
                if counts[b, h, :, i].sum() == 0 and valid[b, i]:
                    counts[b, h, :, i, i] = 1  # nothing else in any round: attend to itself
    s = qk @ F.normalize(qk, dim=-1).transpose(-1, -2) / math.sqrt(D)  # (B, H, N, N)
    e = counts * torch.exp(s - s.amax(-1, keepdim=True).detach()).unsqueeze(2)  # (B, H, R, N, N)
    den = e.sum(-1)  # (B, H, R, N); 0 where a round offers query i nothing
    ok = den > 0
    den1 = torch.where(ok, den, torch.ones_like(den))
    o = (e @ v.unsqueeze(2)) / den1[..., None]  # per-round outputs
    lse = torch.where(ok, torch.log(den1) + s.amax(-1).detach().unsqueeze(2), -torch.inf)  # (B, H, R, N)
    top = lse.amax(2, keepdim=True).detach()
    ew = torch.where(ok, torch.exp(lse - torch.where(torch.isfinite(top), top, 0.0)), 0.0)
    w = ew / torch.where(ew.sum(2, keepdim=True) > 0, ew.sum(2, keepdim=True), 1.0)  # softmax over rounds
    return (o * w[..., None]).sum(2)


def grads(out, ts):
    g = torch.randn_like(out, generator=torch.Generator().manual_seed(7))
    return torch.autograd.grad(out, ts, g)


def inputs(B, H, N, D, Dv, seed, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    qk = torch.randn(B, H, N, D, generator=g, dtype=dtype, requires_grad=True)
    v = torch.randn(B, H, N, Dv, generator=g, dtype=dtype, requires_grad=True)
    return qk, v, g


@settings(max_examples=25, deadline=None, derandomize=True)
@given(B=st.integers(1, 2), H=st.integers(1, 2), N=st.integers(1, 12), D=st.integers(1, 5), Dv=st.integers(1, 4),
       R=st.integers(1, 3), nb=st.sampled_from([1, 2, 4]), causal=st.booleans(), padded=st.booleans(),
       seed=st.integers(0, 2**16))
def test_one_chunk_equals_exact_shared_qk_attention(B, H, N, D, Dv, R, nb, causal, padded, seed):
    qk, v, g = inputs(B, H, N, D, Dv, seed)
    kp = masks.key_padding(torch.randint(0, N + 1, (B,), generator=g)) if padded else None
    out = lsh_attention(qk, v, n_hashes=R, n_buckets=nb, bucket_size=N, causal=causal, mask=kp, seed=seed)
    ref = shared_qk_attention(qk, v, causal=causal, mask=kp)
    torch.testing.assert_close(out, ref, **tol(F64))
    for a, b in zip(grads(out, (qk, v)), grads(ref, (qk, v))):
        torch.testing.assert_close(a, b, **tol(F64, grad=True))


def test_shared_qk_attention_is_attention_with_normalised_keys_and_the_self_rule():
    qk, v, _ = inputs(2, 2, 7, 4, 3, 0)
    lengths = torch.tensor([7, 1])
    for causal in (False, True):
        ok = torch.ones(7, 7, dtype=torch.bool).tril() if causal else torch.ones(7, 7, dtype=torch.bool)
        ok = ok & (torch.arange(7)[None, None, :] < lengths[:, None, None])  # (B, N, N)
        other = ok & ~torch.eye(7, dtype=torch.bool)
        allowed = other | (ok & torch.eye(7, dtype=torch.bool) & ~other.any(-1, keepdim=True))
        ref = attention(qk, F.normalize(qk, dim=-1), v, mask=allowed[:, None], backend="reference")
        out = shared_qk_attention(qk, v, causal=causal, mask=masks.key_padding(lengths))
        torch.testing.assert_close(out, ref, **tol(F64))
    assert out[1, :, 1:].abs().max() > 0 and torch.equal(out[1, :, 0], v[1, :, 0])  # only key 0: itself


@settings(max_examples=25, deadline=None, derandomize=True)
@given(B=st.integers(1, 2), H=st.integers(1, 2), N=st.integers(2, 14), D=st.integers(2, 5), Dv=st.integers(1, 3),
       R=st.integers(1, 3), nb=st.sampled_from([2, 4, 6]), c=st.integers(1, 5), causal=st.booleans(),
       padded=st.booleans(), seed=st.integers(0, 2**16))
def test_matches_naive_bucketed_algorithm_forward_backward(B, H, N, D, Dv, R, nb, c, causal, padded, seed):
    qk, v, g = inputs(B, H, N, D, Dv, seed)
    rot = torch.randn(D, R, nb // 2, generator=g, dtype=F64)
    lengths = torch.randint(0, N + 1, (B,), generator=g) if padded else None
    kp = None if lengths is None else masks.key_padding(lengths)
    valid = None if lengths is None else torch.arange(N)[None, :] < lengths[:, None]
    out = lsh_attention(qk, v, n_hashes=R, n_buckets=nb, bucket_size=c, causal=causal, mask=kp, rotations=rot)
    ref = naive_lsh(qk, v, rot, nb, c, causal, valid)
    torch.testing.assert_close(out, ref, **tol(F64))
    for a, b in zip(grads(out, (qk, v)), grads(ref, (qk, v))):
        torch.testing.assert_close(a, b, **tol(F64, grad=True))


def test_head_groups_give_the_same_numbers():
    qk, v, _ = inputs(2, 3, 19, 4, 4, 1)
    kw = dict(n_hashes=2, bucket_size=4, seed=3, causal=True)
    a = lsh_attention(qk, v, heads_per_group=1, **kw)  # six groups, each hashed, sorted and masked alone
    b = lsh_attention(qk, v, heads_per_group=6, **kw)  # one group
    torch.testing.assert_close(a, b, **tol(F64))
    for x, y in zip(grads(a, (qk, v)), grads(b, (qk, v))):
        torch.testing.assert_close(x, y, **tol(F64, grad=True))


@pytest.mark.parametrize("N, c, R, nb", [(24, 4, 3, 4), (16, 2, 2, 8), (32, 8, 1, 4), (40, 4, 4, 2)])
def test_shared_window_mask_path_matches_naive(N, c, R, nb):
    """No causal, no padding, N % c == 0, c >= 2: every window shares one broadcast mask and only the
    first chunk of each round (whose look-back is the previous round) gets its own."""
    qk, v, g = inputs(2, 2, N, 5, 3, N + c + R)
    rot = torch.randn(5, R, nb // 2, generator=g, dtype=F64)
    out = lsh_attention(qk, v, n_hashes=R, n_buckets=nb, bucket_size=c, rotations=rot)
    ref = naive_lsh(qk, v, rot, nb, c)
    torch.testing.assert_close(out, ref, **tol(F64))
    for a, b in zip(grads(out, (qk, v)), grads(ref, (qk, v))):
        torch.testing.assert_close(a, b, **tol(F64, grad=True))


@pytest.mark.parametrize("causal, padded, N, c", [(False, False, 24, 4), (True, False, 19, 4), (False, True, 21, 3),
                                                  (True, True, 16, 2)])
def test_matmul_chunk_kernel_equals_the_flash_kernel(monkeypatch, causal, padded, N, c):
    """Off CPU the chunks run through plain matmuls; on CPU through torch's fused flash kernel. Same
    plan, same numbers (forward and backward)."""
    from attnkit.variants import lsh_chunks

    qk, v, g = inputs(2, 2, N, 4, 4, 7)
    kp = masks.key_padding(torch.tensor([N, N - 5])) if padded else None
    kw = dict(n_hashes=3, n_buckets=4, bucket_size=c, causal=causal, mask=kp, seed=1)
    flash = lsh_attention(qk, v, **kw)
    monkeypatch.setattr(lsh_chunks, "_use_flash", lambda x: False)
    plain = lsh_attention(qk, v, **kw)
    torch.testing.assert_close(plain, flash, **tol(F64))
    for a, b in zip(grads(plain, (qk, v)), grads(flash, (qk, v))):
        torch.testing.assert_close(a, b, **tol(F64, grad=True))


def test_float32_matches_float64_naive_on_the_same_buckets():
    qk, v, g = inputs(1, 2, 21, 4, 3, 2, dtype=torch.float32)
    rot = torch.randn(4, 2, 2, generator=g)
    out = lsh_attention(qk, v, n_hashes=2, n_buckets=4, bucket_size=4, rotations=rot)
    assert out.dtype == torch.float32
    # Hash on the float32 vectors (so both sides bucket identically), compute the rest in float64.
    buckets = lsh_buckets(qk.detach(), rot, 4)
    rot64 = rot.double()
    ref = naive_lsh(qk.detach().double(), v.detach().double(), rot64, 4, 4)
    assert torch.equal(lsh_buckets(qk.detach().double(), rot64, 4), buckets)
    torch.testing.assert_close(out.double(), ref, **tol(torch.float32, "lsh"))


def test_seed_and_rotations():
    qk, v, _ = inputs(1, 2, 32, 4, 4, 3)
    kw = dict(n_hashes=2, bucket_size=4)
    a, b = lsh_attention(qk, v, seed=11, **kw), lsh_attention(qk, v, seed=11, **kw)
    assert torch.equal(a, b)
    assert not torch.allclose(a, lsh_attention(qk, v, seed=12, **kw))  # other rotations, other buckets
    rot = draw_rotations(4, 2, 8, seed=11, dtype=F64)  # default nb = 32 // 4 = 8
    assert torch.equal(lsh_attention(qk, v, rotations=rot, **kw), a)
    hi = torch.einsum("bhnd,drk->bhrnk", qk.detach(), rot)
    assert torch.equal(lsh_buckets(qk.detach(), rot, 8), torch.cat([hi, -hi], -1).argmax(-1))


def test_padded_keys_get_no_weight_and_fully_padded_rows_are_zero():
    qk, v, _ = inputs(2, 2, 16, 4, 3, 4)
    kp = masks.key_padding(torch.tensor([10, 0]))
    out = lsh_attention(qk, v, n_hashes=2, bucket_size=4, mask=kp, seed=0)
    assert out[1].abs().max() == 0
    gq, gv = torch.autograd.grad(out.sum(), (qk, v))
    assert torch.isfinite(gq).all() and gv[:, :, 10:].abs().max() == 0


def test_module_runs_and_learns_shapes():
    mod = LSHSelfAttention(8, 2, n_hashes=2, bucket_size=4, causal=True, seed=0)
    assert mod.k_proj is None  # shared QK: no key projection
    x = torch.randn(2, 12, 8, requires_grad=True)
    y = mod(x, key_padding_mask=torch.arange(12)[None, :] >= torch.tensor([12, 7])[:, None])
    assert y.shape == (2, 12, 8)
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_errors_name_the_problem():
    qk, v = torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 3)
    with pytest.raises(ValueError, match=r"must match qk \(1, 2, 8, 4\) in \(B, H, N\)"):
        lsh_attention(qk, v[:, :, :7])
    with pytest.raises(ValueError, match="n_buckets must be 1 or an even int"):
        lsh_attention(qk, v, n_buckets=3)
    with pytest.raises(ValueError, match=r"rotations must have shape \(D, n_hashes, n_buckets // 2\) = \(4, 2, 2\)"):
        lsh_attention(qk, v, n_hashes=2, n_buckets=4, rotations=torch.randn(4, 2, 3))
    with pytest.raises(ValueError, match=r"LSH attention cannot honour the mask sliding_window\(2, 0\)"):
        lsh_attention(qk, v, mask=masks.sliding_window(2))
    with pytest.raises(ValueError, match="bucket_size must be an int > 0"):
        lsh_attention(qk, v, bucket_size=0)


@pytest.mark.parametrize("causal", [False, True])
def test_matches_reformer_pytorch_lsh_attention_same_rotations(causal):
    rp = pytest.importorskip("reformer_pytorch.reformer_pytorch")
    B, H, N, D, c, R = 2, 2, 32, 6, 4, 3
    qk, v, _ = inputs(B, H, N, D, D, 5)  # the peer needs Dv == D
    lengths = torch.tensor([32, 21])
    peer = rp.LSHAttention(bucket_size=c, n_hashes=R, causal=causal).eval()
    torch.manual_seed(9)  # the peer draws randn((1, D, R, nb / 2)) from the global generator
    rot = torch.randn((1, D, R, N // c // 2), dtype=F64)[0]
    for lens in (None, lengths):
        input_mask = None if lens is None else (torch.arange(N)[None, :] < lens[:, None]).repeat_interleave(H, 0)
        torch.manual_seed(9)
        want = peer(qk.reshape(B * H, N, D), v.reshape(B * H, N, D), input_mask=input_mask)[0].view(B, H, N, D)
        got = lsh_attention(qk, v, n_hashes=R, bucket_size=c, causal=causal, rotations=rot,
                            mask=None if lens is None else masks.key_padding(lens))
        rows = torch.ones(B, N, dtype=torch.bool) if lens is None else torch.arange(N)[None, :] < lens[:, None]
        # The peer scores a query against itself as -5e4 (not -inf); where a query sees only itself
        # in every round its round weights are computed at that magnitude: 5e4 * 2^-52 ~ 1.1e-11
        # absolute error in the log weights, times |v| <= 5 (normal draws here) and R rounds.
        atol = tol(F64)["atol"] + 5e4 * 2.0 ** -52 * 5 * R
        torch.testing.assert_close(got.permute(0, 2, 1, 3)[rows], want.permute(0, 2, 1, 3)[rows],
                                   atol=atol, rtol=tol(F64)["rtol"])


@pytest.mark.parametrize("causal", [False, True])
def test_float32_flash_chunks_at_a_larger_size_forward_backward(monkeypatch, causal):
    """Float32 through torch's CPU flash kernel with more chunks than the tiny cases (odd N, a padded
    tail chunk, key padding, one batch fully padded), forward and backward, within the float32 table
    of the float64 naive algorithm. Both hash the float32 vectors in float64 (same buckets)."""
    from attnkit.variants import lsh as lsh_mod

    hash64 = lsh_mod.lsh_buckets
    monkeypatch.setattr(lsh_mod, "lsh_buckets", lambda x, r, nb: hash64(x.double(), r.double(), nb))
    qk, v, g = inputs(2, 2, 157, 8, 6, 9, dtype=torch.float32)
    rot = torch.randn(8, 2, 4, generator=g)
    lengths = torch.tensor([120, 0])
    out = lsh_attention(qk, v, n_hashes=2, n_buckets=8, bucket_size=16, rotations=rot, causal=causal,
                        mask=masks.key_padding(lengths))
    qd, vd = (t.detach().double().requires_grad_() for t in (qk, v))
    ref = naive_lsh(qd, vd, rot.double(), 8, 16, causal=causal, valid=torch.arange(157)[None] < lengths[:, None])
    assert out.dtype == torch.float32 and out[1].abs().max() == 0
    torch.testing.assert_close(out.double(), ref, **tol(torch.float32, "lsh"))
    gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=F64)
    for a, b in zip(torch.autograd.grad(out, (qk, v), gout.float()), torch.autograd.grad(ref, (qd, vd), gout)):
        torch.testing.assert_close(a.double(), b, **tol(torch.float32, "lsh", grad=True))
