#!/usr/bin/env python3
"""attnkit's own mutation check: small deliberate bugs, each with the tests that must catch it.

A developer tool, not part of CI. It answers "do the tests still bite?" after a change to a
kernel or a module: every mutant below is a one-line bug that a user would get silently (a
wrong result, not a crash), paired with the test selection that must fail on it.

Usage, from the repository root with the dev environment's python (``./dev setup`` first)::

    .venv/bin/python tools/mutate.py               # every mutant (about 15 min on 2 cores)
    .venv/bin/python tools/mutate.py --list        # ids, files and what each breaks
    .venv/bin/python tools/mutate.py ID [ID ...]   # some of them
    .venv/bin/python tools/mutate.py --check       # only check that every edit still applies

How it runs: src/ is copied to a temporary directory, the one edit is applied there (its old
text must occur exactly once, so code that moved is reported as "edit no longer applies"
rather than silently testing nothing), and the mutant's test selection runs with the copy first
on PYTHONPATH; the working tree is never touched. pytest exiting 1 (tests failed) counts as
caught; passing tests mean the mutant survived; any other exit (collection error, usage error)
or a timeout is reported as an error (``-x`` under xdist exits 2 on a failure: that is read
as caught, by xdist's "stopping after" line). Before the mutants, the union of the selections runs on
the unchanged source and must pass, so a catch means the bug was caught.

Exit status: 0 when every mutant is caught, 1 otherwise. When you move code that a mutant
edits, update the mutant's ``old``/``new`` text here in the same change.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    id: str
    file: str  # relative to src/attnkit/
    old: str
    new: str
    tests: tuple[str, ...]  # pytest node ids or files
    why: str  # what a user would get


DROPOUT_TESTS = ("tests/test_hash.py::test_dropout_keep_batch_and_head_indices_matter",
                 "tests/test_functional.py::test_dropout_pattern_differs_across_batch_and_heads")

MUTANTS = [
    # -- the issue-16 table: bugs that once slipped through -------------------------------------
    Mutant("dropout-ignores-batch", "_hash.py",
           "return uniform(seed, b, h, q, k) >= p", "return uniform(seed, 0 * b, h, q, k) >= p",
           (DROPOUT_TESTS),
           "every sequence in a batch gets the same dropout pattern"),
    Mutant("dropout-ignores-head", "_hash.py",
           "return uniform(seed, b, h, q, k) >= p", "return uniform(seed, b, 0 * h, q, k) >= p",
           (DROPOUT_TESTS),
           "every head gets the same dropout pattern"),
    Mutant("blockwise-shift-free-bound", "backends/blockwise_tiles.py",
           "SHIFT_FREE_BOUND = {torch.float32: 30.0,", "SHIFT_FREE_BOUND = {torch.float32: 300.0,",
           ("tests/backends/test_blockwise_extremes.py::test_float32_scores_beyond_exp_overflow",),
           "float32 scores around 100 overflow exp: inf/NaN outputs"),
    Mutant("rope-interleaved-ignored", "nn/positions.py",
           "interleaved=spec.interleaved,", "interleaved=False,",
           ("tests/nn/test_positions.py",),
           "Rope(interleaved=True) silently uses half-split pairs (wrong for GPT-J style weights)"),
    Mutant("t5-explicit-direction-ignored", "nn/positions.py",
           "bidir = (not attention.causal) if self.bidirectional is None else self.bidirectional",
           "bidir = not attention.causal",
           ("tests/nn/test_positions.py",),
           "T5(bidirectional=...) ignored: decoder buckets for an encoder or the reverse"),
    Mutant("t5-causal-bidirectional", "nn/positions.py",
           "bidir = (not attention.causal) if self.bidirectional is None else self.bidirectional",
           "bidir = True if self.bidirectional is None else self.bidirectional",
           ("tests/nn/test_positions.py",),
           "a causal T5 layer uses bidirectional buckets"),
    Mutant("xl-memory-keeps-oldest", "caches.py",
           "self.memory = (k_all[:, :, -self.mem_len:].detach(), v_all[:, :, -self.mem_len:].detach())",
           "self.memory = (k_all[:, :, :self.mem_len].detach(), v_all[:, :, :self.mem_len].detach())",
           ("tests/test_caches.py::test_xl_memory_keeps_the_newest_tokens",
            "tests/test_caches.py::test_segment_memory_after_keeps_the_last_mem_len"),
           "Transformer-XL attends to the oldest tokens instead of the newest"),
    Mutant("window-cache-first-flags", "caches.py",
           "self.valid[:B, slots] = valid_new[:, n - keep:]", "self.valid[:B, slots] = valid_new[:, :keep]",
           ("tests/test_caches.py::test_window_cache_keeps_the_padding_flags_of_the_newest_tokens",
            "tests/test_caches.py::test_window_cache_update_returns_the_newest_flags"),
           "after a long padded prefill, padded keys attended and real keys dropped"),
    Mutant("heads-wrong-view", "nn/mha.py",
           "return t.view(B, N, heads, self.head_dim).transpose(1, 2)  # (B, heads, N, D)",
           "return t.view(B, heads, N, self.head_dim)  # (B, heads, N, D)",
           ("tests/nn/test_family.py",),
           "heads mixed with tokens (LSHSelfAttention and every other module)"),
    Mutant("generate-temperature-multiplies", "models/blocks.py",
           "logits = logits.float() / temperature", "logits = logits.float() * temperature",
           ("tests/models/test_models.py::test_sampling_follows_softmax_of_logits_over_temperature",),
           "sampling too sharp or too flat"),
    Mutant("flex-tail-block-full", "backends/flex.py",
           "    if Nk % BLOCK:", "    if False:",
           ("tests/backends/test_flex.py::test_block_mask_full_blocks_are_all_allowed_and_inside_nk",),
           "flex may run the tail key block without mask_mod (attends past Nk on some builds)"),
    # -- the issue-16 weak tests, now biting ------------------------------------------------------
    Mutant("performer-padding-in-stabiliser", "variants/performer.py",
           "    lg = logits.detach()\n    if key_valid is not None:", "    lg = logits.detach()\n    if False:",
           ("tests/variants/test_performer.py::test_garbage_in_padded_keys_changes_nothing",),
           "garbage in padded keys sets Performer's key stabiliser"),
    Mutant("sdpa-returns-float32", "backends/sdpa.py",
           "return out.to(call.q.dtype)", "return out.to(torch.float32)",
           ("tests/backends/test_sdpa.py::test_sdpa_runs_plain_calls_in_every_dtype",),
           "sdpa returns float32 for half/bfloat16/float64 inputs"),
    Mutant("rope-cache-offset", "nn/mha.py",
           "q, k = self.pos.rotate(q, k, q_offset=offset, k_offset=offset)",
           "q, k = self.pos.rotate(q, k, q_offset=0, k_offset=offset)",
           ("tests/test_caches.py::test_chunked_decoding_equals_full_pass",),
           "cached decoding rotates new queries at position 0"),
    Mutant("decoder-position-offset", "models/decoder.py",
           "offset = 0 if caches is None else caches[0].length", "offset = 0",
           ("tests/models/test_models.py::test_generate_with_cache_equals_recomputation",),
           "cached generation restarts absolute positions at 0"),
    Mutant("key-padding-polarity", "nn/mha.py",
           "        return ~key_padding_mask\n", "        return key_padding_mask\n",
           ("tests/test_caches.py::test_cached_decoding_with_key_padding_equals_full_pass",),
           "key_padding_mask read with the opposite polarity"),
    # -- core numerics: examples the next kernel change should keep catching ----------------------
    Mutant("window-off-by-one", "masks/bands.py",
           "out = out & (d >= self.lo)", "out = out & (d > self.lo)",
           ("tests/masks/test_base.py",),
           "sliding windows one key short"),
    Mutant("prefix-lm-off-by-one", "masks/bands.py",
           "return (k <= q) | (k < self._prefix(b))", "return (k <= q) | (k <= self._prefix(b))",
           ("tests/masks/test_base.py",),
           "prefix-LM masks one key too long"),
    Mutant("rope-frequency", "positions/rope.py",
           "return 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))",
           "return 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / (rotary_dim + 2)))",
           ("tests/positions/test_rope.py",),
           "RoPE frequencies off the papers' and transformers' values"),
    Mutant("alibi-slopes", "positions/alibi.py",
           "start = 2 ** (-(2 ** -(math.log2(n) - 3)))", "start = 2 ** (-(2 ** -(math.log2(n) - 2)))",
           ("tests/positions/test_alibi.py",),
           "ALiBi slopes off the paper's"),
    Mutant("linear-feature-map", "variants/linear.py",
           "return F.elu(x).add_(1.0)", "return F.elu(x).add_(1.5)",
           ("tests/variants/test_linear.py",),
           "linear attention with a different feature map than elu+1"),
    Mutant("gqa-head-mapping", "_numerics.py",
           "return x if groups == 1 else x.repeat_interleave(groups, dim=1)",
           "return x if groups == 1 else x.repeat(1, groups, 1, 1)",
           ("tests/test_functional.py::test_gqa_query_head_reads_kv_head_h_div_groups",),
           "grouped-query heads read the wrong key/value head"),
]
BY_ID = {m.id: m for m in MUTANTS}


def pytest_cmd(python: str, tests: tuple[str, ...], workers: int) -> list[str]:
    cmd = [python, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "--no-header", "-W", "ignore"]
    if workers > 1:
        cmd += ["-n", str(workers)]
    return cmd + list(tests)


def run(cmd: list[str], src: Path, timeout: float) -> tuple[int | None, float, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(src), str(ROOT)]), PYTHONDONTWRITEBYTECODE="1")
    t0 = time.time()
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, time.time() - t0, "timeout"
    return p.returncode, time.time() - t0, (p.stdout + p.stderr)[-3000:]


def verdict(rc: int | None, out: str) -> str:
    """pytest's exit 1 is "tests failed": caught. With xdist, ``-x`` stops the run on the first
    failure and pytest then exits 2 (interrupted); that is a catch too, told apart from a usage
    or collection error (also exit 2) by xdist's "stopping after N failures" line."""
    if rc == 1 or (rc == 2 and "Interrupted: stopping after" in out):
        return "caught"
    return {0: "SURVIVED", None: "ERROR (timeout)"}.get(rc, f"ERROR (pytest exit {rc})")


