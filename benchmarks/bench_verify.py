"""Verify-step cost on SmolLM2-135M-Instruct (CPU): capture+passes time, and one tree-verify forward with
N = 1/16/32/64 nodes relative to one plain HF decoding step, measured interleaved in one run.

    python benchmarks/bench_verify.py [--threads 2] [--reps 15] [--context 128]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from jetspec_compile import TreeSpec, TreeVerifier
from jetspec_compile.backends import lower_eager
from jetspec_compile.models import load_smollm2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--context", type=int, default=128, help="committed prefix length")
    ap.add_argument("--nodes", type=int, nargs="+", default=[1, 16, 32, 64])
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_smollm2()
    prompt = torch.randint(100, 20000, (1, args.context), generator=torch.Generator().manual_seed(0))

    verifiers, capture = {}, {}
    for n in args.nodes:
        start = time.perf_counter()
        verifiers[n] = TreeVerifier(model, max_cache_len=args.context + 2 * max(args.nodes) + 64, num_nodes=n,
                                    self_check=False, compile_fn=lower_eager)  # what optimize() runs
        capture[n] = time.perf_counter() - start
        verifiers[n].prefill(prompt)

    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True)
    cache = out.past_key_values

    def hf_step():
        with torch.no_grad():
            model(input_ids=torch.tensor([[42]]), cache=cache, use_cache=True)
        cache.crop(-1)  # drop the token again: every step decodes at the same length

    def verify_step(n):
        v = verifiers[n]
        tree = TreeSpec.chain(1) if n == 1 else TreeSpec((-1,) + tuple(i // 4 for i in range(n - 1)))
        v.verify(torch.randint(100, 20000, (1, n)), tree)
        v._pending = None  # discard: the cache pointer did not move

    times = {"hf": []} | {n: [] for n in args.nodes}
    for _ in range(2):  # warm-up
        hf_step()
        for n in args.nodes:
            verify_step(n)
    for _ in range(args.reps):  # interleaved: drift hits every variant alike
        t = time.perf_counter(); hf_step(); times["hf"].append(time.perf_counter() - t)
        for n in args.nodes:
            t = time.perf_counter(); verify_step(n); times[n].append(time.perf_counter() - t)
    hf = statistics.median(times["hf"])
    print(f"SmolLM2-135M, {args.threads} threads, prefix {args.context} tokens, median of {args.reps}")
    print(f"HF decode step: {hf * 1e3:.1f} ms")
    rows = []
    for n in args.nodes:
        med = statistics.median(times[n])
        rows.append({"nodes": n, "capture_passes_s": capture[n], "verify_ms": med * 1e3, "ratio_vs_hf_step": med / hf})
        print(f"N={n:3d}: capture+passes {capture[n]:.2f}s  verify {med * 1e3:6.1f} ms  = {med / hf:.2f}x an HF step")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"hf_step_ms": hf * 1e3, "rows": rows, "threads": args.threads}, fh, indent=2)


if __name__ == "__main__":
    main()
