"""``jetspec-compile bench``: this project's backends against HF ``generate`` and HF assisted generation.

Every prompt runs each method in turn (A B C A B C ...), so drift of a shared machine hits all methods alike;
the first prompt is a warm-up and not counted. Per prompt set it reports tokens/s, speedup ratios against HF
``generate`` (median, min, max over prompts), τ, the acceptance histogram and peak memory; it checks that every
speculative output is token-identical to HF greedy output; it writes JSON, a Markdown table and PNG plots.
With ``--sample T[,top_p]`` every method also runs sampled (rows ``*-sample``, seeded per prompt): their speedups
are against HF sampling with the same warping, and sampled outputs are not compared token by token (the chi-square
tests in ``tests/runtime/test_sampling.py`` are the proof that sampling is lossless).

``--peers vllm`` adds vLLM's CPU build (plain decoding and its n-gram speculation, from the venv ``make peers``
creates, driven as a subprocess) to the same interleaved runs, compares its outputs with HF's and prints each
method's ratio to the strongest peer. ``--batch 4 16`` adds a table of whole-batch throughput.
"""

from __future__ import annotations

import argparse
import json
import resource
import signal
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .drafter import NGramDrafter, load_jetspec_drafter
from .peers import PEERS, PeerConfig, PeerUnavailable, VLLMPeer
from .prompts import PROMPT_SETS, TRAIN_ONLY, encode_chat, load_jsonl, load_prompts
from .runtime.spec_model import optimize
from .targets import load_target

__all__ = ["add_bench_arguments", "build_specs", "run_batches", "run_bench", "run_bench_cli", "run_interleaved"]


def add_bench_arguments(ap) -> None:
    ap.add_argument("--model", default="smollm2", help="'smollm2' or a local HF checkpoint folder")
    ap.add_argument("--drafter", default="smollm2",
                    help="drafter checkpoint folder, 'smollm2' (shipped) or 'ngram' (training-free)")
    ap.add_argument("--prompts", nargs="+", default=["humaneval", "gsm"],
                    help=f"prompt sets ({' '.join(s for s in PROMPT_SETS if s not in TRAIN_ONLY)}) and/or .jsonl "
                         "files; test split")
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
    ap.add_argument("--settle", type=float, default=1.0, metavar="SECONDS",
                    help="idle pause before every run, so that each engine starts from the same idle machine (the "
                         "first forward after an idle second runs ~25%% slower on a shared VM; back-to-back runs of "
                         "one process would skip that cost; 0: no pause)")
    ap.add_argument("--sample", default=None, metavar="T[,TOP_P]", type=parse_sample,
                    help="also run HF, the peers and every speculative method sampled at temperature T (and "
                         "top-p), as '*-sample' rows compared with HF sampling, e.g. --sample 0.7,0.9")
    ap.add_argument("--peers", nargs="*", default=[], choices=sorted(PEERS),
                    help="other engines on the same prompts: 'vllm' adds vLLM CPU plain decoding and vLLM n-gram "
                         "speculation (needs the venv `make peers` creates)")
    ap.add_argument("--peer-python", help="Python of the vLLM environment (default: $JETSPEC_VLLM_PYTHON or "
                                          ".peers/vllm/bin/python)")
    ap.add_argument("--vllm-spec-tokens", type=int, default=8, help="tokens vLLM's n-gram speculation proposes")
    ap.add_argument("--vllm-lookup", type=int, nargs=2, default=[2, 5], metavar=("MIN", "MAX"),
                    help="n-gram sizes vLLM's n-gram speculation matches")
    ap.add_argument("--vllm-kv-gib", type=int, default=1, help="vLLM's KV cache (VLLM_CPU_KVCACHE_SPACE, GiB)")
    ap.add_argument("--batch", type=int, nargs="*", default=[],
                    help="also time whole batches of these sizes (prompts pooled over the sets, left-padded): "
                         "jetspec vs HF batched generate vs the peers with as many concurrent requests")
    ap.add_argument("--out", default="benchmarks/results", help="folder for JSON, Markdown and plots")


