"""use_tree_attention_op: attention calls one ``jetspec::tree_attention`` op instead of SDPA over a dense mask.

Expects the graph after :func:`insert_tree_mask` (best after :func:`use_native_gqa`, so the op reads the
grouped ``[B, H_kv, L, D]`` cache). Every attention tagged ``tree_attention`` whose mask is a
:func:`tree_attention_mask` call becomes ``torch.ops.jetspec.tree_attention(q, k, v, cache_valid,
cache_positions, write_slots, tree_mask, positions, window, scale)`` on the mask's own inputs; the
``[B, 1, N, L]`` masks are gone afterwards. A tagged attention with any other mask, dropout, a causal flag or
an unknown argument raises instead of being skipped. An opt-in lowering pass for the PyTorch backends (eager:
the op's torch reference; Inductor: an extern call; CUDA: the Triton kernel), see
:mod:`jetspec_compile.kernels.tree_attention`.
"""

from __future__ import annotations

import math

import torch

from ..errors import UnsupportedModelError
from ..kernels import tree_attention as _kernels  # noqa: F401  (registers torch.ops.jetspec.tree_attention)
from ..tree import tree_attention_mask
from .manager import PassResult
from .patterns import find_attention_nodes, val

#: SDPA keyword arguments the op covers, with the values it supports (None: any value)
_KWARGS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": None}


def _fake_value(node_args):
    """The op's fake output for the new node's ``meta['val']`` (None when the inputs carry no fake values)."""
    from torch._guards import detect_fake_mode

    fakes = [val(a) if isinstance(a, torch.fx.Node) else a for a in node_args]
    mode = detect_fake_mode([f for f in fakes if isinstance(f, torch.Tensor)])
    if mode is None or any(f is None for f in fakes):
        return None
    with mode:
        return torch.ops.jetspec.tree_attention.default(*fakes)


def use_tree_attention_op(step) -> PassResult:
    gm = step.graph_module
    rewritten, masks = 0, set()
    for attn in find_attention_nodes(gm):
        if attn.meta.get("jetspec") != "tree_attention":
            continue
        q, k, v = attn.args[:3]
        mask = attn.kwargs.get("attn_mask")
        bad = {key: value for key, value in attn.kwargs.items()
               if key not in _KWARGS or (_KWARGS[key] is not None and value != _KWARGS[key])}
        if len(attn.args) > 3 or bad or getattr(mask, "target", None) is not tree_attention_mask:
            raise UnsupportedModelError(
                f"tree attention {attn.name} is not SDPA(q, k, v) over a tree_attention_mask call (mask "
                f"{getattr(mask, 'name', mask)}, extra args {attn.args[3:]}, unsupported kwargs {bad}); "
                "use_tree_attention_op runs right after the tree-verify pipeline")
        tree_mask, cache_valid, cache_positions, write_slots, positions, window, _dtype = mask.args
        scale = attn.kwargs.get("scale")
        if scale is None:
            scale = 1.0 / math.sqrt(val(q).shape[-1])  # SDPA's default
        args = (q, k, v, cache_valid, cache_positions, write_slots, tree_mask, positions,
                -1 if window is None else window, float(scale))
        with gm.graph.inserting_before(attn):
            node = gm.graph.call_function(torch.ops.jetspec.tree_attention.default, args)
        node.meta.update(attn.meta)  # tag, module stack; val: same shape and dtype as SDPA's
        fake = _fake_value(args)  # exact strides where the inputs carry fake values (added inputs do not)
        if fake is not None:
            node.meta["val"] = fake
        attn.replace_all_uses_with(node)
        gm.graph.erase_node(attn)
        masks.add(mask)
        rewritten += 1
    removed = 0
    for mask in masks:
        if not mask.users:
            gm.graph.erase_node(mask)
            removed += 1
    gm.recompile()
    return PassResult(rewritten > 0, {"attention_tree_op": rewritten, "masks_removed": removed})
