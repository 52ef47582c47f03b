"""Nystromformer: float64 formula (forward and backward), the pinv error law, exactness at m == N,
padding, errors, and the ``nystrom-attention`` peer on the same weights."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnkit import NystromAttention, masks
from attnkit.variants.nystrom import iterative_pinv, nystrom_attention
from tests.tolerances import tol

F64 = torch.float64


def segments_of(n, m, mode):
    """Lists of positions per landmark, written out by hand."""
    if mode == "even":
        return [list(range(math.floor(s * n / m), math.floor((s + 1) * n / m))) for s in range(m)]
    pad, seg = (-n) % m, -(-n // m)
    return [[p - pad for p in range(s * seg, (s + 1) * seg) if p >= pad] for s in range(m)]


def pinv_loop(a, iters, c):
    z = a.T * c
    eye = torch.eye(a.shape[0], dtype=a.dtype)
    for _ in range(iters):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def naive(q, k, v, m, iters, kvalid=None, qvalid=None, conv=None, mode="even", init="per_matrix"):
    """Per (b, h): landmarks over valid positions of each segment (empty ones dropped), then
    softmax(s Q Kl^T) pinv(softmax(s Ql Kl^T)) softmax(s Ql K_valid^T) V_valid (+ conv of padded-zeroed v)."""
    B, Hq, Nq, D = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    s = D ** -0.5
    kvalid = torch.ones(B, Nk, dtype=torch.bool) if kvalid is None else kvalid
    qvalid = torch.ones(B, Nq, dtype=torch.bool) if qvalid is None else qvalid
    parts = {}
    for b in range(B):
        for h in range(Hq):
            kh = h // (Hq // Hk)
            ql = [q[b, h, [i for i in seg if qvalid[b, i]]].mean(0) for seg in segments_of(Nq, m, mode)
                  if any(qvalid[b, i] for i in seg)]
            kl = [k[b, kh, [j for j in seg if kvalid[b, j]]].mean(0) for seg in segments_of(Nk, m, mode)
                  if any(kvalid[b, j] for j in seg)]
            kidx = [j for j in range(Nk) if kvalid[b, j]]
            if not ql or not kl:
                parts[b, h] = None
                continue
            Ql, Kl = torch.stack(ql), torch.stack(kl)
            a1 = torch.softmax(s * q[b, h] @ Kl.T, -1)
            a2 = torch.softmax(s * Ql @ Kl.T, -1)
            a3 = torch.softmax(s * Ql @ k[b, kh, kidx].T, -1)
            parts[b, h] = (a1, a2, a3, v[b, kh, kidx])
    a2s = [p[1] for p in parts.values() if p is not None]
    glob = max(a.abs().sum(1).max() for a in a2s) * max(a.abs().sum(0).max() for a in a2s) if a2s else 1
    rows = []
    for b in range(B):
        heads = []
        for h in range(Hq):
            p = parts[b, h]
            if p is None:
                o = torch.zeros(Nq, v.shape[-1], dtype=v.dtype)
            else:
                a1, a2, a3, vv = p
                c = 1 / glob if init == "global" else 1 / (a2.abs().sum(1).max() * a2.abs().sum(0).max())
                o = a1 @ pinv_loop(a2, iters, c) @ a3 @ vv
            if conv is not None:
                vz = v[b, h // (Hq // Hk)] * kvalid[b, :, None].to(v.dtype)
                K = conv.shape[1]
                o = o + sum(conv[h, t] * torch.nn.functional.pad(vz, (0, 0, K // 2, K // 2))[t:t + Nq] for t in range(K))
            heads.append(o)
        rows.append(torch.stack(heads))
    return torch.stack(rows)


def grads(out, ts):
    """Gradients of <out, fixed random weights>; zeros for inputs the output does not depend on."""
    if not out.requires_grad:
        return [torch.zeros_like(t) for t in ts]
    g = torch.randn_like(out, generator=torch.Generator().manual_seed(7))
    return [torch.zeros_like(t) if d is None else d for t, d in zip(ts, torch.autograd.grad(out, ts, g, allow_unused=True))]


@settings(max_examples=25, deadline=None, derandomize=True)
@given(B=st.integers(1, 2), Hk=st.integers(1, 2), groups=st.sampled_from([1, 2]), Nq=st.integers(2, 11),
       Nk=st.integers(2, 11), m=st.integers(1, 5), D=st.integers(1, 5), Dv=st.integers(1, 4),
       iters=st.integers(0, 7), mode=st.sampled_from(["even", "front_pad"]),
       init=st.sampled_from(["per_matrix", "global"]), pad_k=st.booleans(), pad_q=st.booleans(),
       use_conv=st.booleans(), seed=st.integers(0, 2**16))
def test_matches_formula_forward_backward(B, Hk, groups, Nq, Nk, m, D, Dv, iters, mode, init, pad_k, pad_q,
                                          use_conv, seed):
    g = torch.Generator().manual_seed(seed)
    Hq = Hk * groups
    if use_conv:
        Nq = Nk
    m = min(m, Nq, Nk)
    q = torch.randn(B, Hq, Nq, D, generator=g, dtype=F64, requires_grad=True)
    k = torch.randn(B, Hk, Nk, D, generator=g, dtype=F64, requires_grad=True)
    v = torch.randn(B, Hk, Nk, Dv, generator=g, dtype=F64, requires_grad=True)
    conv = torch.randn(Hq, 3, generator=g, dtype=F64, requires_grad=True) if use_conv else None
    kvalid = torch.rand(B, Nk, generator=g) > 0.3 if pad_k else None
    qvalid = torch.rand(B, Nq, generator=g) > 0.3 if pad_q else None
    spec = lambda valid: None if valid is None else masks.key_padding_from_bool(~valid)
    out = nystrom_attention(q, k, v, num_landmarks=m, pinv_iterations=iters, mask=spec(kvalid),
                            query_valid=qvalid, conv_kernel=conv, segments=mode, pinv_init=init)
    ref = naive(q, k, v, m, iters, kvalid, qvalid, conv, mode, init)
    torch.testing.assert_close(out, ref, **tol(F64))
    ts = [t for t in (q, k, v, conv) if t is not None]
    for a, b in zip(grads(out, ts), grads(ref, ts)):
        torch.testing.assert_close(a, b, **tol(F64, grad=True))


def g_step(e):
    return e ** 3 * (3 + e) / 4


@pytest.mark.parametrize("init", ["per_matrix", "global"])
def test_pinv_backward_is_the_derivative_of_the_iteration(init):
    """The iteration has a hand-written backward; gradcheck it (and the init's own gradient) in float64.
    (Not on a softmax matrix: its row sums tie at 1, where the init's max is not differentiable.)"""
    g = torch.Generator().manual_seed(3)
    a = (torch.rand(2, 2, 7, 7, generator=g, dtype=torch.float64) + torch.eye(7, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: iterative_pinv(x, 3, init), (a,))
    assert torch.autograd.gradcheck(lambda x: iterative_pinv(x, 0, init), (a,))


def test_pinv_error_follows_the_third_order_law():
    """||I - A Z_t||_2 = g^t(1 - c sigma_min^2) with g(e) = e^3 (3 + e) / 4 (A Z_0 is symmetric PSD)."""
    g = torch.Generator().manual_seed(0)
    a = torch.softmax(torch.randn(3, 12, 12, generator=g, dtype=F64) * 1.5, -1)
    c = 1 / (a.sum(-1).amax(-1) * a.sum(-2).amax(-1))
    e = 1 - c * torch.linalg.svdvals(a)[:, -1] ** 2
    eye = torch.eye(12, dtype=F64)
    for t in range(12):
        measured = torch.linalg.matrix_norm(eye - a @ iterative_pinv(a, t), ord=2)
        torch.testing.assert_close(measured, e, atol=1e-12, rtol=1e-6)
        e = g_step(e)
    torch.testing.assert_close(iterative_pinv(a, 40), torch.linalg.inv(a), atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("iters", [6, 40])
def test_equals_exact_attention_when_landmarks_equal_n(iters):
    """m == N: out - softmax(s q k^T) v = -E_t A V, so |error_ij| <= g^t(e0) * ||(A V)[:, j]||_2."""
    g = torch.Generator().manual_seed(1)
    B, H, N, D = 2, 2, 16, 8
    q, k, v = (torch.randn(B, H, N, D, generator=g, dtype=F64) for _ in range(3))
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D), -1)
    exact = a @ v
    out = nystrom_attention(q, k, v, num_landmarks=N, pinv_iterations=iters)
    e = 1 - torch.linalg.svdvals(a)[..., -1] ** 2 / (a.sum(-1).amax(-1) * a.sum(-2).amax(-1))
    for _ in range(iters):
        e = g_step(e)
    bound = e[..., None, None] * torch.linalg.vector_norm(exact, dim=-2, keepdim=True)  # (B, H, 1, D)
    err = (out - exact).abs()
    assert (err <= bound + tol(F64)["atol"] + tol(F64)["rtol"] * exact.abs()).all()
    if iters == 40:  # g^40(e0) is far below float64 roundoff: exact within the float64 tolerance
        assert e.max() < 1e-13
        torch.testing.assert_close(out, exact, **tol(F64))
    else:
        assert err.max() > 0  # six iterations leave a measurable error that the bound covers


def test_padded_keys_change_nothing_and_get_no_gradient():
    g = torch.Generator().manual_seed(2)
    B, H, N, D, m = 2, 2, 13, 4, 4
    q, k, v = (torch.randn(B, H, N, D, generator=g, dtype=F64, requires_grad=True) for _ in range(3))
    spec = masks.key_padding(torch.tensor([13, 5]))  # segment 3 of row 1 (positions 9..12) is empty
    valid = torch.arange(N)[None, :] < torch.tensor([13, 5])[:, None]
    conv = torch.randn(H, 5, generator=g, dtype=F64)
    out = nystrom_attention(q, k, v, num_landmarks=m, mask=spec, query_valid=valid, conv_kernel=conv)
    assert torch.isfinite(out).all()
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[1, :, 5:] = 1e3
    v2[1, :, 5:] = -1e3
    out2 = nystrom_attention(q, k2, v2, num_landmarks=m, mask=spec, query_valid=valid, conv_kernel=conv)
    torch.testing.assert_close(out2, out, **tol(F64))
    gk, gv = torch.autograd.grad(out.sum(), (k, v))
    assert gk[1, :, 5:].abs().max() == 0 and gv[1, :, 5:].abs().max() == 0


def test_fully_padded_sequence_gives_zeros_and_finite_gradients():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 1, 8, 3, generator=g, dtype=F64, requires_grad=True) for _ in range(3))
    out = nystrom_attention(q, k, v, num_landmarks=4, mask=masks.key_padding(torch.tensor([8, 0])))
    assert out[1].abs().max() == 0
    for t in torch.autograd.grad(out.sum(), (q, k, v)):
        assert torch.isfinite(t).all()


