import random

import torch
from torch.testing import FileCheck

from jetspec_compile import TreeVerifier
from jetspec_compile.backends import lower_eager
from tests.families import VOCAB, make_model
from tests.reference import random_tree


def test_native_gqa_removes_cache_copies_and_keeps_logits():
    model = make_model("qwen3")  # 4 query heads over 2 KV heads
    plain = TreeVerifier(model, max_cache_len=96, num_nodes=12)
    lowered = TreeVerifier(model, max_cache_len=96, num_nodes=12, compile_fn=lower_eager)
    code = lowered.graph.code
    FileCheck().check_not("repeat_interleave").run(code)
    FileCheck().check_count("enable_gqa = True", 3, exactly=True).run(code)
    rng = random.Random(0)
    prompt = torch.tensor([[rng.randrange(3, VOCAB) for _ in range(30)]])
    for v in (plain, lowered):
        v.prefill(prompt)
    tree = random_tree("deep", 12, rng)
    tokens = torch.tensor([[rng.randrange(3, VOCAB) for _ in range(12)]])
    (la, ha), (lb, hb) = plain.verify(tokens, tree), lowered.verify(tokens, tree)
    torch.testing.assert_close(lb, la, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hb, ha, atol=1e-5, rtol=1e-5)
