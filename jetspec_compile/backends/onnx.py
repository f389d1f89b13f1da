"""Export the verify step to ONNX and run the speculative loop on onnxruntime.

``export_onnx`` captures the target, runs :data:`~jetspec_compile.passes.EXPORT_PIPELINE` (the verify passes
plus :func:`~jetspec_compile.passes.functionalize_kv_writes`) and exports the graph with
``torch.onnx.export(..., dynamo=True)``. Inputs: ``input_ids``, ``base_position``, ``depth``, ``write_slots``,
``tree_mask``, ``cache_valid``, ``cache_positions`` and ``k_cache_l``/``v_cache_l``; the cache length is a
dynamic axis. Outputs: ``logits``, ``hidden`` and the step's new keys/values (the caller writes them into its
cache). The file is written to a temporary name, checked with ``onnx.checker`` and renamed, so a failed export
never leaves a file that looks complete. Weights go to external data when the model is over ~2 GB.

:class:`OrtVerifyStep` runs such a file with onnxruntime (CPU provider here; CUDA where installed) behind the
same call convention as the eager graph, so :class:`~jetspec_compile.runtime.TreeVerifier` drives it unchanged.

The drafter's step is exported and run by :mod:`jetspec_compile.backends.onnx_drafter`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path

import torch

from ..compiler import build_verify_step
from ..errors import JetSpecError
from ..interface import INPUT_IDS, VerifyInterface
from ..passes import functionalize_kv_writes
from ..paths import cache_dir

logger = logging.getLogger(__name__)

__all__ = ["export_onnx", "export_step_onnx", "OrtVerifyStep", "lower_onnxruntime", "onnx_op_types",
           "TENSORRT_ONNX_OPS", "check_tensorrt_ops", "staged_export"]

#: ONNX op types TensorRT's ONNX parser supports (onnx-tensorrt docs/operators.md, TensorRT 10), restricted to
#: the ones transformer graphs use; an exported graph with any other op is reported before an engine build.
TENSORRT_ONNX_OPS = frozenset("""
Abs Add And ArgMax ArgMin Cast Ceil Clip Concat Constant ConstantOfShape Cos CumSum Div Equal Erf Exp Expand
Flatten Floor Gather GatherElements GatherND Gelu Gemm Greater GreaterOrEqual Identity If LayerNormalization Less
LessOrEqual Log LogSoftmax MatMul Max Mean Min Mod Mul Neg Not Or Pow Range Reciprocal ReduceL2 ReduceMax
ReduceMean ReduceMin ReduceProd ReduceSum Relu Reshape Resize ScatterElements ScatterND Shape Sigmoid Sign Sin
Slice Softmax Softplus Split Sqrt Squeeze Sub Sum Tanh Tile TopK Transpose Trilu Unsqueeze Where Xor
""".split())


def onnx_op_types(path: str | Path) -> set[str]:
    import onnx

    return {node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node}


def check_tensorrt_ops(path: str | Path) -> set[str]:
    """Op types in the ONNX file that TensorRT's ONNX parser does not support (empty set: all supported)."""
    return onnx_op_types(path) - TENSORRT_ONNX_OPS


@contextlib.contextmanager
def staged_export(path: Path, what: str):
    """Yield a temporary folder beside ``path``; on success move its files next to ``path`` (the ``.json``
    metadata last), on any error remove them and raise a :class:`JetSpecError` saying nothing was written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.stem}-", dir=path.parent))
    try:
        yield tmp_dir
        for item in sorted(tmp_dir.iterdir(), key=lambda p: p.suffix == ".json"):
            os.replace(item, path.parent / item.name)
    except Exception as err:
        raise JetSpecError(f"ONNX export of {what} failed and nothing was written: {err}") from err
    finally:
        for item in tmp_dir.glob("*"):
            item.unlink()
        tmp_dir.rmdir()


def export_step_onnx(step, path: str | Path) -> Path:
    """Export a step that went through the verify pipeline (functionalizing its KV writes) to ``path``."""
    import onnx

    if not step.functional_kv:
        functionalize_kv_writes(step)
        step.graph_module.recompile()
    path = Path(path)
    n = step.budget
    interface = step.interface
    inputs = interface.example_inputs(max(2 * n, 64), next(step.model.parameters()).device)
    dynamic = interface.dynamic_shapes(torch.export.Dim("cache_len", min=n + 1, max=1 << 16))
    nbytes = sum(p.numel() * p.element_size() for p in step.model.parameters())
    with staged_export(path, type(step.model).__name__) as tmp_dir:
        tmp = tmp_dir / path.name
        with torch.no_grad():
            torch.onnx.export(step.graph_module, (), kwargs=inputs, f=str(tmp), dynamo=True, dynamic_shapes=dynamic,
                              input_names=interface.input_names, output_names=interface.output_names,
                              external_data=nbytes > 1_800_000_000, optimize=True, verbose=False)
        onnx.checker.check_model(str(tmp))
        (tmp_dir / (path.name + ".json")).write_text(json.dumps(interface.to_json(), indent=1))
    return path


def export_onnx(model, path: str | Path, *, batch_size: int = 1, budget: int = 16, tap_layers=None) -> Path:
    """Capture ``model``, rewrite it for tree verification and write the verify step to ``path`` (.onnx)."""
    step, _ = build_verify_step(model, batch_size=batch_size, budget=budget, tap_layers=tap_layers)
    return export_step_onnx(step, path)


class OrtVerifyStep:
    """An exported verify step run by onnxruntime, called like the eager graph (inputs by name).

    The caches passed in are written in place with the step's new keys/values, as the eager graph does.
    """

    def __init__(self, path: str | Path, providers=None):
        import onnxruntime as ort

        path = Path(path)
        self.interface = VerifyInterface.from_json(json.loads(Path(str(path) + ".json").read_text()))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        self.runner = ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.runner.get_inputs()]

    def __call__(self, **inputs):
        feeds = {name: inputs[name].detach().cpu().numpy() for name in self.input_names}
        logits, hidden, *new_kv = self.runner.run(None, feeds)
        self.interface.write_new_kv(inputs, new_kv)
        device = inputs[INPUT_IDS].device
        return torch.from_numpy(logits).to(device), torch.from_numpy(hidden).to(device)


def lower_onnxruntime(step) -> OrtVerifyStep:
    """Export ``step`` into the cache folder (once per model/shape) and open it with onnxruntime."""
    root = cache_dir() / "onnx"
    root.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="onnx-", dir=root))  # one export per verifier built
    return OrtVerifyStep(export_step_onnx(step, folder / "verify.onnx"))
