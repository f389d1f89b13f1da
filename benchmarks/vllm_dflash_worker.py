"""Run a target in vLLM, with or without a DFlash drafter, and report outputs, speed and acceptance as JSON.

Runs with the vLLM environment's Python (vLLM's CPU build pins its own torch and transformers), never inside
``jetspec_compile``: it imports only vLLM and the standard library. Driven by ``benchmarks/vllm_dflash.py``.

    <vllm python> benchmarks/vllm_dflash_worker.py REQUEST.json RESULT.json

REQUEST: ``{"target": DIR, "drafter": DIR or null, "num_speculative_tokens": K, "prompts": [[ids], ...],
"max_new_tokens": N, "stop_token_ids": [...], "threads": 2}``. Every prompt is generated on its own (batch 1,
greedy), after one warm-up request. RESULT: ``{"outputs": [[new ids], ...], "seconds": [...], "new_tokens":
[...], "spec": {"drafts", "draft_tokens", "accepted_tokens", "accepted_per_position": [...]}, "vllm": version}``
(the speculative counters of the timed requests only; zeros without a drafter).
"""

from __future__ import annotations

import json
import os
import sys
import time

COUNTERS = {"vllm:spec_decode_num_drafts": "drafts", "vllm:spec_decode_num_draft_tokens": "draft_tokens",
            "vllm:spec_decode_num_accepted_tokens": "accepted_tokens"}
PER_POSITION = "vllm:spec_decode_num_accepted_tokens_per_pos"


def counters(llm) -> dict:
    out = {name: 0 for name in COUNTERS.values()}
    per_pos: list[int] = []
    for metric in llm.get_metrics():
        name = getattr(metric, "name", None)
        if name in COUNTERS:
            out[COUNTERS[name]] += int(metric.value)
        elif name == PER_POSITION:
            values = [int(v) for v in metric.values]
            per_pos = [a + b for a, b in zip(per_pos + [0] * len(values), values + [0] * len(per_pos))]
    out["accepted_per_position"] = per_pos
    return out


def preload() -> str:
    """tcmalloc and Intel OpenMP for vLLM's CPU engine, as its install guide asks (found on disk, else none)."""
    found = [p for p in ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
                         "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4") if os.path.exists(p)][:1]
    iomp = os.path.join(sys.prefix, "lib", "libiomp5.so")
    return ":".join(found + ([iomp] if os.path.exists(iomp) else []))


def main() -> None:
    request = json.loads(open(sys.argv[1]).read())
    threads = int(request.get("threads", 2))
    os.environ.setdefault("LD_PRELOAD", preload())
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{threads - 1}"
    os.environ["OMP_NUM_THREADS"] = str(threads)
    # vLLM 0.32 CPU never loads its compile cache ("'function' object has no attribute 'finalize_loading'") and
    # recompiles at every start anyway; with a stale entry there, a start has overflowed the stack while
    # recompiling. Not reading or writing the cache costs nothing and avoids that (set it to 0 to keep it).
    os.environ.setdefault("VLLM_DISABLE_COMPILE_CACHE", "1")
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kwargs = dict(model=request["target"], dtype="float32", max_model_len=2048, max_num_seqs=4, seed=0,
                  skip_tokenizer_init=True, disable_log_stats=False)
    if request.get("drafter"):
        kwargs["speculative_config"] = {"method": "dflash", "model": request["drafter"],
                                        "num_speculative_tokens": int(request["num_speculative_tokens"])}
    llm = LLM(**kwargs)
    params = SamplingParams(max_tokens=int(request["max_new_tokens"]), temperature=0.0, detokenize=False,
                            stop_token_ids=list(request.get("stop_token_ids", [])))
    llm.generate([TokensPrompt(prompt_token_ids=list(request["prompts"][0]))],
                 SamplingParams(max_tokens=8, temperature=0.0, detokenize=False), use_tqdm=False)  # warm-up
    before = counters(llm)
    outputs, seconds = [], []
    for ids in request["prompts"]:
        start = time.perf_counter()
        result = llm.generate([TokensPrompt(prompt_token_ids=list(ids))], params, use_tqdm=False)[0]
        seconds.append(time.perf_counter() - start)
        outputs.append(list(result.outputs[0].token_ids))
    after = counters(llm)
    spec = {k: after[k] - before[k] for k in COUNTERS.values()}
    spec["accepted_per_position"] = [a - b for a, b in zip(
        after["accepted_per_position"], before["accepted_per_position"] + [0] * len(after["accepted_per_position"]))]
    with open(sys.argv[2], "w") as fh:
        json.dump({"outputs": outputs, "seconds": seconds, "new_tokens": [len(o) for o in outputs], "spec": spec,
                   "vllm": vllm.__version__}, fh)


if __name__ == "__main__":
    main()
