"""The target's LM head outside the verify graph: exact logits, and a certified argmax from a bf16 copy.

Greedy verification needs only the argmax of every node's logits, yet the LM head is the largest single weight a
decoding step reads (SmolLM2-135M: 49 152 × 576 fp32, 113 MB of the 540 MB a step streams). :meth:`LMHead.argmax`
reads a bf16 copy instead (half the bytes; oneDNN's packed bf16 GEMM accumulates in fp32) and then proves which
tokens can still be the fp32 argmax:

For a row ``h`` (fp32) and vocabulary row ``w_j``, write ``h~ = bf16(h)``, ``d = h - h~`` (known per call) and
``w~_j = bf16(w_j)``, ``r_j = w_j - w~_j`` (norms precomputed). Then ``h~·w~_j - h·w_j = -(h·r_j + d·w~_j)``, so

    |a_j - h·w_j| <= ‖h‖‖r_j‖ + ‖d‖‖w~_j‖ + γ_K(‖h~‖‖w~_j‖ + ‖h‖‖w_j‖) + u|a_j| / (1 - u) =: b_j

where ``a_j`` is the kernel's bf16 output, ``γ_K = K·2⁻²⁴ / (1 - K·2⁻²⁴)`` bounds an fp32 dot product's rounding
over ``K`` inputs (the kernel's accumulation, and the fp32 reference's own), and ``u = 2⁻⁸`` the rounding of the
bf16 output (every bound is doubled, :data:`SAFETY`, for what this model of the kernel leaves out). Write
``b_j = c_j + u'|a_j|``. The fp32 logit of the largest ``a`` (``top``) is at least ``top - u'|top| - c_top``; a
token ``j`` can beat it only if ``a_j + u'|a_j| + c_j`` reaches that, and ``a + u'|a|`` grows with ``a``. So the
search runs over blocks of :data:`BLOCK` tokens first, with each block's largest ``a`` and largest ``c`` (from the
block's largest row norms), and then token by token inside the blocks that pass. The candidates left (on SmolLM2's
own hidden states about 5 of 49 152 per row, on random tokens about 100) are recomputed in fp32 from the original
rows and the largest wins, the lowest token id on a tie, as ``argmax`` breaks ties. A call with a non-finite value,
or with more than :data:`MAX_CANDIDATES` candidates per row, falls back to the full fp32 logits. The result is the
argmax of fp32 logits, as exact as the in-graph head it replaces (both sum in some fp32 order).

:meth:`LMHead.logits` (sampling, prefill) computes the fp32 logits from packed weights, as the graph did.
Whether a lowering takes the head out of its graph is :func:`use_certified_head`'s call: ``"certified"``
always (fp32 CPU heads), ``"exact"`` never, ``"auto"`` (default) where the certified argmax measured faster than
the fp32 head on this CPU (bf16 GEMMs are native on AVX512-BF16 / AMX CPUs, emulated and slower elsewhere).
"""

from __future__ import annotations

import statistics
import time
import weakref

import torch

from ..config import LM_HEADS, env_setting
from .cpu_linear import (MAX_ROWS, bf16_supported, choose_kernel, derived, pack_weight, packed_weight,
                         prepack_supported, run_packed)

__all__ = ["LM_HEADS", "LMHead", "lm_head_setting", "use_certified_head", "MAX_CANDIDATES", "SAFETY",
           "AUTO_MIN_BYTES"]

#: every error bound is multiplied by this (the kernel's rounding model is assumed, not read from its source)
SAFETY = 2.0

#: above this many candidates per row (on average over the call's rows) the full fp32 logits are computed instead
MAX_CANDIDATES = 1024

#: the candidates are searched block by block: the largest logit of every BLOCK tokens first
BLOCK = 64

#: ``"auto"`` considers heads of at least this many bytes (smaller ones sit in the CPU's caches, where halving the
#: bytes read saves little, and a timing of microseconds would decide by noise)
AUTO_MIN_BYTES = 16 << 20

_U_BF16 = 2.0 ** -8
_U_FP32 = 2.0 ** -24


def lm_head_setting(setting: str | None) -> str:
    """``setting`` if given, else ``$JETSPEC_LM_HEAD``, else ``"auto"``; a clear error for anything else."""
    return env_setting(setting, "JETSPEC_LM_HEAD", LM_HEADS, "lm_head")


#: id(weight) -> (weak reference, version, {"head": state}): the bf16 copy and norms (see
#: :func:`~jetspec_compile.kernels.cpu_linear.derived`), shared by every head of the weight
_STATE: dict[int, tuple[weakref.ref, int, dict]] = {}


