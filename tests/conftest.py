"""Suite-wide settings. Tests run in 2 xdist workers on 2 cores: one torch thread each avoids
oversubscription (speed is measured by `attnkit bench`, never here)."""

import torch


def pytest_configure(config):
    torch.set_num_threads(1)
