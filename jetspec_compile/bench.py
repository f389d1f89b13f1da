"""``jetspec-compile bench``: this project's backends against HF ``generate`` and HF assisted generation.

Every prompt runs each method in turn (A B C A B C ...), so drift of a shared machine hits all methods alike;
the first prompt is a warm-up and not counted. Per prompt set it reports tokens/s, speedup ratios against HF
``generate`` (median, min, max over prompts), τ, the acceptance histogram and peak memory; it checks that every
speculative output is token-identical to HF greedy output; it writes JSON, a Markdown table and PNG plots.
"""

from __future__ import annotations

import json
import resource
import statistics
import time
from collections import Counter
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .drafter import NGramDrafter, load_jetspec_drafter
from .prompts import encode_chat, load_jsonl, load_prompts
from .runtime.spec_model import optimize
from .targets import load_target

__all__ = ["add_bench_arguments", "run_bench", "run_bench_cli", "run_interleaved"]


def add_bench_arguments(ap) -> None:
    ap.add_argument("--model", default="smollm2", help="'smollm2' or a local HF checkpoint folder")
    ap.add_argument("--drafter", default="smollm2",
                    help="drafter checkpoint folder, 'smollm2' (shipped) or 'ngram' (training-free)")
    ap.add_argument("--prompts", nargs="+", default=["humaneval", "gsm"],
                    help="prompt sets (humaneval gsm codeio pyfunc sharegpt) and/or .jsonl files; test split")
    ap.add_argument("--limit", type=int, default=8, help="prompts per set (plus one warm-up)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--budgets", nargs="+", default=["8"], help="tree budgets to run (ints or 'auto')")
    ap.add_argument("--width", type=int, default=4, help="candidates per depth in the draft tree")
    ap.add_argument("--path-branches", type=int, default=0,
                    help="depth-1 branches whose subtrees are re-drafted conditioned on them (0: off)")
    ap.add_argument("--lookup-nodes", type=int, default=None,
                    help="tree nodes prompt-lookup continuations may take from the budget (0: off; default: three "
                         "quarters of it)")
    ap.add_argument("--no-corpus", action="store_true",
                    help="do not draft from the drafter folder's corpus of the target's own responses")
    ap.add_argument("--backends", nargs="+", default=["eager"],
                    help="lowering backends to run (eager inductor aoti onnxruntime); compile time is excluded "
                         "by the warm-up prompt and reported separately")
    ap.add_argument("--no-assisted", action="store_true", help="skip HF prompt-lookup assisted generation")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results", help="folder for JSON, Markdown and plots")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_bench(model, tok, drafter_factory, prompt_sets: dict[str, list[list[int]]], *, budgets=(8,),
              max_new_tokens=128, assisted=True, progress=True, backends=("eager",)) -> dict:
    """Run all methods interleaved over every prompt; returns the raw per-prompt records and summaries."""

    specs = {}
    for backend in backends:
        for b in budgets:
            name = f"jetspec-b{b}" if backend == "eager" else f"jetspec-{backend}-b{b}"
            specs[name] = optimize(model, drafter=drafter_factory(), budget=b if b == "auto" else int(b),
                                   max_cache_len=2048, backend=backend)
    methods = ["hf"] + (["hf-prompt-lookup"] if assisted else []) + list(specs)
    records = run_interleaved(model, specs, prompt_sets, methods, max_new_tokens=max_new_tokens, progress=progress)
    return {"methods": methods, "records": records, "summary": summarize(records, methods)}


