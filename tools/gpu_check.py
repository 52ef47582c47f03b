"""GPU check: every exact backend and the long-range kernels on CUDA against float64, plus timings.

Run on a machine with a CUDA GPU (the test suite runs on CPU only):

    PYTHONPATH=src python tools/gpu_check.py [--out DIR] [--parts exact,short,longrange,transformers,timings]

Part 1 (exactness): for each mask/bias case and each backend that accepts the call on CUDA, the
forward output and dq, dk, dv (and learnable-bias gradients) in float32 and bfloat16 are compared
with ``backend="reference"`` in float64 on the same device, within ``attnkit.tolerances``.
Part 2 (short): flex with Nq in {1, 17, 100, 127} (inductor's decoding kernel) and GQA groups
1, 2, 4, float32 against float64.
Part 3: linear, Performer, Linformer, Nystrom, LSH and additive attention on CUDA float32 against
the same function in float64 (forward and backward).
Part 4: the transformers Mistral check.
Part 5: timings (CUDA events, median of 5) for causal / sliding window / document / ALiBi at
N=16384 in bfloat16, attnkit's backends against sdpa (dense bool mask) and flex (idiomatic
mask_mod), fwd and fwd+bwd, as ratios to sdpa in the same run.
Writes gpu_check.md and gpu_check.json to --out and exits 1 if any exactness check fails.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import attnkit
from attnkit import masks
from attnkit.positions import ALiBi, T5Bias, alibi_slopes
from attnkit.tolerances import tol

DEV = "cuda"


def _every_flex_compiles():
    """dynamo's recompile limits lifted (as the test suite does): past the default limit (8) flex
    refuses by its reason (attnkit) or runs unfused (the peer), and a case is not what it says."""
    return torch._dynamo.config.patch(recompile_limit=1_000, accumulated_recompile_limit=10_000)


def _rand(*shape, dtype, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(DEV, dtype)


def exact_cases(B=2, Hq=4, Hk=2, Nq=300, Nk=300, D=64):
    """(name, kwargs builder(dtype) -> dict, shapes). Odd lengths, GQA, padding, masked rows."""
    lengths = torch.tensor([Nk, Nk // 3], device=DEV)
    ids = (torch.arange(Nk, device=DEV) // 97).expand(B, Nk).contiguous()

    def t5(dtype):
        table = _rand(32, Hq, dtype=dtype, seed=5).requires_grad_(True)
        return T5Bias(table, bidirectional=False)

    return [
        ("dense", lambda dt: {}),
        ("causal", lambda dt: {"mask": masks.causal()}),
        ("causal Nq<Nk", lambda dt: {"mask": masks.causal()}, (Nq // 3, Nk)),
        ("swa 63", lambda dt: {"mask": masks.sliding_window(63)}),
        ("document & causal", lambda dt: {"mask": masks.document(ids) & masks.causal()}),
        ("padding & causal", lambda dt: {"mask": masks.key_padding(lengths) & masks.causal()}),
        ("fully masked rows", lambda dt: {"mask": masks.key_padding(torch.tensor([0, Nk], device=DEV))}),
        ("bigbird", lambda dt: {"mask": masks.bigbird(block_size=32, seed=3)}),
        ("alibi & causal", lambda dt: {"mask": masks.causal(), "bias": ALiBi(Hq, slopes=alibi_slopes(Hq, dtype=dt, device=DEV))}),
        ("t5 learnable & causal", lambda dt: {"mask": masks.causal(), "bias": t5(dt)}),
        ("softcap 30 & causal", lambda dt: {"mask": masks.causal(), "softcap": 30.0}),
    ], (B, Hq, Hk, Nq, Nk, D)


def run_exact(report: list, failures: list, only: set | None = None) -> None:
    with _every_flex_compiles():
        _run_exact(report, failures, only)


def _run_exact(report: list, failures: list, only: set | None) -> None:
    cases, (B, Hq, Hk, Nq, Nk, D) = exact_cases()
    for case in cases:
        name, build = case[0], case[1]
        if only and name.split()[0] not in only:
            continue
        nq, nk = case[2] if len(case) > 2 else (Nq, Nk)
        q64 = _rand(B, Hq, nq, D, dtype=torch.float64, seed=1)
        k64 = _rand(B, Hk, nk, D, dtype=torch.float64, seed=2)
        v64 = _rand(B, Hk, nk, D, dtype=torch.float64, seed=3)
        go64 = _rand(B, Hq, nq, D, dtype=torch.float64, seed=4)
        kw64 = build(torch.float64)
        ins64 = [t.clone().requires_grad_(True) for t in (q64, k64, v64)]
        out64 = attnkit.attention(*ins64, backend="reference", **kw64)
        extra64 = _bias_tensors(kw64)
        grads64 = torch.autograd.grad(out64, ins64 + extra64, go64)
        for dtype in (torch.float32, torch.bfloat16):
            for backend in ("auto", "sdpa", "blockwise", "flex", "reference"):
                kw = build(dtype)
                ins = [t.to(dtype).requires_grad_(True) for t in (q64, k64, v64)]
                extra = _bias_tensors(kw)
                try:
                    chosen = attnkit.which_backend(*ins, **kw) if backend == "auto" else backend
                    out = attnkit.attention(*ins, backend=backend, **kw)
                    grads = torch.autograd.grad(out, ins + extra, go64.to(dtype))
                except (attnkit.NoBackendError, ValueError, NotImplementedError, RuntimeError) as e:
                    if backend == "auto":
                        failures.append(f"{name} {dtype} auto: {e}")
                    report.append({"case": name, "dtype": str(dtype), "backend": backend, "status": f"n/a: {str(e).splitlines()[0][:90]}"})
                    continue
                tb = chosen if isinstance(chosen, str) else str(chosen)
                errs = [_excess(out, out64, dtype, tb, grad=False)]
                errs += [_excess(a, b, dtype, tb, grad=True) for a, b in zip(grads, grads64)]
                ok = max(errs) <= 1.0
                row = {"case": name, "dtype": str(dtype), "backend": backend, "chosen": tb,
                       "worst_err_over_tol": round(max(errs), 4), "status": "ok" if ok else "FAIL"}
                report.append(row)
                if not ok:
                    failures.append(f"{name} {dtype} {backend}: error {max(errs):.3g} x tolerance")
                print(row, flush=True)


def run_short(report: list, failures: list) -> None:
    """Short queries on flex (inductor's decoding kernel below 128 rows) with GQA groups of 1, 2
    and 4, float32 forward and backward against float64 reference: Nq=100 with G=2 raised
    NoValidChoicesError before ``flex._kernel_options``."""
    with _every_flex_compiles():
        _run_short(report, failures)


def _run_short(report: list, failures: list) -> None:
    B, Hk, Nk, D = 1, 2, 300, 64
    for nq in (1, 17, 100, 127):
        for g in (1, 2, 4):
            for name, mask in (("causal", masks.causal()), ("none", None)):
                q64 = _rand(B, Hk * g, nq, D, dtype=torch.float64, seed=1)
                k64, v64 = (_rand(B, Hk, Nk, D, dtype=torch.float64, seed=s) for s in (2, 3))
                go = _rand(B, Hk * g, nq, D, dtype=torch.float64, seed=4)
                ins64 = [t.clone().requires_grad_(True) for t in (q64, k64, v64)]
                out64 = attnkit.attention(*ins64, mask=mask, backend="reference")
                want = [out64, *torch.autograd.grad(out64, ins64, go)]
                case = f"flex short Nq={nq} G={g} {name}"
                try:
                    ins = [t.float().requires_grad_(True) for t in (q64, k64, v64)]
                    out = attnkit.attention(*ins, mask=mask, backend="flex")
                    got = [out, *torch.autograd.grad(out, ins, go.float())]
                except Exception as e:  # noqa: BLE001 - a failure to run is a finding
                    report.append({"case": case, "dtype": "torch.float32", "backend": "flex",
                                   "status": f"FAIL: {type(e).__name__}: {str(e).splitlines()[0][:120]}"})
                    failures.append(case + ": " + report[-1]["status"])
                    print(report[-1], flush=True)
                    continue
                err = max(_excess(a, b, torch.float32, "flex", grad=i > 0) for i, (a, b) in enumerate(zip(got, want)))
                report.append({"case": case, "dtype": "torch.float32", "backend": "flex",
                               "worst_err_over_tol": round(err, 4), "status": "ok" if err <= 1 else "FAIL"})
                print(report[-1], flush=True)
                if err > 1:
                    failures.append(f"{case}: error {err:.3g} x tolerance")


def _bias_tensors(kw) -> list[torch.Tensor]:
    b = kw.get("bias")
    return [t for t in (b.tensors() if hasattr(b, "tensors") else ()) if t.requires_grad]


def _excess(a, e, dtype, backend, grad) -> float:
    """max |a - e| / (atol + rtol |e|): <= 1 means within the tolerance table."""
    t = tol(dtype, backend if backend in ("reference", "sdpa", "blockwise", "flex") else "flex", grad=grad)
    a, e = a.detach().to(torch.float64), e.detach().to(torch.float64)
    return ((a - e).abs() / (t["atol"] + t["rtol"] * e.abs())).max().item()


def run_longrange(report: list, failures: list) -> None:
    """Each kernel on the device in float64 against the CPU in float64 (device-specific bugs), and
    in float32 against float64 on the device (except LSH: hashing is discontinuous, so float32
    rounding may move a vector to another bucket; its float64 device/CPU check stands)."""
    B, H, N, D = 2, 4, 777, 64
    proj = attnkit.variants.performer.draw_favor_projection(128, D, generator=torch.Generator().manual_seed(0))
    e = torch.randn(128, N, generator=torch.Generator().manual_seed(1), dtype=torch.float64) / N ** 0.5

    def pad(q):
        return masks.key_padding(torch.tensor([N, N // 2], device=q.device))

    fns = {
        "linear causal": lambda q, k, v: attnkit.linear_attention(q, k, v, causal=True),
        "linear padded": lambda q, k, v: attnkit.linear_attention(q, k, v, mask=pad(q)),
        "performer causal": lambda q, k, v: attnkit.performer_attention(q, k, v, projection=proj.to(q), causal=True),
        "performer": lambda q, k, v: attnkit.performer_attention(q, k, v, projection=proj.to(q)),
        "linformer": lambda q, k, v: attnkit.linformer_attention(q, k, v, e.to(q)),
        "nystrom": lambda q, k, v: attnkit.nystrom_attention(q, k, v, num_landmarks=64, mask=pad(q)),
        "lsh causal": lambda q, k, v: attnkit.lsh_attention(k, v, n_hashes=4, bucket_size=32, causal=True, seed=7),
    }
    go = _rand(B, H, N, D, dtype=torch.float64, seed=14)
    base = [_rand(B, H, N, D, dtype=torch.float64, seed=s) for s in (11, 12, 13)]

    def run(fn, device, dtype):
        ins = [t.to(device, dtype).requires_grad_(True) for t in base]
        out = fn(*ins)
        grads = torch.autograd.grad(out, ins, go.to(device, dtype), allow_unused=True)
        return [out] + [g for g in grads if g is not None]

    for name, fn in fns.items():
        try:
            dev64 = run(fn, DEV, torch.float64)
        except Exception as e:  # noqa: BLE001 - a failure to run on the device is a finding
            report.append({"case": name, "dtype": "torch.float64", "backend": "variant", "status": f"FAIL: {type(e).__name__}: {e}"[:200]})
            failures.append(report[-1]["case"] + ": " + report[-1]["status"])
            print(report[-1], flush=True)
            continue
        checks = [("float64 vs cpu", run(fn, "cpu", torch.float64), torch.float64)]
        if not name.startswith("lsh"):
            checks.append(("float32 vs float64", [t.to(torch.float64) for t in dev64], torch.float32))
        for what, want, dtype in checks:
            got = dev64 if dtype == torch.float64 else run(fn, DEV, dtype)
            errs = [_excess(a.to(want[0].device), b, dtype, "flex", grad=i > 0) for i, (a, b) in enumerate(zip(got, want))]
            ok = max(errs) <= 1.0
            report.append({"case": f"{name} ({what})", "dtype": str(dtype), "backend": "variant",
                           "worst_err_over_tol": round(max(errs), 4), "status": "ok" if ok else "FAIL"})
            print(report[-1], flush=True)
            if not ok:
                failures.append(f"{name} {what}: error {max(errs):.3g} x tolerance")


def run_transformers(report: list, failures: list) -> None:
    """A small random Mistral (sliding window, GQA) on the device: attnkit's logits equal sdpa's on a
    left-padded batch, and greedy generate gives the same tokens."""
    try:
        import transformers
        from transformers import AutoModelForCausalLM, MistralConfig

        import attnkit.integrations.transformers as akt
    except ImportError as e:
        report.append({"case": "transformers", "dtype": "", "backend": "attnkit", "status": f"n/a: {e}"})
        return
    akt.register()
    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=8, num_key_value_heads=2, sliding_window=48)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").to(DEV).eval()
    ids = torch.randint(1, 256, (3, 150), device=DEV)
    mask = torch.ones_like(ids)
    mask[1, :37] = 0
    mask[2, :140] = 0
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        gen_want = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
        model.set_attn_implementation("attnkit")
        got = model(ids, attention_mask=mask).logits
        gen_got = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    real = mask.bool()
    err = _excess(got[real], want[real].double(), torch.float32, "flex", grad=False)
    ok = err <= 1.0 and torch.equal(gen_got, gen_want)
    report.append({"case": f"transformers {transformers.__version__} Mistral padded (logits, generate)", "dtype": "torch.float32",
                   "backend": "attnkit", "worst_err_over_tol": round(err, 4), "status": "ok" if ok else "FAIL"})
    print(report[-1], flush=True)
    if not ok:
        failures.append(f"transformers: logits error {err:.3g} x tolerance, generate equal: {torch.equal(gen_got, gen_want)}")


def _time(fn, reps=5) -> float:
    """Median milliseconds (CUDA events; wall clock on CPU, for a dry run)."""
    fn()
    if DEV != "cuda":
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(1e3 * (time.perf_counter() - t0))
        return statistics.median(ts)
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def run_timings(rows: list, N: int, only: set | None = None, impls: set | None = None) -> None:
    with _every_flex_compiles():  # the peer compiles flex_attention once per case, mode and mask
        _run_timings(rows, N, only, impls)


def _run_timings(rows: list, N: int, only: set | None, impls: set | None) -> None:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    flex = torch.compile(flex_attention)
    B, H, D, dt = 1, 16, 64, torch.bfloat16
    q, k, v = (torch.randn(B, H, N, D, device=DEV, dtype=dt, requires_grad=True) for _ in range(3))
    ids = (torch.arange(N, device=DEV) // 2048)
    slopes = alibi_slopes(H, dtype=torch.float32, device=DEV)
    cases = {
        "dense": (None, None, None, None),
        "causal": (masks.causal(), None, lambda b, h, i, j: i >= j, None),
        "swa256": (masks.sliding_window(255), None, lambda b, h, i, j: (i >= j) & (i - j < 256), None),
        "docmask": (masks.document(ids) & masks.causal(), None, lambda b, h, i, j: (ids[i] == ids[j]) & (i >= j), None),
        "alibi causal": (masks.causal(), ALiBi(H, slopes=slopes), lambda b, h, i, j: i >= j,
                         lambda s, b, h, i, j: s - slopes[h] * (i - j)),
        "softcap 30 causal": (masks.causal(), None, lambda b, h, i, j: i >= j,
                              lambda s, b, h, i, j: 30.0 * torch.tanh(s / 30.0)),
    }
    for name, (mask, bias, mask_mod, score_mod) in cases.items():
        if only and name.split()[0] not in only:
            continue
        softcap = 30.0 if name.startswith("softcap") else None
        bm = None if mask_mod is None else create_block_mask(mask_mod, B=None, H=None, Q_LEN=N, KV_LEN=N, device=DEV)
        if softcap is not None:  # sdpa has no softcap: materialise capped scores as the eager form would
            sdpa_mask = "eager"
        elif mask is None:
            sdpa_mask = None
        elif bias is not None:  # sdpa's form of a bias: one float mask with -inf, built once
            sdpa_mask = bias.to_dense(N, N, heads=H, device=DEV).to(dt).masked_fill(~mask.to_dense(N, N, device=DEV), float("-inf"))
        else:
            sdpa_mask = mask.to_dense(N, N, device=DEV) if name != "causal" else "causal"
        calls = {
            "sdpa": lambda sdpa_mask=sdpa_mask, softcap=softcap: _sdpa(q, k, v, sdpa_mask, softcap),
            "flex": lambda bm=bm, score_mod=score_mod: flex(q, k, v, score_mod=score_mod, block_mask=bm),
            "auto": lambda mask=mask, bias=bias, softcap=softcap: attnkit.attention(q, k, v, mask=mask, bias=bias, softcap=softcap),
            "blockwise": lambda mask=mask, bias=bias, softcap=softcap: attnkit.attention(
                q, k, v, mask=mask, bias=bias, softcap=softcap, backend="blockwise"),
        }
        calls = {impl: c for impl, c in calls.items() if impl == "sdpa" or not impls or impl in impls}
        for bwd in (False, True):
            res = {}
            for impl, call in calls.items():
                try:
                    if DEV == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    ms = _time(lambda call=call, bwd=bwd: _step(call, bwd))
                    res[impl] = (ms, torch.cuda.max_memory_allocated() / 2 ** 20 if DEV == "cuda" else float("nan"))
                except Exception as e:  # noqa: BLE001 - report, keep going
                    res[impl] = (float("nan"), float("nan"))
                    print(f"timing {name} {impl}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            for impl, (ms, mib) in res.items():
                rows.append({"case": name, "mode": "fwd+bwd" if bwd else "fwd", "impl": impl, "ms": round(ms, 3),
                             "peak_mib": round(mib, 1), "x_sdpa": round(ms / res["sdpa"][0], 3)})
                print(rows[-1], flush=True)
        q.grad = k.grad = v.grad = None
        del sdpa_mask


def _sdpa(q, k, v, how, softcap):
    """sdpa's fastest legal call: is_causal, a dense mask/bias, or (softcap) the eager formula."""
    if how == "causal":
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    if isinstance(how, str):  # eager softcap: what a model without a softcap kernel runs
        s = torch.matmul(q, k.transpose(-1, -2)) / q.shape[-1] ** 0.5
        s = softcap * torch.tanh(s / softcap)
        n = q.shape[-2]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        return torch.matmul(torch.softmax(s.float(), dim=-1).to(q.dtype), v)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=how)


