"""The bfloat16 CPU linear kernel against its float32 reference, and its batch invariance."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specdec.kernels import cpu_linear

pytestmark = pytest.mark.skipif(not cpu_linear.available(),
                                reason="no AVX512-BF16 CPU or no C compiler: the kernel is not built here")


def _case(m, n, k, bias, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).bfloat16()
    w = torch.randn(n, k, generator=g).bfloat16()
    b = torch.randn(n, generator=g).bfloat16() if bias else None
    return x, w, b


def _bound(x, w, b):
    """Both sides sum the same exact products (bf16 x bf16 is exact in float32) in float32, in different
    orders: they differ by at most k * 2^-24 * sum|x w| before the final rounding, and that rounding to
    bfloat16 (8 significant bits) can then land one ulp apart: 2^-8 |y| plus the float32 term."""
    magnitude = x.float().abs() @ w.float().abs().t() + (0 if b is None else b.float().abs())
    return x.shape[1] * 2.0**-24 * magnitude + 2.0**-7 * magnitude


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 20), n=st.integers(1, 70), k=st.integers(1, 150), bias=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_matches_float32_reference(m, n, k, bias, seed):
    x, w, b = _case(m, n, k, bias, seed)  # k not a multiple of 32 and n not of 8: the tails are covered
    got = cpu_linear.linear_bf16(x, w, b)
    want = cpu_linear.linear_bf16_reference(x, w, b)
    assert got.shape == want.shape == (m, n) and got.dtype == torch.bfloat16
    assert ((got.float() - want.float()).abs() <= _bound(x, w, b)).all()


def test_most_elements_are_bitwise_equal_to_the_reference():
    # the bound above is loose; in fact only sums landing within a float32 rounding of a bfloat16
    # rounding boundary can differ (measured: ~0.02% of elements at k = 576)
    x, w, b = _case(7, 960, 576, True, 0)
    same = (cpu_linear.linear_bf16(x, w, b) == cpu_linear.linear_bf16_reference(x, w, b)).float().mean()
    assert same > 0.99


@pytest.mark.parametrize("shape", [(960, 576), (576, 1536), (100, 40)])
def test_each_row_is_computed_alike_whatever_the_row_count(shape):
    # a verification pass of k + 1 rows must give each row the bits a 1-row decode step gives it
    n, k = shape
    x, w, b = _case(9, n, k, True, 1)
    full = cpu_linear.linear_bf16(x[None], w, b)[0]  # [9, n] through a [1, 9, k] input
    for row in range(9):
        assert torch.equal(full[row], cpu_linear.linear_bf16(x[row:row + 1], w, b)[0])


def test_bad_input_is_refused():
    x, w, _ = _case(2, 8, 16, False, 2)
    with pytest.raises(ValueError, match="bfloat16"):
        cpu_linear.linear_bf16(x.float(), w)
    with pytest.raises(ValueError, match="does not fit"):
        cpu_linear.linear_bf16(x[:, :8], w)


def test_native_bfloat16_model_uses_it_and_stays_near_float32(monkeypatch):
    from transformers import LlamaConfig

    from specdec.models.llama import LlamaModel

    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = LlamaModel(config).eval()
    ids = torch.randint(0, 64, (1, 3))  # 3 rows: a decode-sized input
    calls = []
    kernel = cpu_linear.linear_bf16
    monkeypatch.setattr(cpu_linear, "linear_bf16", lambda *a: calls.append(1) or kernel(*a))
    with torch.inference_mode():
        want = model(ids, torch.arange(3)[None], model.new_cache(1, 8))
        assert not calls  # float32 keeps torch's path
        model.bfloat16()
        got = model(ids, torch.arange(3)[None], model.new_cache(1, 8))
    assert len(calls) == 2 * 4 + 1  # qkv, o, gate_up, down per layer, and the output layer
    assert got.dtype == torch.float32
    # bfloat16 weights and activations: 8 significant bits through 2 layers
    assert (got - want).abs().max() < 0.05 * want.abs().max()


def test_bias_of_the_wrong_shape_is_refused():
    x, w, _ = _case(2, 8, 16, False, 3)
    with pytest.raises(ValueError, match="bias"):
        cpu_linear.linear_bf16(x, w, torch.zeros(3, dtype=torch.bfloat16))  # would read past its end


def test_a_failed_build_warns_once_and_falls_back(monkeypatch, tmp_path):
    from specdec.models.llama import Linear

    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path))  # an empty cache: the kernel must be built
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    cpu_linear._library.cache_clear()
    try:
        with pytest.warns(UserWarning, match="could not be built"):
            assert not cpu_linear.available()
        layer = Linear(16, 8).to(torch.bfloat16)
        with torch.no_grad():  # bfloat16 inference keeps working, through oneDNN or torch's default path
            out = layer(torch.randn(1, 16, dtype=torch.bfloat16))
        assert out.shape == (1, 8)
    finally:
        cpu_linear._library.cache_clear()  # the next test builds (or finds) the real kernel again
