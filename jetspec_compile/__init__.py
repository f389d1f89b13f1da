"""jetspec_compile: lossless speculative decoding with parallel tree drafting for any Hugging Face causal LM.

Data flows capture → passes → lowering → runtime::

    capture_step(model)            FX graph of one step            jetspec_compile.capture
    TREE_VERIFY_PIPELINE           tree mask, positions, KV cache, jetspec_compile.passes
                                   hidden-state taps
    TreeVerifier                   prefill / verify / commit        jetspec_compile.runtime
    optimize(model, drafter=...)   the speculative loop, .generate  jetspec_compile.runtime
"""

from .capture import CapturedStep, capture_step
from .compat import check_versions
from .config import JetSpecConfig
from .drafter import Drafter, DraftTree, NGramDrafter
from .errors import CacheFullError, JetSpecError, UnsupportedModelError
from .runtime import TreeVerifier
from .runtime.lossless import LosslessReport, check_lossless
from .runtime.spec_model import SpecModel, attach_drafter, optimize
from .tree import TreeSpec, ancestor_mask, depths, path_to, retrieve_indices

__version__ = "0.1.0"

check_versions()  # an unsupported torch / transformers is named here, not by an obscure failure later

__all__ = [
    "CacheFullError",
    "CapturedStep",
    "DraftTree",
    "Drafter",
    "JetSpecConfig",
    "NGramDrafter",
    "LosslessReport",
    "SpecModel",
    "check_lossless",
    "optimize",
    "JetSpecError",
    "TreeSpec",
    "TreeVerifier",
    "UnsupportedModelError",
    "attach_drafter",
    "ancestor_mask",
    "capture_step",
    "depths",
    "path_to",
    "retrieve_indices",
]