def parse_sample(text: str) -> dict:
    """``"T"`` or ``"T,top_p"`` → sampling keyword arguments for ``generate`` (top-k off, as given)."""
    parts = text.split(",")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or values[0] <= 0 or (len(values) == 2 and not 0 < values[1] <= 1):
        raise argparse.ArgumentTypeError(f"--sample takes T or T,top_p with T > 0 and top_p in (0, 1], got {text!r}")
    return {"do_sample": True, "temperature": values[0], "top_p": values[1] if len(values) == 2 else None}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_bench(model, tok, drafter_factory, prompt_sets: dict[str, list[list[int]]], *, budgets=(8,),
              max_new_tokens=128, assisted=True, progress=True, backends=("eager",), sample: dict | None = None,
              peers=None, specs=None, settle: float = 0.0) -> dict:
    """Run all methods interleaved over every prompt; returns the raw per-prompt records and summaries.
    ``sample``: also run HF and every spec sampled with these ``generate`` arguments (``*-sample`` methods).
    ``peers`` maps method names to running peer engines (:class:`~jetspec_compile.peers.VLLMPeer`); ``specs``
    (from :func:`build_specs`) replaces the models built from ``drafter_factory``, ``budgets`` and ``backends``;
    ``settle``: see :func:`run_interleaved`."""
    if specs is None:
        specs = build_specs(model, drafter_factory, budgets=budgets, backends=backends)
    peers = peers or {}
    methods = ["hf"] + (["hf-prompt-lookup"] if assisted else []) + list(peers) + list(specs)
    if sample is not None:
        methods += ["hf-sample"] + [f"{name}-sample" for name in list(peers) + list(specs)]
    records = run_interleaved(model, specs, prompt_sets, methods, max_new_tokens=max_new_tokens, progress=progress,
                              peers=peers, sample=sample, settle=settle)
    return {"methods": methods, "records": records, "summary": summarize(records, methods, peers=list(peers))}


def build_specs(model, drafter_factory, *, budgets=(8,), backends=("eager",)) -> dict:
    """One optimized model per backend and budget, named like the bench's methods (``jetspec-b8``,
    ``jetspec-inductor-b8``, ...)."""
    specs = {}
    for backend in backends:
        for b in budgets:
            name = f"jetspec-b{b}" if backend == "eager" else f"jetspec-{backend}-b{b}"
            specs[name] = optimize(model, drafter=drafter_factory(), budget=b if b == "auto" else int(b),
                                   max_cache_len=2048, backend=backend)
    return specs


def run_interleaved(model, specs: dict, prompt_sets: dict[str, list[list[int]]], methods, *, max_new_tokens=128,
                    progress=True, peers=None, sample: dict | None = None, settle: float = 0.0) -> list[dict]:
    """Every method on every prompt in turn (``hf``, ``hf-prompt-lookup``, a name in ``specs`` or in ``peers``, or
    ``hf`` / a spec / a peer with ``-sample``: sampled with ``sample``'s arguments); the first prompt of each set is
    marked as warm-up. One record per run, with token-identity to HF's greedy output (None for sampled runs; where it
    differs, the first new token that does).

    ``settle``: seconds of idle before every run (untimed). On a shared VM a process's first forward after it sat
    idle for a second runs slower (cold caches; ~25% on a prefill, docs/results.md), and every engine sits idle
    while the others run except a method that follows another of the same process; the pause gives every run the
    same start."""
    peers = peers or {}
    plain_peer = next(iter(peers), None)  # the first peer decodes plainly; its prefill is timed apart
    eos = _eos_ids(model)
    records = []
    total = sum(len(p) for p in prompt_sets.values()) * len(methods)
    bar = tqdm(total=total, desc="benchmark", unit="run", disable=not progress)
    for set_name, prompts in prompt_sets.items():
        for i, ids in enumerate(prompts):
            x = torch.tensor([ids])
            ref = None
            for method in methods:
                sampled = method.endswith("-sample")
                engine = method.removesuffix("-sample")
                if settle > 0:
                    time.sleep(settle)
                start = time.perf_counter()
                with torch.no_grad():
                    if engine in peers:
                        extra = _peer_sampling(sample, seed=i) if sampled else {"prefill_probe": engine == plain_peer}
                        peer_out = peers[engine].generate([ids], max_new_tokens, stop_token_ids=eos, **extra)
                        out = torch.tensor([ids + peer_out.outputs[0]])
                    elif sampled:
                        out = _generate_sampled(model, specs, engine, x, max_new_tokens, sample, seed=i)
                    elif method == "hf":
                        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                                             do_sample=False)
                        ref = out
                    elif method == "hf-prompt-lookup":
                        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                                             do_sample=False, prompt_lookup_num_tokens=10)
                    else:
                        out = specs[method].generate(x, max_new_tokens=max_new_tokens)
                elapsed = time.perf_counter() - start
                if engine in peers:
                    elapsed = peer_out.seconds  # the engine call itself, not the pipe to its process
                new = out.shape[1] - x.shape[1]
                rec = {"set": set_name, "prompt": i, "method": method, "seconds": elapsed, "new_tokens": new,
                       "tokens_per_second": new / elapsed,
                       "identical": None if sampled else bool(torch.equal(out, ref)),
                       "warmup": i == 0, "rss_mb": _rss_mb()}
                if not sampled and not rec["identical"]:
                    rec["first_difference"] = first_difference(out[0, x.shape[1]:].tolist(),
                                                               ref[0, x.shape[1]:].tolist())
                if engine in peers:
                    rec["spec_decode"] = peer_out.spec_decode
                    if peer_out.prefill_seconds is not None:
                        rec["prefill_seconds"] = peer_out.prefill_seconds
                if engine in specs:
                    st = specs[engine].last_stats
                    rec.update(tau=st["tau"], histogram=st["acceptance_histogram"], trace=st.get("trace"),
                               budgets_used=st.get("budgets_used"),
                               draft_seconds=st["draft_seconds"], verify_seconds=st["verify_seconds"],
                               prefill_seconds=st["prefill_seconds"])
                records.append(rec)
                bar.update(1)
    bar.close()
    return records


