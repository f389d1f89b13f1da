"""Support sweep: which causal-LM architectures of the installed transformers verify trees losslessly.

For every model type in transformers' causal-LM registry (``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``) this builds a
tiny random-weight model offline from its config class's defaults shrunk to tiny sizes (hidden width, layers,
heads, vocabulary, windows, experts, ...), and records one of:

* ``lossless``: greedy ``generate`` of :func:`jetspec_compile.optimize` is token-identical to the model's own
  ``generate(do_sample=False)`` with an always-wrong and a random tree drafter, batch 1 and a left-padded batch 2;
* ``refused``: jetspec_compile raised :class:`~jetspec_compile.errors.UnsupportedModelError` (message kept);
* ``mismatch``: tokens differ from ``model.generate`` (a defect), or jetspec_compile crashed with another error;
* ``cannot-build-here``: the tiny model cannot be built or run on its own here (needs remote code, pixel or
  audio inputs, its ``generate`` fails, ...), so there is nothing to compare against.

Each architecture runs in its own forked process with a time limit, so one hang does not stop the sweep (a timeout
is recorded as ``cannot-build-here``). Results are appended to a JSON-lines file as they come (``--resume``
skips architectures already there) and rendered to ``docs/support.md``::

    nice -n 10 python benchmarks/support_sweep.py                 # the whole registry
    python benchmarks/support_sweep.py --only llama,bloom,gemma2  # a few
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 128
NEW_TOKENS = 12
BUDGET = 8

#: config attribute -> tiny value; applied only where the config class has that attribute
SHRINK = {
    "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256,
    "ffn_dim": 96, "n_inner": 96, "d_ff": 96, "ffn_hidden_size": 96, "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32, "expert_intermediate_size": 32,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_topk": 2, "n_shared_experts": 1, "topk_group": 1, "n_group": 1,
    "first_k_dense_replace": 1,
    "kv_lora_rank": 32, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "qk_head_dim": 16, "global_head_dim": 16, "rotary_dim": 8,
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "tie_word_embeddings": False,
}
#: windows only shrink where the default has one (so tests of a few dozen tokens cross them)
SHRINK_IF_SET = {"sliding_window": 8, "attention_window_size": 8, "local_window_size": 8, "window_size": 8}


def registry() -> dict[str, str]:
    """model_type -> causal-LM class name, from the installed transformers."""
    from transformers.models.auto import modeling_auto

    return dict(modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


#: keys that fix head geometry; the second attempt leaves them at their defaults (some configs tie them together)
_HEAD_GEOMETRY = {"head_dim", "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim",
                  "qk_head_dim", "global_head_dim", "rotary_dim", "num_key_value_heads"}
#: the third attempt shrinks only these (layer count and per-layer lists stay as the config defines them)
_BASIC = {"vocab_size", "hidden_size", "intermediate_size", "bos_token_id", "eos_token_id", "pad_token_id",
          "tie_word_embeddings"}


def tiny_config(model_type: str, attempt: int = 0):
    """The config class's defaults made tiny: attempt 0 shrinks every size in :data:`SHRINK` the class has,
    attempt 1 keeps head geometry at its defaults, attempt 2 shrinks only widths and vocabulary."""
    from transformers import AutoConfig

    default = AutoConfig.for_model(model_type)
    keys = set(SHRINK) - (_HEAD_GEOMETRY if attempt >= 1 else set())
    keys = keys & _BASIC if attempt >= 2 else keys
    overrides = {k: v for k, v in SHRINK.items() if k in keys and hasattr(default, k)}
    if attempt < 2:
        overrides.update({k: v for k, v in SHRINK_IF_SET.items() if getattr(default, k, None)})
    if attempt < 2 and getattr(default, "layer_types", None):
        # keep one layer of every kind the default mixes, in the default's order of first appearance
        kinds = list(dict.fromkeys(default.layer_types))
        layers = max(2, len(kinds))
        overrides["num_hidden_layers"] = layers
        overrides["layer_types"] = (kinds * layers)[:layers]
    if getattr(default, "text_config", None) is not None and hasattr(default.text_config, "to_dict"):
        overrides = {"text_config": {**default.text_config.to_dict(), **overrides}}
    return AutoConfig.for_model(model_type, **overrides)


ATTEMPTS = 3


def _prompts(batch: int):
    import torch

    g = torch.Generator().manual_seed(batch)
    rows = [torch.randint(3, VOCAB, (n,), generator=g) for n in (9, 14)[:batch]]
    width = max(len(r) for r in rows)
    ids = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for i, r in enumerate(rows):  # left padding
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask


def _build(model_type: str, attempt: int):
    """The tiny model, checked by one forward of its own."""
    import torch
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type, attempt)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # sharpen the head: random init gives near-uniform logits and greedy ties
        model.get_output_embeddings().weight.mul_(8.0)
        model(input_ids=_prompts(1)[0])
    model.generation_config.eos_token_id = None  # run every row the full length
    return model


def check_architecture(model_type: str) -> dict:
    """Build the tiny model of ``model_type`` and classify it (see the module docstring)."""
    import torch

    import jetspec_compile as js
    from jetspec_compile.errors import UnsupportedModelError
    from tests.drafters import OracleDrafter

    errors = []
    for attempt in range(ATTEMPTS):
        torch.manual_seed(0)
        try:
            model = _build(model_type, attempt)
            break
        except Exception as err:  # anything the model itself cannot do here
            errors.append(f"{type(err).__name__}: {err}")
    else:
        return {"status": "cannot-build-here", "detail": errors[-1]}
    vocab = model.get_output_embeddings().weight.shape[0]
    attn = getattr(model.config, "_attn_implementation", None)
    stage = "building the verifier"
    try:
        # tap layer 0 only: the model's own forward may then prefill (no second graph to capture)
        spec = js.optimize(model, budget=BUDGET, max_cache_len=96, fallback=False, tap_layers=(0,))
        spec.verifier(1)  # refusals come here, before the (sometimes slow) reference generations
        for batch in (1, 2):
            ids, mask = _prompts(batch)
            stage = "the model's own generate"
            with torch.no_grad():
                expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                                          do_sample=False)
            stage = "speculative generate"
            refs = [expected[r][mask[r].bool().tolist() + [True] * NEW_TOKENS].tolist() for r in range(batch)]
            for mode in ("wrong", "mixed"):
                spec.drafter = OracleDrafter(refs, vocab, mode, seed=batch)
                out = spec.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS)
                if not torch.equal(out, expected):
                    return {"status": "mismatch", "attn": attn,
                            "detail": f"batch {batch}, {mode} drafter: {out.tolist()} != {expected.tolist()}"}
    except UnsupportedModelError as err:
        return {"status": "refused", "attn": attn, "detail": str(err)}
    except Exception as err:
        if stage == "the model's own generate":
            return {"status": "cannot-build-here", "attn": attn, "detail": f"generate: {type(err).__name__}: {err}"}
        return {"status": "mismatch", "attn": attn,
                "detail": f"crash while {stage}: {type(err).__name__}: {err} | {traceback.format_exc(limit=-3)}"}
    return {"status": "lossless", "attn": attn, "detail": ""}


def _child(model_type: str, conn) -> None:
    try:
        result = check_architecture(model_type)
    except BaseException as err:  # the child must always answer
        result = {"status": "cannot-build-here", "detail": f"worker failed: {type(err).__name__}: {err}"}
    conn.send(result)
    conn.close()


def run_one(model_type: str, timeout: float) -> dict:
    """Check one architecture in a forked child (torch and transformers are imported once, in the parent),
    killed after ``timeout`` seconds."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    start = time.perf_counter()
    proc = ctx.Process(target=_child, args=(model_type, send), daemon=True)
    proc.start()
    send.close()
    if receive.poll(timeout):
        try:
            result = receive.recv()
        except EOFError:
            result = None
    else:
        result = {"status": "cannot-build-here", "detail": f"timed out after {timeout:.0f}s"}
    if proc.is_alive():
        proc.kill()
    proc.join()
    if result is None:
        result = {"status": "cannot-build-here", "detail": f"worker died (exit code {proc.exitcode})"}
    result["model_type"] = model_type
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def _cell(text: str, limit: int = 220) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[:limit - 1] + "…"


