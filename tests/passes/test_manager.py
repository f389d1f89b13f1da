import logging

import pytest

from jetspec_compile import capture_step
from jetspec_compile.passes import TREE_VERIFY_PIPELINE, PassManager, insert_tree_positions
from tests.families import make_model


def test_manager_runs_passes_in_order_logs_and_dumps(caplog):
    step = capture_step(make_model("llama"), budget=3)
    manager = PassManager(TREE_VERIFY_PIPELINE, run_checks_after_each_pass=True, dump=["insert_tree_mask"])
    with caplog.at_level(logging.INFO, logger="jetspec_compile.passes.manager"):
        results = manager(step)
    assert list(results) == [p.__name__ for p in TREE_VERIFY_PIPELINE]
    text = caplog.text
    assert text.index("pass insert_tree_positions") < text.index("pass tap_hidden_states")
    assert "graph after insert_tree_mask" in text


def test_unknown_dump_name_is_refused():
    with pytest.raises(ValueError, match="unknown passes"):
        PassManager([insert_tree_positions], dump=["insert_tree_maks"])


def test_passes_out_of_order_fail_clearly():
    from jetspec_compile import UnsupportedModelError
    from jetspec_compile.passes import insert_tree_mask

    step = capture_step(make_model("llama"), budget=3)
    with pytest.raises(UnsupportedModelError, match="run its pass first"):
        PassManager([insert_tree_mask])(step)
