"""tap_hidden_states: expose the output hidden states of chosen decoder layers as an extra graph output.

Expects a captured step (any point in the pipeline). For each tapped layer the tap is the last node, in graph
order, that the layer module produced with shape ``[B, N, H]`` (the layer's residual output). The graph's
output becomes ``(logits, hidden)`` with ``hidden = cat(taps, -1)`` of shape ``[B, N, K*H]`` (tagged
``hidden_taps``), which is what the parallel drafter consumes. Default layers: 5 spread from the 2nd to the
3rd-from-last layer, as in JetSpec (:func:`default_tap_layers`).
"""

from __future__ import annotations

import torch

from ..errors import UnsupportedModelError
from .manager import PassResult
from .patterns import layer_index, output_values, val

aten = torch.ops.aten


def default_tap_layers(num_layers: int, count: int = 5) -> tuple[int, ...]:
    """``count`` layer indices spread evenly from layer 1 to layer ``num_layers - 3`` (JetSpec's choice)."""
    start, end = 1, num_layers - 3
    if end < start:
        start, end = 0, num_layers - 1
    count = min(count, end - start + 1)
    if count == 1:
        return (end,)
    return tuple(sorted({round(start + i * (end - start) / (count - 1)) for i in range(count)}))


def tap_hidden_states(step) -> PassResult:
    gm = step.graph_module
    layers = step.tap_layers or default_tap_layers(step.num_layers)
    bad = [i for i in layers if not 0 <= i < step.num_layers]
    if bad:
        raise ValueError(f"tap layers {bad} out of range for a model with {step.num_layers} layers")
    want = (step.batch_size, step.budget, step.hidden_size)
    last: dict[int, torch.fx.Node] = {}
    for node in gm.graph.nodes:
        v = val(node)
        if isinstance(v, torch.Tensor) and tuple(v.shape) == want:
            idx = layer_index(node, step.layers_path)
            if idx is not None:
                last[idx] = node
    missing = [i for i in layers if i not in last]
    if missing:
        raise UnsupportedModelError(f"no [B, N, H] output found for decoder layers {missing}")
    out, values = output_values(gm)
    with gm.graph.inserting_before(out):
        hidden = gm.graph.call_function(aten.cat.default, ([last[i] for i in layers], -1))
    hidden.meta["jetspec"] = "hidden_taps"
    out.args = (tuple(values[:1]) + (hidden,),)
    step.tap_layers = tuple(layers)
    return PassResult(True, {"layers_tapped": len(layers)})
