"""AOTInductor: the verify step compiled ahead of time into a ``.pt2`` package that loads without compiling.

``export_step_aoti`` makes the rewritten verify graph pure (:func:`~jetspec_compile.passes.functionalize_kv_writes`,
as for ONNX), exports it with ``torch.export`` (the cache length is a dynamic dimension) and compiles it with
``torch._inductor.aoti_compile_and_package``: C++/OpenMP on CPU, Triton on GPU, weights embedded. The package is
written under a temporary name and renamed, with a JSON file beside it recording the model fingerprint (config,
weights, tap layers, shapes, torch version) so a stale or foreign package is recompiled, never run.

The drafter's step (:class:`~jetspec_compile.drafter.step.DraftStep`; context length, new tokens and block
count dynamic) is packaged the same way (:func:`export_drafter_aoti`).

``optimize(model, backend="aoti", artifact_dir="compiled/")`` compiles each verify graph and the drafter step the
first time and saves them there; later processes (a deployment) load the packages in milliseconds instead of compiling
for minutes. The capture and passes (a few seconds) still run at start-up: they provide the cache layout and the
self-check.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
from pathlib import Path

import torch

from ..counters import counters
from ..drafter import JetSpecDrafter
from ..drafter.step import DraftStep, draft_step_export_spec, drafter_network
from ..errors import JetSpecError
from ..interface import VerifyInterface
from ..io import atomic_file, model_fingerprint
from ..passes import functionalize_kv_writes
from ..paths import cache_dir
from .inductor import CONCAT_LINEARS

logger = logging.getLogger(__name__)

__all__ = ["export_step_aoti", "AotiVerifyStep", "lower_aoti", "export_drafter_aoti", "AotiDraftStep",
           "lower_drafter_aoti"]



#: how packages are compiled (bumped when that changes, e.g. freezing on CPU), part of every package's key so a
#: package built the old way is compiled again instead of loaded
PACKAGE_FORMAT = 5


def _step_key(step, fingerprint: str) -> dict:
    interface = step.interface
    return {"model": fingerprint, "format": PACKAGE_FORMAT, "batch_size": interface.batch_size,
            "budget": interface.budget, "tap_layers": list(interface.tap_layers), "kv": interface.kv.to_json(),
            "torch": torch.__version__, "device": str(next(step.model.parameters()).device)}


def export_step_aoti(step, path: str | Path, *, fingerprint: str | None = None) -> Path:
    """Compile a step that went through the verify pipeline into the AOTInductor package ``path`` (.pt2)."""
    if not step.functional_kv:
        functionalize_kv_writes(step)
        step.graph_module.recompile()
    path = Path(path)
    interface = step.interface
    example = interface.example_inputs(max(2 * step.budget, 64), next(step.model.parameters()).device)
    # torch.export binds a GraphModule's kwargs by position: the placeholders' order
    inputs = {name: example[name] for name in inspect.signature(step.graph_module.forward).parameters}
    dynamic = interface.dynamic_shapes(torch.export.Dim("cache_len", min=step.budget + 1, max=1 << 16))
    dynamic = {name: dynamic[name] for name in inputs}
    meta = {**_step_key(step, fingerprint or model_fingerprint(step.model)), "interface": interface.to_json()}
    _compile_package(step.graph_module, inputs, dynamic, path, meta, type(step.model).__name__)
    return path


def _inductor_configs(module) -> dict:
    """Freezing on CPU: the weights are constants of the package anyway, and Inductor then packs them for
    oneDNN's GEMM (in an AOT compile it never picks MKL, whose packed format cannot be serialized). With freezing,
    linears that read the same input (q/k/v, gate/up) run as one GEMM, as in ``lower_inductor``
    (:data:`~jetspec_compile.backends.inductor.CONCAT_LINEARS`): SmolLM2's verify step, 2 threads, median of 25
    interleaved calls, 61.8 → 50.5 ms at budget 1 and 63.3 → 57.3 ms at budget 8 (docs/profile.md §6)."""
    params = list(module.parameters()) + list(module.buffers())
    freezing = bool(params) and not any(p.is_cuda for p in params)
    return {"freezing": freezing, "cpp.enable_concat_linear": freezing and CONCAT_LINEARS}


def _compile_package(module, inputs: dict, dynamic: dict, path: Path, meta: dict, what: str) -> None:
    """torch.export + AOTInductor into ``path``, written under a temporary name; the JSON beside it comes last."""
    try:
        with atomic_file(path, suffix=".pt2") as tmp, torch.no_grad():
            ep = torch.export.export(module, (), kwargs=inputs, dynamic_shapes=dynamic, strict=False)
            torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp),
                                                     inductor_configs=_inductor_configs(module))
        with atomic_file(Path(str(path) + ".json")) as tmp:  # last: marks the package complete
            tmp.write_text(json.dumps(meta, indent=1))
    except Exception as err:
        raise JetSpecError(f"AOTInductor compile of {what} failed and nothing was written: {err}") from err
    counters["aoti"]["compiled"] += 1


def _load_package(path: str | Path) -> tuple[dict, object]:
    """``(metadata, runner)`` of a package written by :func:`_compile_package`; refuses an incomplete one."""
    path = Path(path)
    meta_path = Path(str(path) + ".json")
    if not path.exists() or not meta_path.exists():
        raise FileNotFoundError(f"{path} is not a complete AOTInductor package (needs {path.name} and "
                                f"{meta_path.name}); compile it with optimize(..., backend='aoti')")
    runner = torch._inductor.aoti_load_package(str(path))
    counters["aoti"]["loaded"] += 1
    return json.loads(meta_path.read_text()), runner


class AotiVerifyStep:
    """A compiled ``.pt2`` verify step, called like the eager graph (inputs by name, caches written in place)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.meta, self.runner = _load_package(path)
        self.interface = VerifyInterface.from_json(self.meta["interface"])

    def __call__(self, **inputs):
        # the package was compiled for contiguous inputs and does not check strides: the runtime's cache views
        # (slices of one [2L, B, H, max_len, D] buffer) are copied first (the new K/V go back into the originals)
        ordered = {name: inputs[name].contiguous() for name in self.interface.input_names}
        logits, hidden, *new_kv = self.runner(**ordered)
        self.interface.write_new_kv(inputs, new_kv)
        return logits, hidden


