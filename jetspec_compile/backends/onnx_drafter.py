"""The drafter's step on ONNX Runtime: export, self-check, run.

``export_drafter_onnx`` exports :class:`~jetspec_compile.drafter.step.DraftStep` (new context taps + cached
context keys/values + ``M`` blocks → per-depth log-probabilities and the new keys/values), with the context
lengths and the block count as dynamic axes, and runs the file in onnxruntime against PyTorch at other shapes
before it is moved into place. :class:`OrtDraftStep` runs it behind the step's call convention, and
:func:`lower_drafter_onnxruntime` plugs it into a :class:`~jetspec_compile.drafter.JetSpecDrafter`, so
``optimize(..., backend="onnxruntime")`` runs both the verify step and the drafter step on onnxruntime.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import torch

from ..drafter import JetSpecDrafter
from ..drafter.step import DraftStep, draft_inputs, draft_step_export_spec, drafter_network
from ..errors import JetSpecError
from ..paths import cache_dir
from .onnx import check_tensorrt_ops, staged_export

logger = logging.getLogger(__name__)

__all__ = ["export_drafter_onnx", "OrtDraftStep", "lower_drafter_onnxruntime"]


# Input names are derived from the exporter's own pytree flattening of ``past`` (per layer a ``(k, v)`` pair:
# ``past_k_0, past_v_0, past_k_1, ...``), never written by hand: ``torch.onnx.export`` renames flattened inputs by
# position only, and keys and values share shape and dtype, so a list in another order would export without error
# and feed layer 0's values as layer 1's keys. Every export is also run in onnxruntime against PyTorch at other
# shapes before it is kept (tests/backends/test_onnx.py::test_misnamed_drafter_inputs_are_caught_before_the_file_
# is_written).

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


def _check_draft_step(path: Path, step, net, shapes, atol: float = 1e-3) -> None:
    """Run the exported file in onnxruntime at ``shapes`` (context, new, blocks) and compare with PyTorch."""
    ort_step = OrtDraftStep(path)
    for seed, (context, new, blocks) in enumerate(shapes, start=1):
        inputs = draft_inputs(net, context, new, blocks, seed)
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

    net = drafter_network(drafter)
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
    with staged_export(path, f"the drafter step ({cfg.target_name or 'ParallelDrafter'})") as tmp_dir:
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
        self.runner = ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])
        self.num_layers = self.meta["num_layers"]
        self.input_names = {i.name for i in self.runner.get_inputs()}

    def __call__(self, *, hidden, positions, anchors, revealed, block_positions, past):
        from torch.utils import _pytree as pytree

        inputs = {"hidden": hidden.float(), "positions": positions, "anchors": anchors, "revealed": revealed,
                  "block_positions": block_positions, "past": past}
        leaves = pytree.tree_leaves(inputs)  # named by the same flattening as at export
        feeds = {name: t.detach().cpu().contiguous().numpy() for name, t in zip(_flat_names(inputs), leaves)
                 if name in self.input_names}
        logprobs, *new = self.runner.run(None, feeds)
        new = [torch.from_numpy(a) for a in new]
        return torch.from_numpy(logprobs), [(new[2 * i], new[2 * i + 1]) for i in range(self.num_layers)]


def lower_drafter_onnxruntime(drafter):
    """A copy of ``drafter`` whose steps run on onnxruntime (exported into the cache folder); drafters without
    a network (n-gram, test drafters) are returned unchanged."""
    if not isinstance(drafter, JetSpecDrafter):
        return drafter
    root = cache_dir() / "onnx"
    root.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="onnx-draft-", dir=root))  # one export per optimized model
    return drafter.with_step(OrtDraftStep(export_drafter_onnx(drafter, folder / "draft.onnx")))
