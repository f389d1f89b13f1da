"""match_eager_attention: replace each eager attention subgraph with one attention op the later passes rewrite.

Expects a captured step (before any other pass). HF's eager attention computes
``softmax(q·kᵀ·scale [+ bias] [soft-capped tanh(x/c)·c] + mask)·v`` from ``matmul`` / ``bmm`` / ``baddbmm`` ops,
in 4-D ``[B, H, N, N]`` or flattened 3-D ``[B·H, N, N]`` form. The pass finds that chain by op (a matmul whose
scores, through scalar scaling, soft-capping, additive terms and reshapes only, reach a softmax over the last
dim whose probabilities, through casts, zero dropout and reshapes only, multiply the values), with the
``[B, H, N, D]`` query/key/value and ``[.., N, N]`` score shapes checked on ``node.meta["val"]``; masks may be
added or applied as ``masked_fill(scores, hidden, dtype-min)``. Each match
becomes ``aten.scaled_dot_product_attention(q, k, v, attn_mask=sum of the additive terms, scale=...)``, or
:func:`~jetspec_compile.passes.patterns.softcapped_attention` when the scores are soft-capped. A chain that
reaches a softmax through anything else (a bias before soft-capping, scaling after the mask, non-zero dropout)
raises, naming the op, instead of being skipped. Graphs without eager attention are left as they are.
"""

from __future__ import annotations

import math

import torch
from torch import fx

from ..errors import UnsupportedModelError
from .manager import PassResult
from .patterns import softcapped_attention, val

aten = torch.ops.aten

_MATMULS = {aten.matmul.default, aten.bmm.default, aten.baddbmm.default}
_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_SCALAR_MUL = {aten.mul.Tensor, aten.mul.Scalar}
_SCALAR_DIV = {aten.div.Tensor, aten.div.Scalar}
_SOFTMAX = {aten.softmax.int, aten._softmax.default}
#: ops between the softmax and the value matmul that leave probabilities unchanged (dropout checked separately)
_PASS_THROUGH = {aten.to.dtype, aten._to_copy.default, aten.type_as.default, aten.clone.default,
                 aten.contiguous.default, aten.alias.default} | _RESHAPES
_ASSERTS = {aten._assert_tensor_metadata.default}


def _users(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if u.target not in _ASSERTS]


def _only_user(node: fx.Node) -> fx.Node | None:
    users = _users(node)
    return users[0] if len(users) == 1 else None