def run_interleaved(model, specs: dict, prompt_sets: dict[str, list[list[int]]], methods, *, max_new_tokens=128,
                    progress=True) -> list[dict]:
    """Every method on every prompt in turn (``hf``, ``hf-prompt-lookup`` or a name in ``specs``); the first
    prompt of each set is marked as warm-up. One record per run, with token-identity to HF's output."""
    records = []
    total = sum(len(p) for p in prompt_sets.values()) * len(methods)
    bar = tqdm(total=total, desc="benchmark", unit="run", disable=not progress)
    for set_name, prompts in prompt_sets.items():
        for i, ids in enumerate(prompts):
            x = torch.tensor([ids])
            ref = None
            for method in methods:
                start = time.perf_counter()
                with torch.no_grad():
                    if method == "hf":
                        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                                             do_sample=False)
                        ref = out
                    elif method == "hf-prompt-lookup":
                        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                                             do_sample=False, prompt_lookup_num_tokens=10)
                    else:
                        out = specs[method].generate(x, max_new_tokens=max_new_tokens)
                elapsed = time.perf_counter() - start
                new = out.shape[1] - x.shape[1]
                rec = {"set": set_name, "prompt": i, "method": method, "seconds": elapsed, "new_tokens": new,
                       "tokens_per_second": new / elapsed, "identical": bool(torch.equal(out, ref)),
                       "warmup": i == 0, "rss_mb": _rss_mb()}
                if method in specs:
                    st = specs[method].last_stats
                    rec.update(tau=st["tau"], histogram=st["acceptance_histogram"], trace=st.get("trace"),
                               budgets_used=st.get("budgets_used"),
                               draft_seconds=st["draft_seconds"], verify_seconds=st["verify_seconds"])
                records.append(rec)
                bar.update(1)
    bar.close()
    return records


def summarize(records: list[dict], methods: list[str]) -> dict:
    out = {}
    sets = sorted({r["set"] for r in records})
    for s in sets:
        rows = [r for r in records if r["set"] == s and not r["warmup"]]
        by_prompt = {}
        for r in rows:
            by_prompt.setdefault(r["prompt"], {})[r["method"]] = r
        out[s] = {}
        for m in methods:
            ratios = [p[m]["tokens_per_second"] / p["hf"]["tokens_per_second"] for p in by_prompt.values()
                      if m in p and "hf" in p]
            recs = [p[m] for p in by_prompt.values() if m in p]
            if not recs:
                continue
            entry = {
                "tokens_per_second": statistics.median(r["tokens_per_second"] for r in recs),
                "speedup_median": statistics.median(ratios), "speedup_min": min(ratios), "speedup_max": max(ratios),
                "all_identical": all(r["identical"] for r in recs),
            }
            if "tau" in recs[0]:
                hist = Counter()
                for r in recs:
                    hist.update({int(k): v for k, v in r["histogram"].items()})
                steps = sum(hist.values())
                entry.update(tau=sum(k * v for k, v in hist.items()) / steps if steps else 0.0,
                             histogram=dict(sorted(hist.items())),
                             draft_share=sum(r["draft_seconds"] for r in recs) / sum(r["seconds"] for r in recs),
                             verify_share=sum(r["verify_seconds"] for r in recs) / sum(r["seconds"] for r in recs))
            out[s][m] = entry
        if "hf-prompt-lookup" in methods:
            for m in methods:
                if m.startswith("jetspec") and m in out[s]:
                    ratios = [p[m]["tokens_per_second"] / p["hf-prompt-lookup"]["tokens_per_second"]
                              for p in by_prompt.values() if m in p and "hf-prompt-lookup" in p]
                    out[s][m]["vs_prompt_lookup_median"] = statistics.median(ratios)
    out["peak_rss_mb"] = max(r["rss_mb"] for r in records)
    return out


def markdown(summary: dict, methods: list[str]) -> str:
    lines = ["| prompt set | method | tok/s | speedup vs HF (median [min, max]) | vs prompt lookup | τ | identical |",
             "|---|---|---|---|---|---|---|"]
    for s, entries in summary.items():
        if not isinstance(entries, dict) or s == "peak_rss_mb":
            continue
        for m in methods:
            e = entries.get(m)
            if e is None:
                continue
            vs = f"{e['vs_prompt_lookup_median']:.2f}×" if "vs_prompt_lookup_median" in e else ""
            tau = f"{e['tau']:.2f}" if "tau" in e else ""
            lines.append(f"| {s} | {m} | {e['tokens_per_second']:.1f} | {e['speedup_median']:.2f}× "
                         f"[{e['speedup_min']:.2f}, {e['speedup_max']:.2f}] | {vs} | {tau} | "
                         f"{'yes' if e['all_identical'] else 'NO'} |")
    lines.append(f"\nPeak process RSS: {summary['peak_rss_mb']:.0f} MB")
    return "\n".join(lines)


def _finish_plot(plt, fig, ax, title: str, path: Path, paths: list[Path], legend: bool = True) -> None:
    ax.set_title(title)
    if legend:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)


