"""TensorRT engines for the verify step, built from the exported ONNX graph.

Needs the ``tensorrt`` Python package and an NVIDIA GPU; both are imported lazily, so everything up to the ONNX file
works (and is tested) without them. The engine has one optimization profile over the cache length (``min = N + 1``,
``opt``, ``max = max_cache_len``); the tree budget ``N`` and batch size are static, as in the ONNX graph.
``precision`` (``"fp32"``, ``"fp16"``, ``"bf16"``; default: the model's own dtype, so an fp32 model is not silently
run in half precision) sets the builder flags. :class:`TrtVerifyStep` runs an engine behind the same call convention
as the eager graph (CUDA tensors in, logits/hidden out, caches updated in place).

Not exercised on the machines this project is developed on (no TensorRT wheel, no GPU): see the README.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from ..compiler import build_verify_step
from ..errors import JetSpecError
from ..interface import HIDDEN, LOGITS, VerifyInterface
from ..io import atomic_file
from ..paths import cache_dir
from .onnx import check_tensorrt_ops, export_step_onnx

__all__ = ["build_engine", "TrtVerifyStep", "lower_tensorrt", "export_tensorrt", "tensorrt_available", "PRECISIONS",
           "precision_of"]


def _trt():
    try:
        import tensorrt as trt
    except ImportError as err:
        raise JetSpecError("TensorRT engines need the `tensorrt` package and an NVIDIA GPU "
                           "(pip install tensorrt on a CUDA machine); the ONNX export works without them") from err
    return trt


def tensorrt_available() -> tuple[bool, str]:
    """Whether an engine can be built here, and why not."""
    try:
        _trt()
    except JetSpecError as err:
        return False, str(err)
    if not torch.cuda.is_available():
        return False, "TensorRT is installed but no CUDA GPU is visible"
    return True, ""


#: engine precisions and the dtypes they follow by default
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def precision_of(model, precision: str | None) -> str:
    """``precision`` checked, or the one matching ``model``'s dtype (fp32 models stay fp32: lossless)."""
    if precision is None:
        dtype = next(model.parameters()).dtype
        return next((name for name, d in PRECISIONS.items() if d == dtype), "fp32")
    if precision not in PRECISIONS:
        raise ValueError(f"TensorRT precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    return precision


def build_engine(onnx_path: str | Path, engine_path: str | Path, *, max_cache_len: int, precision: str = "fp32",
                 workspace_gb: int = 4) -> Path:
    """Parse ``onnx_path`` and write a serialized engine to ``engine_path`` (atomically)."""
    trt = _trt()
    unsupported = check_tensorrt_ops(onnx_path)
    if unsupported:
        raise JetSpecError(f"{onnx_path} uses ONNX ops TensorRT's parser does not support: {sorted(unsupported)}")
    n = VerifyInterface.from_json(json.loads(Path(str(onnx_path) + ".json").read_text())).budget
    log = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(log)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, log)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise JetSpecError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_gb << 30)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    profile = builder.create_optimization_profile()
    opt = min(max_cache_len, max(4 * n, 512))
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = list(tensor.shape)
        if -1 in shape:  # the cache-length axis
            lo, mid, hi = ([n + 1 if d == -1 else d for d in shape], [opt if d == -1 else d for d in shape],
                           [max_cache_len if d == -1 else d for d in shape])
            profile.set_shape(tensor.name, lo, mid, hi)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise JetSpecError(f"TensorRT failed to build an engine from {onnx_path}")
    engine_path = Path(engine_path)
    with atomic_file(engine_path) as tmp:
        tmp.write_bytes(bytes(serialized))
    return engine_path


class TrtVerifyStep:
    """Run a verify engine like the eager graph: inputs by name, caches updated in place."""

    def __init__(self, engine_path: str | Path, interface: VerifyInterface):
        trt = _trt()
        self.interface = interface
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()

    def __call__(self, **inputs):
        trt = _trt()
        for name in self.interface.input_names:
            tensor = inputs[name] = inputs[name].contiguous()
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name in self.interface.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = {trt.float32: torch.float32, trt.float16: torch.float16,
                     trt.bfloat16: torch.bfloat16}[self.engine.get_tensor_dtype(name)]
            outputs[name] = torch.empty(shape, dtype=dtype, device="cuda")
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        self.context.execute_async_v3(self.stream.cuda_stream)
        self.stream.synchronize()
        self.interface.write_new_kv(inputs, [outputs[name] for name in self.interface.kv.new_kv_names()])
        return outputs[LOGITS], outputs[HIDDEN]


def lower_tensorrt(step, max_cache_len: int = 2048, precision: str | None = None) -> TrtVerifyStep:
    """Export ``step`` to ONNX in the cache folder, build an engine at ``precision`` (default: the model's dtype)
    for caches up to ``max_cache_len`` slots, and load it."""
    ok, why = tensorrt_available()
    if not ok:
        raise JetSpecError(f"backend='tensorrt' is not available here: {why}")
    precision = precision_of(step.model, precision)
    folder = Path(tempfile.mkdtemp(prefix="trt-", dir=cache_dir()))
    onnx_path = export_step_onnx(step, folder / "verify.onnx")
    engine = build_engine(onnx_path, folder / "verify.engine", max_cache_len=max_cache_len, precision=precision)
    return TrtVerifyStep(engine, step.interface)


def export_tensorrt(model, out_dir: str | Path, *, batch_size: int = 1, budget: int = 16, tap_layers=None,
                    max_cache_len: int = 2048, precision: str | None = None) -> dict[str, Path]:
    """Write ``verify.onnx`` (always) and ``verify.engine`` (where TensorRT and a GPU are present) to ``out_dir``.

    ``model`` may be an HF model or a :class:`~jetspec_compile.SpecModel` (its drafter's tap layers are used).
    ``precision``: ``"fp32"``, ``"fp16"`` or ``"bf16"`` (default: the model's dtype). Raises
    :class:`~jetspec_compile.JetSpecError` naming what is missing when the engine cannot be built.
    """
    if hasattr(model, "drafter") and isinstance(getattr(model, "model", None), torch.nn.Module):  # a SpecModel
        tap_layers = tap_layers if tap_layers is not None else getattr(model.drafter, "tap_layers", None)
        model = model.model
    precision = precision_of(model, precision)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    step, _ = build_verify_step(model, batch_size=batch_size, budget=budget, tap_layers=tap_layers)
    onnx_path = export_step_onnx(step, out_dir / "verify.onnx")
    unsupported = check_tensorrt_ops(onnx_path)
    if unsupported:
        raise JetSpecError(f"exported graph uses ops TensorRT does not support: {sorted(unsupported)}")
    ok, why = tensorrt_available()
    if not ok:
        raise JetSpecError(f"wrote {onnx_path} (TensorRT-compatible ops only) but cannot build the engine: {why}")
    engine = build_engine(onnx_path, out_dir / "verify.engine", max_cache_len=max_cache_len, precision=precision)
    return {"onnx": onnx_path, "engine": engine}
