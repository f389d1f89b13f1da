"""Where the time of one speculative step goes, on SmolLM2-135M-Instruct with the shipped drafter (CPU).

For each lowering backend it prints, all measured in this one process (interleaved, so drift of a shared machine
hits every variant alike):

1. **Isolated steps** at a fixed committed context: one HF decoding step (``model(..)`` with its dynamic cache),
   one verify step at budget 1 (plain decoding through our graph) and at ``--budget`` nodes, each split into the
   graph call and the host work around it (``TreeVerifier.verify_greedy``, what greedy decoding runs: tree
   tensors, cache views, input dict, and the argmax of the LM head where the lowering split it off), and
   one draft step (the drafter network ``step_fn`` and the tree building around it). Median and minimum of
   ``--reps`` runs.
2. **Per-op tables** (``torch.profiler``, self CPU time) of the verify steps and the draft step.
3. **Per-layer / per-component table** of the eager verify graph (an FX interpreter times every node and sums by
   decoder layer and by what the node computes: projections, MLP, norms, rotary, attention, mask, cache write,
   LM head). Inductor fuses across these boundaries, so it gets the per-kernel table of (2) instead
   (``--kernel-profile`` names Inductor's C++ kernels in it).
4. **GEMM kernels** (``--gemm``): every linear shape of the model at 1 row and at ``--budget`` rows, plain
   ``F.linear`` against the MKL- and oneDNN-packed kernels the backends choose between; then one step's layer
   linears on oneDNN against the exactly compact weight forms (``kernels/compact_linear.py``).
5. **Generate breakdown** (``--generate-tokens`` > 0): greedy generation on chat prompts at budget 1 (fallback
   only) and at ``--budget`` (speculating every step), per step: draft / verify / host ms (``last_stats``), τ,
   tokens/s, against HF ``generate`` on the same prompts; every output is compared with HF's.

    python benchmarks/profile_step.py [--backends eager inductor] [--budget 8] [--context 160] [--reps 20]
                                      [--threads 1] [--ops 15] [--generate-tokens 64] [--prompts 2]
                                      [--kernel-profile] [--gemm] [--json FILE]

Inductor compiles each graph on first use (minutes on 2 cores); that time is not counted.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from collections import defaultdict

import torch

from jetspec_compile import TreeSpec, attach_drafter
from jetspec_compile.models import load_smollm2
from jetspec_compile.prompts import encode_chat, load_prompts
from jetspec_compile.runtime.loop import SamplingParams, speculative_generate

#: FX node -> component: first pattern matching the node's module path and op name wins
_COMPONENTS = (
    ("lm_head", r"lm_head"),
    ("q/k/v/o proj", r"self_attn\.(q|k|v|o)_proj"),
    ("mlp", r"\.mlp\."),
    ("norm", r"norm"),
    ("kv write", r"index_copy"),
    ("mask", r"tree_attention_mask|tree_mask"),
    ("attention", r"scaled_dot_product|_attention"),
    ("rotary", r"rotary|self_attn"),
    ("embed", r"embed"),
)


def _component(node) -> tuple[str, str]:
    """(layer, component) of an FX node of the verify graph, from its module stack and op."""
    stack = node.meta.get("nn_module_stack") or {}
    path = " ".join(str(v[0]) if isinstance(v, tuple) else str(v) for v in stack.values())
    layer = re.search(r"layers[._](\d+)", path)
    what = f"{path} {getattr(node.target, '__name__', node.target)} {node.meta.get('jetspec', '')}"
    comp = next((name for name, pat in _COMPONENTS if re.search(pat, what)), "other")
    return (f"layer {int(layer.group(1)):2d}" if layer else "outside layers"), comp


class _TimedInterpreter(torch.fx.Interpreter):
    """Runs a graph node by node, adding each node's wall time to ``times[(layer, component)]``."""

    def __init__(self, gm, times):
        super().__init__(gm)
        self.times = times
        self.keys = {node: _component(node) for node in gm.graph.nodes}

    def run_node(self, n):
        start = time.perf_counter()
        out = super().run_node(n)
        self.times[self.keys[n]] += time.perf_counter() - start
        return out


