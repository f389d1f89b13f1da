import pytest
import torch

from jetspec_compile import UnsupportedModelError, capture_step
from jetspec_compile.capture import find_decoder_layers
from tests.families import VOCAB, make_model


def test_captured_graph_equals_eager_forward():
    model = make_model("qwen3")
    step = capture_step(model, batch_size=2, budget=8)
    ids = torch.randint(0, VOCAB, (2, 8))
    pos = torch.arange(8).expand(2, 8)
    (logits,) = step.graph_module(input_ids=ids, position_ids=pos)
    torch.testing.assert_close(logits, model(input_ids=ids, position_ids=pos).logits)
    assert step.layers_path == "model.model.layers" and step.num_layers == 3
    # the graph shares the model's weights rather than copying them
    assert any(p.data_ptr() == model.lm_head.weight.data_ptr() for p in step.graph_module.parameters())


def test_find_decoder_layers_uses_config_layer_count():
    name, layers = find_decoder_layers(make_model("gpt2"))
    assert name == "transformer.h" and len(layers) == 3


def test_encoder_decoder_is_refused():
    from transformers import T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(T5Config(vocab_size=40, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8))
    with pytest.raises(UnsupportedModelError, match="encoder-decoder"):
        capture_step(t5)


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match=">= 1"):
        capture_step(make_model("llama"), budget=0)
