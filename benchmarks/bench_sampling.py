"""Sampling against greedy decoding, each against HF ``generate`` in the same mode, in one interleaved run.

SmolLM2-135M-Instruct with the shipped drafter (budget 8, eager backend, the product defaults otherwise) on
general-chat prompts (``benchmarks/prompts/chat.jsonl``). Methods, run on every prompt in turn
(``jetspec_compile.bench.run_interleaved``; the first prompt warms up):

* ``hf`` / ``jetspec-b8``: greedy decoding (speculative output checked token-identical to HF's);
* ``hf-sample``: HF sampling at T / top-p (top-k off);
* ``jetspec-b8-sample``: the runtime's default sampling scheme: best-first trees with lookup and corpus,
  sample-and-follow at every step;
* ``jetspec-b8-hybrid-sample``: ``JetSpecDrafter(drawn_trees=True)``: drawn trees with rejection sampling where
  the context gives no lookup/corpus continuation, else best-first trees with sample-and-follow;
* ``jetspec-b8-drawn-sample``: drawn trees at every step (no lookup, no corpus), rejection sampling.

The table gives tokens/s, the median per-prompt speedup over HF in the same mode and τ; the last line compares
the sampled speedups with greedy's.

    python benchmarks/bench_sampling.py [--limit 6] [--temperature 0.7] [--top-p 0.9] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import torch

import jetspec_compile as js
from jetspec_compile.bench import markdown, run_interleaved, summarize
from jetspec_compile.drafter import load_jetspec_drafter
from jetspec_compile.models import load_smollm2
from jetspec_compile.prompts import encode_chat, load_jsonl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", default="benchmarks/prompts/chat.jsonl")
    ap.add_argument("--limit", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--budget", type=int, default=8)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_smollm2()
    hybrid = load_jetspec_drafter("smollm2", model)
    drawn = load_jetspec_drafter("smollm2", model, lookup_nodes=0, corpus=False)
    hybrid.drawn_trees = drawn.drawn_trees = True
    drafters = {"jetspec-b8": load_jetspec_drafter("smollm2", model), "jetspec-b8-hybrid": hybrid,
                "jetspec-b8-drawn": drawn}
    specs = {name: js.attach_drafter(model, d, budget=args.budget, max_cache_len=2048) for name, d in drafters.items()}
    prompts = {"chat": [encode_chat(tok, p) for p in load_jsonl(args.prompts, args.limit + 1)]}
    methods = ["hf", "jetspec-b8", "hf-sample", "jetspec-b8-sample", "jetspec-b8-hybrid-sample",
               "jetspec-b8-drawn-sample"]
    sample = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p}
    records = run_interleaved(model, specs, prompts, methods, max_new_tokens=args.max_new_tokens, sample=sample)
    summary = summarize(records, methods)
    print(markdown(summary, methods))
    greedy = summary["chat"]["jetspec-b8"]["speedup_median"]
    for m in methods[3:]:
        print(f"{m}: median speedup over HF sampling {summary['chat'][m]['speedup_median']:.2f}× = "
              f"{100 * summary['chat'][m]['speedup_median'] / greedy:.0f}% of greedy's {greedy:.2f}×")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "summary": summary, "records": records}, f, indent=1)


if __name__ == "__main__":
    main()
