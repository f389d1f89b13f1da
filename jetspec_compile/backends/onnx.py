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

``export_drafter_onnx`` does the same for the drafter's step (:class:`~jetspec_compile.drafter.step.DraftStep`:
new context taps + cached context keys/values + ``M`` blocks → per-depth log-probabilities and the new keys/
values), with the context lengths and the block count as dynamic axes; :class:`OrtDraftStep` runs it behind the
step's call convention, and :func:`lower_drafter_onnxruntime` plugs it into a
:class:`~jetspec_compile.drafter.JetSpecDrafter`, so ``optimize(..., backend="onnxruntime")`` runs both the
verify step and the drafter step on onnxruntime.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path

import torch

from ..errors import JetSpecError
from ..passes import functionalize_kv_writes

logger = logging.getLogger(__name__)

__all__ = ["export_onnx", "export_step_onnx", "OrtVerifyStep", "lower_onnxruntime", "onnx_op_types",
           "TENSORRT_ONNX_OPS", "check_tensorrt_ops", "export_drafter_onnx", "OrtDraftStep",
           "lower_drafter_onnxruntime"]

#: ONNX op types TensorRT's ONNX parser supports (onnx-tensorrt docs/operators.md, TensorRT 10), restricted to
#: the ones transformer graphs use; an exported graph with any other op is reported before an engine build.
TENSORRT_ONNX_OPS = frozenset("""
Abs Add And ArgMax ArgMin Cast Ceil Clip Concat Constant ConstantOfShape Cos CumSum Div Equal Erf Exp Expand
Flatten Floor Gather GatherElements GatherND Gelu Gemm Greater GreaterOrEqual Identity If LayerNormalization Less
LessOrEqual Log LogSoftmax MatMul Max Mean Min Mod Mul Neg Not Or Pow Range Reciprocal ReduceL2 ReduceMax
ReduceMean ReduceMin ReduceProd ReduceSum Relu Reshape Resize ScatterElements ScatterND Shape Sigmoid Sign Sin
Slice Softmax Softplus Split Sqrt Squeeze Sub Sum Tanh Tile TopK Transpose Trilu Unsqueeze Where Xor
""".split())


def _example_inputs(step, length: int) -> dict[str, torch.Tensor]:
    b, n = step.batch_size, step.num_nodes
    kv = step.meta["kv"]
    device = next(step.model.parameters()).device
    inputs = {
        "input_ids": torch.zeros(b, n, dtype=torch.long, device=device),
        "base_position": torch.zeros(b, dtype=torch.long, device=device),
        "depth": torch.arange(n, device=device).expand(b, n).contiguous(),
        "write_slots": torch.arange(n, device=device),
        "tree_mask": torch.ones(n, n, dtype=torch.bool, device=device).tril().expand(b, n, n).contiguous(),
        "cache_valid": torch.zeros(b, length, dtype=torch.bool, device=device),
        "cache_positions": torch.zeros(b, length, dtype=torch.long, device=device),
    }
    for layer in range(kv["num_layers"]):
        for name in ("k", "v"):
            inputs[f"{name}_cache_{layer}"] = torch.zeros(b, kv["heads"], length, kv["head_dim"], dtype=kv["dtype"],
                                                          device=device)
    return inputs


def onnx_op_types(path: str | Path) -> set[str]:
    import onnx

    return {node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node}


def check_tensorrt_ops(path: str | Path) -> set[str]:
    """Op types in the ONNX file that TensorRT's ONNX parser does not support (empty set: all supported)."""
    return onnx_op_types(path) - TENSORRT_ONNX_OPS


@contextlib.contextmanager
def _staging(path: Path, what: str):
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

    if not step.meta.get("functional_kv"):
        functionalize_kv_writes(step)
        step.graph_module.recompile()
    path = Path(path)
    n = step.num_nodes
    inputs = _example_inputs(step, length=max(2 * n, 64))
    length = torch.export.Dim("cache_len", min=n + 1, max=1 << 16)
    dynamic = {k: ({2: length} if k.startswith(("k_cache", "v_cache")) else {1: length} if k.startswith("cache_")
                   else None) for k in inputs}
    nbytes = sum(p.numel() * p.element_size() for p in step.model.parameters())
    kv_names = [f"{kv}_new_{i}" for i in range(step.meta["kv"]["num_layers"]) for kv in "kv"]
    with _staging(path, type(step.model).__name__) as tmp_dir:
        tmp = tmp_dir / path.name
        with torch.no_grad():
            torch.onnx.export(step.graph_module, (), kwargs=inputs, f=str(tmp), dynamo=True, dynamic_shapes=dynamic,
                              input_names=list(inputs), output_names=["logits", "hidden"] + kv_names,
                              external_data=nbytes > 1_800_000_000, optimize=True, verbose=False)
        onnx.checker.check_model(str(tmp))
        meta = {"inputs": list(inputs), "outputs": ["logits", "hidden"] + kv_names,
                "batch_size": step.batch_size, "num_nodes": n, "tap_layers": list(step.meta["tap_layers"]),
                "kv": {**step.meta["kv"], "dtype": str(step.meta["kv"]["dtype"])}}
        (tmp_dir / (path.name + ".json")).write_text(json.dumps(meta, indent=1))
    return path


