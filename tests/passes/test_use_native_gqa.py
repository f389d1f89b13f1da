import functools

from torch.testing import FileCheck

from jetspec_compile import TreeVerifier
from jetspec_compile.backends import lower_eager
from tests.families import VOCAB, make_model
from tests.reference import assert_same_tree_verify


def test_native_gqa_removes_cache_copies_and_keeps_logits():
    model = make_model("qwen3")  # 4 query heads over 2 KV heads
    plain = TreeVerifier(model, max_cache_len=96, budget=12)
    lowered = TreeVerifier(model, max_cache_len=96, budget=12, compile_fn=functools.partial(lower_eager, prepack=False))
    code = lowered.graph.code
    FileCheck().check_not("repeat_interleave").run(code)
    FileCheck().check_count("enable_gqa = True", 3, exactly=True).run(code)
    assert_same_tree_verify(plain, lowered, VOCAB)
