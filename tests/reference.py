"""References computed with the unmodified Hugging Face model."""

from __future__ import annotations

import copy
import random

import torch

from jetspec_compile.compat import cache_argument
from jetspec_compile.tree import TreeSpec, retrieve_indices


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


@torch.no_grad()
def path_logits(model, prefix: list[int], tokens: list[int], tree: TreeSpec) -> torch.Tensor:
    """Logits ``[n, V]`` at every tree node: prefill ``prefix`` with the HF cache, then decode each leaf's
    root-to-leaf path one token at a time."""
    out = model(input_ids=torch.tensor([prefix]), use_cache=True)
    prefix_cache = _cache_of(out)
    result = torch.full((len(tree), model.config.get_text_config().vocab_size), float("nan"))
    for row in retrieve_indices(tree).tolist():
        cache = copy.deepcopy(prefix_cache)
        for node in row:
            if node < 0:
                break
            step = model(input_ids=torch.tensor([[tokens[node]]]), use_cache=True, **{cache_argument(model): cache})
            cache = _cache_of(step)
            result[node] = step.logits[0, -1]
    return result


@torch.no_grad()
def sequence_logits(model, ids: list[int]) -> torch.Tensor:
    """Logits ``[len(ids), V]`` of one plain forward."""
    return model(input_ids=torch.tensor([ids])).logits[0]


def random_tree(kind: str, n: int, rng: random.Random) -> TreeSpec:
    """A chain, a wide star, a deep unbalanced tree or a random tree of ``n`` nodes."""
    if kind == "chain":
        return TreeSpec.chain(n)
    if kind == "star":
        return TreeSpec.star(n)
    if kind == "deep":  # a long spine with short side branches, like a best-first draft tree
        parents = [-1]
        for i in range(1, n):
            parents.append(i - 1 if rng.random() < 0.7 else rng.randrange(max(0, i - 3), i))
        return TreeSpec(tuple(parents))
    if kind == "random":
        return TreeSpec((-1,) + tuple(rng.randrange(0, i) for i in range(1, n)))
    raise ValueError(kind)


@torch.no_grad()
def leaf_sequence_logits(model, prefix: list[int], tokens: list[int], tree: TreeSpec) -> torch.Tensor:
    """Like :func:`path_logits` but one full forward per root-to-leaf path (cheaper for real models)."""
    result = torch.full((len(tree), model.config.get_text_config().vocab_size), float("nan"))
    for row in retrieve_indices(tree).tolist():
        nodes = [n for n in row if n >= 0]
        logits = sequence_logits(model, prefix + [tokens[n] for n in nodes])
        result[nodes] = logits[len(prefix):]
    return result


def left_pad(rows):
    """Left-padded ``[B, P]`` ids and attention mask for prompts of different lengths."""
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask


def assert_same_tree_verify(a, b, vocab: int, nodes: int = 12, prompt_len: int = 30, seed: int = 0,
                            tol: float = 1e-5) -> None:
    """Two TreeVerifiers over the same model (e.g. before / after a lowering pass) give the same logits and taps
    for one prefill and one random deep tree."""
    rng = random.Random(seed)
    prompt = torch.tensor([[rng.randrange(3, vocab) for _ in range(prompt_len)]])
    for v in (a, b):
        v.prefill(prompt)
    tree = random_tree("deep", nodes, rng)
    tokens = torch.tensor([[rng.randrange(3, vocab) for _ in range(nodes)]])
    (la, ha), (lb, hb) = a.verify(tokens, tree), b.verify(tokens, tree)
    torch.testing.assert_close(lb, la, atol=tol, rtol=tol)
    torch.testing.assert_close(hb, ha, atol=tol, rtol=tol)