def _stats(ts: list[float]) -> str:
    return f"{statistics.median(ts) * 1e3:7.2f} ms (min {min(ts) * 1e3:6.2f})"


def _tree(n: int) -> TreeSpec:
    """A draft-shaped tree of ``n`` nodes: four children per node, breadth first."""
    return TreeSpec.chain(1) if n == 1 else TreeSpec((-1,) + tuple(i // 4 for i in range(n - 1)))


class _Timed:
    """Wraps a callable, recording each call's wall time."""

    def __init__(self, fn):
        self.fn, self.times = fn, []

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        out = self.fn(*args, **kwargs)
        self.times.append(time.perf_counter() - start)
        return out


def _op_table(fn, reps: int, rows: int, title: str) -> str:
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            fn()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
    return f"---- per-op, {title}, {reps} calls (self CPU time; totals over all calls)\n{table}"


def profile_backend(model, tok, backend: str, args) -> dict:
    spec = attach_drafter(model, "smollm2", budget=args.budget, backend=backend, max_cache_len=2048)
    verifier = spec.verifier(1)  # budgets {1, budget}: the graphs generate runs
    drafter = spec.runtime_drafter()
    prompt = torch.randint(100, 20000, (1, args.context), generator=torch.Generator().manual_seed(0))
    gen_prompts = [encode_chat(tok, t) for t in load_prompts("humaneval", "test", max(args.prompts, 1))]

    # the drafter's state after a prompt: begin() with the prompt's taps, as generate does
    _, hidden = verifier.prefill(prompt)
    drafter.begin([prompt[0].tolist()], [hidden[0]])
    with torch.no_grad():
        hf_cache = model(input_ids=prompt, use_cache=True).past_key_values

    def hf_step():
        with torch.no_grad():
            model(input_ids=torch.tensor([[42]]), cache=hf_cache, use_cache=True)
        hf_cache.crop(-1)  # drop the token again: every step decodes at the same length

    graph_timers = {}
    for n in (1, args.budget):
        verifier._graph(n)  # compiled here (first use), not inside the timed loop
        graph_timers[n] = verifier._graphs[n] = _Timed(verifier._graphs[n])

    def verify_step(n):
        verifier.verify_greedy(torch.randint(100, 20000, (1, n)), _tree(n))
        verifier._pending = None  # discard: the cache pointer did not move

    step_timer = _Timed(drafter.step_fn)
    drafter.step_fn = step_timer

    def draft_step():
        drafter.draft([42], args.budget)

    steps = {"hf decode step": hf_step, "verify budget 1": lambda: verify_step(1),
             f"verify budget {args.budget}": lambda: verify_step(args.budget), "draft": draft_step}
    for _ in range(3):  # warm-up (Inductor may recompile once when the cache length turns dynamic)
        for fn in steps.values():
            fn()
    times = {name: [] for name in steps}
    for timer in (*graph_timers.values(), step_timer):
        timer.times.clear()
    for _ in range(args.reps):
        for name, fn in steps.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    print(f"\n==== backend {backend}: isolated steps at a context of {args.context} tokens, {args.threads} thread(s), "
          f"median of {args.reps}")
    result = {"backend": backend, "steps_ms": {}}
    for name, ts in times.items():
        print(f"{name:18s} {_stats(ts)}")
        result["steps_ms"][name] = {"median": statistics.median(ts) * 1e3, "min": min(ts) * 1e3}
    for n, timer in graph_timers.items():
        total = times[f"verify budget {n}"]
        host = [a - b for a, b in zip(total, timer.times)]
        print(f"  budget {n:2d}: graph call {_stats(timer.times)}, host around it {_stats(host)}")
        result["steps_ms"][f"verify budget {n}: graph"] = {"median": statistics.median(timer.times) * 1e3}
        result["steps_ms"][f"verify budget {n}: host"] = {"median": statistics.median(host) * 1e3}
    tree_part = [a - b for a, b in zip(times["draft"], step_timer.times)]
    print(f"  draft: network step {_stats(step_timer.times)}, tree building and lookups {_stats(tree_part)}")
    result["steps_ms"]["draft: network"] = {"median": statistics.median(step_timer.times) * 1e3}
    result["steps_ms"]["draft: trees"] = {"median": statistics.median(tree_part) * 1e3}

    if args.ops:
        for name in ("verify budget 1", f"verify budget {args.budget}", "draft"):
            print(_op_table(steps[name], args.profile_reps, args.ops, f"{backend} {name}"))
    if backend == "eager" and args.layers:
        for n in (1, args.budget):
            result[f"components_budget_{n}"] = _component_table(verifier, n, args)

    if args.generate_tokens:
        result["generate"] = _generate_breakdown(spec, verifier, drafter, model, gen_prompts, args)
    drafter.step_fn = step_timer.fn
    return result


def _component_table(verifier, n: int, args) -> dict:
    """Per-layer and per-component wall time of the eager verify graph at budget ``n`` (FX interpreter)."""
    graph = verifier._graphs[n]
    gm = getattr(graph, "fn", graph)
    times = defaultdict(float)
    interp = _TimedInterpreter(gm, times)
    run = verifier._run

    def timed_run(tokens, depth, tree_mask, start):  # the verifier's own inputs, through the interpreter
        verifier._graphs[n] = lambda **inputs: interp.run(*[inputs[p.target] for p in gm.graph.find_nodes(
            op="placeholder")])
        try:
            return run(tokens, depth, tree_mask, start)
        finally:
            verifier._graphs[n] = graph

    verifier._run = timed_run
    try:
        for _ in range(args.profile_reps):
            verifier.verify_greedy(torch.randint(100, 20000, (1, n)), _tree(n))
            verifier._pending = None
    finally:
        del verifier._run
    reps = args.profile_reps
    total = sum(times.values())
    by_comp, by_layer = defaultdict(float), defaultdict(float)
    for (layer, comp), t in times.items():
        by_comp[comp] += t
        by_layer[layer] += t
    print(f"---- eager verify graph, budget {n}: time by component (FX interpreter, {reps} calls; "
          f"per call {total / reps * 1e3:.2f} ms incl. interpreter overhead)")
    for comp, t in sorted(by_comp.items(), key=lambda kv: -kv[1]):
        print(f"  {comp:16s} {t / reps * 1e3:7.2f} ms  {t / total:6.1%}")
    layers = sorted(k for k in by_layer if k.startswith("layer"))
    per_layer = [by_layer[k] / reps * 1e3 for k in layers]
    print(f"  by layer: {len(layers)} decoder layers, median {statistics.median(per_layer):.2f} ms "
          f"[{min(per_layer):.2f}, {max(per_layer):.2f}]; outside the layers "
          f"{by_layer['outside layers'] / reps * 1e3:.2f} ms")
    return {"components_ms": {k: v / reps * 1e3 for k, v in by_comp.items()},
            "layers_ms": dict(zip(layers, per_layer)), "outside_layers_ms": by_layer["outside layers"] / reps * 1e3}


def _generate_breakdown(spec, verifier, drafter, model, prompts, args) -> dict:
    """Greedy generation at budget 1 and at ``args.budget`` against HF generate; per-step phase times."""
    out = {}
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    rows = defaultdict(lambda: defaultdict(list))
    identical = defaultdict(list)
    for ids in prompts:
        x = torch.tensor([ids])
        start = time.perf_counter()
        with torch.no_grad():
            ref = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=args.generate_tokens,
                                 do_sample=False)
        hf_seconds = time.perf_counter() - start
        rows["hf generate"]["tok/s"].append((ref.shape[1] - x.shape[1]) / hf_seconds)
        for budget in (1, args.budget):
            try:
                tokens, st = speculative_generate(verifier, drafter, x, torch.ones_like(x),
                                                  max_new_tokens=args.generate_tokens, params=SamplingParams(),
                                                  eos_token_ids=eos, budgets=(budget,))
            finally:
                verifier.reset()
            name = f"budget {budget}"
            identical[name].append(tokens[0] == ref[0, x.shape[1]:].tolist())
            steps = max(st["steps"], 1)
            for key in ("draft_seconds", "verify_seconds", "host_seconds"):
                rows[name][key.split("_")[0] + " ms/step"].append(st[key] / steps * 1e3)
            rows[name]["ms/step"].append(st["seconds"] / steps * 1e3)
            rows[name]["tau"].append(st["tau"])
            rows[name]["tok/s"].append(st["tokens_per_second"])
    print(f"---- generate ({len(prompts)} HumanEval prompts, {args.generate_tokens} new tokens, greedy; medians)")
    for name, cols in rows.items():
        vals = {k: statistics.median(v) for k, v in cols.items()}
        same = "" if name not in identical else f"  identical to HF: {all(identical[name])}"
        print(f"  {name:12s} " + "  ".join(f"{k} {v:6.2f}" for k, v in vals.items()) + same)
        out[name] = vals | ({"identical": all(identical[name])} if name in identical else {})
    return out


def gemm_table(model, rows_list, reps: int) -> dict:
    """Each distinct linear shape of ``model`` at each row count: plain ``F.linear`` against the MKL- and
    oneDNN-packed kernels (min of ``reps`` interleaved calls over 30 distinct weights, so they come from memory)."""
    from jetspec_compile.kernels.cpu_linear import available_kernels, pack_weight, run_packed

    shapes = sorted({tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Linear)})
    gen = torch.Generator().manual_seed(0)
    out = {}
    print(f"---- GEMM kernels (min of {reps} calls, 30 distinct weights per shape; MB/ms = GB/s)")
    for rows in rows_list:
        for out_f, in_f in shapes:
            weights = [torch.randn(out_f, in_f, generator=gen) for _ in range(30 if out_f * in_f < 4e6 else 3)]
            x = torch.randn(rows, in_f, generator=gen)
            kernels = {"plain": None} | {k: [pack_weight(k, w, rows) for w in weights] for k in available_kernels()}
            times = {k: [] for k in kernels}
            with torch.no_grad():
                for _ in range(reps):
                    for k, packed in kernels.items():
                        start = time.perf_counter()
                        for i, w in enumerate(weights):
                            if packed is None:
                                torch.nn.functional.linear(x, w)
                            else:
                                run_packed(k, x, packed[i], w, None, rows)
                        times[k].append((time.perf_counter() - start) / len(weights))
            best = {k: min(t) for k, t in times.items()}
            mb = out_f * in_f * 4 / 1e6
            print(f"  rows {rows:2d}  {out_f:5d} x {in_f:5d}: " + "  ".join(
                f"{k} {t * 1e3:7.3f} ms ({mb / (t * 1e3):5.1f} GB/s)" for k, t in best.items()))
            out[f"{rows}x{in_f}->{out_f}"] = {k: t * 1e3 for k, t in best.items()}
    out["concat"] = _concat_table(model, rows_list, reps)
    out["compact"] = _compact_table(model, rows_list, reps)
    return out


