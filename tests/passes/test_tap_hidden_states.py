import pytest
import torch

from jetspec_compile import capture_step
from jetspec_compile.passes import default_tap_layers, tap_hidden_states
from tests.families import VOCAB, make_model


def test_default_layers_follow_jetspec():
    assert default_tap_layers(36) == (1, 9, 17, 25, 33)  # Qwen3-8B in the paper
    assert default_tap_layers(30) == (1, 8, 14, 20, 27)  # SmolLM2-135M
    assert default_tap_layers(3) == (0, 1, 2)


@pytest.mark.parametrize("family", ["gpt_neox", "opt", "phi3"])
def test_taps_equal_hf_hidden_states(family):
    model = make_model(family)
    step = capture_step(model, budget=5)
    step.tap_layers = (0, 1)
    tap_hidden_states(step)
    step.graph_module.recompile()
    ids = torch.randint(0, VOCAB, (1, 5))
    logits, hidden = step.graph_module(input_ids=ids, position_ids=torch.arange(5)[None])
    out = model(input_ids=ids, output_hidden_states=True)
    torch.testing.assert_close(hidden, torch.cat(out.hidden_states[1:3], dim=-1))
    torch.testing.assert_close(logits, out.logits)


def test_out_of_range_layer_is_refused():
    step = capture_step(make_model("llama"), budget=2)
    step.tap_layers = (5,)
    with pytest.raises(ValueError, match="out of range"):
        tap_hidden_states(step)
