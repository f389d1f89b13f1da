"""``torch.ops.jetspec.tree_attention``: attention of tree nodes over the KV cache without a dense mask.

The op computes exactly ``sdpa(q, k, v, attn_mask=tree_attention_mask(...), scale=scale, enable_gqa=True)``
(see :func:`jetspec_compile.tree.tree_attention_mask`) but takes the mask's *inputs*:

* ``cache_valid [B, L]`` bool, ``cache_positions [B, L]`` int64: committed slots and their position ids;
* ``write_slots [N]`` int64: the (distinct) cache slots of the N tree nodes;
* ``tree_mask [B, N, N]`` bool: node ``i`` sees node ``j`` iff ``j`` is ``i`` or an ancestor;
* ``positions [B, N]`` int64: tree position ids; ``window``: sliding window (-1 = none); ``scale``.

A key at a tree slot is visible iff it is an ancestor-or-self of the query node; any other slot iff
``cache_valid``; a sliding window also hides keys with ``query_pos - key_pos >= window``, where the key
positions are ``cache_positions`` with the tree slots overwritten by ``positions``.

Three implementations:

* :func:`tree_attention_reference` (plain torch: dense mask + SDPA) is the op's default kernel (CPU and any
  device without its own); ``register_fake`` makes the op traceable by torch.export and torch.compile.
* :func:`tree_attention_triton` is registered for CUDA. It never builds the ``[B, N, L]`` mask: the tree is
  given compactly as ``slot_node [L]`` int32 (node index of each tree slot, -1 for cache slots) and an
  ancestor bitmask ``ancestors [B, N, W]`` int64 (bit ``j % 64`` of word ``j // 64`` of node ``i`` is set iff
  ``tree_mask[b, i, j]``; ``W = ceil(N / 64)``). Both are O(L + B·N·W) and built per call (two small
  kernels). For ``N <= 64`` (every default budget) a query's whole ancestor set is one int64 held in a
  register for the whole key loop, so a key's visibility is one shift and one select; larger trees gather
  one word per (query, key). One program handles one (batch, head) pair and ``BLOCK_M`` queries, loops over
  the cache in ``BLOCK_N`` slots with an online softmax accumulated in fp32 (fp32, bf16, fp16 inputs; fp32
  dot products in IEEE precision, not TF32, so fp32 results match the reference).
* The same Triton kernel runs on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``), which is
  how it is tested without a GPU. ``triton.jit`` reads the flag when it wraps a function, and triton wraps
  its own helpers (``tl.max``, ``tl.sum``) when it is imported, which torch does on the first custom-op call:
  so the flag must be in the environment before the process starts (tests run the kernel in a subprocess).
  Our kernel is wrapped lazily, once per setting, at its first call. The interpreter's ``tl.dot``
  does not support bf16 (it multiplies the bit patterns, triton-lang/triton#11584), so there bf16 q/k/v are
  upcast to fp32 after loading; on a GPU bf16 and fp16 dots take bf16/fp16 operands with fp32 accumulation.

Difference from the reference: a query that sees no key at all (impossible when ``tree_mask`` holds its
diagonal and ``window >= 1``) gets zeros here, while SDPA's additive ``finfo.min`` mask gives the mean value.
Triton is imported lazily (``pip install jetspec_compile[kernels]``): the package imports without it.
"""

from __future__ import annotations

import os

import torch

from ..tree import tree_attention_mask

__all__ = ["ancestor_bits", "slot_nodes", "tree_attention", "tree_attention_reference", "tree_attention_triton"]

tl = None  # triton.language, imported by _kernel() on first use (the kernel body resolves it as a global)

#: Triton kernels by interpreter setting (``triton.jit`` reads ``TRITON_INTERPRET`` when it wraps a function)
_KERNELS: dict[bool, object] = {}


@torch.library.custom_op("jetspec::tree_attention", mutates_args=())
def tree_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_valid: torch.Tensor,
                   cache_positions: torch.Tensor, write_slots: torch.Tensor, tree_mask: torch.Tensor,
                   positions: torch.Tensor, window: int, scale: float) -> torch.Tensor:
    """Tree attention ``[B, Hq, N, D]`` (see the module docstring); default kernel: the torch reference."""
    return tree_attention_reference(q, k, v, cache_valid, cache_positions, write_slots, tree_mask, positions,
                                    window, scale)


