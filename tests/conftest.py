"""Shared test settings: no progress bars, one intra-op thread (tiny networks run fastest on one thread, and a second
thread only spins on a busy 2-core machine)."""
import os

import pytest
import torch
from threadpoolctl import threadpool_limits

os.environ.setdefault("OODBENCH_PROGRESS", "0")


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(before)
