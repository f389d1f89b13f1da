import os

import pytest
import torch

from tests.fake_vllm import fake_python  # noqa: F401  (a fixture: a peer Python running a stand-in vllm)

# Two cores shared with whatever else runs: one intra-op thread keeps small matmuls predictable.
torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Inductor tests get their own cache folder (the Makefile points it into .cache/), never the user's.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".cache", "inductor"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


#: the suite's layers (``pytest -m unit`` etc.); a test module not listed is a ``model`` test
UNIT_MODULES = {
    "tests/test_tree.py", "tests/test_kv_cache.py", "tests/test_prompts.py", "tests/test_import_graph.py",
    "tests/test_cli.py", "tests/passes/test_manager.py", "tests/runtime/test_budget.py",
    "tests/drafter/test_tree_builder.py", "tests/drafter/test_vocab.py", "tests/drafter/test_checkpoint.py",
    "tests/drafter/test_model.py", "tests/test_bench_tau.py", "tests/test_io.py",
}
COMPILE_MODULES = {
    "tests/backends/test_inductor.py", "tests/backends/test_aoti.py", "tests/backends/test_onnx.py",
    "tests/kernels/test_tree_attention.py",
}


def pytest_collection_modifyitems(config, items):
    """Mark every test with its layer: ``unit`` (no model forward to speak of), ``compile`` (Inductor, AOTI, ONNX,
    Triton), ``model`` (tiny random models and the real one end to end); ``gpu`` tests mark themselves."""
    root = config.rootpath
    for item in items:
        path = item.path.relative_to(root).as_posix()
        layer = "unit" if path in UNIT_MODULES else "compile" if path in COMPILE_MODULES else "model"
        item.add_marker(getattr(pytest.mark, layer))
