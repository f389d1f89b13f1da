"""Verify-step cost on SmolLM2-135M-Instruct (CPU): capture+passes time, and one tree-verify forward with
N = 1/16/32/64 nodes relative to one plain HF decoding step, measured interleaved in one run, for each
lowering backend (eager FX graph, Inductor via torch.compile, AOTInductor package). Compile time is the
first call (Inductor) or the package build (AOTInductor, inside construction), reported apart.

    python benchmarks/bench_verify.py [--threads 2] [--reps 15] [--context 128] [--backends eager inductor aoti]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from jetspec_compile import TreeSpec, TreeVerifier
from jetspec_compile.backends import lower
from jetspec_compile.models import load_smollm2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--context", type=int, default=128, help="committed prefix length")
    ap.add_argument("--nodes", type=int, nargs="+", default=[1, 16, 32, 64])
    ap.add_argument("--backends", nargs="+", default=["eager"], choices=["eager", "inductor", "aoti", "onnxruntime"])
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_smollm2()
    prompt = torch.randint(100, 20000, (1, args.context), generator=torch.Generator().manual_seed(0))

    verifiers, capture, first_call = {}, {}, {}
    for backend in args.backends:
        for n in args.nodes:
            start = time.perf_counter()
            v = TreeVerifier(model, max_cache_len=args.context + 2 * max(args.nodes) + 64, num_nodes=n,
                             self_check=False, compile_fn=lower(backend), prefill_chunk=n)  # what optimize() runs
            capture[backend, n] = time.perf_counter() - start
            start = time.perf_counter()
            v.prefill(prompt)  # first call: Inductor compiles here
            first_call[backend, n] = time.perf_counter() - start
            verifiers[backend, n] = v

    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True)
    cache = out.past_key_values

    def hf_step():
        with torch.no_grad():
            model(input_ids=torch.tensor([[42]]), cache=cache, use_cache=True)
        cache.crop(-1)  # drop the token again: every step decodes at the same length

    def verify_step(key):
        n = key[1]
        v = verifiers[key]
        tree = TreeSpec.chain(1) if n == 1 else TreeSpec((-1,) + tuple(i // 4 for i in range(n - 1)))
        v.verify(torch.randint(100, 20000, (1, n)), tree)
        v._pending = None  # discard: the cache pointer did not move

    keys = list(verifiers)
    times = {"hf": []} | {k: [] for k in keys}
    for _ in range(2):  # warm-up (Inductor may recompile once the cache length turns dynamic)
        hf_step()
        for k in keys:
            verify_step(k)
    for _ in range(args.reps):  # interleaved: drift hits every variant alike
        t = time.perf_counter(); hf_step(); times["hf"].append(time.perf_counter() - t)
        for k in keys:
            t = time.perf_counter(); verify_step(k); times[k].append(time.perf_counter() - t)
    hf = statistics.median(times["hf"])
    print(f"SmolLM2-135M, {args.threads} threads, prefix {args.context} tokens, median of {args.reps}")
    print(f"HF decode step: {hf * 1e3:.1f} ms")
    rows = []
    for backend, n in keys:
        med = statistics.median(times[backend, n])
        eager = statistics.median(times["eager", n]) if ("eager", n) in times else None
        rows.append({"backend": backend, "nodes": n, "capture_s": capture[backend, n],
                     "first_call_s": first_call[backend, n], "verify_ms": med * 1e3, "ratio_vs_hf_step": med / hf,
                     "speedup_vs_eager": eager / med if eager else None})
        vs = f"  {eager / med:.2f}x faster than eager" if eager and backend != "eager" else ""
        print(f"{backend:11s} N={n:3d}: build {capture[backend, n]:6.1f}s  first call {first_call[backend, n]:6.1f}s  "
              f"verify {med * 1e3:6.1f} ms = {med / hf:.2f}x an HF step{vs}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"hf_step_ms": hf * 1e3, "rows": rows, "threads": args.threads}, fh, indent=2)


if __name__ == "__main__":
    main()
