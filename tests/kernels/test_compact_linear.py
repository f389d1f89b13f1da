"""Compact weight forms: chosen only when they decode to every fp32 weight bit for bit; their kernels compute the
fp32 linear (up to the order of the sum) for any row count, with and without bias, eagerly and compiled."""

import pytest
import torch

from jetspec_compile.kernels import compact_linear
from jetspec_compile.kernels.compact_linear import compact_setting, compact_weight, encode
from tests.families import q4_1

pytestmark = pytest.mark.skipif(not compact_linear.kernels_available(),
                                reason=f"compact-weight kernels did not build here: {compact_linear.build_error()}")


def _weight(out=48, inp=96, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=gen) * 0.1, gen


def _same_bits(a, b):
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


def _exact(form, w):
    return w.bfloat16().float() if form == "bf16" else q4_1(w)


@pytest.mark.parametrize("form", ["bf16", "q4"])
def test_an_exact_weight_gets_its_form_and_decodes_bit_for_bit(form):
    w = _exact(form, _weight()[0])
    found = encode(w)
    assert found is not None and found.form == form
    assert _same_bits(found.decode(), w)
    assert found.nbytes <= w.numel() * 4 * (0.5 if form == "bf16" else 0.1875)


@pytest.mark.parametrize("form", ["bf16", "q4"])
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 17])  # register blocks of 8 rows: full, partial, several
@pytest.mark.parametrize("bias", [False, True])
def test_the_kernel_computes_the_fp32_linear(form, rows, bias):
    w, gen = _weight(out=48)  # 3 tiles of 16 columns: a pair and a single
    w = _exact(form, w)
    b = torch.randn(48, generator=gen) if bias else None
    found = encode(w)
    x = torch.randn(rows, w.shape[1], generator=gen)
    expected = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    got = found.linear(x, b)
    assert got.dtype == torch.float32 and got.shape == (rows, 48)
    fp32_error = (torch.nn.functional.linear(x, w, b).double() - expected).abs().max()
    assert (got.double() - expected).abs().max() <= max(4 * fp32_error, 1e-6)
    x3 = x.reshape(1, rows, -1)  # leading dims are kept
    assert torch.equal(found.linear(x3, b), got.reshape(1, rows, 48))


def test_a_weight_that_is_not_exact_gets_no_form():
    w, _ = _weight()
    assert encode(w) is None  # plain fp32 values
    q = q4_1(w)
    q[5, 7] = torch.nextafter(q[5, 7], torch.tensor(1.0))  # one weight one ulp off its 4-bit grid (and bf16)
    assert encode(q) is None
    late = q4_1(w)
    late[40, 7] = torch.nextafter(late[40, 7], torch.tensor(1.0))  # off the grid beyond the first tile of rows
    assert encode(late) is None
    nan = q4_1(w)
    nan[0, 0] = float("nan")
    assert encode(nan) is None
    assert encode(q4_1(w)[:40]) is None  # 40 rows: not whole tiles of 16
    assert encode(q4_1(w).double()) is None
    assert encode(w.bfloat16().float(), forms=("q4",)) is None  # bf16 values are not on a 4-bit grid
    with pytest.raises(ValueError, match="forms must be among"):
        encode(w, forms=("int8",))


def test_q4_is_preferred_and_bf16_is_the_fallback():
    w, _ = _weight(inp=80)  # 80 inputs: not whole blocks of 32, so no q4 even for 4-bit values
    assert encode(w.bfloat16().float()).form == "bf16"
    assert encode(q4_1(_weight()[0])).form == "q4"


def test_setting():
    w = q4_1(_weight()[0])
    assert compact_weight(w, "off") is None
    assert compact_weight(w, "auto").form == "q4"
    assert compact_weight(w, "auto") is compact_weight(w, "auto")  # encoded once per weight
    with torch.no_grad():
        w.add_(1.0)  # changed in place: encoded again
    assert _same_bits(compact_weight(w, "auto").decode(), w)
    with pytest.raises(ValueError, match="JETSPEC_COMPACT_WEIGHTS"):
        compact_setting("on")


def test_the_op_compiles_with_inductor():
    w, gen = _weight(out=32)
    form = encode(q4_1(w))
    x = torch.randn(4, w.shape[1], generator=gen)

    def f(x):
        return torch.relu(form.linear(x) * 2)

    compiled = torch.compile(f, fullgraph=True)
    assert torch.equal(compiled(x), f(x))


def test_without_a_compiler_the_kernels_are_unavailable_and_weights_stay_fp32(tmp_path):
    """A fresh cache and a compiler that does not exist: no build, a reason, and no compact form (fp32 GEMMs)."""
    import os
    import subprocess
    import sys

    script = ("import torch\n"
              "from jetspec_compile.kernels import compact_linear as c\n"
              "from tests.families import q4_1\n"
              "assert not c.kernels_available()\n"
              "assert c.compact_weight(q4_1(torch.randn(32, 64))) is None\n"
              "print(c.build_error())\n")
    env = {**os.environ, "JETSPEC_CACHE": str(tmp_path), "CXX": str(tmp_path / "no-such-compiler")}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert done.returncode == 0, done.stderr
    assert "no-such-compiler" in done.stdout
    assert not list(tmp_path.glob("kernels/*.so"))  # nothing half-written
