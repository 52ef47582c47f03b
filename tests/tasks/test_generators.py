"""The task generators: MQAR answers are in context, ListOps labels are the expressions' values,
selective-copy targets are the data tokens in order, batches are pure functions of (seed, step)."""

from __future__ import annotations

import random

import pytest
import torch

from attnkit.tasks import IGNORE, MQAR, ListOps, SelectiveCopy
from attnkit.tasks import listops as LO
from attnkit.tasks.selective_copy import NOISE, SEP
from attnkit.train.words import task_from_word


@pytest.mark.parametrize("opts", [dict(), dict(vocab=64, seq_len=32, num_kv_pairs=8), dict(seq_len=128, num_kv_pairs=16),
                                  dict(random_non_queries=False), dict(vocab=64, seq_len=32, num_kv_pairs=8, random_non_queries=False)])
def test_mqar_queries_have_their_answer_in_context(opts):
    t = MQAR(**opts)
    b = t.train_batch(3, 32, seed=5)
    P, L, V = t.num_kv_pairs, t.seq_len, t.vocab
    assert b.x.shape == b.y.shape == (32, L)
    for x, y in zip(b.x.tolist(), b.y.tolist()):
        keys, values = x[0:2 * P:2], x[1:2 * P:2]
        assert len(set(keys)) == P and all(1 <= k < V // 2 for k in keys)
        assert all(V // 2 <= v < V for v in values)
        queries = [(i, x[i], y[i]) for i in range(L) if y[i] != IGNORE]
        assert len(queries) == P  # every key is queried once, after the context
        for i, key, value in queries:
            assert i >= 2 * P and (i - 2 * P) % 2 == 0
            assert value == values[keys.index(key)]  # the answer is the value that followed the key


@pytest.mark.parametrize("opts", [dict(), dict(vocab=64, seq_len=32, num_kv_pairs=8)])
def test_mqar_filler_is_token_0_without_random_non_queries(opts):
    """Zoology's published configs: every position that is not a key, value or query holds 0, so
    a key occurs only in the context and at its query."""
    t = MQAR(random_non_queries=False, **opts)
    b = t.train_batch(3, 32, seed=5)
    P = t.num_kv_pairs
    for x, y in zip(b.x.tolist(), b.y.tolist()):
        query_pos = {i for i, v in enumerate(y) if v != IGNORE}
        assert all(x[i] == 0 for i in range(2 * P, len(x)) if i not in query_pos)
        assert all(x[i] != 0 for i in query_pos)
        for key in x[0:2 * P:2]:
            later = [i for i in range(2 * P, len(x)) if x[i] == key]
            assert len(later) == 1 and later[0] in query_pos  # the key recurs only as its query


def test_mqar_filler_keys_fills_with_the_whole_vocabulary():
    """filler_keys=True (Zoology's class default): the same keys, values and queries as with
    filler 0, the filler drawn from the whole vocabulary, so keys recur in it."""
    t, z = MQAR(filler_keys=True), MQAR(random_non_queries=False)
    assert t.random_non_queries is True
    b, bz = t.train_batch(3, 256, seed=5), z.train_batch(3, 256, seed=5)
    P, V = t.num_kv_pairs, t.vocab
    query = b.y != IGNORE
    assert torch.equal(b.y, bz.y) and torch.equal(b.x[:, :2 * P], bz.x[:, :2 * P])  # the randomness before the filler is shared
    filler = b.x[:, 2 * P:][~query[:, 2 * P:]]
    assert filler.unique().numel() == V  # every token occurs somewhere in 256 sequences
    recurs = sum(any(x[i] == k for i in range(2 * P, len(x)) if y[i] == IGNORE)
                 for x, y in zip(b.x.tolist(), b.y.tolist()) for k in x[0:2 * P:2])
    assert recurs > 0


def test_mqar_default_filler_holds_no_key():
    """The default (filler_keys=False): random filler from the tokens that are no key ({0} and the
    value range), so, as with filler 0, a key recurs after the context only as its query; the
    keys, values and queries are those of the whole-vocabulary filler."""
    t, d = MQAR(), MQAR(filler_keys=True)
    assert t.filler_keys is False
    b, bd = t.train_batch(3, 256, seed=5), d.train_batch(3, 256, seed=5)
    P, V = t.num_kv_pairs, t.vocab
    assert torch.equal(b.y, bd.y) and torch.equal(b.x[:, :2 * P], bd.x[:, :2 * P])
    query = b.y != IGNORE
    filler = b.x[:, 2 * P:][~query[:, 2 * P:]]
    assert set(filler.unique().tolist()) == {0, *range(V // 2, V)}  # every non-key token, no key
    for x, y in zip(b.x.tolist(), b.y.tolist()):
        for key in x[0:2 * P:2]:
            later = [i for i in range(2 * P, len(x)) if x[i] == key]
            assert len(later) == 1 and y[later[0]] != IGNORE


def test_mqar_word_sets_random_non_queries():
    assert task_from_word("mqar:random_non_queries=True").random_non_queries is True
    assert task_from_word("mqar:random_non_queries=False").random_non_queries is False
    assert task_from_word("mqar").random_non_queries is True
    assert task_from_word("mqar:filler_keys=False").filler_keys is False


def test_batches_are_pure_functions_of_seed_and_step():
    t = MQAR()
    a, b, c = t.train_batch(7, 8, 1), t.train_batch(7, 8, 1), t.train_batch(8, 8, 1)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not torch.equal(a.x, c.x)
    assert not torch.equal(t.train_batch(7, 8, 2).x, a.x)


def _eval_tokens(tokens: list[str]) -> int:
    """Evaluate LRA ListOps tokens with an explicit stack (independent of the generator's tree)."""
    stack: list = []
    for tok in tokens:
        if tok in LO.OPS:
            stack.append([tok])
        elif tok == "]":
            op, *args = stack.pop()
            val = {"[MIN": min(args), "[MAX": max(args), "[SM": sum(args) % 10,
                   "[MED": int(sorted(args)[len(args) // 2] if len(args) % 2 else
                               (sorted(args)[len(args) // 2 - 1] + sorted(args)[len(args) // 2]) / 2)}[op]
            if stack:
                stack[-1].append(val)
            else:
                return val
        else:
            assert tok.isdigit() and stack or len(tokens) == 1
            if not stack:
                return int(tok)
            stack[-1].append(int(tok))
    raise AssertionError(f"unbalanced expression {tokens}")


def test_listops_labels_equal_a_direct_evaluation():
    rng = random.Random(0)
    for _ in range(300):
        toks, label = LO.sample(rng, min_len=8, max_len=200, max_depth=10, max_args=10)
        assert 8 <= len(toks) <= 200
        assert label == _eval_tokens(toks)
    t = ListOps(min_len=16, max_len=64, num_eval=8)
    b = t.train_batch(0, 16, seed=0)
    for row, pad, label in zip(b.x.tolist(), b.padding_mask.tolist(), b.y.tolist()):
        toks = [LO.VOCAB[i] for i, p in zip(row, pad) if not p]
        assert 16 <= len(toks) <= 64 and label == _eval_tokens(toks)


def test_listops_operators_follow_the_grammar():
    assert LO.evaluate(("[MED", [1, 2, 3, 9])) == 2  # int(median 2.5)
    assert LO.evaluate(("[SM", [9, 8, ("[MAX", [3, 7])])) == 4
    assert LO.tokens(("[MAX", [2, 9, ("[MIN", [4, 7]), 0])) == ["[MAX", "2", "9", "[MIN", "4", "7", "]", "0", "]"]
    with pytest.raises(RuntimeError, match="no tree"):
        LO.sample(random.Random(0), min_len=3, max_len=3, max_depth=2, max_args=2, max_tries=50)


def test_selective_copy_targets_are_the_data_tokens_in_order():
    t = SelectiveCopy(vocab=10, seq_len=20, num_tokens=5)
    b = t.train_batch(0, 16, seed=3)
    L, K = 20, 5
    assert b.x.shape == (16, L + K)
    for x, y in zip(b.x.tolist(), b.y.tolist()):
        data = [v for v in x[:L] if v != NOISE]
        assert len(data) == K and all(2 <= v < 10 for v in data) and x[L] == SEP
        assert y[:L] == [IGNORE] * L and y[L:] == data
        assert x[L + 1:] == data[:-1]  # teacher forcing


@pytest.mark.parametrize("text, match", [
    ("nope", "unknown task 'nope'"),
    ("mqar:seq_len=8,num_kv_pairs=4", "seq_len=8 must be >= 4"),
    ("mqar:pairs=3", "has no option 'pairs'"),
    ("mqar:random_non_queries=1", "random_non_queries must be True or False, got 1"),
    ("mqar:random_non_queries='yes'", "random_non_queries must be True or False, got 'yes'"),
    ("mqar:random_non_queries=yes", "'yes' is not a literal"),
    ("listops:min_len=9,max_len=3", "min_len=9 must be <= max_len=3"),
])
def test_bad_task_words(text, match):
    with pytest.raises(ValueError, match=match):
        task_from_word(text)


@pytest.mark.parametrize("word, msg", [("mqar:filler_keys=2", "mqar: filler_keys must be True or False, got 2"),
                                       ("mqar:random_non_queries='no'", "mqar: random_non_queries must be True or False")])
def test_mqar_bool_options_refuse_other_values(word, msg):
    with pytest.raises(ValueError, match=msg):
        task_from_word(word)
