import os

import pytest
import torch

# Two cores are shared by two xdist workers: one thread each keeps the suite fast and steady.
torch.set_num_threads(int(os.environ.get("MECHVIT_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