def test_float32_close_to_float64():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 40, 8, generator=g, dtype=F64) for _ in range(3))
    ref = nystrom_attention(q, k, v, num_landmarks=8)
    out = nystrom_attention(q.float(), k.float(), v.float(), num_landmarks=8)
    assert out.dtype == torch.float32
    # Softmax kernels are computed in float32 and the six pinv steps contract towards the inverse,
    # so the standard float32 table (with the factor for a changed summation order) applies.
    torch.testing.assert_close(out.double(), ref, **tol(torch.float32, "nystrom"))


def test_errors_name_the_problem():
    q = k = v = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match=r"Nystrom cannot honour the mask causal\(\): each landmark averages"):
        nystrom_attention(q, k, v, num_landmarks=4, mask=masks.causal())
    with pytest.raises(ValueError, match=r"num_landmarks must be an int in \[1, min\(Nq, Nk\)\] = \[1, 8\]"):
        nystrom_attention(q, k, v, num_landmarks=9)
    with pytest.raises(ValueError, match=r"cannot honour the mask sliding_window\(2, 0\).*only key padding"):
        nystrom_attention(q, k, v, num_landmarks=4, mask=masks.sliding_window(2))
    with pytest.raises(ValueError, match=r"query_valid must be a bool \(B, Nq\) = \(1, 8\)"):
        nystrom_attention(q, k, v, num_landmarks=4, query_valid=torch.ones(1, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="must be odd"):
        nystrom_attention(q, k, v, num_landmarks=4, conv_kernel=torch.randn(2, 4))
    with pytest.raises(ValueError, match="needs Nq == Nk"):
        nystrom_attention(q[:, :, :5], k, v, num_landmarks=4, conv_kernel=torch.randn(2, 3))
    with pytest.raises(ValueError, match="segments must be one of"):
        nystrom_attention(q, k, v, num_landmarks=4, segments="pad")
    with pytest.raises(ValueError, match="pinv_iterations must be an int >= 0"):
        nystrom_attention(q, k, v, num_landmarks=4, pinv_iterations=-1)


@pytest.mark.parametrize("n,lengths", [(16, None), (14, None), (16, (16, 13))])
def test_matches_nystrom_attention_peer_same_weights(n, lengths):
    peer_mod = pytest.importorskip("nystrom_attention")
    torch.manual_seed(5)
    dim, heads, dh, m, K = 10, 2, 5, 4, 5
    peer = peer_mod.NystromAttention(dim, dim_head=dh, heads=heads, num_landmarks=m, pinv_iterations=6,
                                     residual=True, residual_conv_kernel=K).double().eval()
    peer.eps = 0.0  # the peer adds eps to landmark counts; with no empty segment 0 gives exact means
    divisible = n % m == 0
    ours = NystromAttention(dim, heads, num_landmarks=m, conv_kernel_size=K,
                            segments="even" if divisible else "front_pad",
                            pinv_init="global").double()  # the peer takes max row/col sums over the whole batch
    with torch.no_grad():
        for lin, w in zip((ours.q_proj, ours.k_proj, ours.v_proj), peer.to_qkv.weight.chunk(3, dim=0)):
            lin.weight.copy_(w)
            lin.bias.zero_()  # the peer's to_qkv has no bias
        ours.out_proj.weight.copy_(peer.to_out[0].weight)
        ours.out_proj.bias.copy_(peer.to_out[0].bias)
        ours.core.conv_kernel.copy_(peer.res_conv.weight.view(heads, K))
    x = torch.randn(2, n, dim, dtype=F64)
    if lengths is None:
        # Without a mask the peer would attend to its own zero padding tokens when m does not divide N.
        mask = None if divisible else torch.ones(2, n, dtype=torch.bool)
        torch.testing.assert_close(ours(x), peer(x, mask=mask), **tol(F64))
    else:
        lens = torch.tensor(lengths)
        mask = torch.arange(n)[None, :] < lens[:, None]
        got, want = ours(x, key_padding_mask=~mask), peer(x, mask=mask)
        torch.testing.assert_close(got[mask], want[mask], **tol(F64))  # the peer's padded rows are garbage


def test_float32_fused_softmax_matmul_at_a_larger_size_forward_backward():
    """Float32 through the fused softmax-matmul and the pinv iteration with hand-written backwards
    at an odd length (front-padded segments), key and query padding with one batch fully padded, GQA
    and the conv term: within the float32 table of the float64 run on the rounded inputs."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(3, 4, 389, 16, generator=g, dtype=F64).float().requires_grad_()
    k, v = (torch.randn(3, 2, 389, 16, generator=g, dtype=F64).float().requires_grad_() for _ in range(2))
    conv = (torch.randn(4, 5, generator=g, dtype=F64) / 5).float()
    valid = torch.arange(389)[None] < torch.tensor([389, 250, 0])[:, None]
    kw = dict(num_landmarks=16, mask=masks.key_padding_from_bool(~valid), query_valid=valid, segments="front_pad")
    out = nystrom_attention(q, k, v, conv_kernel=conv, **kw)
    xs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = nystrom_attention(*xs, conv_kernel=conv.double(), **kw)
    assert out.dtype == torch.float32 and out[2].abs().max() == 0
    torch.testing.assert_close(out.double(), ref, **tol(torch.float32, "nystrom"))
    gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=F64)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), gout.float()), torch.autograd.grad(ref, xs, gout)):
        torch.testing.assert_close(a.double(), b, **tol(torch.float32, "nystrom", grad=True))