def render(results: list[dict], classes: dict[str, str], total_seconds: float, registered: int) -> str:
    import platform

    import torch
    import transformers

    order = ("lossless", "refused", "mismatch", "cannot-build-here")
    counts = {s: sum(r["status"] == s for r in results) for s in order}
    lines = [
        "# Support matrix: causal-LM architectures of transformers",
        "",
        f"**{counts['lossless']} of {registered} causal-LM architectures of transformers "
        f"{transformers.__version__} verified lossless** (torch {torch.__version__}, "
        f"{time.strftime('%Y-%m', time.gmtime())}, {platform.machine()} CPU with {os.cpu_count()} cores, load "
        f"average {os.getloadavg()[0]:.0f} when the table was written, float32).",
        "",
        "| status | count |",
        "| --- | --- |",
        *[f"| {s} | {counts[s]} |" for s in order],
        "",
        "Produced by `make support-sweep` (`nice -n 10 python benchmarks/support_sweep.py`)"
        + f" ({len(results)} of {registered} registered architectures run; {total_seconds / 60:.0f} minutes of "
        "per-architecture time on 1 thread). Each architecture: "
        "a tiny random-weight model from its config class's defaults with sizes shrunk (hidden 64, 2 layers or one "
        "per layer kind, 4 heads, vocabulary 128, windows 8, 4 experts), greedy `generate` of 12 new tokens with "
        "an always-wrong and a random tree drafter (budget 8), batch 1 and a left-padded batch of 2, compared "
        "token by token with the model's own `generate(do_sample=False)`. `refused` means jetspec_compile raised "
        "`UnsupportedModelError` with the message shown; `cannot-build-here` means the tiny model could not be "
        "built or could not run `generate` by itself here, so there is nothing to compare.",
        "",
        "| architecture | class | status | attention | detail |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in sorted(results, key=lambda r: (order.index(r["status"]), r["model_type"])):
        lines.append(f"| `{r['model_type']}` | {classes.get(r['model_type'], '')} | {r['status']} | "
                     f"{r.get('attn') or ''} | {_cell(r.get('detail', ''))} |")
    missing = sorted(set(classes) - {r["model_type"] for r in results})
    if missing:
        lines += ["", f"Not run in this sweep ({len(missing)}): " + ", ".join(f"`{m}`" for m in missing) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated model types to (re)run; the table keeps the others' "
                        "earlier results from --results (default: the whole registry)")
    parser.add_argument("--timeout", type=float, default=150.0, help="seconds per architecture (default 150)")
    parser.add_argument("--results", default=str(ROOT / ".cache" / "support_sweep.jsonl"),
                        help="JSON-lines results file, appended as architectures finish")
    parser.add_argument("--resume", action="store_true",
                        help="skip architectures already in --results (by default they are rerun)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "support.md"), help="markdown table to write")
    args = parser.parse_args(argv)
    os.environ.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
                      TRANSFORMERS_OFFLINE="1")
    sys.path.insert(0, str(ROOT))
    import torch

    torch.set_num_threads(1)
    import jetspec_compile  # noqa: F401  (imported once; every forked child shares it)
    import transformers  # noqa: F401
    classes = registry()
    wanted = args.only.split(",") if args.only else sorted(classes)
    unknown = sorted(set(wanted) - set(classes))
    if unknown:
        parser.error(f"not causal-LM model types of this transformers: {unknown}")
    results_path = Path(args.results)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    done = {}  # earlier results: kept for the table, rerun unless --resume (--only reruns just those named)
    if results_path.exists() and (args.resume or args.only):
        for line in results_path.read_text().splitlines():
            r = json.loads(line)
            if r["model_type"] in classes and not (args.only and r["model_type"] in wanted and not args.resume):
                done[r["model_type"]] = r
    start = time.perf_counter()
    todo = [m for m in wanted if m not in done]
    for i, model_type in enumerate(todo):
        done[model_type] = run_one(model_type, args.timeout)
        results_path.write_text("".join(json.dumps(done[m]) + "\n" for m in sorted(done)))
        print(f"[{i + 1}/{len(todo)}] {model_type}: {done[model_type]['status']} ({done[model_type]['seconds']}s) "
              f"{_cell(done[model_type].get('detail', ''), 160)}", flush=True)
    results = [done[m] for m in sorted(done)]
    missing = sorted(set(classes) - set(done))
    if missing:
        print(f"not run yet ({len(missing)}): {missing}")
    Path(args.out).write_text(render(results, classes, sum(r["seconds"] for r in results), len(classes)))
    mismatches = [r["model_type"] for r in results if r["status"] == "mismatch"]
    print(f"wrote {args.out}; {time.perf_counter() - start:.0f}s; mismatches: {mismatches}")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