@tree_attention.register_fake
def _(q, k, v, cache_valid, cache_positions, write_slots, tree_mask, positions, window, scale):
    _check(q, k, v, cache_valid, write_slots, tree_mask, positions)
    return q.new_empty(q.shape)


@tree_attention.register_kernel("cuda")
def _(q, k, v, cache_valid, cache_positions, write_slots, tree_mask, positions, window, scale):
    return tree_attention_triton(q, k, v, cache_valid, cache_positions, write_slots, tree_mask, positions,
                                 window, scale)


def _check(q, k, v, cache_valid, write_slots, tree_mask, positions) -> None:
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"tree_attention needs q [B, Hq, N, D], k and v [B, Hkv, L, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    b, hq, n, d = q.shape
    _, hkv, length, _ = k.shape
    if k.shape[0] != b or k.shape[3] != d or hq % hkv:
        raise ValueError(f"k/v {tuple(k.shape)} do not fit q {tuple(q.shape)}: need the same B and D and a "
                         "number of KV heads dividing the query heads")
    expected = {"cache_valid": (cache_valid, (b, length)), "write_slots": (write_slots, (n,)),
                "tree_mask": (tree_mask, (b, n, n)), "positions": (positions, (b, n))}
    for name, (t, shape) in expected.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"tree_attention: {name} has shape {tuple(t.shape)}, expected {shape}")


def tree_attention_reference(q, k, v, cache_valid, cache_positions, write_slots, tree_mask, positions,
                             window: int, scale: float) -> torch.Tensor:
    """The op's definition in plain torch: the dense additive mask and SDPA (contiguous ``[B, Hq, N, D]``)."""
    _check(q, k, v, cache_valid, write_slots, tree_mask, positions)
    mask = tree_attention_mask(tree_mask, cache_valid, cache_positions, write_slots, positions,
                               None if window < 0 else window, q.dtype)  # [B, 1, N, L]
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                                           enable_gqa=k.shape[1] != q.shape[1])
    return out.contiguous()


def slot_nodes(write_slots: torch.Tensor, length: int) -> torch.Tensor:
    """``[L]`` int32: the node index written at each cache slot, -1 at slots that hold no tree node."""
    n = write_slots.shape[0]
    out = torch.full((length,), -1, dtype=torch.int32, device=write_slots.device)
    return out.index_copy_(0, write_slots, torch.arange(n, dtype=torch.int32, device=write_slots.device))