def export_onnx(model, path: str | Path, *, batch_size: int = 1, num_nodes: int = 16, tap_layers=None) -> Path:
    """Capture ``model``, rewrite it for tree verification and write the verify step to ``path`` (.onnx)."""
    from ..runtime.verifier import build_verify_step

    step, _ = build_verify_step(model, batch_size=batch_size, num_nodes=num_nodes, tap_layers=tap_layers)
    return export_step_onnx(step, path)


class OrtVerifyStep:
    """An exported verify step run by onnxruntime, called like the eager graph (inputs by name).

    The caches passed in are written in place with the step's new keys/values, as the eager graph does.
    """

    def __init__(self, path: str | Path, providers=None):
        import onnxruntime as ort

        path = Path(path)
        self.meta = json.loads(Path(str(path) + ".json").read_text())
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        self.session = ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.num_layers = self.meta["kv"]["num_layers"]

    def __call__(self, **inputs):
        feeds = {name: inputs[name].detach().cpu().numpy() for name in self.input_names}
        from . import write_new_kv

        logits, hidden, *new_kv = self.session.run(None, feeds)
        write_new_kv(inputs, new_kv, self.num_layers)
        device = inputs["input_ids"].device
        return torch.from_numpy(logits).to(device), torch.from_numpy(hidden).to(device)


def lower_onnxruntime(step) -> OrtVerifyStep:
    """Export ``step`` into the cache folder (once per model/shape) and open it with onnxruntime."""
    from ..models import cache_dir

    root = cache_dir() / "onnx"
    root.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="onnx-", dir=root))  # one export per verifier built
    return OrtVerifyStep(export_step_onnx(step, folder / "verify.onnx"))



# -- the drafter step ------------------------------------------------------------------------------------------
#
# The first drafter export (not kept in the repository) exported fine, matched PyTorch in ``ep.module()`` and
# part by part in onnxruntime, yet the whole step disagreed in onnxruntime. Bisecting the step here (exporting
# its prefixes: block states, rotary, each layer, norm, head, log-softmax; masks built in the graph from the
# dynamic context length by in-place slices or comparisons, -inf or dtype-min, additive or boolean; context
# lengths 0, 1, equal to the block size; GQA by repeat_interleave or SDPA ``enable_gqa``; the old in-place
# ``block_states``; onnxscript and onnxruntime optimizers on and off) found every variant equal to PyTorch to
# ~1e-6. The one mechanism that reproduces all three symptoms is the input names: the step takes the cached
# context keys/values as a nested input (``past``: per layer a ``(k, v)`` pair), which ``torch.onnx.export``
# flattens in pytree order ``k_0, v_0, k_1, v_1, ...``, while ``input_names`` renames the flattened inputs by
# position only. A hand-written list in another order (grouped by kind: ``k_0, k_1, ..., v_0, ...``) exports
# without error, since those tensors share shape and dtype, and onnxruntime, fed by name, then reads layer 0's
# values as layer 1's keys: wrong log-probabilities, no error. ``ep.module()`` binds by pytree structure, and
# one layer exported alone has ``k`` and ``v`` as plain arguments, so every check short of the whole step in
# onnxruntime passes. Hence the names below are derived from the same pytree flattening the exporter uses,
# never written by hand, and every export is run in onnxruntime against PyTorch at context lengths and block
# counts other than the traced ones before the file is moved into place
# (tests/backends/test_onnx.py::test_misnamed_drafter_inputs_are_caught_before_the_file_is_written).

def _flat_names(tree: dict) -> list[str]:
    """Names of the leaves of ``tree`` in ``torch.utils._pytree`` flattening order (the exporter's input order):
    ``past=[(k, v), ...]`` gives ``past_k_0, past_v_0, past_k_1, ...``."""
    from torch.utils import _pytree as pytree

    names = []
    for path, _ in pytree.tree_flatten_with_path(tree)[0]:
        keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
        if len(keys) == 3 and isinstance(keys[1], int) and keys[2] in (0, 1):  # a per-layer (k, v) pair
            names.append(f"{keys[0]}_{'kv'[keys[2]]}_{keys[1]}")
        else:
            names.append("_".join(str(k) for k in keys))
    return names


