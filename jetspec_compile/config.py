"""The one config object of :func:`jetspec_compile.optimize`."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

__all__ = ["JetSpecConfig", "env_setting", "BACKENDS", "AUTO_BUDGETS", "CPU_LINEARS", "LM_HEADS", "DRAFTER_DTYPES",
           "PRECISIONS", "COMPACT_WEIGHTS"]

BACKENDS = ("eager", "inductor", "aoti", "onnxruntime", "tensorrt")
#: candidates of ``budget="auto"``
AUTO_BUDGETS = (4, 8, 16, 32)
#: packed-GEMM settings of fp32 CPU linears, and TensorRT engine precisions
CPU_LINEARS = ("auto", "mkl", "onednn")
#: where greedy verification takes the argmax of the LM head (``lm_head``)
LM_HEADS = ("auto", "certified", "exact")
#: what a parallel drafter's network computes in on CPU (``drafter_dtype``)
DRAFTER_DTYPES = ("auto", "float32", "bfloat16")
PRECISIONS = ("fp32", "fp16", "bf16")
#: whether few-row fp32 CPU linears read exactly-compact weight forms (``compact_weights``)
COMPACT_WEIGHTS = ("auto", "off")


def env_setting(value: str | None, variable: str, choices: tuple[str, ...], what: str) -> str:
    """``value`` if given, else ``$variable``, else ``"auto"``; for anything not in ``choices`` a clear error
    naming ``what`` and the variable."""
    value = value or os.environ.get(variable) or "auto"
    if value not in choices:
        raise ValueError(f"{what} (argument or {variable}) must be one of {choices}, got {value!r}")
    return value


@dataclass(frozen=True)
class JetSpecConfig:
    """Options of a speculative model. Unknown names raise; every field is checked on construction.

    Attributes:
        backend: how the verify graph is lowered: ``"eager"`` (the rewritten FX graph run by PyTorch),
            ``"inductor"`` (torch.compile with the ``jetspec`` backend), ``"aoti"`` (AOTInductor ``.pt2``
            packages compiled once and reloaded), ``"onnxruntime"``, ``"tensorrt"``.
        budget: tree budget ``N`` — nodes verified per target forward (trees are padded to it); ``"auto"``
            picks among :data:`AUTO_BUDGETS` each step by measured cost and acceptance.
        fallback: also keep plain decoding (budget 1) as a candidate and use it while speculation does not pay.
        max_cache_len: static KV cache size; prompt + ``max_new_tokens`` + ``budget`` must fit.
        tap_layers: target layers whose hidden states feed the drafter (None: the drafter's own, else 5 spread).
        self_check: compare the rewritten graph with the eager model once when it is built.
        artifact_dir: folder of compiled ``.pt2`` packages for ``backend="aoti"`` (default: the cache folder);
            ship it with a deployment so start-up loads instead of compiling.
        cpu_linear: packed GEMM of fp32 CPU linears (``eager``, ``inductor``, and every backend's prompt prefill):
            ``"auto"`` (measure both per weight shape), ``"mkl"`` or ``"onednn"``; None: ``$JETSPEC_CPU_LINEAR``,
            else ``"auto"``.
        compact_weights: ``eager`` and ``inductor`` on CPU: ``"auto"`` runs few-row fp32 linears (decoding, tree
            verification) from a compact form of each weight that decodes to it bit for bit, where one exists (bf16
            for a bf16 checkpoint loaded as fp32, 4-bit codes with a scale and a min per 32 inputs for a model
            dequantized from a Q4_1 GGUF file; :mod:`jetspec_compile.kernels.compact_linear`); ``"off"`` never.
            None: ``$JETSPEC_COMPACT_WEIGHTS``, else ``"auto"``.
        lm_head: ``eager`` and ``inductor`` on CPU: ``"certified"`` takes the LM head out of the verify graph and
            finds greedy verification's argmax from a bf16 copy of its weight, proved equal to the fp32 argmax
            (:mod:`jetspec_compile.kernels.lm_head`); ``"exact"`` keeps the fp32 head in the graph; ``"auto"``
            certifies where that measured faster on this CPU. None: ``$JETSPEC_LM_HEAD``, else ``"auto"``.
        drafter_dtype: ``eager``, ``inductor`` and ``aoti`` on CPU: what a parallel drafter's network computes in,
            ``"float32"`` or ``"bfloat16"`` (half the bytes a draft step reads; the drafter only proposes, so this
            moves acceptance, never the output); ``"auto"``: bf16 where the CPU has bf16 instructions and oneDNN
            its bf16 GEMM. None: ``$JETSPEC_DRAFTER_DTYPE``, else ``"auto"``.
        precision: TensorRT engine precision, ``"fp32"``, ``"fp16"`` or ``"bf16"``; None: the model's dtype.
        max_batch: most rows one speculative loop serves when ``generate`` calls overlap (threads): waiting greedy
            calls with the same ``max_new_tokens`` share one left-padded batch. 1: overlapping calls only take
            turns. Each batch size in use gets its own verifier (a KV cache of ``max_cache_len`` slots per row and,
            on compiled backends, one more compile).
    """

    backend: str = "eager"
    budget: int | str = 16
    max_cache_len: int = 2048
    fallback: bool = True
    tap_layers: tuple[int, ...] | None = None
    self_check: bool = True
    artifact_dir: str | None = None
    cpu_linear: str | None = None
    compact_weights: str | None = None
    lm_head: str | None = None
    drafter_dtype: str | None = None
    precision: str | None = None
    max_batch: int = 1

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose one of {BACKENDS}")
        if self.budget != "auto" and (not isinstance(self.budget, int) or self.budget < 1):
            raise ValueError("budget must be a positive int (tree nodes per verification) or 'auto', "
                             f"got {self.budget!r}")
        if not isinstance(self.max_cache_len, int) or self.max_cache_len <= self.max_budget:
            raise ValueError(f"max_cache_len must be an int larger than the budget ({self.max_budget}), "
                             f"got {self.max_cache_len!r}")
        if self.cpu_linear not in (None, *CPU_LINEARS):
            raise ValueError(f"cpu_linear must be one of {CPU_LINEARS} or None, got {self.cpu_linear!r}")
        if self.compact_weights not in (None, *COMPACT_WEIGHTS):
            raise ValueError(f"compact_weights must be one of {COMPACT_WEIGHTS} or None, got {self.compact_weights!r}")
        if self.lm_head not in (None, *LM_HEADS):
            raise ValueError(f"lm_head must be one of {LM_HEADS} or None, got {self.lm_head!r}")
        if self.drafter_dtype not in (None, *DRAFTER_DTYPES):
            raise ValueError(f"drafter_dtype must be one of {DRAFTER_DTYPES} or None, got {self.drafter_dtype!r}")
        if self.precision not in (None, *PRECISIONS):
            raise ValueError(f"precision must be one of {PRECISIONS} or None, got {self.precision!r}")
        if not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise ValueError(f"max_batch must be an int >= 1 (rows one loop serves), got {self.max_batch!r}")
        if self.tap_layers is not None:
            object.__setattr__(self, "tap_layers", tuple(int(i) for i in self.tap_layers))

    @property
    def budgets(self) -> tuple[int, ...]:
        """Candidate budgets of the runtime's controller."""
        base = AUTO_BUDGETS if self.budget == "auto" else (self.budget,)
        return tuple(sorted(set(base) | ({1} if self.fallback else set())))

    @property
    def max_budget(self) -> int:
        return max(AUTO_BUDGETS) if self.budget == "auto" else self.budget

    @classmethod
    def from_options(cls, **options) -> "JetSpecConfig":
        """Build from keyword options, naming any unknown option and the valid ones."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise TypeError(f"unknown jetspec option(s) {unknown}; valid options are {sorted(names)}")
        return cls(**options)
