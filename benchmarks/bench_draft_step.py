"""The shipped drafter's step in fp32 against bf16 (``drafter_dtype``), on SmolLM2-135M-Instruct (CPU), in one
process.

Contexts are real: each prompt's greedy answer from HF ``generate`` and the target's tapped hidden states of it;
at every ``--stride`` tokens of the answer the drafter has taken in the context up to three tokens before, is
given the last three (as after a step that accepted two drafts) and drafts one budget-8 tree, in fp32 and in bf16
alternately. The step runs as the backend runs it: ``inductor`` (an AOTInductor package per precision, compiled
on first use and cached) or ``eager`` (PyTorch, packed linears). Printed: the median draft time of each, the
median of the per-call ratios, and how often the two trees were the same.

    python benchmarks/bench_draft_step.py [--backend inductor] [--threads 2] [--limit 2] [--reps 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from jetspec_compile.backends import LoweringOptions, lower_drafter
from jetspec_compile.drafter import load_jetspec_drafter
from jetspec_compile.models import load_smollm2
from real_contexts import add_context_args, greedy_answers

DTYPES = ("float32", "bfloat16")
NEW = 3  # tokens taken in by each timed step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="inductor", choices=["inductor", "eager"])
    add_context_args(ap, "timed steps")
    ap.add_argument("--budget", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_smollm2()
    base = load_jetspec_drafter("smollm2", model)
    drafters = {d: lower_drafter(args.backend, base, LoweringOptions(drafter_dtype=d)) for d in DTYPES}
    cuts = []  # (ids [T], taps [T, K*H], cut)
    for prompt_len, seq in greedy_answers(model, tok, args.sets, args.limit, args.answer_tokens):
        with torch.no_grad():
            states = model(seq[None], output_hidden_states=True).hidden_states
        taps = torch.cat([states[layer + 1][0] for layer in base.tap_layers], dim=-1)
        cuts += [(seq, taps, cut) for cut in range(prompt_len + NEW, len(seq), args.stride)]
    times = {d: [] for d in DTYPES}
    same = 0
    with torch.no_grad():
        for rep in range(args.reps + 1):  # the first pass warms caches and oneDNN's primitives, untimed
            for i, (seq, taps, cut) in enumerate(cuts):
                trees = []
                for d in DTYPES if (rep + i) % 2 == 0 else DTYPES[::-1]:
                    drafter = drafters[d]
                    drafter.begin([seq[:cut - NEW].tolist()], [taps[:cut - NEW]])
                    drafter.draft([int(seq[cut - NEW])], args.budget)  # takes in the context
                    drafter.advance([seq[cut - NEW:cut].tolist()], [taps[cut - NEW:cut]])  # root + 2 accepted
                    start = time.perf_counter()
                    (tree,) = drafter.draft([int(seq[cut])], args.budget)
                    if rep:
                        times[d].append(time.perf_counter() - start)
                    trees.append(tree.tokens)
                same += rep > 0 and trees[0] == trees[1]
    ratios = [b / a for a, b in zip(times["float32"], times["bfloat16"])]
    result = {"backend": args.backend, "calls": len(ratios), "median_ms": {d: 1e3 * statistics.median(t)
                                                                         for d, t in times.items()},
              "median_ratio_bf16_fp32": statistics.median(ratios), "same_tree": same / len(ratios)}
    ms = result["median_ms"]
    print(f"{args.backend}, {len(ratios)} calls each: fp32 {ms['float32']:.2f} ms, bf16 {ms['bfloat16']:.2f} ms; "
          f"bf16 / fp32, median per call {result['median_ratio_bf16_fp32']:.3f}; same tree "
          f"{100 * result['same_tree']:.0f}%")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
