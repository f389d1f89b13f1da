"""Real decoding contexts for the step benchmarks (``bench_lm_head.py``, ``bench_draft_step.py``): the greedy
answers of SmolLM2-135M-Instruct to held-out prompts, and the command-line options that choose them."""

from __future__ import annotations

import argparse

import torch

from jetspec_compile.prompts import encode_chat, load_prompts


def add_context_args(ap: argparse.ArgumentParser, what: str) -> None:
    """The options every step benchmark shares; ``what`` names what happens at each cut (for ``--stride``)."""
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sets", nargs="+", default=["sharegpt", "humaneval", "gsm"])
    ap.add_argument("--limit", type=int, default=2, help="test prompts per set")
    ap.add_argument("--answer-tokens", type=int, default=96)
    ap.add_argument("--stride", type=int, default=12, help=f"tokens between two {what} of an answer")
    ap.add_argument("--reps", type=int, default=3, help="passes over every cut")
    ap.add_argument("--json", help="write the results here")


def greedy_answers(model, tok, sets, limit: int, answer_tokens: int) -> list[tuple[int, torch.Tensor]]:
    """``(prompt length, prompt + greedy answer [T])`` for the first ``limit`` test prompts of each set."""
    out = []
    for name in sets:
        for prompt in load_prompts(name, "test", limit):
            ids = torch.tensor([encode_chat(tok, prompt)])
            with torch.no_grad():
                seq = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=answer_tokens,
                                     do_sample=False)
            out.append((ids.shape[1], seq[0]))
    return out
