import os

import pytest
import torch

# Two cores shared with whatever else runs: one intra-op thread keeps small matmuls predictable.
torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
