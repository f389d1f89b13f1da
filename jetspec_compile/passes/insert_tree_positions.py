"""insert_tree_positions: position ids of tree nodes = committed length + depth.

Expects a captured step whose graph has a ``position_ids`` input ``[B, N]`` (see
:func:`jetspec_compile.capture.capture_step`). Afterwards the graph takes ``base_position`` ``[B]`` (the
position of the tree root, i.e. how many tokens of the row are already committed) and ``depth`` ``[B, N]``
(each node's depth in its row's tree) instead, and every former use of ``position_ids`` reads
``base_position[:, None] + depth`` (tagged ``tree_positions``). Rotary and learned position embeddings alike
follow, because both read the position ids the model was given. A model that never reads position ids is
accepted only when :func:`match_attention_bias` found ALiBi layers (positions then enter through the bias).
"""

from __future__ import annotations

import torch

from ..errors import UnsupportedModelError
from ..interface import BASE_POSITION, DEPTH
from .manager import PassResult
from .patterns import add_placeholders, placeholder

aten = torch.ops.aten


def insert_tree_positions(step) -> PassResult:
    gm = step.graph_module
    position_ids = placeholder(gm, "position_ids")
    if not position_ids.users and not step.alibi_slopes:
        raise UnsupportedModelError(
            f"{type(step.model).__name__} ignores position_ids (its graph never reads them) and has no ALiBi "
            "bias, so tree positions cannot be given to it"
        )
    base_position, depth = add_placeholders(gm, [BASE_POSITION, DEPTH])
    with gm.graph.inserting_after(depth):
        base = gm.graph.call_function(aten.unsqueeze.default, (base_position, -1))
    with gm.graph.inserting_after(base):
        positions = gm.graph.call_function(aten.add.Tensor, (base, depth))
    positions.meta["jetspec"] = "tree_positions"
    positions.meta["val"] = position_ids.meta.get("val")
    n_uses = len(position_ids.users)
    position_ids.replace_all_uses_with(positions)
    gm.graph.erase_node(position_ids)
    return PassResult(True, {"position_uses_rewritten": n_uses})