def lower_aoti(step, artifact_dir: str | Path | None = None) -> AotiVerifyStep:
    """Load the step's package from ``artifact_dir`` (default: the cache folder) or compile and save it there."""
    folder = Path(artifact_dir) if artifact_dir is not None else cache_dir() / "aoti"
    key = _step_key(step, model_fingerprint(step.model))
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = folder / f"verify_b{step.batch_size}_n{step.budget}_{digest}.pt2"
    meta_path = Path(str(path) + ".json")
    if path.exists() and meta_path.exists():
        saved = json.loads(meta_path.read_text())
        if all(saved.get(k) == v for k, v in key.items()):
            logger.info("loading compiled verify step %s", path)
            return AotiVerifyStep(path)
        logger.warning("%s was compiled for another model or torch version; recompiling", path)
    logger.info("compiling the verify step (N=%d) with AOTInductor into %s", step.budget, path)
    export_step_aoti(step, path, fingerprint=key["model"])
    return AotiVerifyStep(path)


def export_drafter_aoti(drafter, path: str | Path, *, fingerprint: str | None = None) -> Path:
    """Compile the drafter's step (a :class:`~jetspec_compile.drafter.JetSpecDrafter` or its network) into the
    AOTInductor package ``path``; the shared embedding and LM head are embedded in it."""
    net = drafter_network(drafter)
    path = Path(path)
    step = DraftStep(net).eval()
    inputs, dynamic = draft_step_export_spec(net)
    meta = {"kind": "draft_step", "model": fingerprint or model_fingerprint(step, net.cfg.to_json()),
            "format": PACKAGE_FORMAT,
            "num_layers": net.cfg.num_layers, "torch": torch.__version__}
    _compile_package(step, inputs, dynamic, path, meta, f"the drafter step ({net.cfg.target_name or 'drafter'})")
    return path


class AotiDraftStep:
    """A compiled drafter step, called like :class:`~jetspec_compile.drafter.step.DraftStep`."""

    def __init__(self, path: str | Path):
        self.meta, self.runner = _load_package(path)

    def __call__(self, *, hidden, positions, anchors, revealed, block_positions, past):
        dtype = past[0][0].dtype
        past = [(k.contiguous(), v.contiguous()) for k, v in past]
        return self.runner(hidden=hidden.to(dtype).contiguous(), positions=positions.contiguous(),
                           anchors=anchors.contiguous(), revealed=revealed.contiguous(),
                           block_positions=block_positions.contiguous(), past=past)


def lower_drafter_aoti(drafter, artifact_dir: str | Path | None = None):
    """A copy of ``drafter`` whose steps run a compiled package (loaded from ``artifact_dir`` or compiled into
    it); drafters without a network (n-gram) are returned unchanged."""
    if not isinstance(drafter, JetSpecDrafter):
        return drafter
    folder = Path(artifact_dir) if artifact_dir is not None else cache_dir() / "aoti"
    fingerprint = model_fingerprint(DraftStep(drafter.model), drafter.model.cfg.to_json())
    key = {"model": fingerprint, "format": PACKAGE_FORMAT, "torch": torch.__version__}
    path = folder / f"draft_{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]}.pt2"
    meta_path = Path(str(path) + ".json")
    if not (path.exists() and meta_path.exists()
            and all(json.loads(meta_path.read_text()).get(k) == v for k, v in key.items())):
        logger.info("compiling the drafter step with AOTInductor into %s", path)
        export_drafter_aoti(drafter, path, fingerprint=fingerprint)
    return drafter.with_step(AotiDraftStep(path))
