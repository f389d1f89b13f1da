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
compiles with Inductor's ``freezing``: the weights become constants, which lets Inductor pack them for a GEMM
once and fuse everything between the GEMMs. Inductor packs fp32 weights for MKL; :class:`PackedLinearPass` moves
the linears to oneDNN where that is faster on this CPU (MKL's small-row GEMMs are slow on AMD CPUs; figures in
``docs/results.md``, from ``benchmarks/bench_verify.py --nodes 8 --backends inductor``). Dynamo must trace with
``freezing`` on (it is what turns parameters into constants), so ``lower_inductor`` sets it around the compiled
call, not only inside the backend. A frozen graph keeps the weights it was compiled with: after changing the
model's weights, call ``optimize`` again. Freezing also bypasses Inductor's FX-graph cache: every process compiles
again (about two minutes per graph for SmolLM2 on 2 cores); an AOTInductor package is compiled once and loaded
from disk.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import operator
from typing import Callable

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from ..counters import counters
from ..interface import VerifyInterface
from ..kernels.compact_linear import compact_setting, compact_weight
from ..kernels.cpu_linear import CPU_LINEAR_KERNELS, MAX_ROWS, choose_kernel, kernel_setting, pack_weight
from ..passes import KERNEL_LOWERING_PASSES, LOWERING_PASSES, PassManager, split_lm_head
from ..passes.prepack_linear_weights import register_compact

logger = logging.getLogger(__name__)

__all__ = ["PackedLinearPass", "TreeAttentionPass", "jetspec_backend", "lower_inductor"]


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
        counters["inductor"]["tree_attention_ops"] = attention
        logger.info("jetspec post-grad pass: %d attention ops", attention)

    def uuid(self) -> bytes:
        return hashlib.sha256(inspect.getsource(type(self)).encode()).digest()


class PackedLinearPass(CustomGraphPass):
    """Post-grad pass over a *frozen* CPU graph: picks the GEMM kernel of every fp32 linear.

    With ``freezing``, Inductor packs fp32 linear weights for MKL (``mkl._mkl_linear``). Each such linear of up to
    ``MAX_ROWS`` rows whose weight has an exact compact form (``compact``: ``"auto"``; bf16, or 4-bit codes with a
    scale and a min per 32 inputs: :mod:`~jetspec_compile.kernels.compact_linear`) calls that form's kernel, which
    reads 2 or 0.75 bytes per weight instead of 4. Otherwise: MKL's small-row GEMMs are fast on Intel CPUs and can
    be several times slower than oneDNN's on others (AMD; ``docs/results.md``), so each MKL linear whose kernel
    :func:`~jetspec_compile.kernels.cpu_linear.choose_kernel` says is slower than oneDNN here (``kernel``:
    ``"auto"`` measures per shape, ``"mkl"`` / ``"onednn"`` force one) becomes ``mkldnn._linear_pointwise`` on a
    weight packed for oneDNN, a constant of the frozen graph.
    """

    def __init__(self, kernel: str = "auto", compact: str = "auto"):
        if kernel not in CPU_LINEAR_KERNELS:
            raise ValueError(f"cpu linear kernel must be one of {CPU_LINEAR_KERNELS}, got {kernel!r}")
        self.kernel, self.compact = kernel, compact_setting(compact)

    def __call__(self, graph: torch.fx.Graph) -> None:
        gm = graph.owning_module
        mkl_linear = getattr(getattr(torch.ops, "mkl", None), "_mkl_linear", None)
        if gm is None or mkl_linear is None or not torch.backends.mkldnn.is_available():
            return
        rewritten = compact = 0
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target not in (mkl_linear, mkl_linear.default):
                continue
            x, mkl_packed, weight_node, bias, rows = node.args
            if weight_node.op != "get_attr" or not isinstance(rows, int):
                continue
            weight = operator.attrgetter(weight_node.target)(gm)
            if weight.dtype != torch.float32 or weight.dim() != 2:
                continue
            form = compact_weight(weight, self.compact) if rows <= MAX_ROWS else None
            if form is not None:
                with graph.inserting_before(node):
                    replacement = graph.call_function(form.op(), (x, *register_compact(gm, weight_node.target, form),
                                                                  bias))
                compact += 1
            elif choose_kernel(weight.shape[0], weight.shape[1], rows, self.kernel) == "onednn":
                name = f"_jetspec_onednn_{rewritten}"
                gm.register_buffer(name, pack_weight("onednn", weight, rows), persistent=False)
                with graph.inserting_before(node):
                    packed = graph.get_attr(name)
                    replacement = graph.call_function(torch.ops.mkldnn._linear_pointwise.default,
                                                      (x, packed, bias, "none", [], ""))
            else:
                continue
            replacement.meta.update(node.meta)
            node.replace_all_uses_with(replacement)
            graph.erase_node(node)
            for unused in (mkl_packed, weight_node):  # free the MKL copy (and the plain weight) with their node
                if unused.op == "get_attr" and not unused.users:
                    graph.erase_node(unused)
                    if "." not in unused.target and hasattr(gm, unused.target):
                        delattr(gm, unused.target)
            rewritten += 1
        graph.eliminate_dead_code()
        counters["inductor"]["onednn_linears"] += rewritten - compact
        counters["inductor"]["compact_linears"] += compact
        logger.info("jetspec packed-linear pass: %d linears on oneDNN, %d compact", rewritten - compact, compact)

    def uuid(self) -> bytes:
        return hashlib.sha256(inspect.getsource(type(self)).encode() + self.kernel.encode()
                              + self.compact.encode()).digest()