def apply(m: Mutant, src_root: Path) -> str | None:
    """Apply m to the copy under src_root (…/attnkit/...); None, or why it cannot be applied."""
    path = src_root / "attnkit" / m.file
    if not path.exists():
        return f"{m.file} does not exist"
    text = path.read_text()
    count = text.count(m.old)
    if count != 1:
        return f"edit no longer applies: the old text occurs {count} times in {m.file}"
    path.write_text(text.replace(m.old, m.new))
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ids", nargs="*", help="mutant ids (default: all)")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--check", action="store_true", help="only check that every edit applies")
    ap.add_argument("-n", "--workers", type=int, default=2, help="pytest-xdist workers per run (default 2)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per pytest run (default 600)")
    ap.add_argument("--python", default=sys.executable, help="python with the test dependencies")
    args = ap.parse_args(argv)

    unknown = [i for i in args.ids if i not in BY_ID]
    if unknown:
        ap.error(f"unknown mutant ids {unknown}; see --list")
    chosen = [BY_ID[i] for i in args.ids] if args.ids else MUTANTS
    if args.list:
        for m in chosen:
            print(f"{m.id:34s} {m.file:30s} {m.why}\n{'':34s} tests: {' '.join(m.tests)}")
        return 0

    with tempfile.TemporaryDirectory(prefix="attnkit-mutants-") as tmp:
        clean = Path(tmp) / "clean"
        shutil.copytree(ROOT / "src", clean, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        problems = []
        for m in chosen:
            scratch = Path(tmp) / "check"
            shutil.copytree(clean, scratch)
            why = apply(m, scratch)
            shutil.rmtree(scratch)
            if why:
                problems.append(f"{m.id}: {why}")
        if problems or args.check:
            print("\n".join(problems) or f"all {len(chosen)} edits apply")
            return 1 if problems else 0

        selections = tuple(sorted({t for m in chosen for t in m.tests}))
        print(f"clean run of the {len(selections)} test selections ...", flush=True)
        rc, secs, out = run(pytest_cmd(args.python, selections, args.workers), clean, args.timeout * 3)
        if rc != 0:
            print(f"the selections fail without any mutant (exit {rc}, {secs:.0f} s); fix that first:\n{out}")
            return 1
        print(f"  passed ({secs:.0f} s)\n", flush=True)

        results = []
        for m in chosen:
            work = Path(tmp) / m.id
            shutil.copytree(clean, work)
            apply(m, work)
            rc, secs, out = run(pytest_cmd(args.python, m.tests, args.workers), work, args.timeout)
            status = verdict(rc, out)
            results.append((m, status))
            print(f"{status:16s} {m.id:34s} {secs:6.0f} s   {m.why}", flush=True)
            if status != "caught":
                print("    " + "\n    ".join(out.strip().splitlines()[-8:]), flush=True)
            shutil.rmtree(work)

    caught = sum(s == "caught" for _, s in results)
    print(f"\n{caught} of {len(results)} mutants caught")
    return 0 if caught == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