def plot(result: dict, out_dir: Path) -> list[Path]:
    """Speedup vs budget, τ per prompt set, acceptance histogram, tokens-over-time trace (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary, methods = result["summary"], result["methods"]
    sets = [s for s in summary if s != "peak_rss_mb"]
    spec_methods = [m for m in methods if m.startswith("jetspec")]
    paths = []

    fig, ax = plt.subplots(figsize=(6, 4))
    fixed = [m for m in spec_methods if m.rsplit("-b", 1)[1].isdigit()]
    backends = sorted({m.rsplit("-b", 1)[0] for m in fixed})  # "jetspec" (eager), "jetspec-inductor", ...
    for s in sets:
        for backend in backends:
            ms = [m for m in fixed if m.rsplit("-b", 1)[0] == backend]
            label = s if len(backends) == 1 else f"{s} ({backend.removeprefix('jetspec').lstrip('-') or 'eager'})"
            ax.plot([int(m.rsplit("-b", 1)[1]) for m in ms], [summary[s][m]["speedup_median"] for m in ms],
                    marker="o", label=label)
    ax.axhline(1.0, color="gray", ls="--", lw=1)
    ax.set_xticks(sorted({int(m.rsplit("-b", 1)[1]) for m in fixed}))  # the budgets run, not fractions
    ax.set_xlabel("tree budget (nodes verified per target forward)")
    ax.set_ylabel("speedup vs HF generate (median)")
    _finish_plot(plt, fig, ax, "Speedup vs tree budget", out_dir / "speedup_vs_budget.png", paths)

    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / max(1, len(spec_methods))
    for k, m in enumerate(spec_methods):
        ax.bar([i + k * width for i in range(len(sets))], [summary[s][m]["tau"] for s in sets], width, label=m)
    ax.set_xticks([i + width * (len(spec_methods) - 1) / 2 for i in range(len(sets))], sets)
    ax.set_ylabel("mean accepted length τ")
    _finish_plot(plt, fig, ax, "τ per prompt set", out_dir / "tau_per_set.png", paths)

    fig, ax = plt.subplots(figsize=(6, 4))
    m = spec_methods[0]
    hist = Counter()
    for s in sets:
        hist.update(summary[s][m]["histogram"])
    ks = sorted(hist)
    ax.bar(ks, [hist[k] for k in ks])
    ax.set_xlabel("tokens committed per target forward")
    ax.set_ylabel("steps")
    _finish_plot(plt, fig, ax, f"Acceptance-length histogram ({m})", out_dir / "acceptance_histogram.png", paths,
                 legend=False)

    fig, ax = plt.subplots(figsize=(6, 4))
    recs = [r for r in result["records"] if not r["warmup"]]
    first = recs[0]["set"], recs[0]["prompt"]
    for r in recs:
        if (r["set"], r["prompt"]) != first:
            continue
        if r.get("trace"):
            ts, ns = zip(*r["trace"])
            ax.step(ts, ns, where="post", label=r["method"])
        else:
            ax.plot([0, r["seconds"]], [0, r["new_tokens"]], label=f"{r['method']} (average rate)")
    ax.set_xlabel("seconds")
    ax.set_ylabel("tokens generated")
    _finish_plot(plt, fig, ax, f"Tokens over time ({first[0]} prompt {first[1]})", out_dir / "tokens_over_time.png",
                 paths)
    return paths


def run_bench_cli(args) -> None:

    torch.set_num_threads(args.threads)
    model, tok = load_target(args.model)
    if args.drafter == "ngram":
        factory = NGramDrafter
    else:
        loaded = load_jetspec_drafter(args.drafter, model, width=args.width, path_branches=args.path_branches,
                                      lookup_nodes=args.lookup_nodes, corpus=not args.no_corpus)
        factory = lambda: loaded  # noqa: E731 - one loaded network shared by all budgets
    sets = {}
    for name in args.prompts:
        texts = (load_jsonl(name, args.limit + 1) if name.endswith(".jsonl")
                 else load_prompts(name, "test", args.limit + 1))
        sets[Path(name).stem] = [encode_chat(tok, t) for t in texts]
    result = run_bench(model, tok, factory, sets, budgets=args.budgets, max_new_tokens=args.max_new_tokens,
                       assisted=not args.no_assisted, backends=args.backends)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=1))
    table = markdown(result["summary"], result["methods"])
    (out / "bench.md").write_text(table + "\n")
    paths = plot(result, out)
    print(table)
    print("wrote", out / "bench.json", out / "bench.md", *paths)
