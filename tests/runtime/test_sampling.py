"""Speculative sampling follows the target's distribution exactly (chi-square on a tiny vocabulary).

The first token comes from the prefill; tokens 2 and 3 come from one verified tree (root = token 1), so the
joint of the first three tokens checks the acceptance rule at two depths.
"""

import functools

import pytest
import torch
from scipy.stats import chisquare
from transformers import LlamaConfig, LlamaForCausalLM

import jetspec_compile as js
from jetspec_compile.drafter import DraftTree, NGramDrafter
from jetspec_compile.runtime import sampling
from jetspec_compile.runtime.acceptance import warp_logits
from jetspec_compile.tree import TreeSpec

V = 8
ROWS, ROUNDS = 200, 30  # 6000 samples of the first three tokens
ALPHA = 1e-3
PROMPT = [3, 1, 4, 1, 5]


@functools.lru_cache(maxsize=None)
def tiny_model():
    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)
    return model


class SamplingDrafter:
    """Draws children without replacement from a fixed, deliberately wrong distribution q and reports q."""

    needs_hidden = False

    def __init__(self, seed=0, width=3):
        g = torch.Generator().manual_seed(seed)
        self.q = torch.softmax(torch.randn(V, generator=g) * 2, -1)
        self.width = width
        self.g = g

    def begin(self, prompts, hidden=None):
        pass

    def advance(self, accepted, hidden=None):
        pass

    def _children(self):
        gumbel = -torch.log(-torch.log(torch.rand(V, generator=self.g)))
        return torch.topk(self.q.log() + gumbel, self.width).indices.tolist()  # without replacement, in order

    def draft(self, roots, budget):
        out = []
        for root in roots:
            parents, tokens = [-1], [root]
            for tok in self._children():
                parents.append(0)
                tokens.append(tok)
                child = len(tokens) - 1
                for tok2 in self._children()[:2]:
                    parents.append(child)
                    tokens.append(tok2)
            probs = self.q.expand(len(tokens), V).clone()
            out.append(DraftTree(tuple(tokens), TreeSpec(tuple(parents)), probs))
        return out


def exact_joint(model, temperature, top_k, top_p):
    """P(t1, t2, t3) of the target after warping: [V, V, V]."""
    def probs(prefixes):
        with torch.no_grad():
            return warp_logits(model(torch.tensor(prefixes)).logits[:, -1], temperature, top_k, top_p)

    p1 = probs([PROMPT])[0]
    p2 = probs([PROMPT + [a] for a in range(V)])  # [V, V]
    p3 = probs([PROMPT + [a, b] for a in range(V) for b in range(V)]).reshape(V, V, V)
    return p1[:, None, None] * p2[:, :, None] * p3


def sampled_counts(spec, temperature, top_k, top_p, seed=0, rounds=ROUNDS):
    g = torch.Generator().manual_seed(seed)
    counts = torch.zeros(V, V, V)
    ids = torch.tensor([PROMPT] * ROWS)
    for _ in range(rounds):
        out = spec.generate(ids, max_new_tokens=3, do_sample=True, temperature=temperature, top_k=top_k,
                            top_p=top_p, generator=g)
        for a, b, c in out[:, len(PROMPT):].tolist():
            counts[a, b, c] += 1
    return counts


def p_value(counts, joint):
    expected = joint.flatten() * counts.sum()
    observed = counts.flatten()
    assert observed[expected == 0].sum() == 0, "sampled a token the target gives probability 0"
    big = expected >= 5
    obs = torch.cat([observed[big], observed[~big].sum(0, keepdim=True)])
    exp = torch.cat([expected[big], expected[~big].sum(0, keepdim=True)])
    keep = exp > 0
    return chisquare(obs[keep].numpy(), exp[keep].numpy()).pvalue


@pytest.mark.parametrize("drafter_kind", ["rejection", "follow"])
@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, None, None), (0.7, 5, 0.9)])
def test_sampling_matches_target_distribution(drafter_kind, temperature, top_k, top_p):
    drafter = SamplingDrafter() if drafter_kind == "rejection" else NGramDrafter(min_ngram=1)
    spec = js.optimize(tiny_model(), drafter=drafter, budget=16, max_cache_len=48)
    counts = sampled_counts(spec, temperature, top_k, top_p)
    assert p_value(counts, exact_joint(spec.model, temperature, top_k, top_p)) > ALPHA
    if drafter_kind == "rejection":
        assert spec.last_stats["tau"] > 1.0  # drafts do get accepted


def test_biased_acceptance_is_detected(monkeypatch):
    real_reject = sampling._reject

    def always_accept(probs, ids, q, child_tokens, child_valid, u):
        """Accept the first child whenever the target allows it: biased towards q."""
        accepted, residual, bad = real_reject(probs, ids, q, child_tokens, child_valid, u)
        col, inside = sampling._column_of(ids, child_tokens[:, :1])
        possible = child_valid[:, 0] & inside[:, 0] & (probs.gather(-1, col)[:, 0] > 0)
        return torch.where(possible, 0, accepted), residual, bad

    monkeypatch.setattr(sampling, "_reject", always_accept)
    spec = js.optimize(tiny_model(), drafter=SamplingDrafter(), budget=16, max_cache_len=48)
    counts = sampled_counts(spec, 1.0, None, None)
    assert p_value(counts, exact_joint(spec.model, 1.0, None, None)) < ALPHA


