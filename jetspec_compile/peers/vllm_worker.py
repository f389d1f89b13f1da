"""A vLLM engine behind a line-delimited JSON protocol, run by ``jetspec-compile bench --peers vllm``.

This file runs with the peer environment's Python (``make peers``: vLLM's CPU build with its own torch and
transformers), never inside ``jetspec_compile``: it imports only vLLM and the standard library.

Protocol, one JSON object per line. The first line on stdin configures the engine::

    {"model": "<HF folder>", "method": "plain" | "ngram", "num_speculative_tokens": 8, "prompt_lookup_min": 2,
     "prompt_lookup_max": 5, "dtype": "float32", "max_model_len": 2048, "max_num_seqs": 16, "kv_cache_gib": 1,
     "threads": 2, "seed": 0, "preload": true}

and the worker answers ``{"ready": true, "vllm": "<version>", "method": ...}``. Each further line is a request::

    {"prompts": [[token ids], ...], "max_new_tokens": 128, "temperature": 0.0, "top_p": 1.0, "seed": null,
     "stop_token_ids": [2]}

(temperature 0: greedy) submitted as one ``LLM.generate`` call (so its prompts run as concurrent requests),
answered with ``{"outputs": [[new token ids], ...], "seconds": <wall time of the call>, "spec_decode": {"drafts": ...,
"draft_tokens": ..., "accepted_tokens": ...}}`` (vLLM's speculative-decoding counters for that call; zeros for
plain decoding). A failure is answered ``{"error": "<message>"}`` and ends the worker; end of input ends it too.
Answers go to the original stdout; anything vLLM prints goes to stderr.
"""

from __future__ import annotations

import json
import os
import sys
import copy
import time
import traceback

SPEC_COUNTERS = {"vllm:spec_decode_num_drafts": "drafts", "vllm:spec_decode_num_draft_tokens": "draft_tokens",
                 "vllm:spec_decode_num_accepted_tokens": "accepted_tokens"}


def spec_counters(metrics) -> dict[str, int]:
    """vLLM's cumulative speculative-decoding counters from ``LLM.get_metrics()``, summed over engines."""
    out = dict.fromkeys(SPEC_COUNTERS.values(), 0)
    for m in metrics:
        key = SPEC_COUNTERS.get(getattr(m, "name", None))
        if key is not None:
            out[key] += int(m.value)
    return out


#: where tcmalloc lies when the distribution's package is installed (Debian/Ubuntu ``libtcmalloc-minimal4``)
TCMALLOC = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4",
            "/usr/lib64/libtcmalloc_minimal.so.4", "/usr/lib64/libtcmalloc.so.4")


def preload_libraries() -> list[str]:
    """tcmalloc and Intel OpenMP (``libiomp5``, installed into the venv with vLLM's CPU build), found on disk:
    vLLM's CPU install guide has users put them in ``LD_PRELOAD`` and warns of a large loss without them (for
    speculation in particular). vLLM's engine process inherits the variable."""
    found = [p for p in TCMALLOC if os.path.exists(p)][:1]
    iomp = os.path.join(sys.prefix, "lib", "libiomp5.so")
    found += [iomp] if os.path.exists(iomp) else []
    return found


def build_engine(cfg: dict):
    """The offline ``vllm.LLM`` described by the configuration line (environment variables set first)."""
    threads = int(cfg.get("threads", 1))
    if cfg.get("preload", True) and "LD_PRELOAD" not in os.environ:
        os.environ["LD_PRELOAD"] = ":".join(preload_libraries())
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.get("kv_cache_gib", 1))
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cfg.get("cpu_bind") or f"0-{threads - 1}"
    os.environ["OMP_NUM_THREADS"] = str(threads)
    # vLLM 0.32 CPU never loads its compile cache ("'function' object has no attribute 'finalize_loading'") and
    # recompiles at every start anyway; with a stale entry there, a start has overflowed the stack while
    # recompiling. Not reading or writing the cache costs nothing and avoids that (set it to 0 to keep it).
    os.environ.setdefault("VLLM_DISABLE_COMPILE_CACHE", "1")
    from vllm import LLM

    kwargs = dict(model=cfg["model"], dtype=cfg.get("dtype", "float32"),
                  max_model_len=int(cfg.get("max_model_len", 2048)), max_num_seqs=int(cfg.get("max_num_seqs", 16)),
                  seed=int(cfg.get("seed", 0)),
                  skip_tokenizer_init=True, disable_log_stats=False)
    method = cfg.get("method", "plain")
    if method == "ngram":
        kwargs["speculative_config"] = {
            "method": "ngram", "num_speculative_tokens": int(cfg.get("num_speculative_tokens", 8)),
            "prompt_lookup_min": int(cfg.get("prompt_lookup_min", 2)),
            "prompt_lookup_max": int(cfg.get("prompt_lookup_max", 5))}
    elif method != "plain":
        raise ValueError(f"method must be 'plain' or 'ngram', got {method!r}")
    return LLM(**kwargs)


def serve(cfg: dict, requests, reply) -> None:
    """Build the engine, then answer each request line (``reply`` gets one dict per answer)."""
    import vllm
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm = build_engine(cfg)
    reply({"ready": True, "vllm": vllm.__version__, "method": cfg.get("method", "plain"),
           "ld_preload": os.environ.get("LD_PRELOAD", "")})
    before = spec_counters(llm.get_metrics())
    for line in requests:
        if not line.strip():
            continue
        req = json.loads(line)
        params = SamplingParams(max_tokens=int(req["max_new_tokens"]), temperature=float(req.get("temperature", 0.0)),
                                top_p=float(req.get("top_p", 1.0)), stop_token_ids=list(req.get("stop_token_ids", [])),
                                detokenize=False, seed=req.get("seed"))
        prompts = [TokensPrompt(prompt_token_ids=list(ids)) for ids in req["prompts"]]
        start = time.perf_counter()
        results = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        after = spec_counters(llm.get_metrics())
        answer = {"outputs": [list(r.outputs[0].token_ids) for r in results], "seconds": seconds,
                  "spec_decode": {k: after[k] - before[k] for k in after}}
        if req.get("prefill_probe"):
            answer["prefill_seconds"] = prefill_probe(llm, prompts, params)
            after = spec_counters(llm.get_metrics())
        reply(answer)
        before = after


def prefill_probe(llm, prompts, params) -> float | None:
    """Wall time of the same prompts generating one token, with the prefix cache emptied first (else the prompt
    would come from it): the engine's prefill plus one sampling. None where the cache cannot be reset."""
    reset = getattr(llm, "reset_prefix_cache", None)
    if reset is None or reset() is False:
        return None
    one = copy.copy(params)
    one.max_tokens = 1
    start = time.perf_counter()
    llm.generate(prompts, one, use_tqdm=False)
    seconds = time.perf_counter() - start
    reset()
    return seconds


def main() -> int:
    # answers go to a private copy of stdout; fd 1 itself (inherited by vLLM's engine process) goes to stderr
    channel = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())

    def reply(obj: dict) -> None:
        channel.write(json.dumps(obj) + "\n")
        channel.flush()

    try:
        first = sys.stdin.readline()
        if not first.strip():
            raise ValueError("no configuration line on stdin")
        serve(json.loads(first), sys.stdin, reply)
    except Exception as err:  # reported to the bench, which shows it with the log tail
        traceback.print_exc()
        reply({"error": f"{type(err).__name__}: {err}"})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