def _peer_sampling(sample: dict, seed: int) -> dict:
    """``generate`` sampling arguments as a peer engine takes them (vLLM: top-p 1.0 is off)."""
    return {"temperature": sample["temperature"], "top_p": sample.get("top_p") or 1.0, "seed": seed}


def _generate_sampled(model, specs: dict, method: str, x, max_new_tokens: int, sample: dict, seed: int):
    generator = torch.Generator().manual_seed(seed)
    if method == "hf":
        torch.manual_seed(seed)  # HF sampling draws from the global generator
        return model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, top_k=0, **sample)
    return specs[method].generate(x, max_new_tokens=max_new_tokens, generator=generator, **sample)


def summarize(records: list[dict], methods: list[str], peers=()) -> dict:
    """Per set and method: median tok/s, ratios to HF (median, min, max over prompts; sampled runs against HF
    sampling), τ; with ``peers`` also each method's ratio to the strongest peer of that set (highest median tok/s;
    sampled methods against the strongest sampled peer) and the peers' own speculation counters; ``ms_per_step``,
    the cost of one target forward (a verification step, or a token of plain decoding), and with peers its ratio
    to the first (plain-decoding) peer's (``step_vs_plain_peer``); for speculative methods also ``prefill_ms``
    (per prompt) and ``ms_per_decode_step`` (a step without the prompt's prefill), and for the plain peer the same
    where it timed its prefill (``prefill_probe``), with the ratio of the two (``decode_step_vs_plain_peer``)."""
    out = {}
    plain = {"hf", *peers[:1]}  # methods that decode plainly
    sets = sorted({r["set"] for r in records})
    for s in sets:
        rows = [r for r in records if r["set"] == s and not r["warmup"]]
        by_prompt = {}
        for r in rows:
            by_prompt.setdefault(r["prompt"], {})[r["method"]] = r
        out[s] = {}
        for m in methods:
            base = "hf-sample" if m.endswith("-sample") else "hf"  # sampled runs against HF sampling
            ratios = [p[m]["tokens_per_second"] / p[base]["tokens_per_second"] for p in by_prompt.values()
                      if m in p and base in p]
            recs = [p[m] for p in by_prompt.values() if m in p]
            if not recs:
                continue
            entry = {
                "tokens_per_second": statistics.median(r["tokens_per_second"] for r in recs),
                "speedup_median": statistics.median(ratios), "speedup_min": min(ratios), "speedup_max": max(ratios),
                "all_identical": None if m.endswith("-sample") else all(r["identical"] for r in recs),
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
                if steps:
                    entry["ms_per_step"] = 1e3 * sum(r["seconds"] for r in recs) / steps
                    prefill = sum(r.get("prefill_seconds", 0.0) for r in recs)
                    entry["prefill_ms"] = 1e3 * prefill / len(recs)  # per prompt
                    entry["ms_per_decode_step"] = 1e3 * (sum(r["seconds"] for r in recs) - prefill) / steps
            elif m.removesuffix("-sample") in plain:  # plain decoding (HF, the first peer): one forward a token
                entry["ms_per_step"] = 1e3 * sum(r["seconds"] for r in recs) / sum(r["new_tokens"] for r in recs)
                if all("prefill_seconds" in r for r in recs) and sum(r["new_tokens"] for r in recs) > len(recs):
                    prefill = sum(r["prefill_seconds"] for r in recs)  # it also gave each prompt's first token
                    entry["prefill_ms"] = 1e3 * prefill / len(recs)
                    entry["ms_per_decode_step"] = 1e3 * (sum(r["seconds"] for r in recs) - prefill) / (
                        sum(r["new_tokens"] for r in recs) - len(recs))
            out[s][m] = entry
        if "hf-prompt-lookup" in methods:
            for m in methods:
                if m.startswith("jetspec") and m in out[s] and not m.endswith("-sample"):
                    ratios = [p[m]["tokens_per_second"] / p["hf-prompt-lookup"]["tokens_per_second"]
                              for p in by_prompt.values() if m in p and "hf-prompt-lookup" in p]
                    out[s][m]["vs_prompt_lookup_median"] = statistics.median(ratios)
        for sampled in (False, True):  # greedy methods against the greedy peers, sampled ones against sampled
            names = [m for m in methods if m.endswith("-sample") == sampled]
            engines = [f"{p}-sample" if sampled else p for p in peers]
            _peer_summary(out[s], by_prompt, names, [p for p in engines if p in out[s]])
            if peers:
                _step_cost(out[s], names, f"{peers[0]}-sample" if sampled else peers[0])
    out["peak_rss_mb"] = max(r["rss_mb"] for r in records)
    return out


def _peer_summary(entries: dict, by_prompt: dict, methods: list[str], peers: list[str]) -> None:
    for p in peers:
        counts = Counter()
        for rec in by_prompt.values():
            counts.update(rec.get(p, {}).get("spec_decode") or {})
        if counts.get("drafts"):  # vLLM's own measure: 1 + accepted drafted tokens per step that had a draft
            entries[p]["peer_accepted_length"] = 1 + counts["accepted_tokens"] / counts["drafts"]
    if not peers:
        return
    best = max(peers, key=lambda p: entries[p]["tokens_per_second"])
    for m in methods:
        if m == best or m not in entries:
            continue
        ratios = [rec[m]["tokens_per_second"] / rec[best]["tokens_per_second"] for rec in by_prompt.values()
                  if m in rec and best in rec]
        if ratios:
            entries[m]["vs_peer"] = {"peer": best, "median": statistics.median(ratios), "min": min(ratios),
                                     "max": max(ratios)}


def _step_cost(entries: dict, methods: list[str], plain: str) -> None:
    """Each method's cost of one target forward (a verification step; a token for plain decoding) against the
    plain-decoding peer's cost of one token: how much dearer a step is than the peer's own decoding step."""
    base = entries.get(plain, {}).get("ms_per_step")
    if not base:
        return
    decode_base = entries[plain].get("ms_per_decode_step")
    for m in methods:
        if m != plain and entries.get(m, {}).get("ms_per_step"):
            entries[m]["step_vs_plain_peer"] = {"peer": plain, "ratio": entries[m]["ms_per_step"] / base}
            if decode_base and entries[m].get("ms_per_decode_step"):
                entries[m]["decode_step_vs_plain_peer"] = {"peer": plain,
                                                           "ratio": entries[m]["ms_per_decode_step"] / decode_base}


def step_cost_markdown(summary: dict, methods: list[str]) -> str:
    """The step-cost table: ms per target forward of every method that has one, and its ratio to the plain-decoding
    peer's ms per token (budget-1 rows: plain decoding through the verify graph). Empty without a peer."""
    rows = []
    for s, entries in summary.items():
        if not isinstance(entries, dict) or s == "peak_rss_mb":
            continue
        for m in methods:
            e = entries.get(m, {})
            ratio = e.get("step_vs_plain_peer")
            if ratio or any(x.get("step_vs_plain_peer", {}).get("peer") == m for x in entries.values()):
                tau = f"{e['tau']:.2f}" if "tau" in e else "1 (plain)"
                vs = f"{ratio['ratio']:.2f}× {ratio['peer']}" if ratio else "(reference)"
                decode = (f"{e['ms_per_decode_step']:.1f} (prefill {e['prefill_ms']:.0f} ms a prompt)"
                          if "ms_per_decode_step" in e else "")
                split = e.get("decode_step_vs_plain_peer")
                vs_split = f"{split['ratio']:.2f}×" if split else ("(reference)" if not ratio and decode else "")
                rows.append(f"| {s} | {m} | {e['ms_per_step']:.1f} | {decode} | {tau} | {vs} | {vs_split} |")
    if not rows:
        return ""
    title = ("Cost of one target forward (ms; a verification step, or a token of plain decoding; whole generate "
             "time, prefill included) against the plain-decoding peer's; also without the prompt's prefill (the "
             "peer's prefill: the same prompt generating one token, its prefix cache reset):")
    head = ("| prompt set | method | ms/step | ms/step, prefill excluded | τ | vs peer's ms/token "
            "| vs peer, prefill excluded |")
    return "\n".join([title, "", head, "|---|---|---|---|---|---|---|", *rows])


def lm_head_report(specs: dict) -> tuple[dict, str]:
    """Where each spec's greedy verification took its argmax, per budget (from its batch-1 verifier): ``"certified"``
    (the bf16 copy of the head with a proof, :mod:`jetspec_compile.kernels.lm_head`) or ``"fp32 in the graph"``;
    with the certified heads' candidates per row and fallbacks. Returns the data and a one-line-per-spec text."""
    data, lines = {}, ["LM head of greedy verification (per budget):"]
    for name, spec in specs.items():
        verifier = spec.verifier(1)
        heads = {b: h for b, h in verifier.heads.items() if b in verifier.budgets}  # not the prefill chunk's graph
        certified = {h for h in heads.values() if h is not None}
        rows = sum(h.rows for h in certified)
        data[name] = {"budgets": {str(b): "certified" if h is not None else "fp32 in the graph"
                                  for b, h in sorted(heads.items())},
                      "candidates_per_row": sum(h.candidates for h in certified) / rows if rows else None,
                      "fallback_rows": sum(h.fallbacks for h in certified)}
        where = ", ".join(f"budget {b} {kind}" for b, kind in data[name]["budgets"].items())
        extra = (f"; {data[name]['candidates_per_row']:.1f} candidates per row, {data[name]['fallback_rows']} rows "
                 "fell back to fp32" if rows else "")
        lines.append(f"  {name}: {where}{extra}")
    return data, "\n".join(lines)


def drafter_dtype_report(specs: dict) -> tuple[dict, str]:
    """What each spec's drafter network computed in (``JetSpecConfig.drafter_dtype`` as resolved on this CPU);
    specs whose drafter has no network (n-gram) are left out. Returns the data and a one-line text ("" if none)."""
    data = {}
    for name, spec in specs.items():
        network = getattr(spec.runtime_drafter(), "model", None)
        weight = getattr(getattr(network, "fc", None), "weight", None)
        if weight is not None:
            data[name] = str(weight.dtype).removeprefix("torch.")
    text = ("Drafter network computed in: " + ", ".join(f"{n} {d}" for n, d in data.items())) if data else ""
    return data, text


def weight_form_report(model, specs: dict) -> tuple[dict, str]:
    """How each spec's decoding and verify graphs read the model's linear weights: the exact compact forms
    (:mod:`jetspec_compile.kernels.compact_linear`) of the layers' weights where the spec's backend and setting use
    them, else fp32. Returns the data and a one-line text."""
    from .kernels.compact_linear import compact_setting, compact_weight

    head = model.get_output_embeddings()
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    data, parts = {}, []
    for name, spec in specs.items():
        setting = compact_setting(spec.config.compact_weights)
        uses = spec.config.backend in ("eager", "inductor") and setting != "off"
        forms = [compact_weight(w, setting) if uses else None for w in weights]
        counts = dict(Counter(form.form if form is not None else "fp32" for form in forms))
        mb = sum(f.nbytes if f is not None else w.numel() * w.element_size() for f, w in zip(forms, weights)) / 1e6
        data[name] = {"forms": counts, "mb": mb}
        parts.append(f"{name} " + " + ".join(f"{k} x{v}" for k, v in sorted(counts.items())) + f" ({mb:.0f} MB)")
    return data, "Layer weights read per decoding step: " + ", ".join(parts) if parts else ""


def first_difference(a: list[int], b: list[int]) -> int:
    """Index of the first token where ``a`` and ``b`` differ (the shorter length if one is a prefix)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _eos_ids(model) -> list[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))


def markdown(summary: dict, methods: list[str]) -> str:
    peers = any("vs_peer" in e for s, es in summary.items() if s != "peak_rss_mb" for e in es.values())
    lines = ["| prompt set | method | tok/s | speedup vs HF (median [min, max]) | vs prompt lookup |"
             + (" vs strongest peer (median [min, max]) |" if peers else "") + " τ | identical |",
             "|---|---|---|---|---|" + ("---|" if peers else "") + "---|---|"]
    for s, entries in summary.items():
        if not isinstance(entries, dict) or s == "peak_rss_mb":
            continue
        for m in methods:
            e = entries.get(m)
            if e is None:
                continue
            vs = f"{e['vs_prompt_lookup_median']:.2f}×" if "vs_prompt_lookup_median" in e else ""
            tau = (f"{e['tau']:.2f}" if "tau" in e else
                   f"{e['peer_accepted_length']:.2f}†" if "peer_accepted_length" in e else "")
            vp = e.get("vs_peer")
            peer_col = ((f" {vp['median']:.2f}× [{vp['min']:.2f}, {vp['max']:.2f}] vs {vp['peer']} |" if vp
                         else " (strongest) |" if any(x.get("vs_peer", {}).get("peer") == m for x in entries.values())
                         else " |") if peers else "")
            lines.append(f"| {s} | {m} | {e['tokens_per_second']:.1f} | {e['speedup_median']:.2f}× "
                         f"[{e['speedup_min']:.2f}, {e['speedup_max']:.2f}] | {vs} |{peer_col} {tau} | "
                         f"{'n/a' if e['all_identical'] is None else 'yes' if e['all_identical'] else 'NO'} |")
    if any("peer_accepted_length" in e for s, es in summary.items() if s != "peak_rss_mb" for e in es.values()):
        lines.append("\n† vLLM's mean accepted length: 1 + accepted draft tokens per step that had a draft (steps "
                     "where the n-gram lookup found nothing are not counted), so not the same measure as τ.")
    lines.append(f"\nPeak process RSS: {summary['peak_rss_mb']:.0f} MB")
    return "\n".join(lines)


def identity_report(records: list[dict], methods: list[str]) -> str:
    """One line per greedy method: how many timed outputs equal HF greedy's, and where the others first differ
    (sampled methods are not compared token by token)."""
    lines = ["Outputs compared with HF greedy (timed prompts):"]
    for m in methods:
        if m == "hf" or m.endswith("-sample"):
            continue
        recs = [r for r in records if r["method"] == m and not r["warmup"]]
        if not recs:
            continue
        diffs = [f"{r['set']} #{r['prompt']} at new token {r['first_difference']}" for r in recs if not r["identical"]]
        lines.append(f"  {m}: {len(recs) - len(diffs)}/{len(recs)} identical"
                     + (f"; differ: {', '.join(diffs)}" if diffs else ""))
    return "\n".join(lines)


def _finish_plot(plt, fig, ax, title: str, path: Path, paths: list[Path], legend: bool = True) -> None:
    ax.set_title(title)
    if legend:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)


def _grouped_bars(ax, groups: list[str], series: list[str], value) -> dict:
    """One bar per series in every group (``value(group, series)`` high), groups labelled on the x axis; returns
    each series' bars."""
    width = 0.8 / max(1, len(series))
    bars = {m: ax.bar([i + k * width for i in range(len(groups))], [value(g, m) for g in groups], width, label=m)
            for k, m in enumerate(series)}
    ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(groups))], groups)
    return bars


