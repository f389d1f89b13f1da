"""match_attention_bias: prove that each attention's mask is one the tree mask can replace, and find ALiBi.

Expects a captured step whose attention ops are matched (after :func:`match_eager_attention`) and whose
``position_ids`` input is still in place (before :func:`insert_tree_positions`). For every attention it evaluates the
additive mask the model built, on the capture's positions ``0 .. N-1`` (twice, with different tokens: a mask that
changes with them is refused), and checks what it is: a key may be visible exactly when it is causal and (on
sliding-window layers, see :func:`~jetspec_compile.passes.insert_tree_mask.attention_windows`) less than the window
behind the query; over the visible keys the mask may add, per head, ``slope · key position`` plus a per-query constant
(ALiBi; a constant per query changes no softmax) and nothing else. Slopes are recorded in ``step.alibi_slopes``
(``{layer: [H] float tensor}``) for :func:`insert_tree_alibi`. A mask that depends on token content, hides other keys,
or adds any other bias raises, naming the layer, instead of being replaced by the tree mask. Graphs of fewer than 4
tokens say too little about how a bias varies with position; they are judged from a 4-token capture of the same model.
"""

from __future__ import annotations

import torch
from torch import fx

from ..errors import UnsupportedModelError
from ..interface import INPUT_IDS
from .insert_tree_mask import attention_windows
from .manager import PassResult
from .match_eager_attention import match_eager_attention
from .patterns import attention_by_layer, placeholder, val

#: tokens a capture needs for the bias of its last query over keys 0..N-1 to show slopes and a fit check
MIN_TOKENS = 4


def _evaluate(gm: fx.GraphModule, node: fx.Node, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Run the part of ``gm`` that computes ``node`` on ``inputs`` (placeholder tag -> tensor)."""
    needed, stack = set(), [node]
    while stack:
        cur = stack.pop()
        if cur in needed:
            continue
        needed.add(cur)
        stack.extend(cur.all_input_nodes)
    sub, env, args = fx.Graph(), {}, []
    for cur in gm.graph.nodes:
        if cur not in needed:
            continue
        if cur.op == "placeholder":
            tag = cur.meta.get("jetspec", cur.name)
            if tag not in inputs:
                raise UnsupportedModelError(f"the attention mask depends on the graph input {tag!r}; only masks "
                                            "built from positions are modelled")
            args.append(inputs[tag])
            env[cur] = sub.placeholder(cur.name)
        else:
            env[cur] = sub.node_copy(cur, lambda x: env[x])
    sub.output(env[node])
    with torch.no_grad():
        return fx.GraphModule(gm, sub)(*args)


def _judge(term: torch.Tensor, n: int, window: int | None, layer: int) -> torch.Tensor | None:
    """ALiBi slopes ``[H]`` of an additive mask broadcast to ``[.., N, N]`` (None: a plain mask); raises when it
    is neither."""
    term = term.reshape(-1, *term.shape[-3:]) if term.dim() >= 3 else term.reshape(1, 1, *term.shape[-2:])
    term = term.expand(*term.shape[:2], n, n)  # [b, h, N, N]
    q = torch.arange(n)[:, None]
    k = torch.arange(n)[None, :]
    expected = (k <= q) & (torch.ones(n, n, dtype=torch.bool) if window is None else (q - k < window))
    if term.dtype == torch.bool:
        visible, bias = term, torch.zeros(term.shape)
    else:
        term = term.double()
        visible = torch.isfinite(term) & (term > torch.finfo(torch.float32).min / 2)
        bias = torch.where(visible, term, 0.0)
    if not bool((visible == expected.to(visible.device)).all()):
        what = "causal" if window is None else f"causal with a sliding window of {window}"
        raise UnsupportedModelError(
            f"layer {layer}: the attention mask the model builds is not {what} (config.layer_types / "
            "config.sliding_window); its visibility pattern is not modelled by the tree mask")
    bias = bias.cpu()
    slopes = bias[:, :, n - 1, 1] - bias[:, :, n - 1, 0]  # [b, h]
    fit = slopes[:, :, None, None] * k + bias[:, :, :, :1]  # [b, h, N, N]
    err = torch.where(expected, bias - fit, 0.0).abs().max()
    if float(err) > 1e-4 * max(1.0, float(bias.abs().max())) or not torch.allclose(slopes, slopes[:1]):
        raise UnsupportedModelError(
            f"layer {layer}: the attention mask adds a bias that is neither zero nor linear in the key position "
            "(ALiBi); position biases of that form are not modelled, so the model is refused")
    slopes = slopes[0].float()
    return None if bool((slopes == 0).all()) else slopes


def _attention_terms(step) -> dict[int, torch.Tensor | None]:
    """Evaluated additive mask of each layer's attention (None: causal flag, no mask)."""
    gm = step.graph_module
    by_layer = attention_by_layer(gm, step.layers_path, step.num_layers)
    position_ids = placeholder(gm, "position_ids")
    b, n = step.batch_size, step.budget
    device = val(position_ids).device
    positions = torch.arange(n, device=device).expand(b, n).contiguous()
    tokens = torch.randint(0, step.config.vocab_size, (b, n), generator=torch.Generator().manual_seed(0))
    probes = [{"position_ids": positions, INPUT_IDS: torch.zeros(b, n, dtype=torch.long, device=device)},
              {"position_ids": positions, INPUT_IDS: tokens.to(device)}]
    terms = {}
    for layer, attn in by_layer.items():
        mask = attn.kwargs.get("attn_mask", attn.args[3] if len(attn.args) > 3 else None)
        causal = attn.kwargs.get("is_causal", attn.args[5] if len(attn.args) > 5 else False)
        if mask is None and not causal:
            raise UnsupportedModelError(f"layer {layer}: attention {attn.name} has neither a mask nor "
                                        "is_causal, so it is not causal attention")
        if mask is None:
            terms[layer] = None
            continue
        first, second = (_evaluate(gm, mask, inputs) for inputs in probes)
        if not torch.equal(first, second):
            raise UnsupportedModelError(f"layer {layer}: the attention mask depends on the tokens' content, not "
                                        "on positions only; such masks are not modelled")
        terms[layer] = first
    return terms


def match_attention_bias(step) -> PassResult:
    windows = attention_windows(step.config, step.num_layers)
    probe = step
    if step.budget < MIN_TOKENS:
        from ..capture import capture_step

        probe = capture_step(step.model, batch_size=step.batch_size, budget=MIN_TOKENS)
        match_eager_attention(probe)
    slopes = {}
    for layer, term in _attention_terms(probe).items():
        found = None if term is None else _judge(term, probe.budget, windows[layer], layer)
        if found is not None:
            slopes[layer] = found
    step.alibi_slopes = slopes
    return PassResult(False, {"alibi_layers": len(slopes)})