def _drafter_network(drafter):
    from ..drafter import JetSpecDrafter, ParallelDrafter

    if isinstance(drafter, JetSpecDrafter):
        return drafter.model
    if isinstance(drafter, ParallelDrafter):
        return drafter
    raise JetSpecError(f"only the parallel drafter's step can be exported to ONNX, got {type(drafter).__name__} "
                       "(training-free drafters such as NGramDrafter have no network and run in Python)")


def draft_step_export_spec(net) -> tuple[dict, dict]:
    """Example inputs and ``dynamic_shapes`` for exporting a :class:`~jetspec_compile.drafter.step.DraftStep`:
    cached context ``T``, new tokens ``t`` (both may be 0) and blocks ``M`` are dynamic."""
    cfg = net.cfg
    context, new = torch.export.Dim("context", min=0, max=1 << 16), torch.export.Dim("new", min=0, max=1 << 16)
    blocks = torch.export.Dim("blocks", min=1, max=256)
    dynamic = {"hidden": {1: new}, "positions": {1: new}, "anchors": {1: blocks}, "revealed": {1: blocks},
               "block_positions": {1: blocks * cfg.block_size},
               "past": [({2: context}, {2: context}) for _ in range(cfg.num_layers)]}
    return _draft_inputs(net, context=11, new=3, blocks=2), dynamic


def _draft_inputs(net, context: int, new: int, blocks: int, seed: int = 0) -> dict:
    """Random step inputs in ``DraftStep.forward``'s argument order: ``context`` cached tokens, ``new`` pending
    ones, ``blocks`` blocks (the second onward with a revealed depth-1 token)."""
    cfg = net.cfg
    g = torch.Generator().manual_seed(seed)
    device, dtype = net.fc.weight.device, net.fc.weight.dtype
    s, p = cfg.block_size, context + new
    revealed = torch.full((1, blocks, s - 1), -1, dtype=torch.long)
    if s > 1:
        revealed[0, 1:, 0] = torch.randint(0, cfg.vocab_size, (blocks - 1,), generator=g)
    inputs = {
        "hidden": torch.randn(1, new, len(cfg.tap_layers) * cfg.target_hidden_size, generator=g),
        "positions": torch.arange(context, p)[None],
        "anchors": torch.randint(0, cfg.vocab_size, (1, blocks), generator=g),
        "revealed": revealed,
        "block_positions": torch.arange(p, p + s).repeat(blocks)[None],
        "past": [tuple(torch.randn(1, cfg.num_kv_heads, context, cfg.head_dim, generator=g) for _ in "kv")
                 for _ in range(cfg.num_layers)],
    }
    cast = lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)  # noqa: E731
    return {k: [tuple(cast(t) for t in kv) for kv in v] if k == "past" else cast(v) for k, v in inputs.items()}


def _check_draft_step(path: Path, step, net, shapes, atol: float = 1e-3) -> None:
    """Run the exported file in onnxruntime at ``shapes`` (context, new, blocks) and compare with PyTorch."""
    ort_step = OrtDraftStep(path)
    for seed, (context, new, blocks) in enumerate(shapes, start=1):
        inputs = _draft_inputs(net, context, new, blocks, seed)
        with torch.no_grad():
            expected, expected_kv = step(**inputs)
        actual, actual_kv = ort_step(**inputs)
        err = (actual - expected).abs().max().item()
        kv_err = max([(a - e).abs().max().item() for pa, pe in zip(actual_kv, expected_kv) for a, e in zip(pa, pe)
                      if e.numel()], default=0.0)
        if not err <= atol or not kv_err <= atol:
            raise JetSpecError(f"onnxruntime disagrees with PyTorch on the exported drafter step at context "
                               f"{context}+{new}, {blocks} block(s): max |Δ log-prob| {err:.3g}, |Δ kv| {kv_err:.3g}")


