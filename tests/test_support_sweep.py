"""The support sweep (benchmarks/support_sweep.py): tiny configs, and a small run end to end (slow)."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _sweep():
    spec = importlib.util.spec_from_file_location("support_sweep", ROOT / "benchmarks" / "support_sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_config_shrinks_what_the_config_has_and_keeps_every_layer_kind():
    sweep = _sweep()
    cfg = sweep.tiny_config("gemma2")
    assert (cfg.hidden_size, cfg.vocab_size, cfg.num_attention_heads) == (64, sweep.VOCAB, 4)
    assert cfg.sliding_window == 8
    assert set(cfg.layer_types) == {"sliding_attention", "full_attention"}
    assert len(cfg.layer_types) == cfg.num_hidden_layers
    assert "gemma2" in sweep.registry() and "bloom" in sweep.registry()


@pytest.mark.slow
def test_sweep_classifies_architectures_and_writes_the_table(tmp_path):
    sweep = _sweep()
    out, results = tmp_path / "support.md", tmp_path / "results.jsonl"
    code = sweep.main(["--only", "llama,bloom,gemma2,bert", "--results", str(results), "--out", str(out)])
    assert code == 0
    text = out.read_text()
    for arch, status in [("llama", "lossless"), ("bloom", "lossless"), ("gemma2", "lossless"), ("bert", "refused")]:
        assert f"| `{arch}` |" in text and any(line.startswith(f"| `{arch}` |") and f"| {status} |" in line
                                                for line in text.splitlines())
    assert "3 of" in text and "verified lossless" in text