def plot(result: dict, out_dir: Path) -> list[Path]:
    """Tokens/s of every engine per prompt set (each speculative bar labelled with its ratio to the set's strongest
    peer, where peers ran), speedup vs budget, τ per prompt set, acceptance histogram, tokens-over-time trace
    (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary, methods = result["summary"], result["methods"]
    sets = [s for s in summary if s != "peak_rss_mb"]
    spec_methods = [m for m in methods if m.startswith("jetspec")]
    paths = []

    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(sets) * len(methods) / 3), 4))
    bars = _grouped_bars(ax, sets, methods, lambda s, m: summary[s].get(m, {}).get("tokens_per_second", 0.0))
    labelled = False
    for m in spec_methods:
        for bar, s in zip(bars[m], sets):
            vp = summary[s].get(m, {}).get("vs_peer")
            if vp:
                ax.annotate(f"{vp['median']:.2f}×", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=7)
                labelled = True
    ax.set_ylabel("tokens/s (median over prompts)")
    title = "Tokens/s per engine" + (" (label: × the set's strongest peer, per-prompt median)" if labelled else "")
    ax.legend(fontsize=7)
    _finish_plot(plt, fig, ax, title, out_dir / "engines_per_set.png", paths, legend=False)

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
    _grouped_bars(ax, sets, spec_methods, lambda s, m: summary[s][m]["tau"])
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


def _new_tokens(row: list[int], eos: list[int]) -> list[int]:
    """A batch row's generated tokens up to and including its first EOS (the padding after it dropped)."""
    cut = next((i for i, t in enumerate(row) if t in eos), None)
    return row if cut is None else row[:cut + 1]


