"""``optimize(model)``: a speculative model with an HF-style ``generate``.

``optimize`` works three ways::

    spec = jetspec_compile.optimize(model, drafter=NGramDrafter(), budget=16)

    @jetspec_compile.optimize(budget=16)          # on a function or class that builds an HF model
    def load(): return AutoModelForCausalLM.from_pretrained(...)

    torch.compile(fn, backend="jetspec")          # the lowering backend (see jetspec_compile.backends)
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
from typing import Callable, Sequence

import torch
from torch import nn

from ..backends import LoweringOptions, lower, lower_drafter
from ..capture import text_config
from ..config import JetSpecConfig
from ..drafter.ngram import NGramDrafter
from .loop import LoopStats, SamplingParams, speculative_generate
from .scheduler import BatchScheduler, Request, shared_lock
from .verifier import TreeVerifier

logger = logging.getLogger(__name__)

__all__ = ["SpecModel", "attach_drafter", "optimize"]


class SpecModel:
    """A target model wrapped for lossless speculative decoding (build it with :func:`optimize`).

    Attributes:
        model: the unmodified HF model (still usable on its own).
        drafter: the drafter proposing trees (as given; ``generate`` runs :meth:`runtime_drafter`).
        config: the :class:`~jetspec_compile.config.JetSpecConfig`.
        last_stats: statistics of this thread's last ``generate`` call, a
            :class:`~jetspec_compile.runtime.loop.LoopStats` (``tau``, ``target_forwards``, ``tokens_per_second``,
            ``acceptance_histogram``, ...; read as attributes or by name; ``batch_size``: rows of the loop it ran
            in, which are more than its own when it was batched with other calls).

    ``generate`` is safe to call from several threads (see :mod:`jetspec_compile.runtime.scheduler`): one loop
    runs at a time, every output is what the call gives alone, a streamer sees only its own call's tokens; with
    ``max_batch > 1`` overlapping greedy calls share one batched loop. Models sharing a drafter object or a
    target module take turns on it. The lower-level :class:`TreeVerifier` and drafters are not thread-safe.
    """

    def __init__(self, model: nn.Module, drafter=None, config: JetSpecConfig | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"optimize() needs a Hugging Face model (nn.Module), got {type(model).__name__}")
        self.model = model.eval()
        self.config = config or JetSpecConfig()
        self.drafter = drafter if drafter is not None else NGramDrafter()
        _check_drafter(self.drafter, model)
        self._verifiers: dict[int, TreeVerifier] = {}
        self._runtime_drafter = None
        self._build_lock = threading.RLock()  # verifiers and the runtime drafter are built once
        self._scheduler = BatchScheduler(self._run_loop, max_batch=self.config.max_batch)
        self._local = threading.local()

    @property
    def last_stats(self) -> LoopStats:
        return getattr(self._local, "stats", None) or LoopStats()

    @last_stats.setter
    def last_stats(self, stats: LoopStats) -> None:
        self._local.stats = stats

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def verifier(self, batch_size: int) -> TreeVerifier:
        """The tree verifier for ``batch_size`` rows (captured and lowered on first use, then reused)."""
        with self._build_lock, shared_lock(self.model):  # a capture swaps the target's parameters for a moment
            return self._verifier(batch_size)

    def _verifier(self, batch_size: int) -> TreeVerifier:
        if batch_size not in self._verifiers:
            tap_layers = self.config.tap_layers or getattr(self.drafter, "tap_layers", None)
            options = LoweringOptions.from_config(self.config)
            self._verifiers[batch_size] = TreeVerifier(
                self.model, max_cache_len=self.config.max_cache_len, batch_size=batch_size,
                budget=self.config.max_budget, tap_layers=tap_layers, self_check=self.config.self_check,
                compile_fn=lower(self.config.backend, options), prefill_linear=options.cpu_linear,
                extra_budgets=[b for b in self.config.budgets if b < self.config.max_budget])
        return self._verifiers[batch_size]

    def runtime_drafter(self):
        """The drafter as ``generate`` runs it: lowered to the backend where it has a drafter lowering (with
        ``onnxruntime``, a copy of a JetSpec drafter whose steps run an exported ONNX graph; exported on first
        use), else the drafter itself."""
        with self._build_lock, shared_lock(self.model):  # an export traces the target's shared embeddings too
            return self._lower_drafter()

    def _lower_drafter(self):
        if self._runtime_drafter is None or self._runtime_drafter[0] is not self.drafter:  # drafter swapped
            lowered = lower_drafter(self.config.backend, self.drafter, LoweringOptions.from_config(self.config))
            self._runtime_drafter = (self.drafter, lowered)
        return self._runtime_drafter[1]

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None,
                 eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
                 streamer=None, generator: torch.Generator | None = None, **unsupported) -> torch.Tensor:
        """Generate like ``model.generate`` (greedy output is token-identical to it).

        Args mirror HF ``generate``: ``input_ids``/``attention_mask`` ``[B, P]`` (left-padded for B > 1),
        ``max_new_tokens`` (never exceeded), ``do_sample``/``temperature``/``top_k``/``top_p``,
        ``eos_token_id`` (an id or a list; default: the model's generation config), ``pad_token_id`` (fills
        rows that finished early), ``streamer`` (an HF ``TextStreamer``/``TextIteratorStreamer``, batch 1) and
        ``generator`` (seeds sampling). Returns ``[B, P + new]`` like HF.
        """
        if unsupported:
            raise TypeError(f"generate() got unsupported arguments {sorted(unsupported)}; supported are input_ids, "
                            "attention_mask, max_new_tokens, do_sample, temperature, top_k, top_p, eos_token_id, "
                            "pad_token_id, streamer, generator")
        input_ids, attention_mask = self._check_inputs(input_ids, attention_mask, max_new_tokens)
        params = SamplingParams(do_sample, temperature, top_k, top_p, generator)
        gen_cfg = getattr(self.model, "generation_config", None)
        if eos_token_id is None:
            eos_token_id = getattr(gen_cfg, "eos_token_id", None)
        eos = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        if pad_token_id is None:
            pad_token_id = getattr(gen_cfg, "pad_token_id", None)
            pad_token_id = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
        batch = input_ids.shape[0]
        if streamer is not None:
            if batch != 1:
                raise ValueError("streamers support batch size 1 only (as in HF generate)")
            streamer.put(input_ids.cpu())
        emit = (lambda row, toks: streamer.put(torch.tensor(toks))) if streamer is not None else None
        # greedy, left-padded calls with the same length and EOS ids may share a loop; sampling runs alone
        batchable = not params.do_sample and bool(attention_mask[:, -1].all())
        request = _GenerateRequest(input_ids, attention_mask, (max_new_tokens, tuple(eos)) if batchable else None,
                                   emit, params=params, max_new_tokens=max_new_tokens, eos=eos)
        try:
            outputs, stats = self._scheduler.submit(request)
        finally:
            if streamer is not None:
                streamer.end()
        self.last_stats = stats
        width = max(len(o) for o in outputs)
        new = torch.full((batch, width), pad_token_id, dtype=torch.long)
        for r, o in enumerate(outputs):
            new[r, :len(o)] = torch.tensor(o, dtype=torch.long)
        return torch.cat([input_ids, new.to(input_ids.device)], dim=1)

    def _run_loop(self, input_ids, attention_mask, requests, emit):
        """One speculative loop over a (merged) batch; the scheduler runs one at a time."""
        first = requests[0]
        verifier = self.verifier(input_ids.shape[0])
        drafter = self.runtime_drafter()
        # models sharing the target or the drafter take turns (a verifier may capture more graphs mid-loop)
        with shared_lock(self.model), shared_lock(drafter):
            try:
                return speculative_generate(
                    verifier, drafter, input_ids, attention_mask, max_new_tokens=first.max_new_tokens,
                    params=first.params, eos_token_ids=first.eos, budgets=self.config.budgets, emit=emit)
            finally:
                verifier.reset()  # a drafter or user error mid-generation leaves a clean verifier behind

    def _check_inputs(self, input_ids, attention_mask, max_new_tokens):
        if not torch.is_tensor(input_ids):
            raise TypeError(f"input_ids must be a tensor [B, P], got {type(input_ids).__name__}")
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool or input_ids.is_complex():
            raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}; tokenize the text "
                            "(tokenizer(..., return_tensors='pt')) or convert with input_ids.long()")
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be a non-empty [B, P] tensor, got shape {tuple(input_ids.shape)}")
        if input_ids.device != self.device:
            raise ValueError(f"input_ids are on {input_ids.device} but the model is on {self.device}; move them "
                             "with input_ids.to(model.device)")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        elif attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                             f"{tuple(input_ids.shape)}")
        if input_ids.shape[0] > 1 and bool((attention_mask[:, -1] == 0).any()):
            raise ValueError("batched prompts must be left-padded (tokenizer.padding_side = 'left')")
        vocab = text_config(self.model).vocab_size
        if bool(((input_ids < 0) | (input_ids >= vocab)).any()):
            raise ValueError(f"input_ids contain ids outside the vocabulary [0, {vocab})")
        need = input_ids.shape[1] + max_new_tokens + self.config.max_budget
        if need > self.config.max_cache_len:
            raise ValueError(
                f"prompt ({input_ids.shape[1]}) + max_new_tokens ({max_new_tokens}) + tree budget "
                f"({self.config.max_budget}) = {need} exceeds max_cache_len={self.config.max_cache_len}; pass a larger "
                "max_cache_len to optimize()")
        return input_ids, attention_mask


@dataclasses.dataclass(eq=False)
class _GenerateRequest(Request):
    """A ``generate`` call's loop settings (shared by every request of a batch: equal keys)."""

    params: SamplingParams = SamplingParams()
    max_new_tokens: int = 0
    eos: list[int] = dataclasses.field(default_factory=list)