def _state(weight: torch.Tensor) -> dict:
    entries = derived(weight, _STATE)
    if "head" in entries:
        return entries["head"]
    with torch.no_grad():
        w = weight.detach()
        low = w.to(torch.bfloat16)
        wide, low_wide = w.double(), low.double()
        # per token [V] and, for every block of BLOCK tokens, their maximum [V / BLOCK]: ‖w_j‖, ‖w~_j‖, ‖r_j‖
        norms = torch.stack([wide.norm(dim=1), low_wide.norm(dim=1), (wide - low_wide).norm(dim=1)]).float()
        norms = norms * (1 + 1e-6)  # rounded up, not to the nearest float
        padded = torch.nn.functional.pad(norms, (0, -norms.shape[1] % BLOCK))
        state = {
            "packed": torch.ops.mkldnn._reorder_linear_weight(low, MAX_ROWS),  # one copy serves every row count
            "finite": bool(torch.isfinite(w).all()),
            "norms": norms,  # [3, V]
            "block_norms": padded.view(3, -1, BLOCK).amax(-1),  # [3, V / BLOCK]
        }
    entries["head"] = state
    return state


class LMHead:
    """``F.linear(h, weight, bias)`` as the verify graph computed it, plus a certified argmax (module docstring).

    weight: ``[V, K]`` fp32 on CPU; bias: ``[V]`` or None; cpu_linear: the packed-GEMM setting of the exact
    logits (see :func:`~jetspec_compile.kernels.cpu_linear.kernel_setting`).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, cpu_linear: str = "auto"):
        if weight.dtype != torch.float32 or weight.device.type != "cpu" or weight.dim() != 2:
            raise ValueError(f"a certified LM head needs a 2-D fp32 CPU weight, got {weight.dtype} "
                             f"{tuple(weight.shape)} on {weight.device}")
        if not bf16_supported():
            raise RuntimeError("a certified LM head needs oneDNN's bf16 GEMM, which this PyTorch build lacks; "
                               "use lm_head='exact'")
        self.weight, self.bias, self.cpu_linear = weight, bias, cpu_linear
        k = weight.shape[1]
        self.gamma = k * _U_FP32 / (1 - k * _U_FP32)
        self.fallbacks = 0  # rows whose argmax needed the full fp32 logits
        self.rows = self.candidates = 0  # rows certified, and the fp32 dot products that took
        _state(weight)  # the bf16 copy is made now, not on the first step

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """fp32 logits ``[..., V]`` of ``h`` ``[..., K]``."""
        rows = h.numel() // h.shape[-1]
        with torch.no_grad():
            if 1 <= rows <= MAX_ROWS and h.dtype == torch.float32 and prepack_supported():
                kernel, packed = packed_weight(self.weight, rows, self.cpu_linear)
                out = run_packed(kernel, h.reshape(rows, h.shape[-1]), packed, self.weight, self.bias, rows)
                return out.reshape(*h.shape[:-1], self.weight.shape[0])
            return torch.nn.functional.linear(h, self.weight, self.bias)

    def _fallback(self, x: torch.Tensor) -> torch.Tensor:
        """The argmax of the full fp32 logits of ``x`` ``[R, K]`` (counted in ``fallbacks``)."""
        self.fallbacks += x.shape[0]
        return self.logits(x).argmax(-1)

    def argmax(self, h: torch.Tensor) -> torch.Tensor:
        """The argmax token ``[...]`` (int64) of the fp32 logits of ``h`` ``[..., K]``, read mostly from bf16."""
        shape = h.shape[:-1]
        x = h.reshape(-1, h.shape[-1])
        with torch.no_grad():
            state = _state(self.weight)
            finite = state["finite"] and (self.bias is None or bool(torch.isfinite(self.bias).all()))
            if not (finite and bool(torch.isfinite(x).all())):
                return self._fallback(x).reshape(shape)
            low = x.to(torch.bfloat16)
            # [R, V]: the kernel's bf16 output, widened once (exactly) because fp32 reductions and gathers are
            # several times faster than bf16 ones on CPU
            a = torch.ops.mkldnn._linear_pointwise(low, state["packed"], None, "none", [], "").float()
            # b_j = c_j + u'|a_j|, c_j from the norms (module docstring); with a bias, the kernel's bf16 output is
            # rounded before the bias is added in fp32
            h_norm, low_wide = x.norm(dim=1, keepdim=True), low.float()
            factors = torch.cat([self.gamma * h_norm, self.gamma * low_wide.norm(dim=1, keepdim=True)
                                 + (x - low_wide).norm(dim=1, keepdim=True), h_norm], dim=1)  # [R, 3]
            rel = _U_BF16 / (1 - _U_BF16)
            extra = 0.0
            if self.bias is not None:
                a = a + self.bias
                extra = rel * float(self.bias.abs().max())
                rel += 2 * _U_FP32
            rel = SAFETY * rel
            # blocks of BLOCK tokens: their largest a and largest c first, then the tokens of the blocks that pass
            rows_, vocab = a.shape
            pad = -vocab % BLOCK
            blocks = torch.nn.functional.pad(a, (0, pad), value=-torch.inf) if pad else a
            blocks = blocks.view(rows_, -1, BLOCK)
            block_max = blocks.amax(-1)  # [R, V / BLOCK]
            block_c = SAFETY * (factors @ state["block_norms"] + extra)  # [R, V / BLOCK]
            top_block = block_max.argmax(-1, keepdim=True)  # [R, 1]: the block of the largest a
            top = block_max.gather(1, top_block)
            floor = top - rel * top.abs() - block_c.gather(1, top_block)  # [R, 1]: the top token's fp32 logit is above
            block_rows, block_ids = (block_max + rel * block_max.abs() + block_c >= floor).nonzero(as_tuple=True)
            values = blocks[block_rows, block_ids]  # [Mb, BLOCK]
            ids = block_ids[:, None] * BLOCK + torch.arange(BLOCK)  # [Mb, BLOCK]
            norms = state["norms"][:, ids.clamp(max=vocab - 1)]  # [3, Mb, BLOCK]
            c = SAFETY * ((factors[block_rows].T[:, :, None] * norms).sum(0) + extra)
            inside, offset = (values + rel * values.abs() + c >= floor[block_rows]).nonzero(as_tuple=True)
            rows, ids = block_rows[inside], ids[inside, offset]  # [M]
            if ids.numel() > MAX_CANDIDATES * x.shape[0]:
                return self._fallback(x).reshape(shape)
            self.rows, self.candidates = self.rows + x.shape[0], self.candidates + ids.numel()
            exact = (x[rows] * self.weight[ids]).sum(-1)  # [M] fp32
            if self.bias is not None:
                exact = exact + self.bias[ids]
            best = torch.full((x.shape[0],), -torch.inf).scatter_reduce(0, rows, exact, "amax")
            first = torch.where(exact == best[rows], ids, self.weight.shape[0])  # the lowest id among the maxima
            win = torch.full((x.shape[0],), self.weight.shape[0]).scatter_reduce(0, rows, first, "amin")
            return win.reshape(shape)


#: (weight shape, rows) -> whether the certified argmax measured faster than the fp32 head in this process
_PAYS: dict[tuple[int, int], bool] = {}


def _certified_pays(weight: torch.Tensor, rows: int, reps: int = 7) -> bool:
    key = (tuple(weight.shape), rows)
    if key not in _PAYS:
        head = LMHead(weight)
        h = torch.randn(rows, weight.shape[1], generator=torch.Generator().manual_seed(0))
        # the fp32 head as the graph runs it, from a packed copy made for the timing only (the shared cache of
        # packed_weight would keep 4 bytes per weight per row count alive for a head that may never run)
        kernel = choose_kernel(weight.shape[0], weight.shape[1], rows, "auto")
        times: dict[str, list[float]] = {"exact": [], "certified": []}
        with torch.no_grad():
            packed = pack_weight(kernel, weight.detach(), rows)
            exact = lambda: run_packed(kernel, h, packed, weight, None, rows).argmax(-1)  # noqa: E731
            for rep in range(reps + 1):
                for name, fn in (("exact", exact), ("certified", lambda: head.argmax(h))):
                    start = time.perf_counter()
                    fn()
                    if rep:  # the first call of each warms oneDNN's primitive cache
                        times[name].append(time.perf_counter() - start)
        _PAYS[key] = statistics.median(times["certified"]) < statistics.median(times["exact"])
    return _PAYS[key]


def use_certified_head(weight: torch.Tensor, rows: int, setting: str | None = None) -> bool:
    """Whether a graph of ``rows`` rows should leave its LM head (``weight``) to :class:`LMHead`, under
    ``setting`` (see :func:`lm_head_setting`). fp32 CPU weights only. ``"auto"``: heads of :data:`AUTO_MIN_BYTES`
    or more where oneDNN has a bf16 GEMM, and only if the certified argmax measured faster (timed once per head
    shape and row count in the process); ``"certified"`` always (failing when the head is built if bf16 is missing)."""
    setting = lm_head_setting(setting)
    if setting == "exact" or weight.dtype != torch.float32 or weight.device.type != "cpu" or weight.dim() != 2:
        return False
    if setting == "certified":
        return True
    big = weight.numel() * weight.element_size() >= AUTO_MIN_BYTES
    return big and bf16_supported() and _certified_pays(weight, rows)
