"""The training loop on tiny configs: loss decreases, metrics.json schema, determinism, resume."""

from __future__ import annotations

import csv
import dataclasses
import json
import math

import pytest
import torch

from attnkit.train import Interrupted, RunConfig, train
from attnkit.train.loop import CHECKPOINT, lr_at

TINY = RunConfig(task="mqar:vocab=32,seq_len=16,num_kv_pairs=2,num_eval=32", attention="softmax", layers=1, dim=16,
                 heads=2, steps=12, batch=8, eval_every=4)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _curve(path):
    with open(path / "curve.csv") as f:
        return list(csv.reader(f))


def test_metrics_schema_and_files(tmp_path):
    m = train(TINY, tmp_path, progress=False)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == m
    assert {"task", "attention", "position", "params", "steps", "seconds", "eval"} <= set(m)
    assert m["task"] == TINY.task and m["attention"] == "softmax" and m["position"] == "rope"
    assert m["steps"] == 12 and m["params"] > 0 and m["seconds"] > 0 and m["tokens_per_s"] > 0
    assert list(m["eval"]) == ["accuracy"] and 0.0 <= m["eval"]["accuracy"] <= 1.0
    rows = _curve(tmp_path)
    assert rows[0] == ["step", "train_loss", "accuracy"] and len(rows) == 13
    assert [r[2] != "" for r in rows[1:]] == [s % 4 == 0 for s in range(1, 13)]
    assert float(rows[-1][2]) == m["eval"]["accuracy"]
    assert (tmp_path / "loss.png").stat().st_size > 1000
    ck = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert ck["step"] == 12 and ck["config"]["steps"] == 12 and "q_proj.weight" in "".join(ck["model"])


def test_loss_decreases(tmp_path):
    cfg = dataclasses.replace(TINY, task="selective_copy:vocab=8,seq_len=12,num_tokens=3,num_eval=32", steps=60,
                              eval_every=60, batch=16)
    train(cfg, tmp_path, progress=False)
    losses = [float(r[1]) for r in _curve(tmp_path)[1:]]
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:5]) / 5


def test_same_seed_same_metrics_other_seed_differs(tmp_path):
    a = train(TINY, tmp_path / "a", progress=False)
    b = train(TINY, tmp_path / "b", progress=False)
    train(dataclasses.replace(TINY, seed=1), tmp_path / "c", progress=False)
    assert a["eval"] == b["eval"] and _curve(tmp_path / "a") == _curve(tmp_path / "b")
    assert _curve(tmp_path / "a") != _curve(tmp_path / "c")


@pytest.mark.parametrize("task", ["mqar:vocab=32,seq_len=16,num_kv_pairs=2,num_eval=32",
                                  "listops:min_len=8,max_len=24,num_eval=16"])
def test_resume_equals_uninterrupted(tmp_path, task):
    cfg = dataclasses.replace(TINY, task=task, attention="performer" if task.startswith("listops") else "softmax")
    whole = train(cfg, tmp_path / "whole", progress=False)
    with pytest.raises(Interrupted, match="after step 6"):
        train(cfg, tmp_path / "cut", progress=False, stop_after=6)
    assert torch.load(tmp_path / "cut" / CHECKPOINT, weights_only=True)["step"] == 6
    resumed = train(cfg, tmp_path / "cut", resume=True, progress=False)
    assert resumed["eval"] == whole["eval"]
    assert _curve(tmp_path / "cut") == _curve(tmp_path / "whole")
    a = torch.load(tmp_path / "whole" / CHECKPOINT, weights_only=True)["model"]
    b = torch.load(tmp_path / "cut" / CHECKPOINT, weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_another_run(tmp_path):
    train(TINY, tmp_path, progress=False)
    with pytest.raises(ValueError, match="checkpoint in .* is of another run"):
        train(dataclasses.replace(TINY, dim=32), tmp_path, resume=True, progress=False)
    with pytest.raises(ValueError, match="--resume: no checkpoint"):
        train(TINY, tmp_path / "empty", resume=True, progress=False)


def test_lr_schedule_warms_up_and_decays_to_a_tenth():
    lrs = [lr_at(s, 1000, 1e-3) for s in range(1000)]
    assert lrs[0] == pytest.approx(1e-5) and lrs[99] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[99:], lrs[100:])) and lrs[-1] == pytest.approx(1e-4, rel=1e-3)
    assert not any(math.isnan(x) for x in lrs)


@pytest.mark.parametrize("field, value, match", [
    ("steps", 0, "--steps must be an int >= 1, got 0"),
    ("dim", 15, "--dim 15 must be divisible by --heads 2"),
    ("lr", -1.0, "--lr must be a number"),
    ("position", "alibi", "--position alibi: position=Alibi\\(\\) changes the score matrix, which Linear"),
    ("attention", "linformer", "--attention linformer: mqar trains a causal language model, but Linformer is non-causal"),
])
def test_bad_configs_name_the_argument(field, value, match):
    cfg = dataclasses.replace(TINY, **{field: value})
    if field == "position":
        cfg = dataclasses.replace(cfg, attention="linear")
    with pytest.raises(ValueError, match=match):
        cfg.resolved().specs()