def _check_drafter(drafter, model) -> None:
    for method in ("begin", "draft", "advance"):
        if not callable(getattr(drafter, method, None)):
            raise TypeError(f"drafter {type(drafter).__name__} lacks {method}(); see jetspec_compile.drafter.Drafter")
    config = text_config(model)
    vocab = getattr(drafter, "vocab_size", None)
    if vocab is not None and vocab != config.vocab_size:
        raise ValueError(f"drafter vocabulary ({vocab}) does not match the target's ({config.vocab_size}); "
                         "train or load a drafter for this target")
    hidden = getattr(drafter, "target_hidden_size", None)
    if hidden is not None and hidden != config.hidden_size:
        raise ValueError(f"drafter expects target hidden size {hidden}, the target has {config.hidden_size}; "
                         "this drafter was trained for another model")
    layers = getattr(drafter, "tap_layers", None)
    if layers is not None and max(layers) >= config.num_hidden_layers:
        raise ValueError(f"drafter taps layers {tuple(layers)} but the target has {config.num_hidden_layers} layers")


def optimize(model: nn.Module | Callable | None = None, drafter=None, **options):
    """Wrap an HF causal LM for lossless speculative decoding; also a decorator.

    Args:
        model: the target model, or a function/class that builds one (decorator use), or None (then a
            decorator is returned: ``@optimize(drafter=..., budget=...)``).
        drafter: anything following :class:`jetspec_compile.drafter.Drafter`; default: the training-free
            :class:`~jetspec_compile.drafter.NGramDrafter`.
        **options: fields of :class:`~jetspec_compile.config.JetSpecConfig` (unknown names raise).

    Returns:
        a :class:`SpecModel` (or a decorator / wrapped builder).
    """
    config = JetSpecConfig.from_options(**options)
    if model is None:
        return lambda builder: optimize(builder, drafter, **options)
    if isinstance(model, nn.Module):
        return SpecModel(model, drafter, config)
    if callable(model):
        @functools.wraps(model)
        def build(*args, **kwargs):
            return SpecModel(model(*args, **kwargs), drafter, config)
        return build
    raise TypeError(f"optimize() needs a model or a function building one, got {type(model).__name__}")


def attach_drafter(model: nn.Module, drafter, **options) -> SpecModel:
    """Attach a parallel drafter to ``model``: the verify graph's ``tap_hidden_states`` pass taps exactly the
    drafter's layers, so every verification also yields the drafter's next context (no extra target forward).

    ``drafter``: a :class:`~jetspec_compile.drafter.JetSpecDrafter`, a ``ParallelDrafter`` network, or a
    checkpoint folder. Options as for :func:`optimize` (``tap_layers`` is taken from the drafter).
    """
    from ..drafter import JetSpecDrafter, ParallelDrafter, check_drafter_fits, load_jetspec_drafter

    if isinstance(drafter, ParallelDrafter):
        drafter = JetSpecDrafter(drafter)
    elif not isinstance(drafter, JetSpecDrafter):
        drafter = load_jetspec_drafter(drafter, model)
    check_drafter_fits(drafter.model.cfg, model)
    if options.get("tap_layers") not in (None, drafter.tap_layers):
        raise ValueError(f"tap_layers {options['tap_layers']} conflict with the drafter's {drafter.tap_layers}")
    options["tap_layers"] = drafter.tap_layers
    return optimize(model, drafter=drafter, **options)