def run_batches(model, specs: dict, pool: list[list[int]], batch_sizes, *, max_new_tokens=128, peers=None,
                warmup_tokens=16, progress=True) -> list[dict]:
    """Whole-batch throughput. For each size ``B`` the first ``B`` prompts of ``pool`` run as one batch:
    left-padded through HF batched ``generate`` and each optimized model in ``specs``, as ``B`` concurrent
    requests through each peer. Every method first runs untimed for ``warmup_tokens`` new tokens (compiling and
    capturing that batch size), then once timed. One record per method and size: tokens/s of the whole batch (new
    tokens up to each row's EOS), rows identical to HF's batched output and, for jetspec, the budgets its
    controller used (steps per budget)."""
    peers = peers or {}
    eos = _eos_ids(model)
    pad = getattr(model.generation_config, "pad_token_id", None)
    pad = pad if pad is not None else (eos[0] if eos else 0)
    methods = ["hf"] + list(peers) + list(specs)
    records = []
    bar = tqdm(total=2 * len(methods) * len(batch_sizes), desc="batches", unit="run", disable=not progress)
    for size in batch_sizes:
        prompts = pool[:size]
        if len(prompts) < size:
            raise ValueError(f"batch {size}: only {len(pool)} prompts in the pool")
        width = max(map(len, prompts))
        x = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        ref = None
        for timed in (False, True):
            n = max_new_tokens if timed else min(warmup_tokens, max_new_tokens)
            for method in methods:
                start = time.perf_counter()
                with torch.no_grad():
                    if method == "hf":
                        out = model.generate(x, attention_mask=mask, max_new_tokens=n, do_sample=False,
                                             pad_token_id=pad)
                    elif method in peers:
                        peer_out = peers[method].generate(prompts, n, stop_token_ids=eos)
                    else:
                        out = specs[method].generate(x, mask, max_new_tokens=n, pad_token_id=pad)
                elapsed = time.perf_counter() - start
                if method in peers:
                    rows, elapsed = peer_out.outputs, peer_out.seconds
                else:
                    rows = [_new_tokens(r, eos) for r in out[:, width:].tolist()]
                if method == "hf":
                    ref = rows
                bar.update(1)
                if not timed:
                    continue
                new = sum(map(len, rows))
                rec = {"batch": size, "method": method, "seconds": elapsed, "new_tokens": new,
                       "tokens_per_second": new / elapsed, "rows_identical": sum(a == b for a, b in zip(rows, ref))}
                if method in specs:
                    rec["budgets_used"] = specs[method].last_stats.get("budgets_used")
                if method in peers:
                    rec["spec_decode"] = peer_out.spec_decode
                records.append(rec)
    bar.close()
    return records


