"""Throughput of one speculative model under 1, 4 and 8 concurrent ``generate`` calls.

For each concurrency N, N chat prompts are run three ways, interleaved per repetition so a shared machine's drift
hits all alike: one after another in one thread (``sequential``), from N threads at once against a model that
only serialises overlapping calls (``max_batch=1``), and from N threads at once against a model that batches
waiting calls (``max_batch=8``). Reported: new tokens per second of each and per second of process CPU time
(with one PyTorch thread the work's cost, which drifts less than wall time on a machine shared with other jobs),
the ratios to ``sequential``, and the batch sizes the loops ran. Every threaded output is checked
token-identical to the sequential output of the same prompt (which the test suite checks against HF greedy
decoding). Verifiers of the batch sizes a burst gives (1 and N - 1) are built before timing, so capture time is
excluded (another size is built when first used, inside the timing of the batched mode: reported in its batch
sizes).

    nice -n 10 python benchmarks/bench_concurrency.py [--concurrency 1 4 8] [--max-new-tokens 64] [--repeats 1]
                                                      [--threads 1] [--drafter smollm2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

import jetspec_compile as js
from jetspec_compile.models import load_smollm2
from jetspec_compile.prompts import encode_chat

#: short chat requests of the kind a demo server gets
CHAT_PROMPTS = [
    "What is the capital of France, and what is it famous for?",
    "Write a Python function that checks whether a string is a palindrome.",
    "Explain in two sentences why the sky is blue.",
    "Give me three tips for getting better sleep.",
    "What is the difference between a list and a tuple in Python?",
    "Summarise the plot of Romeo and Juliet in a few sentences.",
    "How do I boil an egg so that the yolk stays soft?",
    "Write a short poem about the sea.",
]


def run_sequential(spec, prompts, new):
    start, cpu = time.perf_counter(), time.process_time()
    outs = [spec.generate(p, max_new_tokens=new) for p in prompts]
    return time.perf_counter() - start, time.process_time() - cpu, outs, [1] * len(prompts)


def run_threads(spec, prompts, new):
    barrier = threading.Barrier(len(prompts) + 1)

    def work(p):
        barrier.wait()
        out = spec.generate(p, max_new_tokens=new)
        return out, spec.last_stats["batch_size"]

    with ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(work, p) for p in prompts]
        barrier.wait()
        start, cpu = time.perf_counter(), time.process_time()
        results = [f.result() for f in futures]
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return seconds, cpu, [o for o, _ in results], [b for _, b in results]


def new_tokens(outs, prompts):
    return sum(o.shape[1] - p.shape[1] for o, p in zip(outs, prompts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=1, help="repetitions of every (N, mode) pair, interleaved")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--drafter", default="smollm2", help="drafter checkpoint folder, 'smollm2' (shipped) or 'ngram'")
    ap.add_argument("--budget", type=int, default=8)
    ap.add_argument("--json", help="write the raw records here")
    args = ap.parse_args()
    if max(args.concurrency) > len(CHAT_PROMPTS):
        ap.error(f"--concurrency at most {len(CHAT_PROMPTS)} (one prompt per request)")
    torch.set_num_threads(args.threads)
    model, tok = load_smollm2()
    prompts = [torch.tensor([encode_chat(tok, p)]) for p in CHAT_PROMPTS]
    max_batch = max(args.concurrency)
    options = dict(budget=args.budget, max_cache_len=max(p.shape[1] for p in prompts) + args.max_new_tokens + 64,
                   self_check=False)  # outputs are compared below; the check costs minutes of start-up here
    specs = {}
    for name, batch in (("serialised", 1), ("batched", max_batch)):
        if args.drafter == "ngram":
            specs[name] = js.optimize(model, max_batch=batch, **options)
        else:
            specs[name] = js.attach_drafter(model, args.drafter, max_batch=batch, **options)
    # a burst of N calls runs as a loop of the first alone and one of the N - 1 that queued meanwhile
    sizes = sorted({1} | {n - 1 for n in args.concurrency if n > 1})
    start = time.perf_counter()
    for size in sizes:
        specs["batched"].verifier(size)
    specs["serialised"].verifier(1)
    print(f"verifiers for batch sizes {sizes} built in {time.perf_counter() - start:.0f} s")
    specs["batched"].generate(prompts[0], max_new_tokens=8)  # warm-up
    specs["serialised"].generate(prompts[0], max_new_tokens=8)

    records = []
    for rep in range(args.repeats):
        for n in args.concurrency:
            batch = prompts[:n]
            ref = None
            for mode, run, spec in (("sequential", run_sequential, specs["serialised"]),
                                    ("threads, max_batch=1", run_threads, specs["serialised"]),
                                    (f"threads, max_batch={max_batch}", run_threads, specs["batched"])):
                seconds, cpu, outs, sizes = run(spec, batch, args.max_new_tokens)
                ref = ref or outs
                same = all(torch.equal(a, b) for a, b in zip(outs, ref))
                toks = new_tokens(outs, batch)
                records.append(dict(repeat=rep, concurrency=n, mode=mode, seconds=seconds, cpu_seconds=cpu,
                                    new_tokens=toks, tokens_per_second=toks / seconds,
                                    tokens_per_cpu_second=toks / cpu, batch_sizes=sorted(set(sizes)),
                                    identical=same))
                print(f"N={n} {mode:22s} {toks:4d} tokens {seconds:6.1f} s {toks / seconds:6.1f} tok/s "
                      f"{cpu:6.1f} CPU s {toks / cpu:6.1f} tok/CPU-s "
                      f"batches {sorted(set(sizes))} identical={same}", flush=True)

    print(f"\n{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, torch threads "
          f"{args.threads}, drafter {args.drafter}, budget {args.budget}, {args.max_new_tokens} new tokens")
    print("| concurrent requests | mode | tokens/s | vs sequential | tokens/CPU-s | vs sequential | loop batch sizes |")
    print("|---|---|---|---|---|---|---|")
    for n in args.concurrency:
        rows = [r for r in records if r["concurrency"] == n]
        seq = statistics.median(r["tokens_per_second"] for r in rows if r["mode"] == "sequential")
        seq_cpu = statistics.median(r["tokens_per_cpu_second"] for r in rows if r["mode"] == "sequential")
        for mode in dict.fromkeys(r["mode"] for r in rows):
            tps = statistics.median(r["tokens_per_second"] for r in rows if r["mode"] == mode)
            tpc = statistics.median(r["tokens_per_cpu_second"] for r in rows if r["mode"] == mode)
            sizes = sorted({s for r in rows if r["mode"] == mode for s in r["batch_sizes"]})
            print(f"| {n} | {mode} | {tps:.1f} | {tps / seq:.2f}x | {tpc:.1f} | {tpc / seq_cpu:.2f}x | {sizes} |")
    if not all(r["identical"] for r in records):
        print("WARNING: some threaded outputs differ from the sequential ones")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(records, fh, indent=1)


if __name__ == "__main__":
    main()