def _number(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _as_4d(node, batch: int, n: int) -> fx.Node | None:
    """``node`` as a ``[B, h, N, D]`` tensor: itself, or the 4-D tensor a ``[B·h, N, D]`` reshape was made from."""
    v = val(node)
    if v is None:
        return None
    if v.dim() == 4 and v.shape[0] == batch and v.shape[2] == n:
        return node
    cur = node
    while v is not None and v.dim() == 3 and cur.op == "call_function" and cur.target in _RESHAPES:
        cur = cur.args[0]
        src = val(cur)
        if src is not None and src.dim() == 4 and src.shape[0] == batch and src.shape[0] * src.shape[1] == \
                v.shape[0] and tuple(src.shape[2:]) == tuple(v.shape[1:]):
            return cur
    return None


def _transposed_key(node) -> fx.Node | None:
    """``k`` where ``node`` is ``k`` with its last two dims swapped."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or val(node) is None:
        return None
    nd = val(node).dim()
    if node.target == aten.transpose.int:
        dims = {d % nd for d in node.args[1:3]}
        return node.args[0] if dims == {nd - 2, nd - 1} else None
    if node.target == aten.permute.default:
        perm = [d % nd for d in node.args[1]]
        return node.args[0] if perm == list(range(nd - 2)) + [nd - 1, nd - 2] else None
    return None


def _score_chain(mm: fx.Node, n: int):
    """Follow the scores from ``mm`` to a softmax; None when they do not reach one (not attention)."""
    v = val(mm)
    if v is None or v.dim() not in (3, 4) or tuple(v.shape[-2:]) != (n, n):
        return None
    scale, softcap, terms, cur = 1.0, None, [], mm
    if mm.target == aten.baddbmm.default:
        beta = _number(mm.kwargs.get("beta", mm.args[3] if len(mm.args) > 3 else 1))
        alpha = _number(mm.kwargs.get("alpha", mm.args[4] if len(mm.args) > 4 else 1))
        if beta is None or alpha is None:
            return None
        scale, terms = alpha, [("add", mm.args[0], beta, 3)]
    while True:
        user = _only_user(cur)
        if user is None or user.op != "call_function":
            return None
        target = user.target
        factor = _number(user.args[1]) if len(user.args) > 1 and user.args[0] is cur else None
        if target in _SCALAR_MUL | _SCALAR_DIV and factor is not None:
            factor = factor if target in _SCALAR_MUL else 1.0 / factor
            tanh = _only_user(user)
            if tanh is not None and tanh.target == aten.tanh.default:
                after = _only_user(tanh)
                cap = _number(after.args[1]) if after is not None and after.target in _SCALAR_MUL else None
                if cap is None or not math.isclose(cap * factor, 1.0, rel_tol=1e-6) or softcap is not None:
                    raise UnsupportedModelError(f"attention scores of {mm.name} go through tanh in a form other "
                                                "than logit soft-capping tanh(x / c) * c")
                if terms:
                    raise UnsupportedModelError(f"attention scores of {mm.name} get an additive bias before "
                                                "soft-capping; only a mask after soft-capping is modelled")
                softcap, cur = cap, after
                continue
            if softcap is not None or terms:
                raise UnsupportedModelError(f"attention scores of {mm.name} are scaled after soft-capping or "
                                            "after the mask; that order is not modelled")
            scale, cur = scale * factor, user
        elif target == aten.add.Tensor and user.args[0] is not user.args[1] and cur in user.args[:2]:
            other = user.args[1] if user.args[0] is cur else user.args[0]
            if isinstance(other, fx.Node):
                terms.append(("add", other, 1.0, val(cur).dim()))
            elif _number(other) is None:
                return None
            cur = user  # a scalar added to every score changes no softmax
        elif target == aten.masked_fill.Scalar and user.args[0] is cur:
            fill = _number(user.args[2])
            if fill is None or not fill <= torch.finfo(val(cur).dtype).min / 2:
                raise UnsupportedModelError(f"attention scores of {mm.name} are filled with {user.args[2]} (not a "
                                            "mask value); only masking fills are modelled")
            terms.append(("fill", user.args[1], fill, val(cur).dim()))
            cur = user
        elif target in _RESHAPES or target in (aten.to.dtype, aten._to_copy.default, aten.type_as.default):
            cur = user  # casts: the replacement computes softmax in float32, as eager attention does
        elif target in _SOFTMAX:
            if user.args[1] % val(user).dim() != val(user).dim() - 1:
                return None
            return scale, softcap, terms, user
        else:
            return None


def _value_matmul(softmax: fx.Node):
    """The matmul of the probabilities with the values, through ops that leave probabilities unchanged."""
    cur = softmax
    while True:
        user = _only_user(cur)
        if user is None or user.op != "call_function":
            return None
        if user.target in _PASS_THROUGH and user.args[0] is cur:
            cur = user
        elif user.target == aten.dropout.default and user.args[0] is cur:
            if user.args[1] != 0.0 and user.args[2]:
                raise UnsupportedModelError(f"attention {softmax.name} applies dropout in training mode")
            cur = user
        elif user.target in (aten.matmul.default, aten.bmm.default) and user.args[0] is cur:
            return user
        else:
            return None


def _output_4d(pv: fx.Node, batch: int, n: int) -> fx.Node | None:
    cur = pv
    while True:
        v = val(cur)
        if v is not None and v.dim() == 4 and v.shape[0] == batch and v.shape[2] == n:
            return cur
        user = _only_user(cur)
        if user is None or user.target not in _RESHAPES:
            return None
        cur = user


def masked_fill_term(condition: torch.Tensor, value: float, dtype: torch.dtype) -> torch.Tensor:
    """The additive score term that acts as ``scores.masked_fill(condition, value)`` under softmax: ``value``
    (a mask value, ``<= dtype-min / 2``) where ``condition`` holds, else 0."""
    zero = torch.zeros((), dtype=dtype, device=condition.device)
    return torch.where(condition, torch.full((), value, dtype=dtype, device=condition.device), zero)


def _term_4d(gm, term, batch: int, heads: int, dtype: torch.dtype, before: fx.Node) -> fx.Node:
    """An additive score term broadcastable to ``[B, H, N, N]``: terms added to flattened ``[B·H, N, N]`` scores
    (``[B·H or 1, n, N]``) are reshaped; masking fills become ``value`` where hidden, else 0."""
    kind, node, factor, scores_dim = term
    v = val(node)
    with gm.graph.inserting_before(before):
        if kind == "fill":
            node = gm.graph.call_function(masked_fill_term, (node, factor, dtype))
            factor = 1.0
        if scores_dim == 3 and v.dim() == 3:
            lead = (batch, heads) if v.shape[0] == batch * heads else (1, 1) if v.shape[0] == 1 else None
            if lead is None:
                raise UnsupportedModelError(f"attention term {node.name} of shape {tuple(v.shape)} does not "
                                            f"broadcast over batch {batch} x heads {heads}")
            node = gm.graph.call_function(aten.reshape.default, (node, [*lead, v.shape[1], v.shape[2]]))
        if factor != 1.0:
            node = gm.graph.call_function(aten.mul.Tensor, (node, factor))
    return node


def match_eager_attention(step) -> PassResult:
    gm = step.graph_module
    batch, n = step.batch_size, step.budget
    matched = 0
    for mm in [node for node in gm.graph.nodes if node.op == "call_function" and node.target in _MATMULS]:
        chain = _score_chain(mm, n)
        if chain is None:
            continue
        scale, softcap, terms, softmax = chain
        pv = _value_matmul(softmax)
        if pv is None:
            raise UnsupportedModelError(f"the softmax {softmax.name} of attention scores {mm.name} does not feed "
                                        "a matmul with the values through casts and reshapes only")
        first, second = (mm.args[1], mm.args[2]) if mm.target == aten.baddbmm.default else mm.args[:2]
        q, k, v = _as_4d(first, batch, n), _as_4d(_transposed_key(second), batch, n), _as_4d(pv.args[1], batch, n)
        out = _output_4d(pv, batch, n)
        if any(x is None for x in (q, k, v, out)):
            raise UnsupportedModelError(
                f"eager attention at {mm.name}: could not recover [B, H, N, D] query/key/value/output "
                f"(query {q}, key {k}, value {v}, output {out}); keys must enter as a transpose of the last two dims")
        heads, heads_kv = val(q).shape[1], val(k).shape[1]
        if heads % heads_kv or val(v).shape[1] != heads_kv:
            raise UnsupportedModelError(f"eager attention at {mm.name}: {heads} query heads against key/value "
                                        f"heads {heads_kv}/{val(v).shape[1]}")
        mask = None
        for term in terms:
            term = _term_4d(gm, term, batch, heads, val(q).dtype, out)
            with gm.graph.inserting_before(out):
                mask = term if mask is None else gm.graph.call_function(aten.add.Tensor, (mask, term))
        kwargs = {"attn_mask": mask, "scale": scale}
        if heads_kv != heads:
            kwargs["enable_gqa"] = True
        if softcap is not None:
            kwargs["softcap"] = softcap
        with gm.graph.inserting_before(out):
            attn = gm.graph.call_function(
                aten.scaled_dot_product_attention.default if softcap is None else softcapped_attention,
                (q, k, v), kwargs)
        attn.meta.update({key: out.meta[key] for key in ("val", "nn_module_stack", "stack_trace") if key in out.meta})
        attn.meta["jetspec"] = "eager_attention"
        out.replace_all_uses_with(attn)
        matched += 1
    while matched:  # metadata asserts on the replaced chains would keep them alive
        dead = [node for node in gm.graph.nodes if node.target in _ASSERTS and isinstance(node.args[0], fx.Node)
                and not _users(node.args[0])]
        for node in dead:
            gm.graph.erase_node(node)
        if not gm.graph.eliminate_dead_code() and not dead:
            break
    return PassResult(matched > 0, {"eager_attention_matched": matched})
