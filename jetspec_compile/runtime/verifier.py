"""TreeVerifier: the lower-level API over a rewritten target — ``prefill``, ``verify``, ``commit``.

Data flow: ``capture_step`` → ``TREE_VERIFY_PIPELINE`` (passes) → optional lowering (``compile_fn``) → this
object, which owns the static KV cache and feeds the graph its explicit inputs (tokens, depths, ancestor mask,
cache slots). The committed prefix lives in the cache; the *pending* token (last emitted, not yet in the cache)
is the root of the next tree.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from typing import Callable, Sequence

import torch
from torch import nn

from ..capture import text_config
from ..compiler import build_verify_step
from ..kernels.cpu_linear import PackedLinearMode
from ..kv_cache import StaticKVCache
from ..tree import TreeSpec, ancestor_mask, depths, pad_tree
from . import prefill as prefill_paths
from .self_check import check_against_eager

logger = logging.getLogger(__name__)

__all__ = ["TreeVerifier"]

#: cache views are cut to a multiple of this many slots (attention only reads what is in use)
SLOT_BUCKET = 64


@functools.lru_cache(maxsize=256)
def _tree_tensors(tree: TreeSpec) -> tuple[torch.Tensor, torch.Tensor]:
    return depths(tree), ancestor_mask(tree)


def _dense(t: torch.Tensor) -> torch.Tensor:
    """Standard strides even on size-1 dims (``contiguous()`` keeps a slice's odd stride there)."""
    strides, step = [], 1
    for size in reversed(t.shape):  # the strides of a fresh contiguous tensor of this shape
        strides.append(step)
        step *= max(size, 1)
    return t if t.stride() == tuple(reversed(strides)) else t.clone(memory_format=torch.contiguous_format)


class TreeVerifier:
    """Verify token trees against a Hugging Face causal LM in one forward per tree.

    Args:
        model: the target model (any family the passes match).
        max_cache_len: static KV cache size ``L`` (prompt + generated tokens + one tree must fit).
        batch_size: rows per call.
        budget: tree budget ``N``; smaller trees are padded to it (or to the smallest of ``extra_budgets``
            that holds them: one more graph per extra budget, all sharing one KV cache).
        tap_layers: decoder layers whose hidden states ``verify`` returns (default: 5 spread layers).
        compile_fn: optional lowering ``CapturedStep -> callable`` of the rewritten graph (see
            :func:`jetspec_compile.backends.lower`); the callable takes the graph's inputs by name.
        self_check: compare the rewritten graph with the eager model once at construction.
        prefill_chunk: prompts longer than ``budget`` are prefilled in chains of this many tokens (one more
            graph, captured on first use), so a small tree budget does not mean many prefill forwards.
        model_prefill: prefill with one forward of the model itself (what ``generate`` runs) and copy its keys
            and values into the static cache, instead of chains of graph calls. It is used only where it provably
            fills the same state: no tap on the last layer (HF returns that one after the final norm), a cache of
            one full ``[B, H_kv, P, D]`` tensor per layer (not a sliding-window layer holding fewer), and a
            comparison with the graph's own prefill on the first call; otherwise the graph prefills.
        prefill_linear: run that forward's fp32 CPU linears from packed weights (one copy, packed on first use;
            :class:`~jetspec_compile.kernels.cpu_linear.PackedLinearMode`) with this kernel setting (``"auto"``,
            ``"mkl"``, ``"onednn"``); None: the model's own linears, as ``generate`` runs them.
    """

    def __init__(self, model: nn.Module, *, max_cache_len: int = 1024, batch_size: int = 1, budget: int = 16,
                 tap_layers: Sequence[int] | None = None, compile_fn: Callable | None = None,
                 self_check: bool = True, run_checks: bool = False, extra_budgets: Sequence[int] = (),
                 prefill_chunk: int = 64, model_prefill: bool = True, prefill_linear: str | None = None):
        if max_cache_len < budget + 2:
            raise ValueError(f"max_cache_len={max_cache_len} leaves no room for a prompt and a tree of "
                             f"budget={budget}; use at least {budget + 2}")
        start = time.perf_counter()
        self.model = model
        self.step, self.pass_results = build_verify_step(
            model, batch_size=batch_size, budget=budget, tap_layers=tap_layers, run_checks=run_checks)
        self.capture_seconds = time.perf_counter() - start
        self.graph = self.step.graph_module if compile_fn is None else compile_fn(self.step)
        self.batch_size, self.budget = batch_size, budget
        bad = [b for b in extra_budgets if not 1 <= b < budget]
        if bad:
            raise ValueError(f"extra budgets {bad} must lie in [1, budget={budget})")
        self.budgets = tuple(sorted(set(extra_budgets) | {budget}))
        self._graphs = {budget: self.graph}
        self._compile_fn, self._run_checks = compile_fn, run_checks
        self.prefill_chunk = max(budget, min(prefill_chunk, max_cache_len - 1))
        self.interface = self.step.interface
        # per graph size: the LM head its lowering left to the runtime (passes.split_lm_head), or None
        self._heads = {budget: self.step.lm_head}
        self.tap_layers = self.interface.tap_layers
        kv = self.interface.kv
        self.device = next(model.parameters()).device
        self.cache = StaticKVCache(kv.num_layers, batch_size, kv.heads, kv.head_dim, max_cache_len, kv.dtype,
                                   self.device)
        self.base_position = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self._views: tuple[torch.Tensor | None, dict[int, list[torch.Tensor]]] = (None, {})  # see _run
        self._pending: list[TreeSpec] | None = None
        # None: not yet compared with the graph's prefill (done on the first prefill); then True / False
        self._model_prefill = None if model_prefill and max(self.tap_layers) < kv.num_layers - 1 else False
        self.prefill_mode = (PackedLinearMode(prefill_linear) if prefill_linear is not None
                             and self.device.type == "cpu" else contextlib.nullcontext())  # see prefill_with_model
        if self_check:
            check_against_eager(self)

    # -- properties ---------------------------------------------------------------------------------------
    @property
    def max_cache_len(self) -> int:
        return self.cache.max_length

    @property
    def heads(self) -> dict:
        """Per graph size captured so far: the LM head its lowering left to the runtime, or None (in the graph)."""
        return dict(self._heads)

    @property
    def head(self):
        """The LM head the lowering left to the runtime (:func:`~jetspec_compile.passes.split_lm_head`; a
        :class:`~jetspec_compile.kernels.lm_head.LMHead`) for the largest budget's graph, or None: in the graph."""
        return self._heads[self.budget]

    @property
    def committed_length(self) -> int:
        """Slots in use (shared by all rows; includes left padding and holes)."""
        return self.cache.length

    @property
    def vocab_size(self) -> int:
        return text_config(self.model).vocab_size

    @property
    def hidden_size(self) -> int:
        return self.step.hidden_size

    def reset(self) -> None:
        self.cache.reset()
        self.base_position.zero_()
        self._pending = None

    @property
    def defragmentations(self) -> int:
        """How often the cache was compacted since it was created."""
        return self.cache.defragmentations

    def make_room(self) -> None:
        """Compact the cache when a tree of the largest budget would no longer fit after the committed slots."""
        if self.cache.room() < self.budget:
            self.cache.defragment()

    def budget_for(self, n: int) -> int:
        """The graph size a tree of ``n`` nodes runs in (the smallest budget that holds it)."""
        return next(b for b in self.budgets if b >= n)

    def _graph(self, n: int):
        if n not in self._graphs:  # captured on first use; same tap layers, same cache layout
            step, _ = build_verify_step(self.model, batch_size=self.batch_size, budget=n,
                                        tap_layers=self.tap_layers, run_checks=self._run_checks)
            self._graphs[n] = step.graph_module if self._compile_fn is None else self._compile_fn(step)
            self._heads[n] = step.lm_head
        return self._graphs[n]

    def prepare(self) -> list[int]:
        """Capture and lower every graph now (each budget, and the prefill chunk unless the model itself
        prefills) instead of on first use; returns their sizes. Ahead-of-time backends save them here."""
        sizes = sorted(set(self.budgets) | (set() if self._model_prefill is not False else {self.prefill_chunk}))
        for n in sizes:
            self._graph(n)
        return sizes

    # -- the step -----------------------------------------------------------------------------------------
    @staticmethod
    def _logits(out: torch.Tensor, head) -> torch.Tensor:
        """The logits of a graph's first output: itself, or ``head``'s logits of it where the head was split off."""
        return out if head is None else head.logits(out)

    def _run(self, tokens: torch.Tensor, depth: torch.Tensor, tree_mask: torch.Tensor, start: int):
        """One graph call writing ``n = tokens.shape[1]`` nodes at slots ``start .. start + n - 1``. Returns the
        graph's outputs, logits (or the LM head's input, see :meth:`_logits`) and the tapped hidden states, and the
        graph's split-off head (None: the first output is the logits)."""
        n = tokens.shape[1]
        graph = self._graph(n)
        length = min(self.cache.max_length, -(-(start + n) // SLOT_BUCKET) * SLOT_BUCKET)
        valid = self.cache.valid[:, :length].clone()
        valid[:, start:] = False
        if self._views[0] is not self.cache.kv:  # views per length are made once per cache tensor
            self._views = (self.cache.kv, {})
        caches = self._views[1].get(length)
        if caches is None:
            caches = self._views[1][length] = self.cache.views(length)
        inputs = self.interface.feed(  # contiguous: compiled backends guard on strides
            input_ids=_dense(tokens), base_position=self.base_position, depth=_dense(depth),
            write_slots=torch.arange(start, start + n, device=self.device), tree_mask=_dense(tree_mask),
            cache_valid=valid, cache_positions=self.cache.positions[:, :length], caches=caches)
        with torch.no_grad():
            out, hidden = graph(**inputs)
        return out, hidden, self._heads[n]  # [B, N, V] (or [B, N, H]), [B, N, K*H]

    def _check_batch(self, tensor: torch.Tensor, name: str) -> None:
        if tensor.dtype.is_floating_point or tensor.is_complex():
            raise TypeError(f"{name} must be an integer tensor, got dtype {tensor.dtype}; convert it with .long()")
        if tensor.dim() != 2 or tensor.shape[0] != self.batch_size:
            raise ValueError(f"{name} must have shape [batch={self.batch_size}, tokens], got {tuple(tensor.shape)}")
        if tensor.device != self.device:
            raise ValueError(f"{name} is on {tensor.device} but the model is on {self.device}; move it with .to()")

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """Commit a (left-padded) prompt to the cache.

        input_ids, attention_mask: [B, P]. Returns ``(logits [B, V], hidden [B, P, K*H])``: the logits at the
        last prompt position (they predict the first new token) and the tapped hidden states of every prompt
        position. Resets any earlier state.
        """
        self._check_batch(input_ids, "input_ids")
        b, p = input_ids.shape
        if p == 0:
            raise ValueError("the prompt is empty: give at least one token")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        self._check_batch(attention_mask, "attention_mask")
        n = self.budget if p <= self.budget else self.prefill_chunk  # chain chunks of n tokens
        if max(p, n) > self.cache.max_length - 1:
            raise ValueError(
                f"prompt of {p} tokens does not fit max_cache_len={self.cache.max_length} with a tree of {n} "
                "nodes; raise max_cache_len or shorten the prompt")
        if bool((attention_mask.sum(1) == 0).any()):
            raise ValueError("a row of attention_mask is all zeros: every prompt needs at least one real token")
        self.reset()
        real = attention_mask.bool()
        positions = (real.long().cumsum(1) - 1).clamp(min=0)
        if self._model_prefill is None:
            self._model_prefill = prefill_paths.model_prefill_agrees(self)
            self.reset()
        if self._model_prefill:
            done = prefill_paths.prefill_with_model(self, input_ids, real, positions)
            if done is not None:
                return done
        return prefill_paths.prefill_with_graph(self, input_ids, real, positions, n)

    def verify(self, tokens: torch.Tensor, trees: TreeSpec | Sequence[TreeSpec]):
        """Run one tree per row through the target in one forward.

        tokens: [B, n] node tokens (node 0 = the pending root token), n <= budget; trees: one TreeSpec for
        all rows or one per row, each of n nodes. Returns ``(logits [B, n, V], hidden [B, n, K*H])``; the
        logits at node i are the target's next-token logits after the root-to-i path.
        """
        out, hidden, head = self._verify(tokens, trees)
        return self._logits(out, head), hidden

    def verify_greedy(self, tokens: torch.Tensor, trees: TreeSpec | Sequence[TreeSpec]):
        """:meth:`verify` for greedy decoding: returns ``(target [B, n] int64, hidden [B, n, K*H])``, the argmax of
        every node's logits (through the certified LM head where the lowering split it off)."""
        out, hidden, head = self._verify(tokens, trees)
        return (out.argmax(-1) if head is None else head.argmax(out)), hidden

    def _verify(self, tokens: torch.Tensor, trees: TreeSpec | Sequence[TreeSpec]):
        self._check_batch(tokens, "tokens")
        b, n = tokens.shape
        trees = [trees] * b if isinstance(trees, TreeSpec) else list(trees)
        if len(trees) != b:
            raise ValueError(f"got {len(trees)} trees for a batch of {b}")
        for i, tree in enumerate(trees):
            if not isinstance(tree, TreeSpec):
                raise TypeError(f"trees[{i}] must be a TreeSpec, got {type(tree).__name__}")
            if len(tree) != n:
                raise ValueError(f"trees[{i}] has {len(tree)} nodes but {n} tokens were given")
        if n > self.budget:
            raise ValueError(f"tree of {n} nodes exceeds the verify budget {self.budget}")
        if self.cache.length == 0:
            raise RuntimeError("call prefill() before verify()")
        size = self.budget_for(n)
        self.cache.check_room(size)
        vocab = self.vocab_size
        if bool(((tokens < 0) | (tokens >= vocab)).any()):
            raise ValueError(f"token ids must lie in [0, {vocab})")
        padded = [_tree_tensors(pad_tree(t, size)) for t in trees]
        depth = torch.stack([d for d, _ in padded]).to(self.device)
        tree_mask = torch.stack([m for _, m in padded]).to(self.device)
        ids = torch.nn.functional.pad(tokens, (0, size - n))
        out, hidden, head = self._run(ids, depth, tree_mask, self.cache.length)
        self._pending = trees
        return out[:, :n], hidden[:, :n], head

    def commit(self, accepted: Sequence[Sequence[int]]) -> None:
        """Keep each row's accepted root-to-node path of the last verified tree; drop the rest.

        accepted: per row, node indices from the root (0) down one path, e.g. ``[0, 2, 5]``, or ``[]`` for a row
        that keeps nothing (it finished). Their keys and values move to the slots right after the committed
        prefix, so the next step sees a clean prefix.
        """
        if self._pending is None:
            raise RuntimeError("commit() needs a verify() first")
        if len(accepted) != self.batch_size:
            raise ValueError(f"got accepted paths for {len(accepted)} rows, batch is {self.batch_size}")
        for row, (path, tree) in enumerate(zip(accepted, self._pending)):
            path = list(path)
            if not path:
                continue  # a finished row keeps nothing
            if path[0] != 0:
                raise ValueError(f"row {row}: an accepted path starts at the root node 0, got {path}")
            for parent, child in zip(path, path[1:]):
                if not 0 <= child < len(tree) or tree.parents[child] != parent:
                    raise ValueError(f"row {row}: {path} is not a root-to-node path of the verified tree")
        counts = torch.tensor([len(p) for p in accepted], device=self.device)
        width = int(counts.max())
        if width == 0:
            self._pending = None
            return
        slots = torch.tensor([list(p) + [p[-1] if p else 0] * (width - len(p)) for p in accepted],
                             device=self.device)
        start = self.cache.length
        positions = self.base_position[:, None] + torch.arange(width, device=self.device)[None]
        in_place = all(list(p) == list(range(len(p))) for p in accepted)  # each path is nodes 0, 1, 2, ...
        self.cache.commit(slots + start, counts, positions, in_place=in_place)
        self.base_position = self.base_position + counts
        self._pending = None