def ancestor_bits(tree_mask: torch.Tensor) -> torch.Tensor:
    """``[B, N, ceil(N / 64)]`` int64: bit ``j % 64`` of word ``j // 64`` of node ``i`` is ``tree_mask[:, i, j]``."""
    b, n, _ = tree_mask.shape
    words = -(-n // 64)
    bits = torch.nn.functional.pad(tree_mask, (0, 64 * words - n)).view(b, n, words, 64).long()
    weights = torch.ones(64, dtype=torch.long, device=tree_mask.device) << torch.arange(64, device=tree_mask.device)
    return (bits * weights).sum(-1)  # distinct bits: the int64 sum is the bit pattern (bit 63 is the sign)


def _kernel():
    """The Triton kernel, wrapped by ``triton.jit`` under the current ``TRITON_INTERPRET`` setting."""
    global tl
    try:
        import triton
        import triton.language
    except ImportError as err:
        raise ImportError("the Triton tree-attention kernel needs triton: pip install 'jetspec_compile[kernels]' "
                          "(or use tree_attention_reference)") from err
    tl = triton.language
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if interpret and isinstance(tl.max, triton.runtime.JITFunction):
        raise RuntimeError(
            "TRITON_INTERPRET=1 was set after triton was imported (torch imports it on the first custom-op call), "
            "so triton.language's own helpers are compiled, not interpreted: set TRITON_INTERPRET=1 in the "
            "environment before the process starts")
    if interpret not in _KERNELS:
        _KERNELS[interpret] = triton.jit(_tree_attention_kernel)
    return _KERNELS[interpret], interpret


def tree_attention_triton(q, k, v, cache_valid, cache_positions, write_slots, tree_mask, positions,
                          window: int, scale: float, *, block_m: int | None = None,
                          block_n: int = 64) -> torch.Tensor:
    """The op computed by the Triton kernel (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``)."""
    _check(q, k, v, cache_valid, write_slots, tree_mask, positions)
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"tree_attention_triton supports fp32/bf16/fp16 q, k, v of one dtype; got {q.dtype}, "
                         f"{k.dtype}, {v.dtype}")
    kernel, interpret = _kernel()
    if q.device.type == "cpu" and not interpret:
        raise RuntimeError("tree_attention_triton runs CPU tensors only under Triton's interpreter: set "
                           "TRITON_INTERPRET=1, or use tree_attention_reference")
    b, hq, n, d = q.shape
    hkv, length = k.shape[1], k.shape[2]
    import triton

    anc = ancestor_bits(tree_mask)  # [B, N, W]
    nodes = slot_nodes(write_slots, length)  # [L]
    valid = cache_valid.view(torch.uint8) if cache_valid.dtype == torch.bool else cache_valid
    pos = positions.contiguous()
    out = torch.empty(b, hq, n, d, dtype=q.dtype, device=q.device)
    upcast = interpret and q.dtype == torch.bfloat16  # the interpreter's tl.dot multiplies bf16 bit patterns
    block_m = block_m or min(64, max(16, triton.next_power_of_2(n)))
    grid = (triton.cdiv(n, block_m), b * hq)
    kernel[grid](
        q, k, v, out, valid, cache_positions, nodes, anc, pos,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *valid.stride(), *cache_positions.stride(),
        hq, hq // hkv, n, length, d, window, scale,
        WORDS=anc.shape[2], HAS_WINDOW=window >= 0, UPCAST=upcast, IEEE=q.dtype == torch.float32 or upcast,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(d)),
    )
    return out


def _tree_attention_kernel(
    Q, K, V, Out, Valid, CachePos, SlotNode, Anc, Pos,
    sqb, sqh, sqn, sqd, skb, skh, skl, skd, svb, svh, svl, svd, sob, soh, son, sod, sva_b, sva_l, scp_b, scp_l,
    H, GROUP, N, L, D, window, scale,
    WORDS: tl.constexpr, HAS_WINDOW: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hkv = h // GROUP
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # query nodes
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < N
    d_ok = offs_d < D
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    if UPCAST:
        q = q.to(tl.float32)
    if WORDS == 1:
        anc = tl.load(Anc + b * N + offs_m, mask=m_ok, other=0)  # [BLOCK_M] int64: ancestor-or-self bits
    if HAS_WINDOW:
        q_pos = tl.load(Pos + b * N + offs_m, mask=m_ok, other=0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_base = K + b * skb + hkv * skh
    v_base = V + b * svb + hkv * svh
    for start in range(0, L, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)  # cache slots
        n_ok = offs_n < L
        node = tl.load(SlotNode + offs_n, mask=n_ok, other=-1)
        is_tree = node >= 0
        node = tl.maximum(node, 0)
        valid = tl.load(Valid + b * sva_b + offs_n * sva_l, mask=n_ok, other=0) != 0
        if WORDS == 1:
            bit = (anc[:, None] >> node[None, :].to(tl.int64)) & 1
        else:
            word = tl.load(Anc + (b * N + offs_m[:, None]) * WORDS + (node // 64)[None, :],
                           mask=m_ok[:, None] & n_ok[None, :], other=0)
            bit = (word >> (node % 64)[None, :].to(tl.int64)) & 1
        visible = tl.where(is_tree[None, :], bit != 0, valid[None, :]) & n_ok[None, :]  # [BLOCK_M, BLOCK_N]
        if HAS_WINDOW:
            tree_pos = tl.load(Pos + b * N + node, mask=n_ok & is_tree, other=0)
            cache_pos = tl.load(CachePos + b * scp_b + offs_n * scp_l, mask=n_ok, other=0)
            key_pos = tl.where(is_tree, tree_pos, cache_pos)
            visible = visible & ((q_pos[:, None] - key_pos[None, :]) < window)
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * skl + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(visible, s * scale, float("-inf"))  # [BLOCK_M, BLOCK_N] fp32
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * svl + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(Out + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :] * sod,
             out.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
