"""Graph passes that turn a captured causal step into a tree-verification step.

The pipeline is an explicit, ordered list. Ordering rules:

0. ``match_eager_attention`` before everything: it turns eager ``softmax(q·kᵀ)·v`` subgraphs into attention ops,
   which every later pass finds by op. ``match_attention_bias`` next: it evaluates each attention's mask on the
   captured ``position_ids`` (so before ``insert_tree_positions`` replaces them) and refuses masks the tree mask
   cannot stand in for; it records ALiBi slopes.
1. ``insert_tree_positions`` then: it replaces ``position_ids`` and tags the ``tree_positions`` node that the
   mask pass reads for sliding windows.
2. ``insert_kv_cache`` before ``insert_tree_mask``: the mask covers the cache slots, and both must see the
   ``write_slots`` input the cache pass adds.
3. ``insert_tree_alibi`` after ``insert_tree_mask``: it adds the ALiBi bias onto the tree mask that replaced the
   model's mask.
4. ``tap_hidden_states`` last: it only adds an output and must not observe intermediate rewrites.

``LOWERING_PASSES`` run after the pipeline for the PyTorch backends only (eager, Inductor): ``use_native_gqa``.
``KERNEL_LOWERING_PASSES`` (opt-in) append ``use_tree_attention_op``: attention becomes the
``jetspec::tree_attention`` custom op (Triton on CUDA, a torch reference elsewhere). It runs after
``use_native_gqa`` so the op reads the grouped KV cache, and after every pass that reads the tree masks.
``EAGER_CPU_PASSES`` append ``prepack_linear_weights`` to them for the eager backend on CPU (fp32 linears from
MKL-packed weights). ``split_lm_head`` (eager and Inductor on CPU, where it pays) runs after the lowering passes
but before any packing: it removes the head's linear from the graph's output. ``EXPORT_PIPELINE`` appends
``functionalize_kv_writes`` (after the taps, so its outputs follow ``(logits, hidden)``) for backends that cannot
mutate inputs (ONNX, TensorRT).
"""

from .functionalize_kv_writes import functionalize_kv_writes
from .insert_kv_cache import insert_kv_cache
from .insert_tree_alibi import insert_tree_alibi, tree_alibi_bias
from .insert_tree_mask import attention_windows, insert_tree_mask
from .insert_tree_positions import insert_tree_positions
from .manager import PassManager, PassResult, lint_graph
from .match_attention_bias import match_attention_bias
from .match_eager_attention import match_eager_attention
from .prepack_linear_weights import prepack_linear_weights, prepack_supported
from .split_lm_head import split_lm_head
from .tap_hidden_states import default_tap_layers, tap_hidden_states
from .use_native_gqa import use_native_gqa
from .use_tree_attention_op import use_tree_attention_op

#: the tree-verification pipeline, in order
TREE_VERIFY_PIPELINE = (match_eager_attention, match_attention_bias, insert_tree_positions, insert_kv_cache,
                        insert_tree_mask, insert_tree_alibi, tap_hidden_states)
#: extra passes of the PyTorch lowerings (eager, Inductor)
LOWERING_PASSES = (use_native_gqa,)
#: extra passes of the eager backend on CPU (Inductor packs weights itself; exports cannot carry packed weights)
EAGER_CPU_PASSES = LOWERING_PASSES + (prepack_linear_weights,)
#: the same, made pure for export
EXPORT_PIPELINE = TREE_VERIFY_PIPELINE + (functionalize_kv_writes,)
#: opt-in: LOWERING_PASSES, then attention as the tree-attention custom op (no dense masks)
KERNEL_LOWERING_PASSES = LOWERING_PASSES + (use_tree_attention_op,)

__all__ = [
    "EAGER_CPU_PASSES",
    "EXPORT_PIPELINE",
    "KERNEL_LOWERING_PASSES",
    "LOWERING_PASSES",
    "TREE_VERIFY_PIPELINE",
    "functionalize_kv_writes",
    "PassManager",
    "PassResult",
    "attention_windows",
    "default_tap_layers",
    "insert_kv_cache",
    "insert_tree_alibi",
    "insert_tree_mask",
    "insert_tree_positions",
    "lint_graph",
    "match_attention_bias",
    "match_eager_attention",
    "prepack_linear_weights",
    "prepack_supported",
    "split_lm_head",
    "tap_hidden_states",
    "tree_alibi_bias",
    "use_native_gqa",
    "use_tree_attention_op",
]
