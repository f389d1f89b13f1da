"""Draft vocabularies: the tokens a drafter may propose, chosen from what the target actually writes.

A parallel drafter spends most of its step in the LM head (for SmolLM2-135M: 8 block positions × 49 152 rows ×
576, about 80% of its multiply-adds). The target's own responses use a small part of the vocabulary (the
1 894 self-distilled SmolLM2 responses: under 6 000 distinct tokens), so drafting over the most frequent ones
cuts that cost several times, at the price of never proposing the rest (as in FR-Spec). Output stays lossless:
the target verifies every draft and always supplies the next token itself.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Sequence

__all__ = ["frequent_tokens"]


def frequent_tokens(records: Iterable[dict], size: int, always: Sequence[int] = ()) -> list[int]:
    """The ``size`` most frequent token ids of the responses in ``records`` (self-distillation records with
    ``response_ids``, as :func:`~jetspec_compile.training.data.read_sequences` returns), most frequent first;
    ties by id. ``always`` (e.g. the EOS token) are included whatever their count. If the responses hold fewer
    distinct tokens, the list is topped up from the prompts' tokens; it may then still be shorter than ``size``.
    """
    if size < 1:
        raise ValueError(f"a draft vocabulary needs at least one token, got size={size}")
    records = list(records)
    if not records:
        raise ValueError("no records to count tokens in; regenerate the data (`jetspec-compile train-drafter`)")
    responses = Counter(t for r in records for t in r["response_ids"])
    prompts = Counter(t for r in records for t in r["prompt_ids"])
    chosen = list(dict.fromkeys(int(t) for t in always))
    seen = set(chosen)
    for counts in (responses, prompts):
        for tok, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
            if len(chosen) >= size:
                return chosen
            if tok not in seen:
                chosen.append(int(tok))
                seen.add(tok)
    return chosen
