"""Every attention variant and position scheme learns a toy copy task inside a tiny model.

Decoder LM (causal-capable variants): sequences x SEP x, loss on the copied half.
Encoder tagger (Linformer, Nystrom: non-causal by construction): tag_i = x_{n-1-i} (reversal).
Seq2seq (cross-attention variants): copy the source.
Threshold: the mean loss of the last 10 steps is below half the mean of the first 5 (chance
level is ln(V) ~ 2.1; a model that does not use attention to copy stays near it).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnkit import masks as M
from attnkit.models import DecoderLM, LayerSpec, Seq2Seq, TokenTagger, TransformerConfig
from attnkit.nn import LSH, T5, XL, Additive, Alibi, Linear, Linformer, Nystrom, Performer, Rope, Shaw, Softmax

V, N, BATCH, STEPS = 10, 6, 32, 150
RATIO = 0.5


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread avoids oversubscription on a shared CPU (restored afterwards)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _train(model, batch_fn, loss_fn, steps=STEPS):
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        loss = loss_fn(model, batch_fn(g))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return sum(losses[:5]) / 5, sum(losses[-10:]) / 10


def _copy_lm(model, seq):
    logits = model(seq[:, :-1])  # (B, 2N, V)
    return F.cross_entropy(logits[:, N:].reshape(-1, V), seq[:, N + 1:].reshape(-1))


def _copy_batch(g):
    x = torch.randint(2, V, (BATCH, N), generator=g)
    return torch.cat([x, torch.ones(BATCH, 1, dtype=torch.long), x], dim=1)  # (B, 2N + 1)


LM = {
    "softmax_rope": LayerSpec(Softmax(), Rope()),
    "sliding_window_rope": LayerSpec(Softmax(mask=M.sliding_window(8)), Rope()),
    "alibi": LayerSpec(Softmax(), Alibi()),
    "t5": LayerSpec(Softmax(), T5(num_buckets=8, max_distance=16)),
    "shaw": LayerSpec(Softmax(), Shaw(max_distance=8)),
    "xl": LayerSpec(Softmax(mask=M.causal()), XL()),
    "rope_interleaved": LayerSpec(Softmax(), Rope(interleaved=True)),
    "linear_rope": LayerSpec(Linear(), Rope()),
    "performer_rope": LayerSpec(Performer(num_features=16), Rope()),
    "lsh_rope": LayerSpec(LSH(bucket_size=8), Rope()),
    "additive_self_learned_abs": LayerSpec(Additive(), None),
}


@pytest.mark.parametrize("name", sorted(LM))
def test_decoder_variant_learns_copy(name):
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=V, d_model=32, num_heads=4, num_layers=2, layers=LM[name], max_len=2 * N + 1,
                            abs_position="learned" if name.endswith("learned_abs") else None)
    first, last = _train(DecoderLM(cfg), _copy_batch, _copy_lm)
    assert last < RATIO * first, f"{name}: loss {first:.3f} -> {last:.3f}"


@pytest.mark.parametrize("spec", [Linformer(max_len=8, proj_dim=4), Nystrom(num_landmarks=4)], ids=["linformer", "nystrom"])
def test_encoder_variant_learns_reversal(spec):
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=V, d_model=32, num_heads=4, layers=LayerSpec(spec), abs_position="learned", max_len=8)

    def loss(model, x):
        return F.cross_entropy(model(x).reshape(-1, V), x.flip(1).reshape(-1))

    first, last = _train(TokenTagger(cfg, V), lambda g: torch.randint(0, V, (BATCH, 8), generator=g), loss)
    assert last < RATIO * first, f"{spec}: loss {first:.3f} -> {last:.3f}"


@pytest.mark.parametrize("cross", [Softmax(), Additive()], ids=["softmax_cross", "bahdanau_cross"])
def test_seq2seq_cross_attention_learns_copy(cross):
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=V, d_model=32, num_heads=4, num_layers=1, cross_attention=cross,
                            abs_position="learned", max_len=16)

    def loss(model, x):
        tgt = torch.cat([torch.ones(BATCH, 1, dtype=torch.long), x], dim=1)  # BOS = 1
        return F.cross_entropy(model(x, tgt[:, :-1]).reshape(-1, V), tgt[:, 1:].reshape(-1))

    first, last = _train(Seq2Seq(cfg), lambda g: torch.randint(2, V, (BATCH, N), generator=g), loss)
    assert last < RATIO * first, f"{cross}: loss {first:.3f} -> {last:.3f}"
