"""Serve a jetspec_compile drafter with vLLM: offline ``LLM`` and ``vllm serve`` + an OpenAI client request.

A drafter of the DFlash shape (the shipped SmolLM2 one, or yours from ``jetspec-compile train-drafter --style
dflash``) is exported once, with jetspec_compile's environment, in vLLM's native DFlash layout::

    jetspec-compile export-vllm smollm2 vllm-drafter/

then this script runs with the Python of a vLLM environment (vLLM's CPU build: ``make peers`` creates
``.peers/vllm``; on a GPU, plain ``pip install vllm``)::

    .peers/vllm/bin/python examples/serve_vllm.py --target TARGET_DIR --drafter vllm-drafter/
    .peers/vllm/bin/python examples/serve_vllm.py --target TARGET_DIR --drafter vllm-drafter/ --server

``TARGET_DIR`` is the Hugging Face folder of the drafter's target (for SmolLM2:
``python -c "from jetspec_compile.models import smollm2_path; print(smollm2_path())"``). vLLM drafts chains of
``--k`` tokens (its tree verification was removed); jetspec_compile verifies trees from the same drafter in one
process. vLLM's ``LLM(...)`` must be created under ``if __name__ == "__main__":`` (it starts worker processes).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import urllib.request

PROMPT = "Write a Python function `is_palindrome(s)` that ignores case and spaces, with a docstring."


def speculative_config(drafter: str, k: int) -> dict:
    return {"method": "dflash", "model": drafter, "num_speculative_tokens": k}


def offline(args) -> None:
    from vllm import LLM, SamplingParams

    llm = LLM(model=args.target, dtype="float32", max_model_len=2048,
              speculative_config=speculative_config(args.drafter, args.k), disable_log_stats=False)
    start = time.perf_counter()
    out = llm.chat([{"role": "user", "content": PROMPT}], SamplingParams(temperature=0.0, max_tokens=128))
    seconds = time.perf_counter() - start
    completion = out[0].outputs[0]
    print(completion.text)
    counters = {m.name: getattr(m, "value", getattr(m, "values", None)) for m in llm.get_metrics()
                if m.name.startswith("vllm:spec_decode")}
    drafts = counters.get("vllm:spec_decode_num_drafts") or 1
    print(f"\n{len(completion.token_ids)} tokens in {seconds:.2f} s; mean accepted length "
          f"{1 + counters.get('vllm:spec_decode_num_accepted_tokens', 0) / drafts:.2f}; accepted per position "
          f"{counters.get('vllm:spec_decode_num_accepted_tokens_per_pos')}")


def server(args) -> None:
    from openai import OpenAI

    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", args.target, "--dtype", "float32",
           "--max-model-len", "2048", "--port", str(args.port),
           "--speculative-config", json.dumps(speculative_config(args.drafter, args.k))]
    print("starting:", " ".join(cmd[2:]))
    proc = subprocess.Popen(cmd)
    try:
        deadline = time.time() + args.startup_timeout
        while True:  # vLLM answers /health once the engine is up (minutes on a CPU: it compiles first)
            if proc.poll() is not None:
                raise SystemExit(f"vllm serve exited with code {proc.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{args.port}/health", timeout=2):
                    break
            except OSError:
                if time.time() > deadline:
                    raise SystemExit(f"vllm serve did not come up within {args.startup_timeout} s")
                time.sleep(2)
        client = OpenAI(base_url=f"http://127.0.0.1:{args.port}/v1", api_key="EMPTY")
        reply = client.chat.completions.create(model=args.target, temperature=0.0, max_tokens=128,
                                               messages=[{"role": "user", "content": PROMPT}])
        print(reply.choices[0].message.content)
        print(f"\n{reply.usage.completion_tokens} tokens; the server's /metrics has the spec_decode counters")
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True, help="the target's Hugging Face folder")
    ap.add_argument("--drafter", required=True, help="folder written by `jetspec-compile export-vllm`")
    ap.add_argument("--k", type=int, default=7, help="draft tokens per step (the drafter's block depth)")
    ap.add_argument("--server", action="store_true", help="start `vllm serve` and query it with the OpenAI client")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--startup-timeout", type=int, default=1200)
    args = ap.parse_args()
    server(args) if args.server else offline(args)


if __name__ == "__main__":
    main()