def export_drafter_onnx(drafter, path: str | Path, *, check: bool = True) -> Path:
    """Export the drafter's per-step computation (:class:`~jetspec_compile.drafter.step.DraftStep`) to ``path``.

    ``drafter``: a :class:`~jetspec_compile.drafter.JetSpecDrafter` or its ``ParallelDrafter`` network
    (float32: onnxruntime's CPU provider has no bfloat16 kernels). Inputs ``hidden [1, t, K*H]``,
    ``positions [1, t]``, ``anchors [1, M]``, ``revealed [1, M, S-1]``, ``block_positions [1, M*S]``,
    ``past_k_l``/``past_v_l [1, H_kv, T, D]``; outputs ``logprobs [M, S, V]`` and ``k_new_l``/``v_new_l
    [1, H_kv, t, D]``. ``T``, ``t`` (both may be 0) and ``M`` are dynamic. With ``check`` the file is run in
    onnxruntime at other shapes and compared with PyTorch before it is moved into place.
    """
    import onnx

    from ..drafter.step import DraftStep

    net = _drafter_network(drafter)
    path = Path(path)
    dtypes = {p.dtype for p in net.parameters()} | {net.embed.weight.dtype, net.lm_head.weight.dtype}
    if dtypes != {torch.float32}:
        raise JetSpecError(f"the drafter step exports in float32 only (onnxruntime's CPU provider lacks bfloat16 "
                           f"and most float16 kernels); this drafter has {sorted(map(str, dtypes))}: load it with "
                           "load_drafter(..., dtype=torch.float32) on a float32 target")
    cfg = net.cfg
    step = DraftStep(net).eval()
    inputs, dynamic = draft_step_export_spec(net)
    input_names = _flat_names(inputs)
    output_names = ["logprobs"] + [f"{kv}_new_{i}" for i in range(cfg.num_layers) for kv in "kv"]
    nbytes = sum(t.numel() * t.element_size() for t in [*net.parameters(), net.embed.weight, net.lm_head.weight])
    with _staging(path, f"the drafter step ({cfg.target_name or 'ParallelDrafter'})") as tmp_dir:
        tmp = tmp_dir / path.name
        with torch.no_grad():
            torch.onnx.export(step, (), kwargs=inputs, f=str(tmp), dynamo=True, dynamic_shapes=dynamic,
                              input_names=input_names, output_names=output_names,
                              external_data=nbytes > 1_800_000_000, optimize=True, verbose=False)
        onnx.checker.check_model(str(tmp))
        meta = {"kind": "draft_step", "inputs": input_names, "outputs": output_names,
                "num_layers": cfg.num_layers, "block_size": cfg.block_size, "vocab_size": cfg.vocab_size,
                "dtype": "float32", "not_tensorrt_ops": sorted(check_tensorrt_ops(tmp))}
        (tmp_dir / (path.name + ".json")).write_text(json.dumps(meta, indent=1))
        if meta["not_tensorrt_ops"]:
            logger.warning("drafter step uses ops TensorRT's ONNX parser lacks: %s", meta["not_tensorrt_ops"])
        if check:  # other lengths than traced (0 cached, 0 new, 1 and 3 blocks): the dynamic axes hold
            _check_draft_step(tmp, step, net, [(0, 5, 1), (37, 1, 3), (6, 0, 1)])
    return path


class OrtDraftStep:
    """An exported drafter step run by onnxruntime, called like :class:`~jetspec_compile.drafter.step.DraftStep`
    (``hidden, positions, anchors, revealed, block_positions, past``) and returning the same
    ``(logprobs [M, S, V], [(k, v) per layer])`` as CPU tensors."""

    def __init__(self, path: str | Path, providers=None):
        import onnxruntime as ort

        path = Path(path)
        self.path = path
        self.meta = json.loads(Path(str(path) + ".json").read_text())
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        self.session = ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])
        self.num_layers = self.meta["num_layers"]
        self.input_names = {i.name for i in self.session.get_inputs()}

    def __call__(self, *, hidden, positions, anchors, revealed, block_positions, past):
        from torch.utils import _pytree as pytree

        inputs = {"hidden": hidden.float(), "positions": positions, "anchors": anchors, "revealed": revealed,
                  "block_positions": block_positions, "past": past}
        leaves = pytree.tree_leaves(inputs)  # named by the same flattening as at export
        feeds = {name: t.detach().cpu().contiguous().numpy() for name, t in zip(_flat_names(inputs), leaves)
                 if name in self.input_names}
        logprobs, *new = self.session.run(None, feeds)
        new = [torch.from_numpy(a) for a in new]
        return torch.from_numpy(logprobs), [(new[2 * i], new[2 * i + 1]) for i in range(self.num_layers)]


def lower_drafter_onnxruntime(drafter):
    """A copy of ``drafter`` whose steps run on onnxruntime (exported into the cache folder); drafters without
    a network (n-gram, test drafters) are returned unchanged."""
    from ..drafter import JetSpecDrafter
    from ..models import cache_dir

    if not isinstance(drafter, JetSpecDrafter):
        return drafter
    root = cache_dir() / "onnx"
    root.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="onnx-draft-", dir=root))  # one export per optimized model
    return drafter.with_step(OrtDraftStep(export_drafter_onnx(drafter, folder / "draft.onnx")))
