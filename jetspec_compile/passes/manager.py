"""The pass manager: runs an explicit, ordered list of passes over a captured step.

Each pass is a plain function ``pass_fn(step: CapturedStep) -> PassResult`` that edits
``step.graph_module`` in place. The manager logs every pass by name, can dump the graph before/after named
passes, and (in tests) lints the graph after every pass, like ``torch.fx.passes.infra.PassManager``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from torch import fx

logger = logging.getLogger(__name__)

__all__ = ["PassResult", "PassManager", "pass_name"]


@dataclass
class PassResult:
    """What a pass did: whether it changed the graph, and counters (e.g. ``{"attention_rewritten": 30}``)."""

    modified: bool
    stats: dict = field(default_factory=dict)


def lint_graph(gm: fx.GraphModule) -> None:
    """Structural checks: FX lint, placeholders before computation, and every node used or an output / side effect."""
    gm.graph.lint()
    seen_body = False
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if seen_body:
                raise AssertionError(f"placeholder {node.name} appears after graph body nodes")
        elif node.op != "get_attr":
            seen_body = True
    gm.recompile()


def pass_name(pass_fn: Callable) -> str:
    """A pass's name: its function's, also for a ``functools.partial`` that binds a pass's options."""
    return getattr(pass_fn, "__name__", None) or pass_fn.func.__name__


class PassManager:
    """Run ``passes`` in order over a :class:`~jetspec_compile.capture.CapturedStep`.

    Args:
        passes: the pipeline, in order (functions ``step -> PassResult``, or partials binding their options).
        run_checks_after_each_pass: lint the graph after every pass (on in tests).
        dump: names of passes whose graph is logged (at INFO) before and after they run.
    """

    def __init__(
        self,
        passes: Sequence[Callable],
        *,
        run_checks_after_each_pass: bool = False,
        dump: Sequence[str] = (),
    ):
        self.passes = list(passes)
        self.run_checks_after_each_pass = run_checks_after_each_pass
        self.dump = set(dump)
        names = [pass_name(p) for p in self.passes]
        unknown = self.dump - set(names)
        if unknown:
            raise ValueError(f"cannot dump unknown passes {sorted(unknown)}; pipeline is {names}")

    def __call__(self, step) -> dict[str, PassResult]:
        results: dict[str, PassResult] = {}
        for pass_fn in self.passes:
            name = pass_name(pass_fn)
            if name in self.dump:
                logger.info("graph before %s:\n%s", name, step.graph_module.graph)
            start = time.perf_counter()
            result = pass_fn(step)
            step.graph_module.graph.eliminate_dead_code()
            step.graph_module.recompile()
            if self.run_checks_after_each_pass:
                lint_graph(step.graph_module)
            logger.info("pass %s: modified=%s %s (%.3fs)", name, result.modified, result.stats,
                        time.perf_counter() - start)
            if name in self.dump:
                logger.info("graph after %s:\n%s", name, step.graph_module.graph)
            results[name] = result
        return results
