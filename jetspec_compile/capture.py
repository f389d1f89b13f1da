"""Capture one decoding step of a Hugging Face causal LM as an FX graph.

``capture_step`` exports ``model(input_ids, position_ids)`` with :func:`torch.export.export` (non-strict, ATen
level) for a fixed batch size ``B`` and number of tokens ``N``, with no KV cache and no attention mask: the
graph it returns computes causal self-attention over the ``N`` tokens only. The passes in
:mod:`jetspec_compile.passes` then turn it into a tree-verification step over a static KV cache. Nothing here
knows about a particular model family: the decoder layers are found as the module list holding one module per
hidden layer, and attention is found later by op.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import UnsupportedModelError
from .interface import KVLayout, VerifyInterface

logger = logging.getLogger(__name__)

__all__ = ["CapturedStep", "capture_step", "find_decoder_layers", "check_causal", "text_config"]


def text_config(model: nn.Module):
    """The config that describes the decoder stack (multimodal wrappers keep it in a sub-config)."""
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


@dataclass
class CapturedStep:
    """A captured step graph and the facts about the model that the passes need.

    Attributes:
        graph_module: the graph; placeholders ``input_ids`` ``[B, N]`` and ``position_ids`` ``[B, N]``; output
            ``(logits [B, N, V],)``. Passes extend it in place.
        model: the eager model the graph was captured from (its parameters are shared, not copied).
        batch_size, budget: the static ``B`` and ``N`` of the graph.
        layers_path: qualified name of the decoder-layer module list in ``model`` (e.g. ``model.layers``).
        num_layers: number of decoder layers.
        hidden_size: width of the residual stream.
        tap_layers: decoder layers whose outputs the step returns as ``hidden`` (set before ``tap_hidden_states``
            to choose them; the pass records its choice here).
        kv: the static KV cache layout (recorded by ``insert_kv_cache``).
        windows: per decoder layer its attention window, None for full attention (recorded by
            ``insert_tree_mask``).
        functional_kv: the graph returns its new keys/values instead of writing the caches
            (``functionalize_kv_writes``).
        alibi_slopes: per decoder layer with an ALiBi bias, its ``[H]`` slopes (recorded by
            ``match_attention_bias``, read by ``insert_tree_alibi``).
        lm_head: the LM head the graph no longer computes (``split_lm_head``): the graph returns the head's input
            instead of the logits, and the runtime applies this :class:`~jetspec_compile.kernels.lm_head.LMHead`.
    """

    graph_module: torch.fx.GraphModule
    model: nn.Module
    batch_size: int
    budget: int
    layers_path: str
    num_layers: int
    hidden_size: int
    tap_layers: tuple[int, ...] | None = None
    kv: KVLayout | None = None
    windows: tuple[int | None, ...] | None = None
    functional_kv: bool = False
    alibi_slopes: dict[int, torch.Tensor] = field(default_factory=dict)
    lm_head: object | None = None

    @property
    def config(self):
        return text_config(self.model)

    @property
    def interface(self) -> VerifyInterface:
        """The rewritten step's inputs and outputs (after the tree-verify pipeline)."""
        if self.kv is None or self.tap_layers is None:
            raise RuntimeError("the step has no verify interface yet: run the tree-verify pipeline on it first")
        return VerifyInterface(self.batch_size, self.budget, self.kv, self.tap_layers, self.functional_kv,
                               self.lm_head is not None)


class _StepModule(nn.Module):
    """``model(input_ids, position_ids)`` with no cache, returning a plain tuple for export."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor):
        out = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False)
        return (out.logits,)


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Find the module list holding one module per decoder layer (``config.num_hidden_layers`` entries)."""
    num_layers = getattr(text_config(model), "num_hidden_layers", None)
    candidates = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and len(mod) == num_layers
    ]
    if len(candidates) != 1:
        raise UnsupportedModelError(
            f"could not identify the decoder layers of {type(model).__name__}: expected exactly one ModuleList "
            f"with config.num_hidden_layers={num_layers} entries, found {[n for n, _ in candidates]}"
        )
    return candidates[0]


