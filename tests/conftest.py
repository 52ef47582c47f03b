"""Suite-wide settings.

- Tests run in 2 xdist workers on 2 cores: one torch thread each avoids oversubscription (speed
  is measured by ``attnkit bench``, never here).
- Peer implementations (the ``peers`` extra) are compared against in tests that import them with
  ``pytest.importorskip``, so the suite still runs where they are absent. ``./dev test`` (and so
  CI) sets ATTNKIT_REQUIRE_PEERS=1: then a missing peer is an error, never a silent skip.
"""

import importlib.util
import os

import pytest
import torch

PEERS = ("transformers", "performer_pytorch", "linformer", "nystrom_attention", "reformer_pytorch", "local_attention")


def pytest_configure(config):
    torch.set_num_threads(1)
    if os.environ.get("ATTNKIT_REQUIRE_PEERS") == "1":
        missing = [p for p in PEERS if importlib.util.find_spec(p) is None]
        if missing:
            raise pytest.UsageError(f"ATTNKIT_REQUIRE_PEERS=1 but these peers are not installed: {missing}; "
                                    "install the 'peers' extra (./dev setup does)")
