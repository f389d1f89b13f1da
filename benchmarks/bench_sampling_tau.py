"""τ and step time of the two lossless sampling schemes, on the real model and general-chat prompts.

SmolLM2-135M-Instruct with the shipped drafter (budget 8, eager backend), sampled at T / top-p:

* ``follow``: best-first trees with prompt-lookup and corpus continuations, sample-and-follow acceptance;
* ``drawn``: every tree's children drawn from the drafter's warped distributions (no lookup, no corpus),
  recursive rejection sampling;
* ``hybrid``: drawn trees for rows whose context gives no lookup/corpus continuation, deterministic trees
  with the continuation otherwise (``JetSpecDrafter(drawn_trees=True)``).

Every configuration runs on every prompt in turn with the same seeds, speculating at every step (no fallback to
plain decoding); greedy decoding is the reference row.

    python benchmarks/bench_sampling_tau.py [--limit 8] [--seeds 2] [--temperature 0.7] [--top-p 0.9]
"""

from __future__ import annotations

import argparse
import statistics

import torch

import jetspec_compile as js
from jetspec_compile.drafter import load_jetspec_drafter
from jetspec_compile.models import load_smollm2
from jetspec_compile.prompts import encode_chat, load_jsonl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", default="benchmarks/prompts/chat.jsonl")
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--budget", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_smollm2()
    drafters = {
        "greedy": load_jetspec_drafter("smollm2", model),
        "follow": load_jetspec_drafter("smollm2", model),
        "hybrid": load_jetspec_drafter("smollm2", model),
        "drawn": load_jetspec_drafter("smollm2", model, lookup_nodes=0, corpus=False),
    }
    drafters["follow"].drawn_trees = False
    spec = js.attach_drafter(model, drafters["greedy"], budget=args.budget, max_cache_len=1024, fallback=False)
    prompts = [torch.tensor([encode_chat(tok, p)]) for p in load_jsonl(args.prompts, args.limit + 1)]
    runs = {name: [] for name in drafters}
    for i, x in enumerate(prompts):
        for seed in range(args.seeds if i else 1):
            for name, drafter in drafters.items():
                spec.drafter = drafter
                kw = {} if name == "greedy" else dict(do_sample=True, temperature=args.temperature, top_p=args.top_p)
                spec.generate(x, max_new_tokens=args.max_new_tokens, generator=torch.Generator().manual_seed(seed),
                              **kw)
                st = spec.last_stats
                if i:  # prompt 0 warms up
                    runs[name].append({"tau": st["tau"], "steps": st["steps"], "tokens": st["new_tokens"],
                                       "step_ms": 1e3 * st["seconds"] / max(1, st["steps"]),
                                       "draft_ms": 1e3 * st["draft_seconds"] / max(1, st["steps"]),
                                       "tps": st["tokens_per_second"]})
    print(f"| scheme | τ (tokens / steps) | ms / step | drafter ms / step | tokens/s (median) |")
    print("|---|---|---|---|---|")
    for name, rs in runs.items():
        tau = sum(r["tau"] * r["steps"] for r in rs) / sum(r["steps"] for r in rs)
        print(f"| {name} | {tau:.2f} | {statistics.median(r['step_ms'] for r in rs):.1f} | "
              f"{statistics.median(r['draft_ms'] for r in rs):.1f} | {statistics.median(r['tps'] for r in rs):.1f} |")


if __name__ == "__main__":
    main()