def jetspec_backend(gm: torch.fx.GraphModule, example_inputs, freezing: bool = False,
                    cpu_linear: str = "auto", compact_weights: str = "auto") -> Callable:
    """Dynamo backend: Inductor with the jetspec post-grad passes installed.

    ``freezing``: weights as constants, for inference graphs (``lower_inductor`` turns it on on CPU).
    ``cpu_linear``: with freezing, the packed GEMM kernel of fp32 linears (see :class:`PackedLinearPass`).
    ``compact_weights``: with freezing, ``"auto"`` runs few-row linears from exactly compact weights where they
    have such a form, ``"off"`` never (see :class:`PackedLinearPass`).
    """
    from torch._inductor import config as inductor_config
    from torch._inductor.compile_fx import compile_fx

    counters["inductor"]["compiles"] += 1
    counters["inductor"]["frozen_compiles"] += bool(freezing)
    passes = {"freezing": freezing, "post_grad_custom_post_pass": TreeAttentionPass()}
    if freezing:
        passes["post_grad_custom_pre_pass"] = PackedLinearPass(cpu_linear, compact_weights)
        passes["cpp.enable_concat_linear"] = CONCAT_LINEARS
    with inductor_config.patch(passes):
        return compile_fx(gm, example_inputs)


#: with freezing on CPU, linears that read the same input (q/k/v, gate/up) become one GEMM over their
#: concatenated weights: fewer, wider GEMMs reading the same bytes (Inductor's ``cpp.enable_concat_linear``)
CONCAT_LINEARS = True


def lower_inductor(step, kernels: bool | None = None, freezing: bool | None = None,
                   cpu_linear: str | None = None, lm_head: str | None = "exact",
                   compact_weights: str | None = None) -> Callable:
    """Compile a rewritten verify step's graph (after the PyTorch lowering passes) with the ``jetspec`` backend.

    ``kernels``: lower attention to the tree-attention custom op first (default: on CUDA models only).
    ``freezing``: compile the weights in as constants (default: on CPU models, where it packs them for a GEMM).
    ``cpu_linear``: the packed GEMM kernel of frozen fp32 linears, ``"auto"`` (default; the environment variable
    ``JETSPEC_CPU_LINEAR`` sets another), ``"onednn"`` or ``"mkl"``; see :class:`PackedLinearPass`.
    ``lm_head``: leave the LM head to the runtime where this setting says so (frozen CPU graphs only;
    :func:`~jetspec_compile.passes.split_lm_head`); default ``"exact"``: the head stays in the graph.
    ``compact_weights``: ``"auto"`` (default; ``$JETSPEC_COMPACT_WEIGHTS`` sets another) or ``"off"``; see
    :class:`PackedLinearPass`.
    """
    from torch._inductor import config as inductor_config

    cpu_linear = kernel_setting(cpu_linear)  # a bad setting fails here, before the graph is touched
    compact_weights = compact_setting(compact_weights)

    cuda = next(step.model.parameters()).is_cuda
    kernels = cuda if kernels is None else kernels
    freezing = not cuda if freezing is None else freezing
    passes = KERNEL_LOWERING_PASSES if kernels else LOWERING_PASSES
    if freezing and not cuda:
        passes += (functools.partial(split_lm_head, setting=lm_head, cpu_linear=cpu_linear),)
    PassManager(passes)(step)
    backend = functools.partial(jetspec_backend, freezing=freezing, cpu_linear=cpu_linear,
                                compact_weights=compact_weights)
    compiled = torch.compile(step.graph_module, backend=backend, fullgraph=True)
    first = [True]

    def run(**inputs):
        if first[0]:  # one compile for every cache length, instead of a second one after the first change
            for name, tensor in inputs.items():
                dim = VerifyInterface.length_dim(name)
                if dim is not None:
                    torch._dynamo.mark_dynamic(tensor, dim)
            first[0] = False
        # Dynamo reads ``freezing`` while it traces (it turns parameters into constants only then): setting it
        # inside the backend alone compiles an unfrozen graph, so it is set around every call that may compile.
        with inductor_config.patch(freezing=freezing):
            return compiled(**inputs)

    return run