def batch_markdown(records: list[dict], peers=()) -> str:
    """The batch table: whole-batch tok/s, ratios to HF and to the strongest peer of that size, budgets used."""
    lines = ["| batch | method | tok/s (whole batch) | vs HF batched | vs strongest peer | budgets used (steps) | "
             "rows identical to HF |", "|---|---|---|---|---|---|---|"]
    for size in sorted({r["batch"] for r in records}):
        rows = {r["method"]: r for r in records if r["batch"] == size}
        hf = rows["hf"]["tokens_per_second"]
        best = max((p for p in peers if p in rows), key=lambda p: rows[p]["tokens_per_second"], default=None)
        for m, r in rows.items():
            vs_peer = ("(strongest)" if m == best else
                       f"{r['tokens_per_second'] / rows[best]['tokens_per_second']:.2f}× vs {best}" if best else "")
            used = ", ".join(f"{b}: {n}" for b, n in (r.get("budgets_used") or {}).items())
            lines.append(f"| {size} | {m} | {r['tokens_per_second']:.1f} | {r['tokens_per_second'] / hf:.2f}× | "
                         f"{vs_peer} | {used} | {r['rows_identical']}/{size} |")
    return "\n".join(lines)


def start_peers(args, model_path: Path, out: Path) -> dict:
    """The peer engines ``--peers`` asks for, started (their log in ``out``); a missing peer environment or an
    engine that fails to start is reported with the way to fix it and left out, so the rest still runs."""
    peers = {}
    if "vllm" not in args.peers:
        return peers
    batch = max(args.batch or [1])
    for name, method in zip(PEERS["vllm"], ("plain", "ngram")):
        cfg = PeerConfig(model=str(model_path), method=method, threads=args.threads, kv_cache_gib=args.vllm_kv_gib,
                         num_speculative_tokens=args.vllm_spec_tokens, prompt_lookup_min=args.vllm_lookup[0],
                         prompt_lookup_max=args.vllm_lookup[1], max_num_seqs=max(16, batch))
        print(f"bench: starting {name} (vLLM {method}; log in {out / f'{name}.log'}) ...", flush=True)
        try:
            peers[name] = VLLMPeer(cfg, python=args.peer_python, log=out / f"{name}.log")
        except PeerUnavailable as err:
            print(f"bench: --peers vllm skipped: {err}", flush=True)
            for peer in peers.values():
                peer.close()
            return {}
    return peers