def check_causal(model: nn.Module, vocab_size: int) -> None:
    """Refuse models whose earlier positions see later tokens (encoders such as BERT).

    Runs the model twice on four tokens that differ only in the last one; a causal LM gives the same logits
    at the first three positions.
    """
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (1, 4), generator=gen)
    ids2 = ids.clone()
    ids2[0, -1] = (ids[0, -1] + 1) % vocab_size
    device = next(model.parameters()).device
    with torch.no_grad():
        a = model(input_ids=ids.to(device)).logits[0, :3]
        b = model(input_ids=ids2.to(device)).logits[0, :3]
    if not torch.allclose(a, b, atol=1e-4, rtol=1e-4):
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a causal language model: changing the last token changed the "
            "logits of earlier positions. Tree verification needs a decoder-only causal LM "
            "(AutoModelForCausalLM); encoders such as BERT cannot be speculated."
        )


def _ensure_sdpa(model: nn.Module) -> None:
    """Switch attention to SDPA where the model supports it; keep eager attention where it does not (eager-only
    features such as Gemma-2's logit soft-capping), which :func:`~jetspec_compile.passes.match_eager_attention`
    matches by pattern."""
    impl = getattr(model.config, "_attn_implementation", None)
    if impl == "sdpa":
        return
    try:
        model.set_attn_implementation("sdpa")
    except (ValueError, AttributeError) as err:
        if impl != "eager":
            try:
                model.set_attn_implementation("eager")
            except (ValueError, AttributeError) as eager_err:
                raise UnsupportedModelError(
                    f"{type(model).__name__} uses attention implementation {impl!r} and can switch to neither "
                    f"'sdpa' ({err}) nor 'eager' ({eager_err}); jetspec_compile matches those two only."
                ) from eager_err
        logger.info("%s keeps eager attention (no SDPA: %s)", type(model).__name__, err)
        return
    logger.info("switched %s to attn_implementation='sdpa' for capture", type(model).__name__)


def capture_step(model: nn.Module, *, batch_size: int = 1, budget: int = 16) -> CapturedStep:
    """Export one forward step of ``model`` over ``budget`` tokens as an ATen-level FX graph.

    Args:
        model: a Hugging Face causal LM (any family whose attention runs through SDPA).
        batch_size: static batch size ``B`` of the graph.
        budget: static number of tokens ``N`` per step (the tree budget).

    Returns:
        a :class:`CapturedStep` whose graph takes ``(input_ids [B, N], position_ids [B, N])`` and returns
        ``(logits [B, N, V],)``.
    """
    if batch_size < 1 or budget < 1:
        raise ValueError(f"batch_size and budget must be >= 1, got {batch_size} and {budget}")
    config = text_config(model)
    if getattr(model.config, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"{type(model).__name__} is an encoder-decoder model; jetspec_compile speculates decoder-only causal LMs"
        )
    if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no language-model head; load it with AutoModelForCausalLM"
        )
    model.eval()
    _ensure_sdpa(model)
    check_causal(model, config.vocab_size)
    layers_path, layers = find_decoder_layers(model)

    device = next(model.parameters()).device
    input_ids = torch.zeros(batch_size, budget, dtype=torch.long, device=device)
    position_ids = torch.arange(budget, device=device).expand(batch_size, budget).contiguous()
    start = time.perf_counter()
    try:
        with torch.no_grad():
            exported = torch.export.export(_StepModule(model), (input_ids, position_ids), strict=False)
    except Exception as err:  # export's own errors are many types; all mean the same thing here
        raise UnsupportedModelError(
            f"torch.export could not capture one step of {type(model).__name__} over {budget} tokens "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); jetspec_compile rewrites "
            "the exported graph, so a model that does not export cannot be tree-verified"
        ) from err
    unlifted = exported.module()
    # A plain GraphModule (no input-spec hooks, plain positional/keyword calling convention), sharing the
    # model's parameters: the passes add inputs, which the export's pytree spec would reject.
    unlifted.graph._codegen = torch.fx.graph.CodeGen()
    gm = torch.fx.GraphModule(unlifted, unlifted.graph, class_name="JetSpecStep")
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            node.meta["jetspec"] = node.name
    logger.info("captured %s (B=%d, N=%d) in %.2fs", type(model).__name__, batch_size, budget,
                time.perf_counter() - start)
    return CapturedStep(
        graph_module=gm,
        model=model,
        batch_size=batch_size,
        budget=budget,
        layers_path="model." + layers_path,
        num_layers=len(layers),
        hidden_size=config.hidden_size,
    )
