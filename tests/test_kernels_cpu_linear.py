"""The CPU linear kernel (float32 and bfloat16) against its float64 reference, and its batch invariance."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specdec.kernels import cpu, cpu_linear

pytestmark = pytest.mark.skipif(not cpu_linear.available(),
                                reason="no AVX-512 CPU or no C compiler: the kernel is not built here")
DTYPES = [torch.float32, torch.bfloat16]


def _case(m, n, k, bias, seed, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return x, w, b


def _run(x, w, b=None):
    return cpu_linear.linear(x, cpu_linear.pack(w), b)


def _bound(x, w, b):
    """The kernel sums k exact products (bfloat16 x bfloat16 and, here, float32 x float32 inputs that are
    randn values) in a float32 FMA chain: within k * 2^-24 * sum|x w| of the exact sum (the standard bound
    for recursive summation, unit roundoff 2^-24). Then both sides round to the output dtype, which can land
    one ulp apart: 2^-7 |y| for bfloat16 (8 significant bits), 2^-23 |y| for float32."""
    magnitude = x.double().abs() @ w.double().abs().t() + (0 if b is None else b.double().abs())
    ulp = 2.0**-7 if x.dtype == torch.bfloat16 else 2.0**-23
    return (x.shape[1] + 1) * 2.0**-24 * magnitude + ulp * magnitude


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 30), n=st.integers(1, 70), k=st.integers(1, 150), bias=st.booleans(),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1))
def test_matches_float64_reference(m, n, k, bias, dtype, seed):
    # n not a multiple of 32, k odd, m over one pass of 12 rows: the tails are covered
    x, w, b = _case(m, n, k, bias, seed, dtype)
    got = _run(x, w, b)
    want = cpu_linear.linear_reference(x, w, b)
    assert got.shape == want.shape == (m, n) and got.dtype == dtype
    assert ((got.double() - want.double()).abs() <= _bound(x, w, b)).all()


def test_the_bound_is_tight_enough_to_catch_a_wrong_sum():
    # the companion of the test above: dropping one input feature (a plausible tail bug) breaks the bound
    x, w, b = _case(3, 40, 33, True, 5, torch.float32)
    wrong = cpu_linear.linear_reference(x[:, :-1], w[:, :-1], b)
    assert not ((wrong.double() - cpu_linear.linear_reference(x, w, b).double()).abs() <= _bound(x, w, b)).all()


@settings(max_examples=20, deadline=None)
@given(m=st.integers(1, 14), n=st.integers(1, 40), k=st.integers(1, 70), norm=st.booleans(),
       gated=st.booleans(), residual=st.booleans(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1))
def test_fused_norm_gate_and_residual_match_the_torch_ops(m, n, k, norm, gated, residual, dtype, seed):
    # the prologue (SiLU(gate) * up, RMSNorm) and the residual add against the torch ops they replace: the
    # prologue's own sums and exp differ from torch's in the last float32 bits, which a bfloat16 rounding
    # can carry one bfloat16 ulp (2^-7 relative) before the linear layer; the bound allows for that on
    # every input feature, then the linear layer's own bound, then one more rounding for the residual add
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, 2 * k if gated else k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    norm_w = (1 + torch.rand(k, generator=g)).to(dtype) if norm else None
    res = torch.randn(m, n, generator=g).to(dtype) if residual else None
    got = cpu_linear.linear(x, cpu_linear.pack(w), norm=norm_w, eps=1e-5, gated=gated, residual=res)
    want = cpu_linear.linear_reference(x, w, norm=norm_w, eps=1e-5, gated=gated, residual=res)
    inputs = cpu_linear.fused_input(x, norm_w, 1e-5, gated)
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-22
    bound = _bound(inputs, w, None) + ulp * (inputs.double().abs() @ w.double().abs().t())
    if res is not None:
        bound = bound + ulp * (res.double().abs() + want.double().abs())
    assert ((got.double() - want.double()).abs() <= bound).all()


def test_the_fused_bound_catches_a_missing_step():
    # the companion of the test above: its bound is loose enough for rounding, not for a step left out
    g = torch.Generator().manual_seed(7)
    x, w = torch.randn(4, 2 * 24, generator=g), torch.randn(10, 24, generator=g)
    norm = (1 + torch.rand(24, generator=g))
    want = cpu_linear.linear_reference(x, w, norm=norm, eps=1e-5, gated=True)
    inputs = cpu_linear.fused_input(x, norm, 1e-5, True)
    bound = _bound(inputs, w, None) + 2.0**-22 * (inputs.double().abs() @ w.double().abs().t())
    for wrong in (cpu_linear.linear_reference(x, w, eps=1e-5, gated=True),  # no norm
                  cpu_linear.linear_reference(x[:, :24] * x[:, 24:], w, norm=norm, eps=1e-5)):  # no SiLU
        assert not ((wrong.double() - want.double()).abs() <= bound).all()
    res = torch.randn(4, 10, generator=g)
    got = cpu_linear.linear(x, cpu_linear.pack(w), norm=norm, eps=1e-5, gated=True, residual=res)
    assert not ((got.double() - want.double()).abs() <= bound).all()  # a residual left out is caught too


@settings(max_examples=15, deadline=None)
@given(m=st.integers(1, 14), n=st.integers(1, 40), half=st.integers(1, 40), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**31 - 1))
def test_a_norm_over_two_halves_matches_the_torch_ops(m, n, half, dtype, seed):
    # a draft head's fc input: its token half and feature half, each under its own RMSNorm (norm_parts=2);
    # the bound of the fused-norm test above
    g = torch.Generator().manual_seed(seed)
    k = 4 * half  # slices of an even number of features
    x = (torch.randn(m, k, generator=g) * torch.tensor([1.0, 30.0]).repeat_interleave(k // 2)).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    norm = (1 + torch.rand(k, generator=g)).to(dtype)
    got = cpu_linear.linear(x, cpu_linear.pack(w), norm=norm, eps=1e-5, norm_parts=2)
    want = cpu_linear.linear_reference(x, w, norm=norm, eps=1e-5, norm_parts=2)
    inputs = cpu_linear.fused_input(x, norm, 1e-5, norm_parts=2)
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-22
    bound = _bound(inputs, w, None) + ulp * (inputs.double().abs() @ w.double().abs().t())
    assert ((got.double() - want.double()).abs() <= bound).all()
    # its companion: one norm over the whole row (the halves' scales differ 30-fold) is caught by that bound
    whole = cpu_linear.linear_reference(x, w, norm=norm, eps=1e-5)
    assert not ((whole.double() - want.double()).abs() <= bound).all()


def test_a_norm_over_slices_refuses_what_c_cannot_split():
    w = cpu_linear.pack(torch.randn(8, 6))
    for parts, gated in ((2, False), (0, False), (3, True)):  # slices of 3 features; no parts; with a gate
        x = torch.randn(2, 12 if gated else 6)
        with pytest.raises(ValueError, match="norm_parts"):
            cpu_linear.linear(x, w, norm=torch.ones(6), eps=1e-5, gated=gated, norm_parts=parts)


def test_fused_residual_is_added_after_the_layer_rounds():
    # bfloat16: y = round(round(x @ w) + r), as the two torch ops; a single rounding of the exact sum differs
    x = torch.tensor([[1.0]], dtype=torch.bfloat16)
    w = torch.tensor([[1.0 + 2.0**-7]], dtype=torch.bfloat16)  # x @ w = 1 + 2^-7, a bfloat16
    r = torch.tensor([[2.0**-8 + 2.0**-9]], dtype=torch.bfloat16)
    got = cpu_linear.linear(x, cpu_linear.pack(w), residual=r)
    assert torch.equal(got, r + (x.float() @ w.float().t()).to(torch.bfloat16))


def test_most_bfloat16_elements_are_bitwise_equal_to_the_reference():
    # the bound above is loose; in fact only sums landing within a float32 rounding of a bfloat16
    # rounding boundary can differ (measured: ~0.02% of elements at k = 576)
    x, w, b = _case(7, 960, 576, True, 0)
    same = (_run(x, w, b) == cpu_linear.linear_reference(x, w, b)).float().mean()
    assert same > 0.99


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(960, 576), (576, 1536), (100, 41)])
def test_each_row_is_computed_alike_whatever_the_row_count(shape, dtype):
    # a verification pass of k + 1 rows (or a batch of requests, or 30 rows in 3 passes of 10) must give
    # each row the bits a 1-row decode step gives it
    n, k = shape
    x, w, b = _case(30, n, k, True, 1, dtype)
    packed = cpu_linear.pack(w)
    full = cpu_linear.linear(x[None], packed, b)[0]  # [30, n] through a [1, 30, k] input
    for rows in (1, 5, 13):
        for start in range(0, 30, rows):
            part = cpu_linear.linear(x[start:start + rows], packed, b)
            assert torch.equal(full[start:start + rows], part)


def test_bfloat16_rounding_and_specials_match_torchs_cast():
    # one input feature, weight 1: y = x + bias exactly in float32, then the kernel's own rounding to bfloat16
    # meets torch's cast, ties to even included; inf and nan pass through
    x = torch.tensor([[1.0], [-2.5], [float("inf")], [float("nan")], [3.0e38]], dtype=torch.bfloat16)
    w = torch.ones(1, 1, dtype=torch.bfloat16)
    bias = torch.tensor([2.0**-8], dtype=torch.bfloat16)  # 1 + 2^-8: a tie between 1 and 1 + 2^-7
    got = _run(x, w, bias)
    want = (x.float() + bias.float()).to(torch.bfloat16)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got[~got.isnan()], want[~want.isnan()])


def test_bad_input_is_refused():
    x, w, _ = _case(2, 8, 16, False, 2)
    with pytest.raises(ValueError, match="dtype"):
        _run(x.float(), w)
    with pytest.raises(ValueError, match="does not fit"):
        _run(x[:, :8], w)
    with pytest.raises(ValueError, match="2-d float32 or bfloat16"):
        cpu_linear.pack(w.double())
    with pytest.raises(ValueError, match="gated"):
        cpu_linear.linear(x, cpu_linear.pack(w), gated=True)  # x holds 16 features, not 2 x 16
    with pytest.raises(ValueError, match="norm of shape"):
        cpu_linear.linear(x, cpu_linear.pack(w), norm=torch.ones(15, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="residual"):
        cpu_linear.linear(x, cpu_linear.pack(w), residual=torch.ones(2, 8))  # float32 against bfloat16


def test_bias_of_the_wrong_shape_is_refused():
    x, w, _ = _case(2, 8, 16, False, 3)
    with pytest.raises(ValueError, match="bias"):
        _run(x, w, torch.zeros(3, dtype=torch.bfloat16))  # would read past its end


@pytest.mark.parametrize("dtype", DTYPES)
def test_native_model_uses_it_and_matches_float64(monkeypatch, dtype):
    from transformers import LlamaConfig

    from specdec.models.llama import LlamaModel

    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = LlamaModel(config).eval()
    ids = torch.randint(0, 64, (1, 3))
    calls = []
    kernel = cpu_linear.linear
    monkeypatch.setattr(cpu_linear, "linear", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    with torch.inference_mode():
        want = model.double()(ids, torch.arange(3)[None], model.new_cache(1, 8))
        assert not calls  # float64 keeps torch's path
        got = model.to(dtype)(ids, torch.arange(3)[None], model.new_cache(1, 8))
        assert len(calls) == 1  # the output layer; the decoder layers' kernels ran in one C call (cpu_layers.c)
        model.runner.one_call = False
        looped = model(ids, torch.arange(3)[None], model.new_cache(1, 8))
    assert len(calls) == 1 + 2 * 4 + 1  # then qkv, o, gate_up, down per layer from Python, and the output layer
    assert torch.equal(got, looped)
    assert got.dtype == torch.float32
    # bfloat16 weights and activations: 8 significant bits through 2 layers; float32: 24 bits
    tolerance = 0.05 if dtype == torch.bfloat16 else 1e-5
    assert (got.double() - want).abs().max() < tolerance * want.abs().max()


def test_a_failed_build_warns_once_and_falls_back(monkeypatch, tmp_path):
    from specdec.kernels.cpu_runner import CpuRunner

    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path))  # an empty cache: the kernel must be built
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    cpu.library.cache_clear()
    try:
        with pytest.warns(UserWarning, match="could not be built"):
            assert not cpu_linear.available()
        for dtype in DTYPES:
            layer = torch.nn.Linear(16, 8).to(dtype)
            with torch.no_grad():  # inference keeps working, through oneDNN or torch's default path
                out = CpuRunner().linear(layer, torch.randn(1, 16, dtype=dtype))
            assert out.shape == (1, 8)
    finally:
        cpu.library.cache_clear()  # the next test builds (or finds) the real kernel again
