"""attnkit._denormal: subnormals flushed on the calling thread and on torch's worker threads."""

import pytest
import torch

from attnkit._denormal import _runtime, denormals_flushed, flush_denormals


def test_flush_denormals_restores_the_callers_mode():
    for mode in (False, True):
        torch.set_flush_denormal(mode)
        try:
            with flush_denormals():
                assert denormals_flushed()
            assert denormals_flushed() == mode
        finally:
            torch.set_flush_denormal(False)


@pytest.mark.skipif(_runtime() is None, reason="torch here runs on no OpenMP runtime found in this process")
def test_worker_threads_flush_inside_and_not_after():
    # An elementwise op over many elements is split over the intra-op threads; with
    # denormals-are-zero on a thread, its chunk of 1e-39 * 1.0 reads as 0.
    x = torch.full((1 << 20,), 1e-39)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with flush_denormals():
            assert int((x * 1.0 != 0).sum()) == 0  # no thread computed a subnormal
        assert bool((x * 1.0 == 1e-39).all())  # every thread back to the caller's mode (off)
    finally:
        torch.set_num_threads(threads)
        torch.set_flush_denormal(False)
