import torch
from torch.testing import FileCheck

from jetspec_compile import capture_step
from jetspec_compile.passes import insert_kv_cache, insert_tree_positions
from tests.families import VOCAB, make_model


def test_cache_written_per_layer_with_kv_heads():
    model = make_model("llama")  # 4 query heads, 2 KV heads
    step = capture_step(model, batch_size=1, budget=6)
    insert_tree_positions(step)
    result = insert_kv_cache(step)
    gm = step.graph_module
    gm.graph.eliminate_dead_code()
    gm.recompile()
    assert result.stats["kv_caches_inserted"] == 3
    FileCheck().check_count("aten.index_copy_", 6, exactly=True).run(gm.code)
    assert step.kv.heads == 2 and step.kv.head_dim == 16
    # With L == N and an empty cache the model's own causal mask still applies: logits are unchanged.
    caches = {f"{kv}_cache_{i}": torch.zeros(1, 2, 6, 16) for i in range(3) for kv in "kv"}
    ids = torch.randint(0, VOCAB, (1, 6))
    (logits,) = gm(input_ids=ids, base_position=torch.tensor([0]), depth=torch.arange(6)[None],
                   write_slots=torch.arange(6), **caches)
    torch.testing.assert_close(logits, model(input_ids=ids).logits)
    assert caches["k_cache_0"].abs().sum() > 0  # written in place
