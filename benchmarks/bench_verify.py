"""Verify-step cost on SmolLM2-135M-Instruct (CPU): capture+passes time, and one tree-verify forward with
N = 1/16/32/64 nodes relative to one plain HF decoding step, measured interleaved in one run, for each
lowering backend (eager FX graph, Inductor via torch.compile, AOTInductor package). Compile time is the
first call (Inductor) or the package build (AOTInductor, inside construction), reported apart.

    python benchmarks/bench_verify.py [--threads 2] [--reps 15] [--context 128] [--backends eager inductor aoti]
                                      [--cpu-linear mkl onednn auto]

``--cpu-linear``: the packed GEMM kernel of the fp32 linears (eager and Inductor; ``JETSPEC_CPU_LINEAR``), one
row per setting, to compare MKL and oneDNN on this CPU in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from jetspec_compile import TreeSpec, TreeVerifier
from jetspec_compile.backends import lower
from jetspec_compile.compat import cache_argument
from jetspec_compile.models import load_smollm2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--context", type=int, default=128, help="committed prefix length")
    ap.add_argument("--nodes", type=int, nargs="+", default=[1, 16, 32, 64])
    ap.add_argument("--backends", nargs="+", default=["eager"], choices=["eager", "inductor", "aoti", "onnxruntime"])
    ap.add_argument("--cpu-linear", nargs="+", default=["auto"], choices=["auto", "mkl", "onednn"],
                    help="packed GEMM kernel(s) of fp32 CPU linears (eager, inductor)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_smollm2()
    prompt = torch.randint(100, 20000, (1, args.context), generator=torch.Generator().manual_seed(0))

    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True)
    cache = out.past_key_values

    def hf_step():
        with torch.no_grad():
            model(input_ids=torch.tensor([[42]]), use_cache=True, **{cache_argument(model): cache})
        cache.crop(-1)  # drop the token again: every step decodes at the same length

    def verify_step(key):
        n = key[1]
        v = verifiers[key]
        tree = TreeSpec.chain(1) if n == 1 else TreeSpec((-1,) + tuple(i // 4 for i in range(n - 1)))
        v.verify(torch.randint(100, 20000, (1, n)), tree)
        v._pending = None  # discard: the cache pointer did not move

    verifiers, capture, first_call = {}, {}, {}
    for kernel in args.cpu_linear:
        os.environ["JETSPEC_CPU_LINEAR"] = kernel  # read while the graphs are built and compiled
        for backend in args.backends:
            for n in args.nodes:
                key = backend, n, kernel
                start = time.perf_counter()
                v = TreeVerifier(model, max_cache_len=args.context + 2 * max(args.nodes) + 64, budget=n,
                                 self_check=False, compile_fn=lower(backend), prefill_chunk=n)  # what optimize() runs
                capture[key] = time.perf_counter() - start
                start = time.perf_counter()
                v.prefill(prompt)
                verifiers[key] = v
                verify_step(key)  # first call: Inductor compiles here
                first_call[key] = time.perf_counter() - start
    os.environ.pop("JETSPEC_CPU_LINEAR")

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
    for key in keys:
        backend, n, kernel = key
        med = statistics.median(times[key])
        eager = statistics.median(times["eager", n, kernel]) if ("eager", n, kernel) in times else None
        rows.append({"backend": backend, "nodes": n, "cpu_linear": kernel, "capture_s": capture[key],
                     "first_call_s": first_call[key], "verify_ms": med * 1e3, "ratio_vs_hf_step": med / hf,
                     "speedup_vs_eager": eager / med if eager else None})
        vs = f"  {eager / med:.2f}x faster than eager" if eager and backend != "eager" else ""
        print(f"{backend:11s} N={n:3d} linears={kernel:6s}: build {capture[key]:6.1f}s  first call "
              f"{first_call[key]:6.1f}s  verify {med * 1e3:6.1f} ms = {med / hf:.2f}x an HF step{vs}")
    from jetspec_compile.kernels.cpu_linear import TIMINGS

    for (out_f, in_f, rows), t in sorted(TIMINGS.items()):  # what "auto" measured and chose, per weight shape
        picked = min(t, key=t.get)
        print(f"auto: {rows:3d} x {in_f:5d} -> {out_f:5d}: " + "  ".join(f"{k} {v * 1e3:.3f} ms" for k, v in t.items())
              + f"  -> {picked}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"hf_step_ms": hf * 1e3, "rows": rows, "threads": args.threads,
                       "auto_timings_ms": [{"out": o, "in": i, "rows": r, **{k: v * 1e3 for k, v in t.items()}}
                                           for (o, i, r), t in sorted(TIMINGS.items())]}, fh, indent=2)


if __name__ == "__main__":
    main()
