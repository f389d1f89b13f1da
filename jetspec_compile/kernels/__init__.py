"""Custom attention kernels, registered as ``torch.library`` ops so graphs, torch.export and Inductor see them.

* ``torch.ops.jetspec.tree_attention`` (:mod:`.tree_attention`): tree nodes attend to the KV cache and to their
  ancestors without a dense ``[B, 1, N, L]`` mask; a torch reference on CPU, a Triton kernel on CUDA.
"""

from .tree_attention import (
    ancestor_bits,
    slot_nodes,
    tree_attention,
    tree_attention_reference,
    tree_attention_triton,
)

__all__ = ["ancestor_bits", "slot_nodes", "tree_attention", "tree_attention_reference", "tree_attention_triton"]
