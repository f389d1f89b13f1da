"""The ``jetspec`` torch.compile backend: the project's graph passes, then Inductor.

``torch.compile(fn, backend="jetspec")`` works without importing this package first: pyproject.toml registers
:func:`jetspec_backend` in the ``torch_dynamo_backends`` entry-point group, which Dynamo's backend registry
loads by name. The backend hands Inductor a post-grad pass (:class:`TreeAttentionPass`) whose ``uuid()`` is
derived from its source, so Inductor's FX-graph cache is invalidated when the pass changes; it counts the
attention ops that reach Inductor (dense-mask SDPA or the ``jetspec::tree_attention`` custom op; tests
assert one per layer). Inductor then emits C++/OpenMP kernels on CPU and Triton kernels on GPU.

On CUDA, ``lower_inductor`` also runs :func:`~jetspec_compile.passes.use_tree_attention_op` (the
``KERNEL_LOWERING_PASSES``): attention becomes the tree-attention custom op, whose CUDA kernel is our Triton
kernel reading a compact ancestor bitmask instead of a dense ``[B, N, L]`` mask; Inductor calls it as an
extern kernel. On CPU the op would run its dense reference, so the plain SDPA graph is kept there unless
``kernels=True`` is asked for.

``lower_inductor`` is what ``optimize(model, backend="inductor")`` uses for the verify graph: shapes are static
except the cache view length, which is marked dynamic on the first call, so each graph compiles once. On CPU it
compiles with Inductor's ``freezing``: the weights become constants, which lets Inductor pack them for MKL's GEMM
once and fuse everything between the GEMMs (for SmolLM2, verifying 8 nodes took 39.2 ms, against 51.6 ms in the
eager graph with packed weights, 43.2 ms in an AOTInductor package and a 36.1 ms HF decoding step;
``benchmarks/bench_verify.py --nodes 8 --backends eager inductor aoti``). Dynamo must trace with ``freezing`` on
(it is what turns parameters into constants), so ``lower_inductor`` sets it around the compiled call, not only
inside the backend. A frozen graph keeps the weights it was compiled with: after changing the model's weights,
call ``optimize`` again. Freezing also bypasses Inductor's FX-graph cache: every process compiles again (about
two minutes per graph for SmolLM2 on 2 cores); an AOTInductor package is compiled once and loaded from disk.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
from typing import Callable

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

logger = logging.getLogger(__name__)

__all__ = ["TreeAttentionPass", "jetspec_backend", "lower_inductor", "STATS"]

#: counters of the last compilations (tests read them): compiles, tree attentions seen by the post-grad pass
STATS = {"compiles": 0, "frozen_compiles": 0, "tree_attention_ops": 0}

_SDPA_TARGETS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten.scaled_dot_product_attention.default,
}


def _is_tree_attention_op(target) -> bool:
    return getattr(target, "name", lambda: "")() in ("jetspec::tree_attention", "jetspec::tree_attention.default")


class TreeAttentionPass(CustomGraphPass):
    """Post-grad pass over Inductor's ATen graph: counts the attention ops (see the module docstring)."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        attention = 0
        for node in graph.nodes:
            if node.op == "call_function" and (node.target in _SDPA_TARGETS or _is_tree_attention_op(node.target)):
                attention += 1
        STATS["tree_attention_ops"] = attention
        logger.info("jetspec post-grad pass: %d attention ops", attention)

    def uuid(self) -> bytes:
        return hashlib.sha256(inspect.getsource(type(self)).encode()).digest()


def jetspec_backend(gm: torch.fx.GraphModule, example_inputs, freezing: bool = False) -> Callable:
    """Dynamo backend: Inductor with the jetspec post-grad pass installed (``freezing``: weights as constants,
    for inference graphs; ``lower_inductor`` turns it on on CPU)."""
    from torch._inductor import config as inductor_config
    from torch._inductor.compile_fx import compile_fx

    STATS["compiles"] += 1
    STATS["frozen_compiles"] += bool(freezing)
    with inductor_config.patch(post_grad_custom_post_pass=TreeAttentionPass(), freezing=freezing):
        return compile_fx(gm, example_inputs)


#: inputs whose length follows the cache view (dimension), marked dynamic on the first call
_CACHE_LENGTH_DIMS = {"cache_valid": 1, "cache_positions": 1}


def lower_inductor(step, kernels: bool | None = None, freezing: bool | None = None) -> Callable:
    """Compile a rewritten verify step's graph (after the PyTorch lowering passes) with the ``jetspec`` backend.

    ``kernels``: lower attention to the tree-attention custom op first (default: on CUDA models only).
    ``freezing``: compile the weights in as constants (default: on CPU models, where it packs them for MKL).
    """
    from torch._inductor import config as inductor_config

    from ..passes import KERNEL_LOWERING_PASSES, LOWERING_PASSES, PassManager

    cuda = next(step.model.parameters()).is_cuda
    kernels = cuda if kernels is None else kernels
    freezing = not cuda if freezing is None else freezing
    PassManager(KERNEL_LOWERING_PASSES if kernels else LOWERING_PASSES)(step)
    compiled = torch.compile(step.graph_module, backend=functools.partial(jetspec_backend, freezing=freezing),
                             fullgraph=True)
    first = [True]

    def run(**inputs):
        if first[0]:  # one compile for every cache length, instead of a second one after the first change
            for name, tensor in inputs.items():
                dim = 2 if name.startswith(("k_cache_", "v_cache_")) else _CACHE_LENGTH_DIMS.get(name)
                if dim is not None:
                    torch._dynamo.mark_dynamic(tensor, dim)
            first[0] = False
        # Dynamo reads ``freezing`` while it traces (it turns parameters into constants only then): setting it
        # inside the backend alone compiles an unfrozen graph, so it is set around every call that may compile.
        with inductor_config.patch(freezing=freezing):
            return compiled(**inputs)

    return run
