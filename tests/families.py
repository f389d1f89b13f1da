"""Tiny random-weight models of every supported family, built from configs (no downloads)."""

from __future__ import annotations

import copy
import functools

import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 97
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
               tie_word_embeddings=False)

#: family name -> (model_type, config overrides). Sliding windows are small so tests cross them.
FAMILIES = {
    "llama": ("llama", {}),
    "qwen2": ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1,
                        "layer_types": ["full_attention", "sliding_attention", "sliding_attention"]}),
    "qwen3": ("qwen3", {"head_dim": 16}),
    "mistral": ("mistral", {"sliding_window": 8}),
    "gemma3": ("gemma3_text", {"head_dim": 16, "sliding_window": 8,
                               "layer_types": ["sliding_attention", "sliding_attention", "full_attention"]}),
    "phi3": ("phi3", {"sliding_window": 8}),
    "gpt2": ("gpt2", {"n_embd": 64, "n_layer": 3, "n_head": 4, "n_positions": 512, "n_inner": 96}),
    "gpt_neox": ("gpt_neox", {"use_parallel_residual": True}),
    "opt": ("opt", {"ffn_dim": 96, "word_embed_proj_dim": 64, "do_layer_norm_before": True}),
    "qwen3_moe": ("qwen3_moe", {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
                                "moe_intermediate_size": 32, "decoder_sparse_step": 1}),
    # eager-only attention with logit soft-capping (attention and final logits), sliding and full layers
    "gemma2": ("gemma2", {"head_dim": 16, "sliding_window": 8, "attn_logit_softcapping": 5.0,
                          "final_logit_softcapping": 30.0,
                          "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}),
    # ALiBi position biases, no position embeddings
    "bloom": ("bloom", {"n_head": 4}),
}

#: families without SDPA attention in transformers: built with eager attention, as a user would get them
EAGER_ONLY = {"gemma2", "bloom"}


@functools.lru_cache(maxsize=None)
def _model(family: str, seed: int):
    model_type, overrides = FAMILIES[family]
    config = AutoConfig.for_model(model_type, **{**_COMMON, **overrides})
    torch.manual_seed(seed)
    attn = "eager" if family in EAGER_ONLY else "sdpa"
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32).eval()
    # Random init gives near-uniform logits; sharpen the head so greedy ties are rare and drafts can be right.
    with torch.no_grad():
        head = model.get_output_embeddings()
        head.weight.mul_(8.0)
    return model


def make_model(family: str, seed: int = 0):
    """A fresh tiny model of ``family`` (cached; deep-copied so tests may not leak changes)."""
    return copy.deepcopy(_model(family, seed))


def q4_1(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` quantized as a Q4_1 GGUF file stores it and dequantized back to fp32: per 32 inputs of a row, an
    fp16 scale and min and 4-bit codes, ``scale * code + min`` in fp32 (how SmolLM2's GGUF weights load)."""
    n, k = weight.shape
    blocks = weight.reshape(n, k // 32, 32)
    lo = blocks.amin(-1, keepdim=True).half().float()
    scale = ((blocks.amax(-1, keepdim=True) - lo) / 15).half().float()
    codes = torch.where(scale > 0, ((blocks - lo) / scale).round(), torch.zeros_like(blocks)).clamp(0, 15)
    return (scale * codes + lo).reshape(n, k)


def with_exact_weights(model, form: str):
    """``model`` with the weight of every ``nn.Linear`` but the LM head made exactly ``form`` ("bf16": rounded to
    bf16, as a bf16 checkpoint loaded in fp32; "q4": :func:`q4_1`), in place; returns ``model``."""
    head = model.get_output_embeddings()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module is not head:
                w = module.weight
                w.copy_(w.bfloat16().float() if form == "bf16" else q4_1(w))
    return model
