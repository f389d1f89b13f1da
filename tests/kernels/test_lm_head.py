"""The certified LM head: its argmax is the fp32 argmax, near ties and all; its logits are the fp32 logits."""

import pytest
import torch

from jetspec_compile.kernels import cpu_linear, lm_head
from jetspec_compile.kernels.lm_head import LMHead, lm_head_setting, use_certified_head

pytestmark = pytest.mark.skipif(not cpu_linear.bf16_supported(),
                                reason="this PyTorch build has no oneDNN bf16 GEMM")


def _weights(vocab=3000, width=96, bias=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(vocab, width, generator=gen) * 0.1
    return w, (torch.randn(vocab, generator=gen) if bias else None), gen


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 8, 40])  # 40: more rows than any packed copy is made for
def test_argmax_equals_the_fp32_argmax(bias, rows):
    w, b, gen = _weights(bias=bias)
    head = LMHead(w, b)
    for scale in (0.3, 3.0, 30.0):  # flat to peaked logits
        h = torch.randn(rows, w.shape[1], generator=gen) * scale
        expected = torch.nn.functional.linear(h, w, b).argmax(-1)
        assert torch.equal(head.argmax(h), expected)
        torch.testing.assert_close(head.logits(h), torch.nn.functional.linear(h, w, b), atol=1e-5, rtol=1e-5)
    assert head.fallbacks == 0
    h = torch.randn(2, 3, w.shape[1], generator=gen)  # leading dims are kept
    assert torch.equal(head.argmax(h), torch.nn.functional.linear(h, w, b).argmax(-1))


def test_near_ties_below_bf16_resolution_are_decided_in_fp32():
    """Rows that round to the same bf16 row but differ in fp32: a plain bf16 argmax cannot tell them apart (and
    this test checks that it indeed fails here), the certified one must."""
    w, _, gen = _weights(vocab=2000)
    h = torch.randn(6, w.shape[1], generator=gen) * 5
    top = torch.nn.functional.linear(h, w).argmax(-1)
    for r in range(h.shape[0]):  # a twin of each row's winner at a higher token id, a hair larger in fp32
        twin = 1000 + r
        w[twin] = w[top[r]] + 1e-5 * h[r] / h[r].norm()
    expected = torch.nn.functional.linear(h, w).argmax(-1)
    assert torch.equal(expected, torch.arange(1000, 1006))  # every twin wins in fp32
    naive = torch.nn.functional.linear(h.bfloat16(), w.bfloat16()).float().argmax(-1)
    assert not torch.equal(naive, expected)  # bf16 alone gets these wrong
    assert torch.equal(LMHead(w).argmax(h), expected)


def test_exact_ties_go_to_the_lowest_token_id_as_argmax_does():
    w, _, gen = _weights(vocab=500)
    h = torch.randn(4, w.shape[1], generator=gen) * 5
    top = torch.nn.functional.linear(h, w).argmax(-1)
    for r in range(4):
        w[r] = w[top[r]]  # an identical row at a lower id: the tie goes to it
    w2 = w.clone()
    assert torch.equal(LMHead(w2).argmax(h), torch.nn.functional.linear(h, w2).argmax(-1))


def test_rows_it_cannot_certify_fall_back_to_the_full_logits():
    w, _, gen = _weights(vocab=3000)
    head = LMHead(w)
    h = torch.randn(3, w.shape[1], generator=gen)
    h[1, 0] = float("inf")
    assert torch.equal(head.argmax(h), head.logits(h).argmax(-1)) and head.fallbacks == 3
    same = w[:1].repeat(lm_head.MAX_CANDIDATES + 10, 1)  # more equal winners than it recomputes one by one
    head = LMHead(torch.cat([w[1:2], same, w]))
    assert int(head.argmax(w[:1] * 50)) == 1 and head.fallbacks == 1


def test_a_weight_changed_in_place_gets_a_new_bf16_copy():
    w, _, gen = _weights(vocab=800)
    head = LMHead(w)
    h = torch.randn(2, w.shape[1], generator=gen) * 5
    head.argmax(h)
    with torch.no_grad():
        w.mul_(-1)
    assert torch.equal(head.argmax(h), torch.nn.functional.linear(h, w).argmax(-1))


def test_settings_and_what_is_refused(monkeypatch):
    w, _, _ = _weights(vocab=100)
    assert not use_certified_head(w, 8, "exact")
    assert use_certified_head(w, 8, "certified")
    assert not use_certified_head(w, 8, "auto")  # far below AUTO_MIN_BYTES: left in the graph
    assert not use_certified_head(w.bfloat16(), 8, "certified")  # fp32 heads only
    monkeypatch.setenv("JETSPEC_LM_HEAD", "exact")
    assert lm_head_setting(None) == "exact" and not use_certified_head(w, 8)
    with pytest.raises(ValueError, match="must be one of"):
        lm_head_setting("bf16")
    with pytest.raises(ValueError, match="2-D fp32 CPU weight"):
        LMHead(w.double())


def test_auto_follows_the_timing_for_large_heads_only(monkeypatch):
    big = torch.zeros(lm_head.AUTO_MIN_BYTES // (4 * 64), 64)  # exactly AUTO_MIN_BYTES of fp32
    small = torch.zeros(100, 64)
    calls = []
    for verdict in (True, False):
        monkeypatch.setattr(lm_head, "_certified_pays", lambda w, rows, v=verdict: calls.append(rows) or v)
        assert use_certified_head(big, 8, "auto") is verdict
        assert not use_certified_head(small, 8, "auto")
    assert calls == [8, 8]  # timed for the large head only


def test_the_timing_runs_once_per_head_shape_and_row_count():
    w, _, _ = _weights(vocab=4000)
    lm_head._PAYS.clear()
    first = lm_head._certified_pays(w, 4, reps=2)
    assert isinstance(first, bool) and lm_head._PAYS == {(tuple(w.shape), 4): first}
    lm_head._PAYS[(tuple(w.shape), 4)] = not first  # a cached verdict is not timed again
    assert lm_head._certified_pays(w, 4) is (not first)
    lm_head._PAYS.clear()
