"""Where a sampling step's time goes, against a greedy step, on the real model.

SmolLM2-135M-Instruct with the shipped drafter (budget 8, eager backend) on general-chat prompts
(``benchmarks/prompts/chat.jsonl``), speculating at every step (no fallback to plain decoding). For every prompt it
runs greedy decoding and sampling (T, top-p as given) two ways: ``sample-scalar``, the node-by-node rules of
``runtime/acceptance.py`` on best-first trees (what the runtime did before batched acceptance), and ``sample``, the
runtime as it is (batched acceptance), both on the drafter's default (best-first) trees. It reports per step: drafter
time, target-forward time and the rest (host: tree assembly, acceptance, KV commit), from ``spec.last_stats``; then a
cProfile view of one sampled generation of each kind.

    python benchmarks/profile_sampling.py [--limit 4] [--temperature 0.7] [--top-p 0.9] [--threads 1]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics

import torch

import jetspec_compile as js
from jetspec_compile.models import load_smollm2
from jetspec_compile.prompts import encode_chat, load_jsonl
from jetspec_compile.runtime import acceptance, loop


def per_step(stats: dict) -> dict:
    steps = max(1, stats["steps"])
    return {"draft_ms": 1e3 * stats["draft_seconds"] / steps, "verify_ms": 1e3 * stats["verify_seconds"] / steps,
            "host_ms": 1e3 * stats["host_seconds"] / steps, "tau": stats["tau"]}


def accept_scalar(logits, trees, params):
    """The node-by-node acceptance: warp each row's ``[n, V]`` with a full sort, then walk node by node."""
    out = []
    for r, t in enumerate(trees):
        probs = acceptance.warp_logits(logits[r, :len(t.tokens)], params.temperature, params.top_k, params.top_p)
        if t.probs is not None:
            out.append(acceptance.accept_rejection(probs, t.probs, t.tree, t.tokens, params.generator))
        else:
            out.append(acceptance.accept_sample_follow(probs, t.tree, t.tokens, params.generator))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", default="benchmarks/prompts/chat.jsonl")
    ap.add_argument("--limit", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--budget", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_smollm2()
    spec = js.attach_drafter(model, "smollm2", budget=args.budget, max_cache_len=1024, fallback=False)
    batched = loop.accept

    def generate(mode: str, x, seed: int):
        loop.accept = accept_scalar if mode == "sample-scalar" else batched
        kw = {} if mode == "greedy" else sample
        try:
            spec.generate(x, max_new_tokens=args.max_new_tokens, generator=torch.Generator().manual_seed(seed), **kw)
        finally:
            loop.accept = batched

    prompts = [torch.tensor([encode_chat(tok, p)]) for p in load_jsonl(args.prompts, args.limit + 1)]
    sample = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p}
    rows = {"greedy": [], "sample-scalar": [], "sample": []}
    for i, x in enumerate(prompts):
        for mode in rows:
            generate(mode, x, i)
            if i:  # prompt 0 warms up
                rows[mode].append(per_step(spec.last_stats))
    print("| mode | draft ms/step | verify ms/step | host ms/step | step ms | τ |")
    print("|---|---|---|---|---|---|")
    for mode, rs in rows.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        step = med["draft_ms"] + med["verify_ms"] + med["host_ms"]
        print(f"| {mode} | {med['draft_ms']:.1f} | {med['verify_ms']:.1f} | {med['host_ms']:.1f} | {step:.1f} | "
              f"{statistics.mean(r['tau'] for r in rs):.2f} |")
    for mode in ("sample-scalar", "sample"):
        prof = cProfile.Profile()
        prof.enable()
        generate(mode, prompts[1], 0)
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(12)
        print(f"\ncProfile of one {mode} generation ({spec.last_stats['steps']} steps), by own time:")
        print(out.getvalue()[out.getvalue().find("ncalls") - 3:])


if __name__ == "__main__":
    main()
