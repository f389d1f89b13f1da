"""JetSpecDrafter: the parallel drafter behind the drafter protocol.

Per row it keeps the injected context keys/values of every committed token (computed from the target's
tapped hidden states, so the target is never run again for the drafter). Each ``draft`` is one drafter step
(:class:`~jetspec_compile.drafter.step.DraftStep`: the keys/values of the tokens committed since the last
step, then a forward over ``[root, MASK × D]``) and a best-first tree over its per-depth distributions. The
step is one callable, ``step_fn``: the PyTorch module by default, or the same step exported to another runtime
(``jetspec_compile.backends.onnx_drafter.OrtDraftStep``), which ``optimize(..., backend="onnxruntime")`` plugs in. With
``path_branches=k`` a second forward re-drafts depths 2.. for the k best depth-1 tokens, each block
``[root, token, MASK × (D-1)]`` (all k in one batch), so those subtrees follow their own path instead of the
shared per-depth marginals (needs a drafter trained with ``reveal_prob > 0``). A drafter with a draft vocabulary
(``ParallelDrafter.restrict_vocab``) scores only those tokens; the tree's indices are mapped back to token ids.
With ``lookup_nodes=n``, prompt-lookup continuations (an :class:`~jetspec_compile.drafter.ngram.NGramDrafter` over
the context, n-grams of 2-3 tokens) are grafted into the tree, up to ``n`` nodes of the same budget (default: three
quarters of it), whenever the context repeats: text the drafter has no reason to predict (an identifier from the
prompt) costs no extra forward. With a ``corpus`` (:class:`~jetspec_compile.drafter.corpus.CorpusIndex`, the
target's own responses to training prompts) the corpus's continuations of the context are merged with the
drafter's tree by score first: the target's stock phrases, which a small drafter predicts a token or two at a
time. When the runtime samples (``set_sampling``) and ``drawn_trees`` is on, a row whose context gives no lookup
or corpus continuation gets a tree of children drawn from the drafter's warped distributions with those
distributions attached (:func:`~jetspec_compile.drafter.drawn_tree.drawn_tree`), so the runtime applies recursive
rejection sampling; rows with a continuation keep the deterministic tree (sample-and-follow). Both are lossless.
"""

from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch

from ..tree import TreeSpec
from .corpus import CorpusIndex
from .drawn_tree import drawn_tree
from .model import ParallelDrafter
from .ngram import NGramDrafter
from .protocol import DraftTree
from .sources import CorpusSource
from .step import DraftStep
from .tree_builder import best_first_tree, graft
from .trie import Trie

__all__ = ["JetSpecDrafter"]

#: the most nodes (and the longest continuation) the default prompt lookup takes
MAX_LOOKUP_NODES = 24


