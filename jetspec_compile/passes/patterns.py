"""Matching helpers shared by the passes: find attention by op, map nodes to decoder layers, add inputs.

Attention is matched by what it is (an ``aten`` scaled-dot-product-attention op with 4-D query/key/value in
``node.meta["val"]``), never by position in the graph. Nodes are mapped to their decoder layer through the
``nn_module_stack`` that torch.export records on every node.
"""

from __future__ import annotations

import re
from typing import Iterable

import torch
from torch import fx

from ..errors import UnsupportedModelError
from ..interface import BASE_POSITION, DEPTH

aten = torch.ops.aten


def softcapped_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                         enable_gqa=False, softcap=None):
    """Eager attention with logit soft-capping, SDPA's signature plus ``softcap``.

    ``softmax(tanh(q·kᵀ·scale / softcap)·softcap + attn_mask)·v`` in float32 (what HF's eager attention computes
    for Gemma-2-style models); :func:`match_eager_attention` puts it where it finds that subgraph, so the later
    passes treat it like SDPA. query: [B, H, N, D]; key/value: [B, H or H_kv, L, D]; attn_mask: additive,
    broadcast to [B, H, N, L].
    """
    if dropout_p != 0.0 or is_causal:
        raise ValueError("softcapped_attention supports neither dropout nor is_causal (give an explicit mask)")
    if enable_gqa and key.shape[1] != query.shape[1]:
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(query, key.transpose(-2, -1)) * scale  # [B, H, N, L]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attn_mask is not None:
        scores = scores + attn_mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(probs, value)  # [B, H, N, D]


#: attention ops the passes know how to rewrite (query, key, value, attn_mask are the first four arguments)
ATTENTION_OPS = (aten.scaled_dot_product_attention.default, softcapped_attention)

#: ops through which a key/value tensor may flow between its projection and attention without changing values
#: (the ``repeat_kv`` expansion of grouped-query attention is built from these)
VIEW_OPS = {
    aten.reshape.default,
    aten.view.default,
    aten._unsafe_view.default,
    aten.expand.default,
    aten.unsqueeze.default,
    aten.slice.Tensor,
    aten.clone.default,
    aten.contiguous.default,
    aten.alias.default,
}


def val(node: fx.Node):
    """The fake value export recorded for ``node`` (a FakeTensor for tensor nodes)."""
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def find_attention_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """All attention nodes of the graph, in graph order."""
    found = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in ATTENTION_OPS:
            q = val(node.args[0])
            if q is None or q.dim() != 4:
                raise UnsupportedModelError(f"attention node {node.name} has a query of unexpected shape {q}")
            found.append(node)
    return found


def layer_index(node: fx.Node, layers_path: str) -> int | None:
    """Index of the decoder layer that produced ``node``, from its ``nn_module_stack`` (None outside layers)."""
    stack = node.meta.get("nn_module_stack") or {}
    pattern = re.compile(re.escape(layers_path) + r"\.(\d+)$")
    for path, _type in stack.values():
        match = pattern.match(path)
        if match:
            return int(match.group(1))
    return None


def module_path(node: fx.Node) -> str | None:
    """Qualified name of the innermost module that produced ``node``."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    return list(stack.values())[-1][0]


def attention_by_layer(gm: fx.GraphModule, layers_path: str, num_layers: int) -> dict[int, fx.Node]:
    """Map each decoder layer to its single attention node; raise naming what was not matched."""
    nodes = find_attention_nodes(gm)
    by_layer: dict[int, fx.Node] = {}
    for node in nodes:
        idx = layer_index(node, layers_path)
        if idx is None:
            raise UnsupportedModelError(f"attention node {node.name} lies outside the decoder layers {layers_path}")
        if idx in by_layer:
            raise UnsupportedModelError(
                f"decoder layer {idx} has more than one attention op ({by_layer[idx].name}, {node.name}); "
                "cross-attention or multi-attention layers are not supported"
            )
        by_layer[idx] = node
    missing = sorted(set(range(num_layers)) - set(by_layer))
    if missing:
        raise UnsupportedModelError(
            f"no attention op found in decoder layers {missing} of {num_layers} (matched {len(nodes)} attention "
            "ops). jetspec_compile rewrites scaled_dot_product_attention and the eager softmax(q·kᵀ)·v pattern; a "
            "layer with neither (linear attention, state-space or recurrent layers) cannot be tree-verified."
        )
    return by_layer


def placeholder(gm: fx.GraphModule, tag: str) -> fx.Node:
    """The placeholder tagged ``tag`` (raises naming the pass that adds it when missing)."""
    for node in gm.graph.nodes:
        if node.op == "placeholder" and node.meta.get("jetspec") == tag:
            return node
    raise UnsupportedModelError(f"graph has no input {tag!r}: run the pass that adds it first")


def tagged(gm: fx.GraphModule, tag: str) -> fx.Node:
    """The single node tagged ``node.meta['jetspec'] == tag``."""
    nodes = [n for n in gm.graph.nodes if n.meta.get("jetspec") == tag]
    if len(nodes) != 1:
        raise UnsupportedModelError(f"expected one node tagged {tag!r}, found {len(nodes)}: run its pass first")
    return nodes[0]


def tree_positions(gm: fx.GraphModule) -> fx.Node:
    """The ``tree_positions`` node (``base_position[:, None] + depth``, ``[B, N]``) that
    :func:`insert_tree_positions` tags; built again from its inputs where the model never read position ids (the
    node then had no users and was dropped as dead code)."""
    nodes = [n for n in gm.graph.nodes if n.meta.get("jetspec") == "tree_positions"]
    if nodes:
        return nodes[0]
    inputs = {n.meta.get("jetspec"): n for n in gm.graph.nodes if n.op == "placeholder"}
    if BASE_POSITION not in inputs or DEPTH not in inputs:
        raise UnsupportedModelError("graph has no tree positions: run its pass first (insert_tree_positions)")
    base_position, depth = inputs[BASE_POSITION], inputs[DEPTH]
    last = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    with gm.graph.inserting_after(last):
        base = gm.graph.call_function(aten.unsqueeze.default, (base_position, -1))
    with gm.graph.inserting_after(base):
        positions = gm.graph.call_function(aten.add.Tensor, (base, depth))
    positions.meta["jetspec"] = "tree_positions"
    return positions


def add_placeholders(gm: fx.GraphModule, names: Iterable[str]) -> list[fx.Node]:
    """Append graph inputs named ``names`` (tagged with their names) after the existing ones."""
    last = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    out = []
    for name in names:
        with gm.graph.inserting_after(last):
            node = gm.graph.placeholder(name)
        node.meta["jetspec"] = name
        out.append(node)
        last = node
    return out


def output_values(gm: fx.GraphModule) -> tuple:
    out = [n for n in gm.graph.nodes if n.op == "output"][0]
    return out, tuple(out.args[0])