def _compact_table(model, rows_list, reps: int) -> dict:
    """Every linear of every layer (the model's own weights, one step's worth) on oneDNN packed fp32 against the
    exact compact form the model's weights have (``kernels/compact_linear.py``; 4-bit codes for SmolLM2's
    GGUF-derived weights) and against the bf16 form of the same weights rounded to bf16 (what a bf16 checkpoint
    loaded as fp32 gets), interleaved; ms per step."""
    from jetspec_compile.kernels import compact_linear
    from jetspec_compile.kernels.cpu_linear import pack_weight, run_packed

    if not compact_linear.kernels_available():
        print(f"---- compact weights: kernels unavailable ({compact_linear.build_error()})")
        return {}
    weights = [m.weight.detach() for layer in model.model.layers for m in layer.modules()
               if isinstance(m, torch.nn.Linear)]
    own = [compact_linear.encode(w) for w in weights]
    forms = sorted({f.form for f in own if f is not None})
    rounded = [compact_linear.encode(w.bfloat16().float()) for w in weights]
    out = {}
    print(f"---- every layer linear of one step: oneDNN fp32 against compact weights (own form: {forms or 'none'})")
    for rows in rows_list:
        xs = {k: torch.randn(rows, k) for k in {w.shape[1] for w in weights}}
        packed = [pack_weight("onednn", w, rows) for w in weights]
        variants = {"onednn": lambda: [run_packed("onednn", xs[w.shape[1]], p, w, None, rows)
                                       for w, p in zip(weights, packed)],
                    "bf16 (rounded weights)": lambda: [f.linear(xs[w.shape[1]]) for w, f in zip(weights, rounded)]}
        if all(f is not None for f in own):
            variants["own form"] = lambda: [f.linear(xs[w.shape[1]]) for w, f in zip(weights, own)]
        times = {k: [] for k in variants}
        with torch.no_grad():
            for _ in range(reps):
                for name, fn in variants.items():
                    start = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - start)
        print(f"  rows {rows:2d}: " + ", ".join(f"{k} {_stats(t)}" for k, t in times.items()))
        out[str(rows)] = {k: statistics.median(t) * 1e3 for k, t in times.items()}
    return out


