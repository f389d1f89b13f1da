"""The certified LM head against the fp32 head in the graph, on SmolLM2-135M-Instruct (CPU), in one process.

Two verifiers of the same model on the same backend: ``lm_head="exact"`` (the head inside the compiled graph)
and ``lm_head="certified"`` (the graph ends at the head's input; greedy verification's argmax comes from a bf16
copy of the head, proved equal to the fp32 argmax; ``kernels/lm_head.py``). Contexts are real: each prompt's
greedy answer from HF ``generate``, cut every ``--stride`` tokens; at every cut both verify the answer's next
token (budget 1, plain decoding) and its next 8 tokens as a chain (budget 8), in alternating order. Printed: the
median verify time of each, the median of the per-cut ratios, whether every argmax agreed, and the certified
head's candidates per row and fallbacks. Compiles two graphs per verifier first (~2 min each with Inductor on 2
cores).

    python benchmarks/bench_lm_head.py [--backend inductor] [--threads 2] [--limit 2] [--reps 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import torch

from jetspec_compile import TreeVerifier
from jetspec_compile.backends import lower_eager, lower_inductor
from jetspec_compile.models import load_smollm2
from jetspec_compile.tree import TreeSpec
from real_contexts import add_context_args, greedy_answers

SETTINGS = ("exact", "certified")
BUDGETS = (1, 8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="inductor", choices=["inductor", "eager"])
    add_context_args(ap, "cuts")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_smollm2()
    sequences = greedy_answers(model, tok, args.sets, args.limit, args.answer_tokens)
    lower = lower_inductor if args.backend == "inductor" else lower_eager
    longest = max(len(seq) for _, seq in sequences)
    verifiers = {}
    for setting in SETTINGS:
        start = time.perf_counter()
        v = TreeVerifier(model, max_cache_len=longest + 64, budget=max(BUDGETS), extra_budgets=BUDGETS[:-1],
                         compile_fn=functools.partial(lower, lm_head=setting), prefill_linear="auto")
        v._model_prefill = True  # skip the first prefill's comparison with the graph's (a third compile): tested
        for n in BUDGETS:  # compiles happen on the first call: make them here, untimed
            v.prefill(sequences[0][1][None, :sequences[0][0]])
            v.verify_greedy(sequences[0][1][None, :n], TreeSpec.chain(n))
        verifiers[setting] = v
        print(f"{setting}: built in {time.perf_counter() - start:.0f} s", flush=True)
    times = {(s, n): [] for s in SETTINGS for n in BUDGETS}
    agree = total = 0
    for rep in range(args.reps):
        for prompt_len, seq in sequences:
            for cut in range(prompt_len + 8, len(seq) - max(BUDGETS), args.stride):
                for n in BUDGETS:
                    order = SETTINGS if (rep + cut + n) % 2 else SETTINGS[::-1]
                    targets = {}
                    for setting in order:
                        v = verifiers[setting]
                        v.prefill(seq[None, :cut])
                        start = time.perf_counter()
                        targets[setting], _ = v.verify_greedy(seq[None, cut:cut + n], TreeSpec.chain(n))
                        times[(setting, n)].append(time.perf_counter() - start)
                    agree += torch.equal(*targets.values())
                    total += 1
    rows = []
    print(f"verify ms, {args.backend}, {args.threads} threads, median over cuts (min)")
    print("| budget | fp32 head in the graph | certified head | certified / fp32, median per cut |")
    print("|---|---|---|---|")
    for n in BUDGETS:
        exact, cert = times[("exact", n)], times[("certified", n)]
        ratio = statistics.median(c / e for c, e in zip(cert, exact))
        rows.append({"budget": n, "exact_ms": 1e3 * statistics.median(exact), "certified_ms":
                     1e3 * statistics.median(cert), "ratio": ratio, "calls": len(exact)})
        print(f"| {n} | {1e3 * statistics.median(exact):.1f} ({1e3 * min(exact):.1f}) | "
              f"{1e3 * statistics.median(cert):.1f} ({1e3 * min(cert):.1f}) | {ratio:.3f} |")
    heads = [h for h in verifiers["certified"]._heads.values() if h is not None]
    rows_certified = sum(h.rows for h in heads)
    candidates = sum(h.candidates for h in heads) / max(rows_certified, 1)
    fallbacks = sum(h.fallbacks for h in heads)
    print(f"argmax equal in {agree} of {total} steps; certified head: {candidates:.1f} candidates per row, "
          f"{fallbacks} rows fell back to the fp32 logits")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "agree": agree, "steps": total, "candidates_per_row": candidates,
                       "fallbacks": fallbacks}, f, indent=2)


if __name__ == "__main__":
    main()
