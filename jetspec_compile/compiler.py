"""Build the verify step: capture a model's forward and run the tree-verify pipeline over it.

The runtime (:class:`~jetspec_compile.runtime.TreeVerifier`), every backend's export and the drafter's training
features all start here, so this module sits below them: it imports only the capture and the passes.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from .capture import CapturedStep, capture_step
from .passes import EXPORT_PIPELINE, TREE_VERIFY_PIPELINE, PassManager, PassResult

__all__ = ["build_verify_step"]


def build_verify_step(model: nn.Module, *, batch_size: int = 1, budget: int = 16,
                      tap_layers: Sequence[int] | None = None, run_checks: bool = False,
                      dump: Sequence[str] = (), functional: bool = False) -> tuple[CapturedStep, dict[str, PassResult]]:
    """Capture ``model`` for ``batch_size`` rows and ``budget`` tree nodes and run the tree-verify pipeline
    (with ``functional``, the export pipeline: cache writes become outputs). Returns the step and each pass's
    result; ``step.interface`` describes the rewritten graph's inputs and outputs."""
    step = capture_step(model, batch_size=batch_size, budget=budget)
    if tap_layers is not None:
        step.tap_layers = tuple(tap_layers)
    manager = PassManager(EXPORT_PIPELINE if functional else TREE_VERIFY_PIPELINE,
                          run_checks_after_each_pass=run_checks, dump=dump)
    return step, manager(step)
