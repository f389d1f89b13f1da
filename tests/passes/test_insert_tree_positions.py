import torch

from jetspec_compile import capture_step
from jetspec_compile.passes import insert_tree_positions
from tests.families import VOCAB, make_model


def test_positions_become_base_plus_depth():
    model = make_model("gpt2")  # learned absolute positions: wrong positions change logits a lot
    step = capture_step(model, batch_size=2, budget=5)
    result = insert_tree_positions(step)
    step.graph_module.recompile()
    names = [n.name for n in step.graph_module.graph.nodes if n.op == "placeholder"]
    assert "position_ids" not in names and {"base_position", "depth"} <= set(names)
    assert result.stats["position_uses_rewritten"] >= 1
    ids = torch.randint(0, VOCAB, (2, 5))
    base = torch.tensor([3, 7])
    depth = torch.arange(5).expand(2, 5)  # a chain: the model keeps its causal mask before insert_tree_mask
    (logits,) = step.graph_module(input_ids=ids, base_position=base, depth=depth)
    expected = model(input_ids=ids, position_ids=base[:, None] + depth).logits
    torch.testing.assert_close(logits, expected)
