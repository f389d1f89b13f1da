"""End-to-end greedy decoding on SmolLM2-135M-Instruct (CPU) with the shipped drafter: HF ``generate`` vs
``optimize(backend="eager")`` vs ``optimize(backend="onnxruntime")`` (verify AND drafter steps on onnxruntime),
run interleaved per prompt (HF, eager, onnxruntime, HF, ...) so machine drift hits all alike; the first prompt
is a warm-up and not counted. Every output is checked token-identical to HF ``generate``. Also reports the
export time and file size of the verify and drafter ONNX files (written to the cache folder and removed at the
end unless ``--keep-onnx``).

    python benchmarks/bench_onnx.py [--threads 2] [--limit 4] [--max-new-tokens 128] [--budget 8]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time

import torch

from jetspec_compile import optimize
from jetspec_compile.bench import run_interleaved
from jetspec_compile.drafter import load_jetspec_drafter
from jetspec_compile.models import load_smollm2
from jetspec_compile.paths import cache_dir
from jetspec_compile.prompts import encode_chat, load_prompts

METHODS = ("hf", "eager", "onnxruntime")


def _onnx_files(folders) -> dict[str, int]:
    """``{file name: bytes}`` of the ONNX models (with external data) in ``folders``, summed per name."""
    sizes: dict[str, int] = {}
    for folder in folders:
        for f in folder.iterdir():
            if not f.name.endswith(".json"):
                key = f.name.split(".onnx")[0] + ".onnx"
                sizes[key] = sizes.get(key, 0) + f.stat().st_size
    return sizes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch and onnxruntime intra-op threads")
    ap.add_argument("--limit", type=int, default=4, help="humaneval test prompts timed (plus one warm-up)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--budget", type=int, default=8, help="tree budget (nodes verified per target forward)")
    ap.add_argument("--width", type=int, default=4, help="candidates per depth in the draft tree")
    ap.add_argument("--keep-onnx", action="store_true", help="keep the exported ONNX files in the cache folder")
    ap.add_argument("--json", help="write the per-prompt records and the summary here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)  # OrtVerifyStep / OrtDraftStep take their thread count from torch

    model, tok = load_smollm2()
    drafter = load_jetspec_drafter("smollm2", model, width=args.width)
    specs = {b: optimize(model, drafter=drafter, budget=args.budget, backend=b, self_check=True)
             for b in ("eager", "onnxruntime")}

    # Exports (and the eager capture, for scale): done before timing, reported separately.
    root = cache_dir() / "onnx"
    root.mkdir(parents=True, exist_ok=True)
    before = set(root.iterdir())
    setup = {}
    for backend, spec in specs.items():
        start = time.perf_counter()
        graphs = spec.verifier(1).prepare()
        setup[f"{backend} verify graphs {graphs}: capture + passes + lowering"] = time.perf_counter() - start
    start = time.perf_counter()
    specs["onnxruntime"].runtime_drafter()
    setup["onnxruntime drafter step: export + check"] = time.perf_counter() - start
    created = sorted(set(root.iterdir()) - before)
    verify_dirs = [d for d in created if (d / "verify.onnx").exists()]
    draft_dirs = [d for d in created if (d / "draft.onnx").exists()]
    sizes = {"verify.onnx": [_onnx_files([d])["verify.onnx"] for d in verify_dirs],
             "draft.onnx": [_onnx_files([d])["draft.onnx"] for d in draft_dirs]}

    texts = load_prompts("humaneval", "test", args.limit + 1)
    prompts = [encode_chat(tok, t) for t in texts]
    records = run_interleaved(model, specs, {"humaneval": prompts}, METHODS, max_new_tokens=args.max_new_tokens)

    timed = [r for r in records if not r["warmup"]]
    hf = {r["prompt"]: r["tokens_per_second"] for r in timed if r["method"] == "hf"}
    summary = {}
    print(f"\nSmolLM2-135M-Instruct + shipped drafter, CPU, {args.threads} thread(s), greedy, "
          f"{args.max_new_tokens} new tokens, budget {args.budget}, width {args.width}, "
          f"{len(hf)} humaneval test prompts (+1 warm-up), interleaved")
    print(f"{'method':<13} {'tok/s (median)':>14} {'vs HF median [min, max]':>26} {'tau':>5} {'draft %':>8} "
          f"{'verify %':>9} identical")
    for m in METHODS:
        rs = [r for r in timed if r["method"] == m]
        ratios = [r["tokens_per_second"] / hf[r["prompt"]] for r in rs]
        entry = {"tokens_per_second": statistics.median(r["tokens_per_second"] for r in rs),
                 "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
                 "identical": all(r["identical"] for r in rs)}
        line = (f"{m:<13} {entry['tokens_per_second']:>14.1f} {entry['ratio_median']:>12.2f}x "
                f"[{entry['ratio_min']:.2f}, {entry['ratio_max']:.2f}]")
        if m != "hf":
            secs = sum(r["seconds"] for r in rs)
            entry.update(tau=statistics.mean(r["tau"] for r in rs),
                         draft_share=sum(r["draft_seconds"] for r in rs) / secs,
                         verify_share=sum(r["verify_seconds"] for r in rs) / secs)
            line += f" {entry['tau']:>5.2f} {100 * entry['draft_share']:>7.0f}% {100 * entry['verify_share']:>8.0f}%"
        else:
            line += f" {'':>5} {'':>8} {'':>9}"
        summary[m] = entry
        print(line + f" {'yes' if entry['identical'] else 'NO'}")
    print("\nsetup (before timing):")
    for what, secs in setup.items():
        print(f"  {what}: {secs:.1f} s")
    for name, values in sizes.items():
        print(f"  {name}: {len(values)} file(s), " + ", ".join(f"{v / 2**20:.1f} MiB" for v in values))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "setup_seconds": setup, "onnx_bytes": sizes, "summary": summary,
                       "records": records}, fh, indent=1)
    if not args.keep_onnx:
        for d in created:
            shutil.rmtree(d, ignore_errors=True)
    if not all(r["identical"] for r in records):
        print("ERROR: some speculative output differs from HF generate", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
