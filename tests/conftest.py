"""Suite-wide settings.

- Tests run in 2 xdist workers on 2 cores: one torch thread each avoids oversubscription (speed
  is measured by ``attnkit bench``, never here).
- Hypothesis runs derandomized (profile "attnkit", loaded here): whether a bug is caught does
  not depend on the run. Tests that pass their own ``settings`` inherit it.
- ``flex_compile_budget``: modules that run flex (``pytestmark = pytest.mark.usefixtures(...)``)
  lift torch._dynamo's recompile limit, so that every flex case compiles and runs instead of
  being refused at the limit (8 specialisations by default).
- ``slow`` marks the tests at the benchmark's largest N (minutes of CPU): they run in CI
  (``./dev test`` runs everything); deselect them while developing with ``-m "not slow"``.
- Peer implementations (the ``peers`` extra) are compared against in tests that import them with
  ``pytest.importorskip``, so the suite still runs where they are absent. ``./dev test`` (and so
  CI) sets ATTNKIT_REQUIRE_PEERS=1: then a missing peer is an error, never a silent skip.
"""

import importlib.util
import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("attnkit", derandomize=True, deadline=None)
settings.load_profile("attnkit")

PEERS = ("transformers", "performer_pytorch", "linformer", "nystrom_attention", "reformer_pytorch", "local_attention")


def pytest_configure(config):
    torch.set_num_threads(1)
    if os.environ.get("ATTNKIT_REQUIRE_PEERS") == "1":
        missing = [p for p in PEERS if importlib.util.find_spec(p) is None]
        if missing:
            raise pytest.UsageError(f"ATTNKIT_REQUIRE_PEERS=1 but these peers are not installed: {missing}; "
                                    "install the 'peers' extra (./dev setup does)")


@pytest.fixture(scope="module")
def flex_compile_budget():
    """torch._dynamo's recompile limits lifted for one test module (restored after it)."""
    with torch._dynamo.config.patch(recompile_limit=1_000_000, accumulated_recompile_limit=1_000_000):
        yield
