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

aten = torch.ops.aten

#: attention ops the passes know how to rewrite (query, key, value, attn_mask are the first four arguments)
ATTENTION_OPS = (aten.scaled_dot_product_attention.default,)

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
            f"no scaled_dot_product_attention op found in decoder layers {missing} of {num_layers} "
            f"(matched {len(nodes)} attention ops). jetspec_compile rewrites SDPA attention; a layer without it "
            "(eager-only attention, linear attention, state-space layers) cannot be tree-verified."
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
