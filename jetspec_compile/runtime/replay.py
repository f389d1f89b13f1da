"""Replay: a drafter's greedy acceptance on a known reference output, without running the speculative loop.

Under greedy decoding the loop's output is the target's greedy continuation, fixed before any drafting. So the
accepted path of every step follows from the reference alone: walk the drafted tree along the reference tokens.
What the drafter sees is fixed too: the prompt, then per step the accepted tokens and the target's tapped hidden
states at their positions, which one prefill of ``prompt + reference`` gives for every position at once. A
replay thus costs one target forward per prompt plus the drafter's own steps, instead of one target forward per
step, and gives the loop's acceptance histogram (equal to it up to the float rounding between a prefill's taps
and a tree verification's, which can flip a near-tie in the drafter's ranking).

It serves drafter evaluation (``bench_tau.py --replay``) on many prompts: τ needs no timing and no verification.
The references are HF greedy decoding with EOS ignored (:func:`greedy_reference`), ``max_new_tokens`` plus the
deepest tree's depth, so that the last step's path can run past the cut as it does in the loop.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import torch

from ..compat import cache_argument, returned_cache
from .acceptance import accept_greedy
from .loop import SamplingParams, draft
from .prefill import _takes_logits_to_keep
from .verifier import TreeVerifier

__all__ = ["greedy_reference", "reference_taps", "replay_acceptance"]


@torch.no_grad()
def greedy_reference(model, prompt: Sequence[int], new_tokens: int) -> list[int]:
    """``new_tokens`` greedy tokens after ``prompt``, not stopping at EOS (the loop stops there;
    :func:`replay_acceptance` cuts the reference itself). The forwards are those of HF greedy ``generate``: the
    prompt, then one token at a time on the model's own cache (``generate`` cannot be told to ignore EOS)."""
    x = torch.tensor([list(prompt)], device=next(model.parameters()).device)
    out = model(input_ids=x, use_cache=True, logits_to_keep=1) if _takes_logits_to_keep(type(model)) else \
        model(input_ids=x, use_cache=True)
    tokens: list[int] = []
    for i in range(new_tokens):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)  # [1, 1]
        tokens.append(int(nxt))
        if i + 1 == new_tokens:
            break
        position = torch.tensor([[x.shape[1] + i]], device=x.device)
        out = model(input_ids=nxt, **{cache_argument(model): returned_cache(out)}, position_ids=position,
                    use_cache=True)
    return tokens


@torch.no_grad()
def reference_taps(verifier: TreeVerifier, prompt: Sequence[int], reference: Sequence[int]) -> torch.Tensor:
    """The target's tapped hidden states ``[1, T, K*H]`` at every position of ``prompt + reference[:-1]`` (one
    prefill of the verifier, which is left reset)."""
    ids = torch.tensor([[int(t) for t in prompt] + [int(t) for t in reference[:-1]]], device=verifier.device)
    _, hidden = verifier.prefill(ids)
    verifier.reset()
    return hidden


def _reference_targets(tree_parents: Sequence[int], tokens: Sequence[int], reference: Sequence[int],
                       root_index: int) -> list[int]:
    """The target's argmax at every node, as far as the reference tells it: a node whose root path spells the
    reference gets the next reference token; others get -1 (greedy acceptance never reaches them)."""
    depth, on_path = [0] * len(tokens), [True] * len(tokens)
    target = [-1] * len(tokens)
    for i, parent in enumerate(tree_parents):
        if parent >= 0:
            depth[i] = depth[parent] + 1
            j = root_index + depth[i]
            on_path[i] = on_path[parent] and j < len(reference) and reference[j] == tokens[i]
        nxt = root_index + depth[i] + 1
        if on_path[i] and nxt < len(reference):
            target[i] = reference[nxt]
    return target


@torch.no_grad()
def replay_acceptance(verifier: TreeVerifier, drafter, prompt: Sequence[int], reference: Sequence[int], *,
                      budget: int, max_new_tokens: int, eos_token_ids: Sequence[int] = (),
                      hidden: torch.Tensor | None = None) -> Counter:
    """The acceptance histogram ``{accepted length: steps}`` that greedy decoding of ``prompt`` at a fixed tree
    ``budget`` would give with ``drafter``, from the target's greedy ``reference`` continuation.

    verifier: a batch-1 verifier of the target (only its prefill runs; its cache must hold the prompt and the
    reference). reference: at least ``max_new_tokens`` tokens plus the deepest path a tree can have
    (``budget - 1``), unless it reaches an EOS before (:func:`greedy_reference` gives it). hidden: the taps
    ``[1, T, K*H]`` of ``prompt + reference[:-1]`` from an earlier call (:func:`reference_taps`), to skip the
    prefill when several drafters with the same taps replay one prompt.
    """
    prompt, reference = [int(t) for t in prompt], [int(t) for t in reference]
    eos = frozenset(int(e) for e in eos_token_ids)
    cut = max_new_tokens
    for i, tok in enumerate(reference[:max_new_tokens]):
        if tok in eos:
            cut = i + 1
            break
    hist: Counter = Counter()
    if cut == 0:
        return hist
    if len(reference) < cut:
        raise ValueError(f"the reference has {len(reference)} tokens and no EOS; replaying {max_new_tokens} "
                         f"tokens at budget {budget} needs {max_new_tokens + budget - 1} "
                         f"(greedy_reference(model, prompt, {max_new_tokens + budget - 1}))")
    if len(prompt) + len(reference) > verifier.cache.max_length - 1:
        raise ValueError(f"prompt and reference ({len(prompt) + len(reference)} tokens) do not fit the verifier's "
                         f"max_cache_len={verifier.cache.max_length}")
    need_hidden = getattr(drafter, "needs_hidden", False)
    if need_hidden and hidden is None:
        hidden = reference_taps(verifier, prompt, reference)
    if need_hidden and tuple(hidden.shape[:2]) != (1, len(prompt) + len(reference) - 1):
        raise ValueError(f"hidden must be the taps of prompt + reference[:-1], [1, {len(prompt) + len(reference) - 1},"
                         f" K*H]; got {tuple(hidden.shape)}")
    if callable(getattr(drafter, "set_sampling", None)):
        drafter.set_sampling(SamplingParams())
    p = len(prompt)
    drafter.begin([prompt], [hidden[0, :p]] if need_hidden else None)
    k = 0  # index in the reference of the pending (root) token
    emitted = 1  # the root from prefill
    while emitted < cut:
        path = [0]
        if budget > 1:
            tree = draft(drafter, [reference[k]], budget)[0]
            path, _ = accept_greedy(_reference_targets(tree.tree.parents, tree.tokens, reference, k),
                                    tree.tree, tree.tokens)
        hist[len(path)] += 1
        if k + len(path) >= len(reference):
            raise ValueError(f"the reference ({len(reference)} tokens) ends inside an accepted path; give "
                             f"{budget - 1} more tokens than max_new_tokens")
        accepted = reference[k:k + len(path)]
        drafter.advance([accepted], [hidden[0, p + k:p + k + len(path)]] if need_hidden else None)
        emitted += len(path)  # the accepted tokens after the root, and the bonus (``cut`` stops at an EOS)
        k += len(path)
    return hist