def run_bench_cli(args) -> None:
    if args.settle < 0:
        raise SystemExit(f"--settle must be 0 or more seconds, got {args.settle}")
    torch.set_num_threads(args.threads)
    model, tok = load_target(args.model)
    if args.drafter == "ngram":
        factory = NGramDrafter
    else:
        loaded = load_jetspec_drafter(args.drafter, model, width=args.width, path_branches=args.path_branches,
                                      lookup_nodes=args.lookup_nodes, corpus=not args.no_corpus)
        factory = lambda: loaded  # noqa: E731 - one loaded network shared by all budgets
    sets = {}
    size = max([args.limit + 1, *args.batch])
    for name in args.prompts:
        texts = load_jsonl(name, size) if name.endswith(".jsonl") else load_prompts(name, "test", size)
        sets[Path(name).stem] = [encode_chat(tok, t) for t in texts]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # a terminated bench still closes its peer engines (the finally below), instead of orphaning them
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    peers = start_peers(args, _model_path(args.model), out)
    try:
        specs = build_specs(model, factory, budgets=args.budgets, backends=args.backends)
        result = run_bench(model, tok, factory, {k: v[:args.limit + 1] for k, v in sets.items()},
                           max_new_tokens=args.max_new_tokens, assisted=not args.no_assisted, peers=peers,
                           specs=specs, sample=args.sample, settle=args.settle)
        result["peers"] = {name: {"vllm": p.version, "config": p.config.__dict__, "ld_preload": p.ld_preload}
                           for name, p in peers.items()}
        result["lm_heads"], heads = lm_head_report(specs)
        result["drafter_dtypes"], drafters = drafter_dtype_report(specs)
        result["weight_forms"], forms = weight_form_report(model, specs)
        table = (markdown(result["summary"], result["methods"]) + "\n\n" + heads + ("\n" + drafters if drafters else "")
                 + ("\n" + forms if forms else ""))
        if peers:
            table += "\n\n" + step_cost_markdown(result["summary"], result["methods"])
            table += "\n\n" + identity_report(result["records"], result["methods"])
        _write(out, result, table)  # the batch-1 table is kept even if the batches are interrupted
        print(table, flush=True)
        if args.batch:  # prompts pooled over the sets, one from each in turn
            pool = [p for group in zip(*sets.values()) for p in group]
            result["batches"] = run_batches(model, specs, pool, args.batch, max_new_tokens=args.max_new_tokens,
                                            peers=peers)
            batches = batch_markdown(result["batches"], peers=list(peers))
            table += "\n\n" + batches
            _write(out, result, table)
            print("\n" + batches)
    finally:
        for peer in peers.values():
            peer.close()
    paths = plot(result, out)
    print("wrote", out / "bench.json", out / "bench.md", *paths)


def _write(out: Path, result: dict, table: str) -> None:
    (out / "bench.json").write_text(json.dumps(result, indent=1))
    (out / "bench.md").write_text(table + "\n")


def _model_path(name: str) -> Path:
    """The HF checkpoint folder a peer engine loads for ``--model``."""
    if name == "smollm2":
        from .models import smollm2_path
        return smollm2_path()
    return Path(name).resolve()
