"""Prefill cost on SmolLM2-135M-Instruct (CPU): ``TreeVerifier.prefill`` with the model's prefill forward on its
own linears (what HF ``generate`` runs: MKL's unpacked GEMM for fp32) against the same forward on packed linears
(``prefill_linear``, what ``optimize`` sets up on CPU; ``--cpu-linear`` chooses the kernel), per prompt length,
interleaved in one process (A B A B ...). Both fill the same state; the largest difference of the last logits is
printed with the times.

    python benchmarks/bench_prefill.py [--threads 2] [--reps 7] [--lengths 32 96 160 320] [--cpu-linear auto]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from jetspec_compile import TreeVerifier
from jetspec_compile.models import load_smollm2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--lengths", type=int, nargs="+", default=[32, 96, 160, 320], help="prompt lengths (tokens)")
    ap.add_argument("--cpu-linear", default="auto", choices=["auto", "mkl", "onednn"],
                    help="packed GEMM kernel of the packed prefill")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_smollm2()
    kw = dict(max_cache_len=max(args.lengths) + 64, budget=8, self_check=False)
    verifiers = {"model's own linears": TreeVerifier(model, **kw),
                 f"packed ({args.cpu_linear})": TreeVerifier(model, prefill_linear=args.cpu_linear, **kw)}
    gen = torch.Generator().manual_seed(0)
    rows = []
    print(f"prefill ms, median of {args.reps} interleaved calls (min), {args.threads} threads")
    print("| prompt tokens | " + " | ".join(verifiers) + " | packed / own | max |Δ logits| |")
    print("|---|" + "---|" * (len(verifiers) + 2))
    for length in args.lengths:
        ids = torch.randint(100, 20000, (1, length), generator=gen)
        times = {name: [] for name in verifiers}
        logits = {}
        for rep in range(args.reps + 1):  # the first round packs the weights and warms up: not timed
            for name, v in verifiers.items():
                start = time.perf_counter()
                logits[name] = v.prefill(ids)[0]
                if rep:
                    times[name].append(time.perf_counter() - start)
        med = {name: 1e3 * statistics.median(t) for name, t in times.items()}
        own_name, packed_name = verifiers
        own, packed = med[own_name], med[packed_name]
        diff = float((logits[own_name] - logits[packed_name]).abs().max())
        rows.append({"tokens": length, "ms": med, "min_ms": {n: 1e3 * min(t) for n, t in times.items()},
                     "ratio": packed / own, "max_logit_diff": diff})
        cells = " | ".join(f"{med[n]:.0f} ({1e3 * min(times[n]):.0f})" for n in verifiers)
        print(f"| {length} | {cells} | {packed / own:.2f}× | {diff:.1e} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
