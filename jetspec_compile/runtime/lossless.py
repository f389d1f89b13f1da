"""``check_lossless``: compare a speculative model's greedy output with plain greedy decoding."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["LosslessReport", "check_lossless"]


@dataclass
class LosslessReport:
    """Result of :func:`check_lossless`: ``ok`` and, per mismatching prompt, where and how it diverged."""

    ok: bool
    prompts: int
    mismatches: list[dict] = field(default_factory=list)

    def __str__(self) -> str:
        if self.ok:
            return f"lossless: {self.prompts} prompts token-identical to plain greedy decoding"
        lines = [f"NOT lossless: {len(self.mismatches)} of {self.prompts} prompts diverge"]
        for m in self.mismatches:
            lines.append(f"  prompt {m['prompt']}: first difference at new token {m['position']}: expected "
                         f"{m['expected']}, got {m['actual']} (target logit margin top1-top2 there: "
                         f"{m['margin']:.3g}{'; a near tie, numerics may flip it' if m['margin'] < 1e-3 else ''})")
        return "\n".join(lines)


def _encode(prompt, tokenizer, device):
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("string prompts need a tokenizer: check_lossless(spec, prompts, tokenizer=tok)")
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    else:
        ids = torch.as_tensor(prompt, dtype=torch.long)
        ids = ids[None] if ids.dim() == 1 else ids
    return ids.to(device)


@torch.no_grad()
def check_lossless(spec_model, prompts, tokenizer=None, max_new_tokens: int = 64) -> LosslessReport:
    """Generate greedily with ``spec_model`` and with its unmodified target; report the first divergence.

    Args:
        spec_model: a :class:`~jetspec_compile.runtime.spec_model.SpecModel`.
        prompts: strings (with ``tokenizer``) or token-id lists/tensors, one prompt each.
        max_new_tokens: tokens generated per prompt.
    """
    model = spec_model.model
    report = LosslessReport(ok=True, prompts=len(prompts))
    for i, prompt in enumerate(prompts):
        ids = _encode(prompt, tokenizer, spec_model.device)
        expected = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                  max_new_tokens=max_new_tokens, do_sample=False)
        actual = spec_model.generate(ids, max_new_tokens=max_new_tokens)
        exp, act = expected[0, ids.shape[1]:].tolist(), actual[0, ids.shape[1]:].tolist()
        if exp == act:
            continue
        pos = next((k for k, (a, b) in enumerate(zip(exp, act)) if a != b), min(len(exp), len(act)))
        context = torch.cat([ids[0], torch.tensor(exp[:pos], dtype=torch.long, device=ids.device)])[None]
        top2 = model(input_ids=context).logits[0, -1].float().topk(2).values
        report.ok = False
        report.mismatches.append({
            "prompt": i, "position": pos,
            "expected": exp[pos] if pos < len(exp) else "<end>",
            "actual": act[pos] if pos < len(act) else "<end>",
            "margin": float(top2[0] - top2[1]),
        })
    return report