def test_warp_matches_hf_logits_processors():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(3, 50)
    scores = TemperatureLogitsWarper(0.7)(None, logits.clone())
    scores = TopKLogitsWarper(10)(None, scores)
    scores = TopPLogitsWarper(0.8)(None, scores)
    torch.testing.assert_close(warp_logits(logits, 0.7, 10, 0.8), scores.softmax(-1))


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, None, 0.9), (1.0, 20, None), (0.5, 200, 0.95),
                                                       (1.3, None, 0.99), (0.7, None, None)])
def test_batched_warp_matches_hf_on_a_large_vocabulary(temperature, top_k, top_p):
    """Candidates widen where the nucleus is wide (flat rows), so every row matches HF's full-sort warpers."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5000, generator=g) * torch.tensor([[8.0], [4.0], [2.0], [1.0], [0.3], [0.05]])
    scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p:
        scores = TopPLogitsWarper(top_p)(None, scores)
    torch.testing.assert_close(sampling.warp_dense(logits, temperature, top_k, top_p), scores.softmax(-1))


def test_draw_never_picks_a_zero_probability_token():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]] * 4)
    picked = sampling.draw(probs, torch.tensor([0.0, 0.25, 0.5, 1.0 - 1e-7]))
    assert picked.tolist() == [1, 1, 3, 3]


def test_drawn_parallel_drafter_trees_match_target_distribution():
    """A parallel drafter (random weights, the shipped drafter's shape: taps, a block, a draft vocabulary) draws
    its trees when sampling; the trees carry probs, acceptance is rejection sampling, the output is the target's."""
    from jetspec_compile.drafter import DrafterConfig, JetSpecDrafter, ParallelDrafter

    target = tiny_model()
    torch.manual_seed(5)
    cfg = DrafterConfig.for_target(target.config, (0, 1), num_layers=1, block_size=4, target_name="tiny")
    net = ParallelDrafter(cfg, target.get_input_embeddings(), target.get_output_embeddings())
    net = net.restrict_vocab([6, 2, 5, 0, 7, 1]).eval()  # token 3 and 4 are never drafted
    drawn = []

    class Recording(JetSpecDrafter):
        def draft(self, roots, budget):
            trees = super().draft(roots, budget)
            drawn.extend(t.probs is not None and len(t.tokens) > 1 for t in trees)
            return trees

    spec = js.attach_drafter(target, Recording(net, width=3, lookup_nodes=0, drawn_trees=True), budget=6,
                             max_cache_len=48)
    temperature, top_k, top_p = 0.7, 5, 0.9
    counts = sampled_counts(spec, temperature, top_k, top_p, rounds=ROUNDS // 2)  # one drafter forward per row
    assert drawn and all(drawn)
    assert p_value(counts, exact_joint(target, temperature, top_k, top_p)) > ALPHA
    assert spec.last_stats["tau"] > 1.0


@pytest.mark.parametrize("support", ["dense", "top-p"])
def test_one_node_rejection_outcome_is_the_target_distribution(support):
    """Many independent nodes in one call: the emitted token (accepted child, else the residual draw) is ~ p."""
    g = torch.Generator().manual_seed(1)
    nodes, vocab, kids = 20000, 12, 3
    logits = torch.randn(vocab, generator=g).expand(nodes, vocab) * 2
    q = torch.softmax(torch.randn(vocab, generator=g) * 2, -1).expand(nodes, vocab).contiguous()
    top_p = 0.8 if support == "top-p" else None
    probs, ids, _ = sampling.warp_top(logits, 0.9, None, top_p, candidates=8)
    gumbel = -torch.log(-torch.log(torch.rand(nodes, vocab, generator=g)))
    children = (q.log() + gumbel).topk(kids, dim=-1).indices  # without replacement from q, in draw order
    u = torch.rand(nodes, kids + 1, generator=g)
    accepted, residual, bad = sampling._reject(probs, ids, q, children, torch.ones_like(children, dtype=torch.bool),
                                               u[:, 1:])
    bonus = sampling.draw(residual, u[:, 0])
    bonus = bonus if ids is None else ids.gather(-1, bonus[:, None])[:, 0]
    out = torch.where(accepted >= 0, children.gather(-1, accepted.clamp(min=0)[:, None])[:, 0], bonus)
    assert not bad.any() and (accepted >= 0).float().mean() > 0.3
    target = sampling.warp_dense(logits[:1], 0.9, None, top_p)[0]

    def follows_target(tokens):
        counts = torch.bincount(tokens, minlength=vocab).float()
        if counts[target == 0].sum() > 0:
            return False
        keep = target > 0
        return chisquare(counts[keep].numpy(), (target[keep] * nodes).numpy()).pvalue > ALPHA

    assert follows_target(out)
    assert not follows_target(torch.where(accepted >= 0, out, children[:, 0]))  # planted bias: first child kept
