"""Mean accepted length τ of a drafter on held-out prompts, for several tree budgets and shapes.

Greedy decoding of held-out prompts (test split: never in the drafter's training data; HumanEval and GSM-style
by default, ``--sets sharegpt`` for general chat); every output is checked token-identical to HF greedy
decoding. τ does not depend on timing, so this is reproducible on a busy machine. Shapes: ``chain`` (width 1),
``tree`` (best-first over per-depth marginals, width 4) and ``path`` (the same, plus the subtrees of the best
``--path-branches`` depth-1 tokens re-drafted conditioned on them: one more drafter forward). The drafter's
time per step is printed next to τ, because path conditioning is not free.

``--replay`` replays each drafter on the target's greedy references instead of running the loop
(:mod:`jetspec_compile.runtime.replay`): the same τ from one target forward per prompt plus the drafter's steps,
so many more prompts fit in the same time. The references (HF ``generate``, EOS ignored) are cached in
``<cache>/tau_refs/``; ``identical`` then reads ``replay``, as no output is produced to compare.

    python benchmarks/bench_tau.py [--drafter smollm2 [OTHER ...]] [--sets humaneval gsm sharegpt]
                                   [--budgets 8 16 32 64] [--widths 4] [--limit 5] [--path-branches 3]
                                   [--draft-vocab 0 2048 4096] [--lookup-nodes auto 0] [--corpus on off]
                                   [--drafter-dtype float32 bfloat16] [--replay] [--json tau.json] [--plot tau.png]
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

import jetspec_compile as js
from jetspec_compile.drafter import JetSpecDrafter, load_jetspec_drafter
from jetspec_compile.drafter.vocab import frequent_tokens
from jetspec_compile.models import load_smollm2
from jetspec_compile.paths import cache_dir
from jetspec_compile.prompts import encode_chat, load_prompts
from jetspec_compile.runtime.replay import greedy_reference, reference_taps, replay_acceptance


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--drafter", nargs="+", default=["smollm2"],
                    help="drafter folders ('smollm2': the shipped one); several are compared on the same references")
    ap.add_argument("--budgets", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--sets", nargs="+", default=["humaneval", "gsm"])
    ap.add_argument("--limit", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--widths", type=int, nargs="+", default=[4], help="tree widths W (candidates per depth)")
    ap.add_argument("--path-branches", type=int, default=3, help="depth-1 branches re-drafted (0: skip 'path')")
    ap.add_argument("--shapes", nargs="+", default=["chain", "tree", "path"], choices=["chain", "tree", "path"])
    ap.add_argument("--lookup-nodes", nargs="+", default=["auto"],
                    help="prompt-lookup nodes grafted into each tree (0: off; auto: three quarters of the budget); "
                         "several values are compared")
    ap.add_argument("--corpus", nargs="+", default=["on"], choices=["on", "off"],
                    help="draft from the drafter folder's corpus of the target's own responses; 'on off' compares")
    ap.add_argument("--draft-vocab", type=int, nargs="+", default=[None],
                    help="draft vocabulary sizes to compare (0: the whole vocabulary; default: the checkpoint's); "
                         "other sizes are the most frequent tokens of --data")
    ap.add_argument("--data", help="self-distillation JSONL the vocabulary is counted in "
                                   "(default: <cache>/data/smollm2_selfdistill.jsonl)")
    ap.add_argument("--drafter-dtype", nargs="+", default=["auto"], choices=["auto", "float32", "bfloat16"],
                    help="what the drafter's network computes in (JetSpecConfig.drafter_dtype); several are compared")
    ap.add_argument("--replay", action="store_true",
                    help="replay the drafters on cached greedy references instead of running the loop (faster; "
                         "the same τ up to float rounding in the drafter's ranking)")
    ap.add_argument("--json")
    ap.add_argument("--plot", help="write a PNG of τ against the budget here (one line per set and configuration)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_smollm2()
    prompts = {s: [encode_chat(tok, p) for p in load_prompts(s, "test", args.limit)] for s in args.sets}
    refs, taps = {}, {}  # taps: per (set, prompt, tap layers), shared by the replays of drafters with those taps
    if args.replay:
        refs = replay_references(model, prompts, args.max_new_tokens + max(args.budgets) - 1)
    configs = [("chain", b, 1, 0) for b in args.budgets if b <= 9]
    configs += [("tree", b, w, 0) for b in args.budgets for w in args.widths]
    if args.path_branches:
        configs += [("path", b, w, args.path_branches) for b in args.budgets for w in args.widths]
    lookups = [None if n == "auto" else int(n) for n in args.lookup_nodes]
    configs = [(d,) + c + (v, n, k, t) for d in args.drafter for c in configs if c[0] in args.shapes
               for v in args.draft_vocab for n in lookups for k in args.corpus for t in args.drafter_dtype]
    records = None
    if any(v for v in args.draft_vocab):
        from jetspec_compile.training.data import read_sequences
        records = read_sequences(args.data or cache_dir() / "data" / "smollm2_selfdistill.jsonl")
    results = []
    bar = tqdm(total=len(configs) * sum(map(len, prompts.values())), desc="τ", unit="gen")
    for folder, shape, budget, width, branches, vocab, lookup, corpus, dtype in configs:
        drafter = load_jetspec_drafter(folder, model, width=width, path_branches=branches, lookup_nodes=lookup,
                                       corpus=corpus == "on")
        if vocab is not None:
            ids = frequent_tokens(records, vocab, always=[tok.eos_token_id]) if vocab else None
            drafter = JetSpecDrafter(drafter.model.restrict_vocab(ids), width=width, path_branches=branches,
                                     lookup_nodes=lookup, corpus=drafter.corpus)
        vocab = drafter.model.cfg.draft_vocab_size
        spec = js.optimize(model, drafter=drafter, budget=budget, max_cache_len=1024, fallback=False,
                           drafter_dtype=dtype)
        name = folder if len(args.drafter_dtype) == 1 else f"{folder}:{dtype}"
        for s, items in prompts.items():
            per_prompt = []  # [tokens, steps] of every prompt: τ, and paired comparisons between drafters
            draft_seconds = verify_seconds = 0.0
            identical = True
            for i, ids in enumerate(items):
                if args.replay:
                    verifier = spec.verifier(1)
                    key = (s, i, verifier.tap_layers)
                    if key not in taps and drafter.needs_hidden:
                        taps[key] = reference_taps(verifier, ids, refs[(s, i)])
                    hist = replay_acceptance(verifier, spec.runtime_drafter(), ids, refs[(s, i)], budget=budget,
                                             max_new_tokens=args.max_new_tokens, eos_token_ids=[tok.eos_token_id],
                                             hidden=taps.get(key))
                else:
                    x = torch.tensor([ids])
                    if (s, i) not in refs:
                        refs[(s, i)] = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                                      max_new_tokens=args.max_new_tokens)
                    out = spec.generate(x, max_new_tokens=args.max_new_tokens)
                    identical &= torch.equal(out, refs[(s, i)])
                    hist = spec.last_stats["acceptance_histogram"]
                    draft_seconds += spec.last_stats["draft_seconds"]
                    verify_seconds += spec.last_stats["verify_seconds"]
                per_prompt.append([sum(k * v for k, v in hist.items()), sum(hist.values())])
                bar.update(1)
            tokens, steps = map(sum, zip(*per_prompt))
            results.append({"drafter": name, "set": s, "shape": shape, "budget": budget, "width": width,
                            "draft_vocab": vocab, "lookup_nodes": lookup, "corpus": corpus, "tau": tokens / steps,
                            "draft_ms": None if args.replay else 1e3 * draft_seconds / steps,
                            "verify_ms": None if args.replay else 1e3 * verify_seconds / steps,
                            "identical": "replay" if args.replay else identical, "per_prompt": per_prompt})
    bar.close()
    named = len(args.drafter) > 1 or len(args.drafter_dtype) > 1
    print(("drafter " if named else "") + f"{'set':10s} {'shape':6s} {'budget':>6s} {'width':>5s} {'vocab':>6s} "
          f"{'lookup':>6s} {'corpus':>6s} {'tau':>6s} {'draft ms':>8s} {'verify ms':>9s} identical")
    for r in results:
        lookup = r['lookup_nodes'] if r['lookup_nodes'] is not None else 'auto'
        print((f"{r['drafter']} " if named else "") + f"{r['set']:10s} {r['shape']:6s} {r['budget']:6d} "
              f"{r['width']:5d} {r['draft_vocab'] or 'all':>6} {lookup:>6} {r['corpus']:>6s} "
              f"{r['tau']:6.2f} {_ms(r['draft_ms']):>8s} {_ms(r['verify_ms']):>9s} {r['identical']}")
    if args.replay:
        print("(replay: τ from the greedy references, no loop run; draft and verify times are not measured)")
    if named:
        print_paired_differences(results)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    if args.plot:
        plot_tau(results, args.plot)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def paired_bootstrap_tau(base: list, other: list, *, resamples: int = 2000, seed: int = 0,
                         level: float = 0.95) -> tuple[float, float, float]:
    """τ(other) − τ(base) over the same prompts, with a paired bootstrap interval.

    base, other: ``[tokens, steps]`` per prompt, in the same prompt order (τ = total tokens / total steps). Prompts
    are resampled with replacement, the same draw for both drafters, so prompt difficulty cancels. Returns
    ``(difference, low, high)``; an interval that contains 0 means the prompts cannot tell the two apart."""
    if len(base) != len(other) or not base:
        raise ValueError(f"need the same non-empty prompts for both drafters, got {len(base)} and {len(other)}")
    a, b = torch.tensor(base, dtype=torch.float64), torch.tensor(other, dtype=torch.float64)
    if bool((a[:, 1] <= 0).any() | (b[:, 1] <= 0).any()):
        raise ValueError("every prompt needs at least one step")

    def tau(x: torch.Tensor) -> torch.Tensor:  # [..., P, 2] -> [...]
        return x[..., 0].sum(-1) / x[..., 1].sum(-1)

    idx = torch.randint(0, len(base), (resamples, len(base)), generator=torch.Generator().manual_seed(seed))
    diffs = tau(b[idx]) - tau(a[idx])  # [resamples]
    tail = (1.0 - level) / 2
    low, high = torch.quantile(diffs, torch.tensor([tail, 1.0 - tail], dtype=torch.float64)).tolist()
    return float(tau(b) - tau(a)), low, high


def print_paired_differences(results: list[dict]) -> None:
    """For every configuration, each further drafter against the first one named (paired over prompts)."""
    first = results[0]["drafter"]
    config = ("set", "shape", "budget", "width", "draft_vocab", "lookup_nodes", "corpus")
    base = {tuple(r[k] for k in config): r for r in results if r["drafter"] == first}
    rows = [(r, base[tuple(r[k] for k in config)]) for r in results
            if r["drafter"] != first and tuple(r[k] for k in config) in base]
    if not rows:
        return
    print(f"\nτ against {first}, paired over the same prompts (95% bootstrap interval; one that holds 0: no "
          "difference these prompts can show):")
    for r, b in rows:
        diff, low, high = paired_bootstrap_tau(b["per_prompt"], r["per_prompt"])
        print(f"{r['drafter']} {r['set']:10s} {r['shape']:6s} {r['budget']:6d} {diff:+6.3f} "
              f"[{low:+.3f}, {high:+.3f}]")


def replay_references(model, prompts: dict[str, list[list[int]]], new_tokens: int) -> dict[tuple[str, int], list]:
    """HF greedy references (EOS ignored) of every prompt, ``new_tokens`` long, cached on disk by prompt."""
    folder = cache_dir() / "tau_refs"
    folder.mkdir(parents=True, exist_ok=True)
    refs, todo = {}, []
    for s, items in prompts.items():
        for i, ids in enumerate(items):
            key = hashlib.sha1(json.dumps([model.config.name_or_path, ids]).encode()).hexdigest()[:16]
            path = folder / f"{key}.json"
            cached = json.loads(path.read_text()) if path.exists() else []
            if len(cached) >= new_tokens:
                refs[(s, i)] = cached[:new_tokens]
            else:
                todo.append((s, i, ids, path))
    for s, i, ids, path in tqdm(todo, desc="greedy references", unit="prompt", disable=not todo):
        refs[(s, i)] = greedy_reference(model, ids, new_tokens)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(refs[(s, i)]))
        tmp.replace(path)
    return refs


def plot_tau(results: list[dict], path: str) -> None:
    """τ against the tree budget, one line per prompt set and configuration (shape, lookup, corpus)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[tuple, list[tuple[int, float]]] = {}
    for r in results:
        lookup = "auto" if r["lookup_nodes"] is None else r["lookup_nodes"]
        key = (Path(r["drafter"]).name, r["set"], r["shape"], f"W{r['width']}", f"lookup {lookup}",
               f"corpus {r['corpus']}")
        lines.setdefault(key, []).append((r["budget"], r["tau"]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, points in sorted(lines.items()):
        points.sort()
        ax.plot([b for b, _ in points], [t for _, t in points], marker="o", label=" · ".join(key))
    ax.set_xscale("log", base=2)
    budgets = sorted({r["budget"] for r in results})
    ax.set_xticks(budgets, labels=[str(b) for b in budgets])
    ax.minorticks_off()
    ax.set_xlabel("tree budget (nodes verified per step)")
    ax.set_ylabel("mean accepted length τ")
    ax.set_title("τ on held-out prompts")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
