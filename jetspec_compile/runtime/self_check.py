"""The construction-time self-check: the rewritten graphs against the eager model.

Catches attention semantics the passes do not model (an unmatched bias, say) by refusing the model instead of
returning wrong logits.
"""

from __future__ import annotations

import torch

from ..errors import UnsupportedModelError
from ..tree import TreeSpec

__all__ = ["check_against_eager"]


def check_against_eager(verifier) -> None:
    """Compare a chunked prefill and one chain verification of the rewritten graphs with the eager model
    (catches unmodelled attention semantics such as ALiBi biases instead of returning wrong logits)."""
    gen = torch.Generator().manual_seed(0)
    p = max(1, min(verifier.prefill_chunk + 3, verifier.cache.max_length - verifier.budget - 1))  # 2 chunks
    n = verifier.budget
    ids = torch.randint(0, verifier.vocab_size, (verifier.batch_size, p + n), generator=gen).to(verifier.device)
    prefill_logits, _ = verifier.prefill(ids[:, :p])
    chain_logits, _ = verifier.verify(ids[:, p:], TreeSpec.chain(n))
    verifier.reset()
    with torch.no_grad():
        expected = verifier.model(input_ids=ids, use_cache=False).logits[:, p - 1:]
    actual = torch.cat([prefill_logits[:, None], chain_logits], dim=1)
    scale = expected.abs().max().clamp(min=1.0)
    tol = 1e-3 if expected.dtype == torch.float32 else 5e-2
    err = float((actual.float() - expected.float()).abs().max() / scale)
    if not err <= tol:
        raise UnsupportedModelError(
            f"the rewritten graph of {type(verifier.model).__name__} disagrees with the eager model (relative "
            f"error {err:.2e} > {tol:.0e}); its attention has semantics the passes do not model "
            "(e.g. ALiBi or soft-capping), so it is refused rather than run wrongly")
