import os

import pytest
import torch

# Two cores shared with whatever else runs: one intra-op thread keeps small matmuls predictable.
torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Inductor tests get their own cache folder (the Makefile points it into .cache/), never the user's.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".cache", "inductor"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
