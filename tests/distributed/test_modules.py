"""Modules on sequence shards: a 2-process DecoderLM training step equals the single-process one
(loss and every parameter's gradient), MultiHeadAttention likewise; unsupported calls say why."""

import pytest
import torch

from attnkit import MultiHeadAttention
from attnkit import masks as M
from attnkit.distributed import ContextParallel
from attnkit.distributed.launch import spawn
from attnkit.nn import Shaw
from attnkit.variants import Linear, Softmax

from . import workers


def test_two_process_decoder_training_step_equals_one_process():
    for rank, errs in enumerate(spawn(workers.training_step, 2, timeout_s=120)):
        assert len(errs) > 10
        for what, err in errs.items():
            assert err <= 1e-10, f"rank {rank}: {what} differs by {err:.3g}"


@pytest.mark.parametrize("layer, kwargs, reason", [
    (dict(attention=Linear(causal=True)), {}, "no context-parallel form"),
    (dict(position=Shaw()), {}, "runs its own kernel"),
    ({}, dict(need_weights=True), "need_weights"),
    ({}, dict(key_padding_mask=torch.zeros(1, 4, dtype=torch.bool)), "key_padding_mask"),
    ({}, dict(mask=torch.ones(4, 4, dtype=torch.bool)), "mask tensor"),
    ({}, dict(context=torch.zeros(1, 3, 8)), "cross-attention"),
])
def test_unsupported_context_parallel_calls_say_why(layer, kwargs, reason):
    mha = MultiHeadAttention(8, 2, **{"attention": Softmax(mask=M.causal()), **layer})
    with pytest.raises(ValueError, match=reason):
        mha(torch.zeros(1, 4, 8), context_parallel=ContextParallel(), **kwargs)