def _concat_table(model, rows_list, reps: int) -> dict:
    """Every layer's q/k/v and gate/up linears as separate packed GEMMs against one GEMM per group over the
    concatenated weights (what ``CONCAT_LINEARS`` makes Inductor do), the model's own weights, interleaved."""
    from jetspec_compile.kernels.cpu_linear import available_kernels, pack_weight, run_packed

    groups = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        groups += [[attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight],
                   [mlp.gate_proj.weight, mlp.up_proj.weight]]
    out = {}
    print("---- q/k/v and gate/up of every layer: separate GEMMs against one GEMM per group (ms per step)")
    for rows in rows_list:
        for kernel in available_kernels():
            with torch.no_grad():
                variants = {"separate": [[(pack_weight(kernel, w, rows), w) for w in g] for g in groups],
                            "concat": [[(pack_weight(kernel, torch.cat(g), rows), torch.cat(g))] for g in groups]}
            x = torch.randn(rows, groups[0][0].shape[1])
            times = {k: [] for k in variants}
            with torch.no_grad():
                for _ in range(reps):
                    for name, packed in variants.items():
                        start = time.perf_counter()
                        for group in packed:
                            for p, w in group:
                                run_packed(kernel, x, p, w, None, rows)
                        times[name].append(time.perf_counter() - start)
            med = {k: statistics.median(t) for k, t in times.items()}
            print(f"  rows {rows:2d} {kernel:6s}: separate {_stats(times['separate'])}, concat "
                  f"{_stats(times['concat'])}; concat/separate {med['concat'] / med['separate']:.2f} (median)")
            out[f"{rows} {kernel}"] = {k: v * 1e3 for k, v in med.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", nargs="*", default=["eager"], choices=["eager", "inductor"],
                    help="backends to profile (none: only --gemm)")
    ap.add_argument("--budget", type=int, default=8, help="speculative tree budget (budget 1 is always profiled)")
    ap.add_argument("--context", type=int, default=160, help="committed context length of the isolated steps")
    ap.add_argument("--reps", type=int, default=20, help="timed repetitions of each isolated step")
    ap.add_argument("--profile-reps", type=int, default=10, help="calls per profiler table")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ops", type=int, default=15, help="rows of each per-op table (0: no tables)")
    ap.add_argument("--no-layers", dest="layers", action="store_false", help="skip the per-layer table (eager)")
    ap.add_argument("--generate-tokens", type=int, default=64, help="new tokens per generate run (0: skip)")
    ap.add_argument("--prompts", type=int, default=2, help="HumanEval test prompts of the generate breakdown")
    ap.add_argument("--kernel-profile", action="store_true",
                    help="Inductor: name each generated C++ kernel in the per-op table (slightly slower kernels)")
    ap.add_argument("--gemm", action="store_true",
                    help="also time every linear shape at 1 row and at --budget rows: plain, MKL- and oneDNN-packed")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    if args.budget < 2:
        raise SystemExit("--budget must be >= 2 (budget 1 is always profiled)")
    torch.set_num_threads(args.threads)
    if args.kernel_profile:
        import torch._inductor.config as inductor_config

        inductor_config.cpp.enable_kernel_profile = True
    model, tok = load_smollm2()
    gemm = gemm_table(model, (1, args.budget), args.reps) if args.gemm else None
    results = [profile_backend(model, tok, backend, args) for backend in args.backends]
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "gemm_ms": gemm, "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