def _step(call, bwd: bool):
    with torch.set_grad_enabled(bwd):  # fwd: inference, as peers measure it
        out = call()
        if bwd:
            out.sum().backward()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=".")
    p.add_argument("--size", type=int, default=16384, help="N for the timing part")
    p.add_argument("--parts", default="exact,short,longrange,transformers,timings",
                   help="comma-separated parts to run (default: all five)")
    p.add_argument("--cases", default="", help="cases to run, by first word (default: all); timings: "
                   "dense,causal,swa256,docmask,alibi,softcap; exact: dense,causal,swa,document,padding,fully,"
                   "bigbird,alibi,t5,softcap")
    p.add_argument("--impls", default="", help="timing columns to run besides sdpa (default: all): "
                   "flex,auto,blockwise")
    p.add_argument("--device", default="cuda", help="cpu: a dry run of this script (use a small --size)")
    a = p.parse_args(argv)
    global DEV
    DEV = a.device
    if DEV == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device", file=sys.stderr)
        return 2
    t0 = time.time()
    report, failures, timings = [], [], []
    parts = set(a.parts.split(","))
    only = set(filter(None, a.cases.split(",")))
    if "exact" in parts:
        run_exact(report, failures, only)
    for part, fn in (("short", run_short), ("longrange", run_longrange), ("transformers", run_transformers)):
        if part in parts:
            fn(report, failures)
    if "timings" in parts:
        run_timings(timings, a.size, only, set(filter(None, a.impls.split(","))))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    info = {"device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu", "torch": torch.__version__, "seconds": round(time.time() - t0, 1)}
    tag = "" if len(parts) == 5 else "_" + "_".join(sorted(parts))
    (out / f"gpu_check{tag}.json").write_text(json.dumps({"info": info, "exact": report, "timings": timings,
                                                    "failures": failures}, indent=1))
    lines = [f"# GPU check on {info['device']}, torch {info['torch']}", "",
             "| case | dtype | backend | chosen | error / tolerance | status |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['dtype']} | {r['backend']} | {r.get('chosen', '')} | {r.get('worst_err_over_tol', '')} | {r['status']} |"
              for r in report]
    lines += ["", "| case | mode | impl | ms | peak MiB | x sdpa |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['mode']} | {r['impl']} | {r['ms']} | {r['peak_mib']} | {r['x_sdpa']} |" for r in timings]
    (out / f"gpu_check{tag}.md").write_text("\n".join(lines) + "\n")
    print(f"{len(failures)} failures in {info['seconds']} s", *failures, sep="\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
