import pytest
import torch

from jetspec_compile.drafter import load_drafter, save_drafter
from tests.drafter.test_model import tiny_drafter
from tests.families import make_model


def test_roundtrip_in_bf16(tmp_path):
    target, drafter = tiny_drafter()
    save_drafter(drafter, tmp_path / "d")
    loaded = load_drafter(tmp_path / "d", target)
    for k, v in drafter.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v.to(torch.bfloat16).float())
    assert not list(tmp_path.glob(".d-*")), "temporary folder left behind"


def test_drafter_for_another_target_is_refused(tmp_path):
    _, drafter = tiny_drafter("llama")
    save_drafter(drafter, tmp_path / "d")
    other = make_model("gpt2")
    other.resize_token_embeddings(120)
    with pytest.raises(ValueError, match="trained for another target.*vocabulary"):
        load_drafter(tmp_path / "d", other)


def test_corrupt_or_truncated_checkpoint_is_refused(tmp_path):
    target, drafter = tiny_drafter()
    path = save_drafter(drafter, tmp_path / "d")
    weights = path / "drafter.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_drafter(path, target)
    (path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid drafter config"):
        load_drafter(path, target)
    with pytest.raises(FileNotFoundError, match="not a drafter checkpoint"):
        load_drafter(tmp_path / "missing", target)
