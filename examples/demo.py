"""Demo: SmolLM2-135M-Instruct with the shipped parallel drafter, streamed, with τ and the speedup over HF
``generate`` measured right here (same prompts, same machine, same run).

    make demo            # or: python examples/demo.py [--drafter ngram] [--budget 8]
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import TextStreamer

import jetspec_compile as js
from jetspec_compile.drafter import NGramDrafter, load_jetspec_drafter, shipped_drafter_path
from jetspec_compile.models import load_smollm2

PROMPTS = [
    "Write a Python function `is_palindrome(s)` that ignores case and spaces, with a docstring.",
    "Tom has 3 boxes with 12 apples each. He gives away 10 apples. How many apples does he have left? "
    "Explain step by step.",
    "Rewrite this function with type hints and a docstring:\ndef area(w, h):\n    return w * h\n",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--drafter", default="shipped", help="'shipped' (trained for SmolLM2) or 'ngram'")
    ap.add_argument("--budget", type=int, default=8, help="tree nodes verified per target forward")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model, tok = load_smollm2()
    if args.drafter == "ngram":
        drafter = NGramDrafter()
    else:
        try:
            drafter = load_jetspec_drafter(shipped_drafter_path("smollm2"), model)
        except FileNotFoundError:
            print("no shipped drafter found; using the training-free n-gram drafter")
            drafter = NGramDrafter()
    spec = js.optimize(model, drafter=drafter, budget=args.budget)
    warm = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                   return_tensors="pt")["input_ids"]
    spec.generate(warm, max_new_tokens=4)  # builds the verify graph once (capture + passes)

    ratios = []
    for prompt in PROMPTS:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt")["input_ids"]
        print(f"\n>>> {prompt}\n")
        start = time.perf_counter()
        out = spec.generate(ids, max_new_tokens=args.max_new_tokens, streamer=TextStreamer(tok, skip_prompt=True))
        t_spec = time.perf_counter() - start
        start = time.perf_counter()
        with torch.no_grad():
            ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                                 do_sample=False)
        t_hf = time.perf_counter() - start
        st = spec.last_stats
        ratios.append(t_hf / t_spec)
        print(f"\n[τ = {st['tau']:.2f} tokens per target forward | {st['tokens_per_second']:.1f} tok/s | "
              f"HF generate {ref.shape[1] - ids.shape[1]} tokens in {t_hf:.2f}s vs {t_spec:.2f}s: "
              f"{t_hf / t_spec:.2f}x | identical to HF: {torch.equal(out, ref)}]")
    print(f"\nspeedup over HF generate on these prompts: {', '.join(f'{r:.2f}x' for r in ratios)}")


if __name__ == "__main__":
    main()
