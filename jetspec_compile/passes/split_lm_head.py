"""split_lm_head: end the verify graph at the LM head's input and leave the head to the runtime.

Expects a step after the tree-verify pipeline whose logits output is ``aten.linear(h, weight[, bias])`` on
``get_attr`` parameters (every family whose head is a plain linear; a head followed by anything, such as
Gemma-2's logit soft-capping, is left in the graph). Afterwards the graph returns ``h [B, N, K]`` in place of the
logits, and ``step.lm_head`` is a :class:`~jetspec_compile.kernels.lm_head.LMHead` over the same parameters: its
``logits`` compute what the graph did, its ``argmax`` the same tokens from a bf16 copy of the weight (proved, not
assumed). A lowering pass of the PyTorch backends on CPU (eager, Inductor), taken only where
:func:`~jetspec_compile.kernels.lm_head.use_certified_head` says so for this head and row count; exported graphs
keep their head.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from ..kernels.lm_head import LMHead, lm_head_setting, use_certified_head
from .manager import PassResult
from .patterns import output_values

__all__ = ["split_lm_head"]


def split_lm_head(step, setting: str | None = None, cpu_linear: str = "auto") -> PassResult:
    """``setting``: ``"auto"``, ``"certified"`` or ``"exact"`` (see :func:`lm_head_setting`); ``cpu_linear``: the
    packed-GEMM setting of the head's exact logits."""
    setting = lm_head_setting(setting)
    gm = step.graph_module
    out, values = output_values(gm)
    logits = values[0]
    if not (isinstance(logits, fx.Node) and logits.op == "call_function"
            and logits.target is torch.ops.aten.linear.default):
        return PassResult(False, {"skipped": "the logits are not a plain linear of the last hidden state"})
    h, weight = logits.args[:2]
    bias = logits.args[2] if len(logits.args) > 2 else logits.kwargs.get("bias")
    if not all(isinstance(p, fx.Node) and p.op == "get_attr" for p in (weight, bias) if p is not None):
        return PassResult(False, {"skipped": "the head's weight is not a parameter of the graph"})
    w = operator.attrgetter(weight.target)(gm)
    b = None if bias is None else operator.attrgetter(bias.target)(gm)
    if not use_certified_head(w, step.batch_size * step.budget, setting):
        return PassResult(False, {"skipped": f"lm_head={setting!r} keeps the head in the graph here"})
    step.lm_head = LMHead(w, b, cpu_linear)
    h.meta["jetspec"] = "head_input"
    out.args = ((h,) + tuple(values[1:]),)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return PassResult(True, {"lm_head_split": 1})