class JetSpecDrafter:
    """Drafter-protocol wrapper of a :class:`ParallelDrafter`.

    Args:
        model: the trained drafter network.
        width: candidates per depth (W) in the best-first tree; 1 gives a chain.
        max_depth: cap on tree depth (default: the drafter's block depth D).
        path_branches: depth-1 candidates whose subtrees are re-drafted conditioned on them (0 = off).
        step_fn: what runs a drafter step, called like :class:`~jetspec_compile.drafter.step.DraftStep`
            (default: that module itself, ``self.step``, with packed linears where they pay).
        lookup_nodes: nodes of each tree that prompt-lookup continuations may take (0 = off; default None:
            three quarters of the budget, at most 24; how that was chosen: ``docs/experiments.md``).
        corpus: a :class:`~jetspec_compile.drafter.corpus.CorpusIndex` of the target's own responses; its
            continuations of the context are merged into the drafter's tree by score (None = off).
        corpus_depth: how deep the corpus's continuations may reach (they are not bound to the block depth).
        drawn_trees: when sampling, draft trees with drawn children and their distributions (rejection
            sampling; path-conditioned branches are not used in them) for rows without a lookup/corpus
            continuation; False (default): best-first trees always (sample-and-follow), which accepted more
            with the shipped drafter (``docs/sampling.md``).
    """

    needs_hidden = True

    def __init__(self, model: ParallelDrafter, width: int = 4, max_depth: int | None = None,
                 path_branches: int = 0, step_fn: Callable | None = None, lookup_nodes: int | None = None,
                 corpus: CorpusIndex | None = None, corpus_depth: int = 16, drawn_trees: bool = False):
        if path_branches < 0:
            raise ValueError(f"path_branches must be >= 0, got {path_branches}")
        if lookup_nodes is not None and lookup_nodes < 0:
            raise ValueError(f"lookup_nodes must be >= 0 (or None: three quarters of the budget), got {lookup_nodes}")
        self.lookup_nodes = lookup_nodes
        self.drawn_trees = drawn_trees
        self.sampling = None  # the runtime's SamplingParams while it samples (set_sampling), else None
        self.corpus = corpus
        self.corpus_source = CorpusSource(corpus, corpus_depth) if corpus is not None else None
        self.lookup = NGramDrafter(max_ngram=3, min_ngram=2, continuation=lookup_nodes or MAX_LOOKUP_NODES,
                                   max_matches=2) if lookup_nodes != 0 else None
        self.model = model.eval()
        self.width = width
        self.path_branches = path_branches
        self.max_depth = min(max_depth or model.cfg.depth, model.cfg.depth)
        cfg = model.cfg
        self.vocab_size = cfg.vocab_size
        self.target_hidden_size = cfg.target_hidden_size
        self.tap_layers = cfg.tap_layers
        self.step = DraftStep(self.model, packed=True).eval()  # linears from packed weights on CPU (fp32, bf16)
        vocab = self.model.draft_vocab
        self._vocab = None if vocab is None else vocab.tolist()  # draft index -> token id
        self.step_fn = step_fn if step_fn is not None else self.step
        self._past: list[list[tuple[torch.Tensor, torch.Tensor]]] = []  # per row, per layer (k, v) [1, H_kv, T, D]
        self._pending: list[list[torch.Tensor]] = []  # per row, tapped states [t, K*H] not yet in _past
        self._length: list[int] = []  # per row, committed tokens (in _past or pending)

    def with_step(self, step_fn: Callable) -> "JetSpecDrafter":
        """A copy (same network and options, fresh state) whose steps run through ``step_fn``."""
        clone = copy.copy(self)
        clone.step_fn = step_fn
        clone._past, clone._pending, clone._length = [], [], []
        clone.lookup = copy.deepcopy(self.lookup)
        clone.corpus_source = copy.copy(self.corpus_source)
        return clone

    def with_dtype(self, dtype: torch.dtype) -> "JetSpecDrafter":
        """A copy (same options, fresh state) whose network computes in ``dtype`` (its own weights, context cache
        and activations; draft log-probabilities stay fp32), e.g. bf16 on CPU: the drafter only proposes, so its
        precision moves acceptance, never the output. ``self`` if it already does."""
        if self.model.fc.weight.dtype == dtype:
            return self
        clone = self.with_step(None)
        clone.model = self.model.cast(dtype)
        clone.step = DraftStep(clone.model, packed=True).eval()
        clone.step_fn = clone.step
        return clone

    def set_sampling(self, params) -> None:
        """Called by the runtime before ``begin``: its sampling parameters (``do_sample`` True), or None (greedy)."""
        self.sampling = params if params is not None and params.do_sample else None

    def _append(self, row: int, hidden: torch.Tensor) -> None:
        if hidden.shape[0]:
            self._pending[row].append(hidden)
            self._length[row] += hidden.shape[0]

    def begin(self, prompts, hidden) -> None:
        if hidden is None:
            raise ValueError("JetSpecDrafter needs the target's tapped hidden states")
        cfg, device, dtype = self.model.cfg, self.model.fc.weight.device, self.model.fc.weight.dtype
        empty = torch.zeros(1, cfg.num_kv_heads, 0, cfg.head_dim, device=device, dtype=dtype)
        self._past = [[(empty, empty)] * cfg.num_layers for _ in prompts]
        self._pending = [[] for _ in prompts]
        self._length = [0] * len(prompts)
        for row, h in enumerate(hidden):
            self._append(row, h)
        for source in self._sources():
            source.begin(prompts)

    def advance(self, accepted, hidden) -> None:
        for row, h in enumerate(hidden):
            self._append(row, h)
        for source in self._sources():
            source.advance(accepted)

    def _sources(self) -> list:
        return [s for s in (self.corpus_source, self.lookup) if s is not None]

    @torch.no_grad()
    def _block_logprobs(self, row: int, root: int, given: Sequence[int | None]) -> torch.Tensor:
        """One drafter forward over ``len(given)`` blocks ``[root, g, MASK...]`` (``g=None``: all MASK; ``g`` a
        token id) after the row's context; returns log-probabilities ``[M, D, V]`` (index i = depth i + 1; over
        the draft vocabulary's ``V'`` entries if the drafter has one)."""
        cfg = self.model.cfg
        p, s, m = self._length[row], cfg.block_size, len(given)
        device = self.model.fc.weight.device
        pending = self._pending[row]
        hidden = (torch.cat(pending) if len(pending) > 1 else pending[0]) if pending else \
            torch.zeros(0, len(cfg.tap_layers) * cfg.target_hidden_size, device=device)
        past = self._past[row]
        start = past[0][0].shape[2]  # tokens already in the cache; the pending ones follow
        revealed = torch.full((1, m, s - 1), -1, dtype=torch.long, device=device)  # -1: MASK
        for j, g in enumerate(given):
            if g is not None and s > 1:
                revealed[0, j, 0] = g
        logprobs, new = self.step_fn(
            hidden=hidden[None].to(device), positions=torch.arange(start, p, device=device)[None],
            anchors=torch.full((1, m), root, dtype=torch.long, device=device), revealed=revealed,
            block_positions=torch.arange(p, p + s, device=device).repeat(m)[None], past=past)
        self._past[row] = [(torch.cat([pk, nk.to(device)], 2), torch.cat([pv, nv.to(device)], 2))
                           for (pk, pv), (nk, nv) in zip(past, new)]
        self._pending[row] = []
        return logprobs.to(device)  # [M, D, V]

    def depth_logprobs(self, row: int, root: int) -> torch.Tensor:
        """Draft log-probabilities ``[D, V]`` of depths 1..D after the row's context and ``root``."""
        return self._block_logprobs(row, root, [None])[0, :self.max_depth]

    def draft(self, roots: Sequence[int], budget: int) -> list[DraftTree]:
        """Per row: the network's best-first tree, merged by score with the corpus's continuations, then the
        prompt-lookup continuations grafted in first (up to ``lookup_nodes`` of the budget)."""
        out = []
        nodes = 0
        if self.lookup is not None and budget > 1:
            nodes = self.lookup_nodes if self.lookup_nodes is not None else min(MAX_LOOKUP_NODES, 3 * budget // 4)
        for row, root in enumerate(roots):
            root = int(root)
            logprobs = self.depth_logprobs(row, root)
            found = self.corpus_source.trie(row, root, budget) if self.corpus_source is not None and budget > 1 \
                else None
            lookup = self.lookup.trie(row, root, nodes + 1) if nodes else None
            if self.sampling is not None and self.drawn_trees and (found is None or len(found) <= 1) and \
                    (lookup is None or len(lookup) <= 1):
                s = self.sampling
                out.append(drawn_tree(root, logprobs, budget, self.width, s.temperature, s.top_k, s.top_p, s.generator,
                                      self.model.draft_vocab, self.vocab_size))
                continue
            branches = None
            k = min(self.path_branches, self.width, budget - 1)
            if k > 0 and self.max_depth > 1:
                firsts = logprobs[0].topk(k).indices.tolist()
                if self._vocab is not None:
                    firsts = [self._vocab[i] for i in firsts]
                again = self._block_logprobs(row, root, firsts)  # [k, S, V]
                branches = {rank: again[rank, 1:self.max_depth] for rank in range(k)}
            tokens, tree, scores = best_first_tree(root, logprobs, budget, self.width, branches, with_scores=True)
            if self._vocab is not None:
                tokens = (root,) + tuple(self._vocab[i] for i in tokens[1:])
            if found is not None and len(found) > 1:
                trie = Trie.from_tree(tokens, tree, scores)
                trie.merge(found)
                tokens, tree = trie.best(budget)
            if lookup is not None and len(lookup) > 1:
                tokens, tree = graft(tokens, tree, lookup.tokens, TreeSpec(tuple(lookup.parents)), budget)
            out.append(DraftTree(tokens, tree))
        return out
