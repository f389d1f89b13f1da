"""DFlash checkpoints: export a ``style="dflash"`` drafter in the layouts serving engines load, and import one.

Two layouts, both a folder with ``config.json``, ``model.safetensors`` and optionally ``mask_embedding.pt``:

- **native** (vLLM ``method="dflash"``, SGLang ``--speculative-algorithm DFLASH``): a Qwen3 config
  (``"architectures": ["DFlashDraftModel"]``, ``"model_type": "qwen3"``, the drafter's own sizes) with
  ``"dflash_config": {"mask_token_id", "target_layer_ids"}`` and ``"is_causal"`` (absent: bidirectional block).
  ``target_layer_ids`` entry ``i`` is the output of target decoder layer ``i`` before the final norm, which is
  what the verify graph taps (:mod:`~jetspec_compile.passes.tap_hidden_states`), so it is our ``tap_layers``.
- **speculators** (the ``speculators`` package's self-describing format, which ``vllm serve DIR`` accepts on
  its own): ``"speculators_model_type": "dflash"``, the decoder sizes under ``transformer_layer_config``, the taps
  as ``aux_hidden_state_layer_ids`` (counted like vLLM's auxiliary hidden-state layers: the *input* of layer
  ``j``, so tap ``i`` is ``i + 1``), ``block_size``, ``mask_token_id``, and a ``speculators_config`` naming the
  verifier. Exported blocks are bidirectional (``"sliding_window_non_causal": true``); on import a ``false`` there
  means causal blocks, as vLLM reads it.

Weights carry no prefix: ``fc.weight [H, K·H_target]``, ``hidden_norm.weight``, ``norm.weight``, and per layer
``layers.{i}.input_layernorm``, ``post_attention_layernorm``, ``self_attn.{q,k,v,o}_proj``, ``self_attn.{q,k}_norm``,
``mlp.{gate,up,down}_proj``. The token embedding and LM head are the target's (not saved). A draft vocabulary of
``V'`` tokens is written as ``lm_head.weight`` (the target head's rows, in increasing token order) with
``d2t [V']`` (token id = index + ``d2t[index]``) and ``draft_vocab_size``. ``mask_embedding.pt``
(``{"mask_token_id", "embedding" [H]}``) replaces the mask token's embedding; without it the mask slot embeds as
the target's row of ``mask_token_id``.

The format describes one drafter shape only: the ``"dflash"`` style of
:class:`~jetspec_compile.drafter.model.DrafterConfig`. The default ``"jetspec"`` shape (no q/k norms, the anchor's
output drafts depth 1) cannot be expressed in it and is refused. The corpus saved beside a drafter
(``corpus.safetensors``) is not exported: engines load every ``*.safetensors`` file of the folder as weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..capture import text_config
from ..io import atomic_folder
from .model import DrafterConfig, ParallelDrafter, vocab_problem

__all__ = ["export_dflash", "load_dflash_drafter", "dflash_layout", "export_problem", "unused_token", "LAYOUTS"]

LAYOUTS = ("native", "speculators")
CONFIG, WEIGHTS, MASK_FILE = "config.json", "model.safetensors", "mask_embedding.pt"

#: our layer parameter names -> DFlash names
_LAYER_NAMES = {
    "input_norm.weight": "input_layernorm.weight",
    "post_norm.weight": "post_attention_layernorm.weight",
    "q_proj.weight": "self_attn.q_proj.weight",
    "k_proj.weight": "self_attn.k_proj.weight",
    "v_proj.weight": "self_attn.v_proj.weight",
    "o_proj.weight": "self_attn.o_proj.weight",
    "q_norm.weight": "self_attn.q_norm.weight",
    "k_norm.weight": "self_attn.k_norm.weight",
    "gate_proj.weight": "mlp.gate_proj.weight",
    "up_proj.weight": "mlp.up_proj.weight",
    "down_proj.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {"fc.weight": "fc.weight", "context_norm.weight": "hidden_norm.weight", "norm.weight": "norm.weight"}


def _dflash_names(num_layers: int) -> dict[str, str]:
    names = dict(_TOP_NAMES)
    for i in range(num_layers):
        names.update({f"layers.{i}.{ours}": f"layers.{i}.{theirs}" for ours, theirs in _LAYER_NAMES.items()})
    return names


def export_problem(cfg: DrafterConfig, layout: str = "native") -> str | None:
    """Why a drafter of shape ``cfg`` cannot be written in ``layout``, or None."""
    if layout not in LAYOUTS:
        return f"layout must be one of {LAYOUTS}, got {layout!r}"
    if cfg.style != "dflash":
        return (f"this drafter has the {cfg.style!r} shape (the anchor's output drafts depth 1, no q/k norms), which "
                "DFlash engines cannot run; train one with `jetspec-compile train-drafter --style dflash`")
    if cfg.mask_token_id < 0:
        return "the drafter has no mask_token_id (DrafterConfig.mask_token_id): engines feed that token in MASK slots"
    if layout == "speculators" and cfg.causal:
        return ("the speculators DFlash format trains bidirectional blocks only; export a causal drafter in the "
                "'native' layout")
    return None


def unused_token(records, vocab_size: int) -> int:
    """A mask token for a new DFlash drafter: the highest token id that occurs nowhere in ``records``
    (self-distillation records with ``prompt_ids`` / ``response_ids``), so a real token is never embedded as the
    mask by an engine."""
    seen = set()
    for rec in records:
        seen.update(rec.get("prompt_ids", ()))
        seen.update(rec.get("response_ids", ()))
    for token in range(vocab_size - 1, -1, -1):
        if token not in seen:
            return token
    raise ValueError("every token of the vocabulary occurs in the data: pass a mask token id explicitly")


def _qwen3_config(cfg: DrafterConfig, max_position_embeddings: int, dtype: torch.dtype) -> dict:
    return {
        "model_type": "qwen3", "hidden_size": cfg.target_hidden_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        "intermediate_size": cfg.intermediate_size, "hidden_act": "silu", "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": None, "max_position_embeddings": max_position_embeddings,
        "vocab_size": cfg.vocab_size, "tie_word_embeddings": False, "attention_bias": False,
        "dtype": str(dtype).removeprefix("torch."),
    }


def export_dflash(drafter, out: str | Path, layout: str = "native", *, max_position_embeddings: int = 8192,
                  dtype: torch.dtype = torch.float32, verifier: str = "") -> Path:
    """Write ``drafter`` (a ``ParallelDrafter`` or ``JetSpecDrafter`` of the ``"dflash"`` style) to folder ``out``
    in ``layout`` (``"native"`` or ``"speculators"``, see the module docstring); written to a temporary folder
    and renamed into place. ``max_position_embeddings``: the target's (sizes the engine's rotary table);
    ``verifier``: the target's name or path, recorded by the speculators layout. Raises ValueError for a
    drafter the layout cannot express."""
    net = getattr(drafter, "model", drafter)
    if not isinstance(net, ParallelDrafter):
        raise TypeError(f"export_dflash needs a ParallelDrafter or JetSpecDrafter, got {type(drafter).__name__}")
    cfg = net.cfg
    problem = export_problem(cfg, layout)
    if problem:
        raise ValueError(f"cannot export to the {layout} DFlash layout: {problem}")
    state = net.state_dict()
    tensors = {theirs: state[ours] for ours, theirs in _dflash_names(cfg.num_layers).items()}
    draft_size = cfg.vocab_size
    if net.draft_vocab is not None:
        ids = net.draft_vocab.sort().values
        draft_size = int(ids.numel())
        tensors["lm_head.weight"] = net.lm_head.weight[ids]
        tensors["d2t"] = ids - torch.arange(draft_size, device=ids.device)
    tensors = {k: (v.detach().to(dtype) if v.is_floating_point() else v.detach().long()).cpu().contiguous()
               for k, v in tensors.items()}
    qwen = _qwen3_config(cfg, max_position_embeddings, dtype)
    if layout == "native":
        config = {"architectures": ["DFlashDraftModel"], **qwen, "block_size": cfg.block_size,
                  "num_target_layers": cfg.target_num_layers, "target_hidden_size": cfg.target_hidden_size,
                  "dflash_config": {"mask_token_id": cfg.mask_token_id, "target_layer_ids": list(cfg.tap_layers)},
                  "is_causal": cfg.causal}
        if draft_size != cfg.vocab_size:
            config["draft_vocab_size"] = draft_size
    else:
        config = {
            "architectures": ["DFlashSpeculator"], "speculators_model_type": "dflash",
            "transformer_layer_config": qwen, "draft_vocab_size": draft_size, "block_size": cfg.block_size,
            "target_hidden_size": cfg.target_hidden_size, "mask_token_id": cfg.mask_token_id,
            "sliding_window_non_causal": True,
            "aux_hidden_state_layer_ids": [i + 1 for i in cfg.tap_layers],
            "speculators_config": {
                "algorithm": "dflash", "default_proposal_method": "greedy",
                "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": cfg.depth}],
                "verifier": {"name_or_path": verifier or cfg.target_name, "architectures": []}},
        }
    out = Path(out)
    with atomic_folder(out) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2))
        torch.save({"mask_token_id": cfg.mask_token_id,
                    "embedding": net.mask_embedding.detach().to(dtype).cpu().clone()}, tmp / MASK_FILE)
    return out


def dflash_layout(folder: str | Path) -> str | None:
    """``"native"`` or ``"speculators"`` if ``folder/config.json`` describes a DFlash drafter, else None."""
    path = Path(folder) / CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    if config.get("speculators_model_type") == "dflash":
        return "speculators"
    if isinstance(config.get("dflash_config"), dict):
        return "native"
    return None


def _read_config(folder: Path, target) -> tuple[DrafterConfig, dict]:
    """The drafter config a DFlash ``config.json`` describes, and the raw JSON."""
    raw = json.loads((folder / CONFIG).read_text())
    layout = dflash_layout(folder)
    if layout == "speculators":
        layer = dict(raw.get("transformer_layer_config") or {})
        taps = [int(i) - 1 for i in raw.get("aux_hidden_state_layer_ids") or []]
        mask_id = raw.get("mask_token_id")
        causal = not raw.get("sliding_window_non_causal", True)  # as vLLM reads it
        draft_size = raw.get("draft_vocab_size")
    else:
        layer = raw
        dflash = raw["dflash_config"]
        taps = [int(i) for i in dflash.get("target_layer_ids") or []]
        mask_id = dflash.get("mask_token_id", raw.get("mask_token_id"))
        causal = raw.get("is_causal", dflash.get("causal"))
        causal = bool(causal) if causal is not None else False
        draft_size = raw.get("draft_vocab_size")
    where = folder / CONFIG
    unsupported = []
    if layer.get("hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act {layer['hidden_act']!r} (only silu)")
    if layer.get("attention_bias"):
        unsupported.append("attention biases")
    if not layer.get("is_neox_style", raw.get("is_neox_style", True)):
        unsupported.append("interleaved (non-neox) RoPE")
    if any(t == "sliding_attention" for t in layer.get("layer_types") or []) or (raw.get("dflash_config") or {}).get(
            "use_swa"):
        unsupported.append("sliding-window layers")
    rope = layer.get("rope_parameters") or layer.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in (None, "default"):
        unsupported.append(f"rope type {rope_type!r}")
    if unsupported:
        raise ValueError(f"{where}: this DFlash drafter uses {', '.join(unsupported)}, which jetspec_compile's drafter "
                         "does not implement")
    if not taps:
        raise ValueError(f"{where} names no target layers (dflash_config.target_layer_ids / "
                         "aux_hidden_state_layer_ids)")
    if mask_id is None:
        raise ValueError(f"{where} has no mask_token_id")
    tc = text_config(target)
    hidden = int(layer.get("hidden_size", 0))
    if hidden != tc.hidden_size or int(raw.get("target_hidden_size") or hidden) != tc.hidden_size:
        raise ValueError(f"{where}: a drafter {hidden} wide for a target of hidden size "
                         f"{raw.get('target_hidden_size') or hidden}; this target's is {tc.hidden_size} "
                         "(jetspec_compile runs drafters as wide as their target)")
    problems = []
    vocab = int(layer.get("vocab_size", tc.vocab_size))
    if vocab != tc.vocab_size:
        problems.append(f"vocabulary {vocab} != the target's {tc.vocab_size}")
    layers = int(raw.get("num_target_layers") or tc.num_hidden_layers)
    if layers != tc.num_hidden_layers:
        problems.append(f"made for a target of {layers} layers, this one has {tc.num_hidden_layers}")
    if max(taps) >= tc.num_hidden_layers or min(taps) < 0:
        problems.append(f"taps layers {taps}, the target has {tc.num_hidden_layers}")
    if problems:
        raise ValueError(f"{where}: this DFlash drafter was trained for another target: " + "; ".join(problems))
    heads = int(layer["num_attention_heads"])
    theta = rope.get("rope_theta", layer.get("rope_theta", 1_000_000.0))
    cfg = DrafterConfig(
        target_hidden_size=hidden, vocab_size=vocab, tap_layers=tuple(taps), target_num_layers=layers,
        num_layers=int(layer["num_hidden_layers"]), num_heads=heads,
        num_kv_heads=int(layer.get("num_key_value_heads") or heads),
        head_dim=int(layer.get("head_dim") or hidden // heads), intermediate_size=int(layer["intermediate_size"]),
        block_size=int(raw.get("block_size") or 16), rope_theta=float(theta),
        rms_norm_eps=float(layer.get("rms_norm_eps", 1e-6)), target_name=folder.name,
        draft_vocab_size=0 if draft_size in (None, layer.get("vocab_size", tc.vocab_size)) else int(draft_size),
        style="dflash", causal=causal, mask_token_id=int(mask_id))
    return cfg, raw


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} has no *.safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            part = load_file(str(file))
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"{file} is corrupt or truncated ({err}); re-download or re-export it") from err
        state.update({k.removeprefix("model."): v for k, v in part.items()})
    return state


def _check_shared(state: dict, name: str, expected: torch.Tensor, folder: Path) -> None:
    """A checkpoint's own copy of the embedding / LM head must be the target's (ours are always shared)."""
    mine = state.pop(name)
    if mine.shape != expected.shape or not torch.allclose(mine.float(), expected.detach().float().cpu(), atol=1e-2,
                                                          rtol=1e-2):
        raise ValueError(f"{folder}: the drafter brings its own {name} (shape {tuple(mine.shape)}), not the target's; "
                         "jetspec_compile drafters share the target's embedding and LM head")


def load_dflash_drafter(folder: str | Path, target, dtype: torch.dtype = torch.float32) -> ParallelDrafter:
    """Load a DFlash checkpoint folder (native or speculators layout) as a ``"dflash"``-style drafter attached to
    ``target``'s embedding and LM head, ready for :class:`~jetspec_compile.drafter.JetSpecDrafter` (tree drafting
    over its per-depth distributions)."""
    folder = Path(folder)
    if dflash_layout(folder) is None:
        raise ValueError(f"{folder / CONFIG} does not describe a DFlash drafter")
    cfg, raw = _read_config(folder, target)  # checks that it fits ``target``
    state = _read_weights(folder)
    vocab = None
    if "d2t" in state:
        d2t = state.pop("d2t").long().flatten()
        vocab = torch.arange(d2t.numel()) + d2t
        problem = vocab_problem(vocab, cfg.vocab_size)
        if problem:
            raise ValueError(f"{folder}: corrupt d2t draft vocabulary ({problem})")
    state.pop("t2d", None)
    head = target.get_output_embeddings().weight
    if "lm_head.weight" in state:
        _check_shared(state, "lm_head.weight", head if vocab is None else head[vocab], folder)
    elif vocab is not None and vocab.numel() != cfg.vocab_size:
        raise ValueError(f"{folder}: a d2t draft vocabulary without its lm_head.weight")
    if "embed_tokens.weight" in state:
        _check_shared(state, "embed_tokens.weight", target.get_input_embeddings().weight, folder)
    if vocab is not None and vocab.numel() == cfg.vocab_size:
        vocab = None
    if (vocab is None) != (cfg.draft_vocab_size == 0):
        cfg = DrafterConfig(**{**json.loads(cfg.to_json()), "draft_vocab_size": 0 if vocab is None else vocab.numel()})
    net = ParallelDrafter(cfg, target.get_input_embeddings(), target.get_output_embeddings())
    names = _dflash_names(cfg.num_layers)
    missing = sorted(theirs for theirs in names.values() if theirs not in state)
    unexpected = sorted(set(state) - set(names.values()))
    if missing or unexpected:
        raise ValueError(f"{folder}: weights do not match a {cfg.num_layers}-layer DFlash drafter: missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]}")
    ours = {k: state[theirs] for k, theirs in names.items()}
    mask_file = folder / MASK_FILE
    if mask_file.exists():
        mask = torch.load(mask_file, weights_only=True, map_location="cpu")
        if isinstance(mask, dict):
            if mask.get("mask_token_id", cfg.mask_token_id) != cfg.mask_token_id:
                raise ValueError(f"{mask_file} is for mask token {mask.get('mask_token_id')}, the config says "
                                 f"{cfg.mask_token_id}")
            mask = mask["embedding"]
        ours["mask_embedding"] = mask.reshape(-1)
    else:  # the mask slot embeds as the target's row of the mask token
        ours["mask_embedding"] = target.get_input_embeddings().weight[cfg.mask_token_id].detach().cpu()
    if vocab is not None:
        ours["draft_vocab"] = vocab
    expected = net.state_dict()
    bad = sorted(k for k in expected if k in ours and tuple(expected[k].shape) != tuple(ours[k].shape))
    if bad:
        raise ValueError(f"{folder}: weights of the wrong shape for its config.json: "
                         + ", ".join(f"{k} {tuple(ours[k].shape)} != {tuple(expected[k].shape)}" for k in bad[:5]))
    net.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in ours.items()})
    return net.to(dtype).eval()
