"""``check_lossless``: compare a speculative model's greedy output with plain greedy decoding.

What "lossless" promises depends on the target's dtype (see ``docs/precision.md``):

* **fp32**: token-identical to ``model.generate(do_sample=False)``.
* **bf16 / fp16**: tree verification computes the same logits with other matrix shapes, so the summation order
  differs from plain decoding and logits differ by a few rounding units of the dtype. The output is
  token-identical except where the target itself cannot tell two tokens apart: at the first difference, the
  target's logit gap between the token plain decoding chose and the one speculation chose is within
  :func:`near_tie_tolerance`, and from there on every speculative token is again the target's greedy choice
  after the speculative prefix, up to the same tolerance. :class:`LosslessReport` gives each difference's
  position, gap and tolerance, and ``within_tolerance`` says whether all of them keep that promise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["NEAR_TIE_ULPS", "LosslessReport", "check_lossless", "near_tie_tolerance"]

#: near-tie tolerance in rounding units (``torch.finfo(dtype).eps``) of the logit's magnitude. Tree verification
#: against plain forwards differs by up to ~2.5 units on SmolLM2-135M in bf16 and fp16 (docs/precision.md);
#: 8 leaves room for deeper models without excusing a wrong token that the target ranks clearly lower.
NEAR_TIE_ULPS = 8.0


def near_tie_tolerance(dtype: torch.dtype, top_logit: float, ulps: float = NEAR_TIE_ULPS) -> float:
    """Largest logit gap between two tokens that ``dtype`` arithmetic may flip: ``ulps · eps · max(1, |top|)``."""
    return ulps * torch.finfo(dtype).eps * max(1.0, abs(top_logit))


@dataclass
class LosslessReport:
    """Result of :func:`check_lossless`.

    ``ok``: every prompt token-identical to plain greedy decoding. ``within_tolerance``: every difference is a
    near tie of the target's own logits (the low-precision promise; equal to ``ok`` when nothing differs).
    ``mismatches``: per differing prompt, ``position`` (new-token index of the first difference), ``expected`` /
    ``actual`` tokens, ``margin`` (target's top-1 minus top-2 logit there), ``gap`` (target's logit of the
    expected minus the actual token), ``tolerance`` (:func:`near_tie_tolerance` there), ``near_tie`` (gap within
    it), ``later_gap`` (largest gap between the target's greedy choice and the speculative token after the
    first difference, given the speculative prefix) and ``within_tolerance`` (both within the tolerance).
    """

    ok: bool
    prompts: int
    mismatches: list[dict] = field(default_factory=list)
    dtype: str = "float32"

    @property
    def within_tolerance(self) -> bool:
        return all(m["within_tolerance"] for m in self.mismatches)

    def __str__(self) -> str:
        if self.ok:
            return f"lossless: {self.prompts} prompts token-identical to plain greedy decoding ({self.dtype})"
        verdict = ("all at near ties of the target's logits (within the promise for this dtype)"
                   if self.within_tolerance else "NOT lossless")
        lines = [f"{len(self.mismatches)} of {self.prompts} prompts differ from plain greedy decoding "
                 f"({self.dtype}): {verdict}"]
        for m in self.mismatches:
            lines.append(f"  prompt {m['prompt']}: first difference at new token {m['position']}: expected "
                         f"{m['expected']}, got {m['actual']}; target logit gap {m['gap']:.3g} (top1-top2 margin "
                         f"{m['margin']:.3g}), near-tie tolerance {m['tolerance']:.3g}; largest gap after it "
                         f"{m['later_gap']:.3g}{'' if m['within_tolerance'] else ' -- beyond the tolerance'}")
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


def _gaps(model, ids: torch.Tensor, new: list[int], ulps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For ``ids`` followed by ``new``: per new token, the target's (teacher-forced) logit gap between its greedy
    choice and that token, the near-tie tolerance there, and the logits ``[len(new), V]`` (fp32)."""
    seq = torch.cat([ids[0], torch.tensor(new, dtype=torch.long, device=ids.device)])[None]
    logits = model(input_ids=seq).logits[0, ids.shape[1] - 1:seq.shape[1] - 1].float()  # [len(new), V]
    chosen = logits.gather(1, torch.tensor(new, device=logits.device)[:, None])[:, 0]
    top = logits.max(-1).values
    dtype = next(model.parameters()).dtype
    tol = torch.tensor([near_tie_tolerance(dtype, float(t), ulps) for t in top])
    return (top - chosen).cpu(), tol, logits


@torch.no_grad()
def check_lossless(spec_model, prompts, tokenizer=None, max_new_tokens: int = 64,
                   ulps: float = NEAR_TIE_ULPS) -> LosslessReport:
    """Generate greedily with ``spec_model`` and with its unmodified target; report every prompt's first
    divergence and whether it is a near tie the dtype allows (see the module docstring).

    Args:
        spec_model: a :class:`~jetspec_compile.runtime.spec_model.SpecModel`.
        prompts: strings (with ``tokenizer``) or token-id lists/tensors, one prompt each.
        max_new_tokens: tokens generated per prompt.
        ulps: near-tie tolerance in rounding units of the dtype (:func:`near_tie_tolerance`).
    """
    model = spec_model.model
    dtype = next(model.parameters()).dtype
    report = LosslessReport(ok=True, prompts=len(prompts), dtype=str(dtype).removeprefix("torch."))
    for i, prompt in enumerate(prompts):
        ids = _encode(prompt, tokenizer, spec_model.device)
        expected = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                  max_new_tokens=max_new_tokens, do_sample=False)
        actual = spec_model.generate(ids, max_new_tokens=max_new_tokens)
        exp, act = expected[0, ids.shape[1]:].tolist(), actual[0, ids.shape[1]:].tolist()
        if exp == act:
            continue
        pos = next((k for k, (a, b) in enumerate(zip(exp, act)) if a != b), min(len(exp), len(act)))
        report.ok = False
        if pos >= len(act) or pos >= len(exp):  # one stopped early (an end token): no logit comparison possible
            report.mismatches.append({
                "prompt": i, "position": pos, "expected": exp[pos] if pos < len(exp) else "<end>",
                "actual": act[pos] if pos < len(act) else "<end>", "margin": float("nan"), "gap": float("inf"),
                "tolerance": 0.0, "near_tie": False, "later_gap": float("nan"), "within_tolerance": False})
            continue
        gaps, tol, logits = _gaps(model, ids, act, ulps)  # the speculative output, teacher-forced
        top2 = logits[pos].topk(2).values
        gap = float(logits[pos, exp[pos]] - logits[pos, act[pos]])
        near_tie = abs(gap) <= float(tol[pos])
        later = gaps[pos + 1:]
        later_ok = bool((later <= tol[pos + 1:]).all())
        report.mismatches.append({
            "prompt": i, "position": pos, "expected": exp[pos], "actual": act[pos],
            "margin": float(top2[0] - top2[1]), "gap": gap, "tolerance": float(tol[pos]), "near_tie": near_tie,
            "later_gap": float(later.max()) if len(later) else 0.0, "within_tolerance": near_tie and later_ok,
        })
    return report
