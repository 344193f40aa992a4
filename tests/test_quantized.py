"""Quantized weights: the C kernel against its references (int8 activations: the integer definition, bit for
bit; float activations: dequantize, then the float kernel, bit for bit in float32), quantization's own bounds, quantized models as targets and drafts (speculation equals
their own plain decoding; the sampled distribution is theirs), clear errors, and GGUF blocks read exactly."""

import copy

import pytest
import torch
from conftest import tiny_head, tiny_model
from distribution import check, reference_joint
from test_sampling import ALL, PROMPT, _sampled, _toy

import specdec
from specdec.kernels import cpu_linear
from specdec.kernels import quantized as Q
from specdec.kernels.runner import TorchRunner
from specdec.models.loading import as_native
from specdec.models.quantized import QuantizedLinear

needs_kernels = pytest.mark.skipif(not cpu_linear.available(), reason="the CPU kernels cannot be built here")

# (out, in, bits, group_size, zero_point): odd widths, a partial tile of 32 columns, per-channel and grouped
SHAPES = [(33, 64, 4, 32, False), (70, 96, 8, None, False), (64, 66, 4, None, True), (40, 128, 8, 32, True),
          (31, 17, 8, None, False), (97, 48, 4, 16, True)]


def _layer(out, n, bits, group, zero_point, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n, generator=g)
    return w, Q.quantize(w, bits, group, zero_point)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_quantization_stays_within_half_a_step(shape):
    out, n, bits, group, zero_point = shape
    w, quantized = _layer(*shape)
    deq = Q.dequantize(quantized, n)
    step = quantized.scale.float().repeat_interleave(quantized.group_size, 1)[:, :n]  # [out, in]
    assert deq.shape == w.shape and quantized.q.dtype == torch.uint8
    assert int(quantized.q.max()) <= 2**bits - 1
    assert ((deq - w).abs() <= step * 0.5 + 1e-3 * w.abs().amax()).all()  # + float16 rounding of scale and zero
    if not zero_point:  # symmetric: zero = -2^(bits-1) scales, exactly
        assert torch.equal(quantized.zero.float(), -(2 ** (bits - 1)) * quantized.scale.float())


@needs_kernels
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("rows", [1, 5, 13])  # 13: two passes of the 12-row kernel
@pytest.mark.parametrize("fused", ["plain", "bias+norm+residual", "gated"])
def test_the_kernel_is_dequantize_then_the_float_kernel_bit_for_bit(shape, rows, fused):
    """float32 activations: the quantized kernel dequantizes exactly (q scale is exact, one rounding in the sum)
    and runs the float kernel's FMA chain, so its output is the float kernel's on the dequantized weight, bit
    for bit. bfloat16 activations: within one bfloat16 rounding of the float64 reference."""
    out, n, bits, group, zero_point = shape
    _, quantized = _layer(*shape)
    packed, deq = Q.pack(quantized, n, group is None), Q.dequantize(quantized, n)
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 2 * n if fused == "gated" else n, generator=g)
    extra = {}
    if fused == "bias+norm+residual":
        extra = dict(bias=torch.randn(out, generator=g), norm=torch.rand(n, generator=g) + 0.5, eps=1e-5,
                     residual=torch.randn(rows, out, generator=g))
    elif fused == "gated":
        extra = dict(gated=True)
    got = cpu_linear.linear(x, packed, **extra)
    assert torch.equal(got, cpu_linear.linear(x, cpu_linear.pack(deq), **extra))
    bf16 = {k: v.bfloat16() if isinstance(v, torch.Tensor) else v for k, v in extra.items()}
    got16 = cpu_linear.linear(x.bfloat16(), packed, **bf16)
    want = cpu_linear.linear_reference(x.bfloat16(), deq, **bf16)  # float64 sums, rounded once
    assert (got16.float() - want.float()).abs().max() <= 2**-7 * want.float().abs().max()


INT8_SHAPES = [s for s in SHAPES if s[3] is None or s[3] % Q.BLOCK == 0] + [(50, 192, 4, 64, True),
                                                                            (48, 256, 8, 128, False)]


def _int8_reference(x, quantized, n, bias=None, residual=None):
    """kernels/quantized.py's definition, then the kernel's epilogue: bias in float32, one rounding to x's dtype,
    the residual added in x's dtype."""
    y = Q.linear_int8_activations(x.float(), quantized, n)
    y = (y if bias is None else y + bias.float()).to(x.dtype)
    return y if residual is None else residual + y


@needs_kernels
@pytest.mark.parametrize("shape", INT8_SHAPES, ids=str)
@pytest.mark.parametrize("rows", [1, 3, 6, 9])  # 6, 9: two and three passes of the 4-row kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_int8_activation_kernel_is_its_integer_definition_bit_for_bit(shape, rows, dtype):
    """Activations quantized per block of 32 features, integer dot products (VNNI), then float32 sums in a
    fixed order: the kernel equals ``linear_int8_activations`` exactly, in both activation dtypes, and each row
    alone equals the row in any batch (a verification pass reproduces plain steps)."""
    out, n, bits, group, zero_point = shape
    _, quantized = _layer(*shape)
    packed = Q.pack_int8_activations(quantized, n)
    g = torch.Generator().manual_seed(rows)
    x = (torch.randn(rows, n, generator=g) * torch.rand(rows, 1, generator=g) * 4).to(dtype)
    x[0, : min(n, 40)] = 0  # a block of zeros: dx = 0
    bias, residual = torch.randn(out, generator=g).to(dtype), torch.randn(rows, out, generator=g).to(dtype)
    assert torch.equal(cpu_linear.linear(x, packed), _int8_reference(x, quantized, n))
    got = cpu_linear.linear(x, packed, bias, residual=residual)
    assert torch.equal(got, _int8_reference(x, quantized, n, bias, residual))
    assert torch.equal(got[-1:], cpu_linear.linear(x[-1:], packed, bias, residual=residual[-1:]))
    want = x.double() @ Q.dequantize(quantized, n).double().t() + bias.double() + residual.double()
    assert (got.double() - want).abs().max() <= 0.05 * want.abs().max()  # int8 blocks: ~1% of the scale


def test_the_int8_activation_reference_runs_where_its_inputs_are():
    """The torch runner's path on another device (here "meta", which checks devices as CUDA would)."""
    _, quantized = _layer(32, 64, 4, 32, False)
    on_meta = Q.Quantized(*(t.to("meta") for t in (quantized.q, quantized.scale, quantized.zero)), quantized.bits)
    y = Q.linear_int8_activations(torch.randn(3, 64, device="meta"), on_meta, 64)
    assert y.device.type == "meta" and y.shape == (3, 32)


@needs_kernels
def test_the_int8_activation_reference_catches_a_wrong_rounding():
    """The companion: with activations rounded half away from zero instead of to even, the exact comparison
    above fails (on inputs that hit .5 exactly)."""
    _, quantized = _layer(32, 64, 4, 32, False)
    packed = Q.pack_int8_activations(quantized, 64)
    x = torch.zeros(1, 64)
    x[0, 0], x[0, 1:8] = 127.0, torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 3.5, 4.5])  # dx = 1: ties
    got = cpu_linear.linear(x, packed)
    assert torch.equal(got, _int8_reference(x, quantized, 64))
    away = x.sign() * (x.abs() + 0.5).floor()  # half away from zero, then exact in the reference's rounding
    assert not torch.equal(got, _int8_reference(away, quantized, 64))


@needs_kernels
def test_the_kernel_refuses_what_it_cannot_take():
    _, quantized = _layer(32, 64, 4, 32, False)
    packed = Q.pack(quantized, 64, False)
    with pytest.raises(ValueError, match="x \\[..., 60\\]"):
        cpu_linear.linear(torch.randn(1, 60), packed)
    with pytest.raises(ValueError, match="does not fit"):
        cpu_linear.linear(torch.randn(1, 64, dtype=torch.float64), packed)
    bad = Q.QuantizedWeight(packed.data, 32, 64, 4, 48)  # 48 does not divide 64
    with pytest.raises(ValueError, match="group_size 48"):
        cpu_linear.linear(torch.randn(1, 64), bad)
    _, quantized = _layer(32, 64, 4, 16, False)
    with pytest.raises(ValueError, match="multiple of 32 .* for int8 activations, got 16"):
        Q.pack_int8_activations(quantized, 64)


def _quantized(arch, dtype, scheme="int4", group_size=None, zero_point=False, activations="int8"):
    native = copy.deepcopy(as_native(tiny_model(arch, dtype)))
    return specdec.quantize(native, scheme, group_size=group_size, zero_point=zero_point, activations=activations)


@pytest.mark.parametrize("scheme, group_size, zero_point, activations", [
    ("int8", ..., False, "int8"), ("int4", None, True, "int8"), ("int4", 16, False, "float"),
    ("int8", ..., False, "float")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_quantized_model_runs_its_layers_in_one_call_as_in_the_loop_and_tracks_the_reference(
        scheme, group_size, zero_point, activations, dtype):
    model = _quantized("qwen2", dtype, scheme, group_size, zero_point, activations)
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == 2 * 4 + 1  # the output layer too
    ids = torch.randint(3, 90, (2, 9), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(9).expand(2, -1)
    reference = copy.deepcopy(model)
    reference.runner = TorchRunner("cpu")  # each layer's reference (QuantizedLinear.forward), then torch's ops
    with torch.no_grad():
        one_call = model(ids, positions, model.new_cache(2, 9))
        if cpu_linear.available():
            assert model.runner.layer_addresses(model) is not None  # the quantized layers took the one call
        model.runner.one_call = False
        looped = model(ids, positions, model.new_cache(2, 9))
        want = reference(ids, positions, reference.new_cache(2, 9))
    assert torch.equal(one_call, looped)
    tolerance = 0.02 if dtype == torch.bfloat16 else 1e-5
    assert (one_call - want).abs().max() <= tolerance * want.abs().max()


@pytest.mark.parametrize("arch", ["llama", "smollm2", "qwen2"])
@pytest.mark.parametrize("draft", ["model", "head", "ngram", "quantized copy", "self", "self-int8"])
@pytest.mark.parametrize("activations", ["int8", "float"])
def test_speculation_over_a_quantized_target_equals_its_plain_decoding(arch, draft, activations):
    """Greedy, float32 (the C kernels' path), a ragged batch: a quantized target is a target in its own right."""
    target = _quantized(arch, torch.float32, group_size=None if activations == "int8" else 16,
                        activations=activations)
    drafts = {"model": lambda: _quantized("llama", torch.float32, "int8"),
              "head": lambda: specdec.quantize(tiny_head(tiny_model(arch, torch.float32), None, seed=1).float(),
                                               "int8"),
              "ngram": lambda: "ngram", "self": lambda: "self", "self-int8": lambda: "self-int8",
              "quantized copy": lambda: _quantized(arch, torch.float32, "int8")}
    ids = torch.tensor([[0, 0, 5, 6, 7, 5, 6], [3, 4, 5, 6, 7, 8, 9]])
    mask = (ids != 0).long()
    plain = specdec.generate(target, ids, attention_mask=mask, max_new_tokens=16, eos_token_id=[])
    for k in (1, 3):
        spec = specdec.generate(target, ids, attention_mask=mask, max_new_tokens=16, eos_token_id=[],
                                draft_model=drafts[draft](), num_draft_tokens=k)
        assert torch.equal(spec, plain)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_self_speculation_drafts_from_the_targets_own_layers_quantized(dtype):
    """draft_model="self": greedy output equals plain decoding of a float target; the draft shares the target's
    embedding and norms, is made once per target and remade when a target weight changes."""
    from specdec.models.quantized import self_draft

    target = copy.deepcopy(as_native(tiny_model("llama", dtype)))
    ids = torch.tensor([[3, 4, 5, 6, 7, 8, 9]])
    plain = specdec.generate(target, ids, max_new_tokens=20, eos_token_id=[])
    out = specdec.generate(target, ids, max_new_tokens=20, eos_token_id=[], draft_model="self", num_draft_tokens=3,
                           return_dict_in_generate=True)
    assert torch.equal(out.sequences, plain) and out.stats.accepted > 0
    draft = self_draft(target)
    assert draft.model.embed_tokens is target.model.embed_tokens and draft.model.norm is target.model.norm
    assert {m.bits for m in draft.modules() if isinstance(m, QuantizedLinear)} == {4}
    assert self_draft(target) is draft
    with torch.no_grad():
        target.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    assert self_draft(target) is not draft
    with pytest.raises(ValueError, match="'self', 'self-int8'"):
        specdec.generate(target, ids, max_new_tokens=2, draft_model="selfie")


def test_sampling_with_a_self_draft_is_the_targets_distribution():
    """The chi-square and 6-sigma tests of tests/distribution.py (false alarm 1e-5; power: test_sampling): the
    int4 draft's distribution differs from the target's, acceptance corrects it exactly."""
    target = _toy(0)
    (counts,) = _sampled(target, "self", 2, ALL, 3)
    check(counts, reference_joint(target, PROMPT, 3, ALL))


def test_sampling_from_a_quantized_target_is_its_distribution():
    """The chi-square and 6-sigma tests of tests/distribution.py (false alarm 1e-5; power: test_sampling) with
    the reference computed by transformers from the dequantized weights (float64: the torch runner's path)."""
    hf = copy.deepcopy(_toy(0))
    target = specdec.quantize(copy.deepcopy(as_native(hf)), "int4", group_size=8, activations="float")
    with torch.no_grad():  # the transformers twin gets the weights the quantized target computes with
        for name, module in target.named_modules():
            if isinstance(module, QuantizedLinear):
                _set_fused(hf, name, module.weight)
    (counts,) = _sampled(target, _toy(1), 2, ALL, 3)
    check(counts, reference_joint(hf, PROMPT, 3, ALL))


def _set_fused(hf, name, weight):
    """Copy a native layer's weight onto the transformers modules it was fused from."""
    from specdec.models.llama import FUSED

    prefix, _, leaf = name.rpartition(".")
    parent = prefix.rpartition(".")[0]
    full = f"{prefix.rpartition('.')[2]}.{leaf}"
    parts = FUSED.get(full)
    if parts is None:
        hf.get_submodule(name).weight.copy_(weight)
        return
    offset = 0
    for part in parts:
        linear = hf.get_submodule(f"{parent}.{part}")
        rows = linear.weight.shape[0]
        linear.weight.copy_(weight[offset:offset + rows])
        offset += rows


def test_quantize_refuses_bad_arguments_and_leaves_the_model_as_it_was():
    model = copy.deepcopy(as_native(tiny_model("llama", torch.float32)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="scheme must be one of"):
        specdec.quantize(model, "int3")
    with pytest.raises(ValueError, match="group_size must be an even number dividing the layer's 112"):
        specdec.quantize(model, "int4", group_size=32)  # divides 64, not the MLP's 112
    with pytest.raises(ValueError, match="needs a native specdec model"):
        specdec.quantize(torch.nn.Linear(4, 4), "int8")
    with pytest.raises(ValueError, match="multiple of 32 .* for int8 activations, got 16"):
        specdec.quantize(model, "int4", group_size=16)
    with pytest.raises(ValueError, match="activations must be one of"):
        specdec.quantize(model, "int4", activations="int4")
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="quantize must be None or one of"):
        specdec.load("smollm2-135m-instruct", quantize="fp8")


def test_bad_quantized_input_is_refused_before_c_reads_it():
    from specdec.kernels import cpu_layers

    _, quantized = _layer(32, 64, 4, 32, False)
    packed = Q.pack(quantized, 64, False)
    short = Q.QuantizedWeight(packed.data[:-1], 32, 64, 4, 32)  # one byte short of what C would read
    with pytest.raises(ValueError, match="has .* bytes, not"):
        cpu_linear.linear(torch.randn(1, 64), short)
    with pytest.raises(ValueError, match="exceeds float16"):
        Q.quantize(torch.full((4, 8), 1e6), 8, None)
    model = copy.deepcopy(as_native(tiny_model("llama", torch.float32)))
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = 1e7  # the last layer quantized overflows
    with pytest.raises(ValueError, match="exceeds float16"):
        specdec.quantize(model, "int8")
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())  # nothing was replaced
    x = torch.randn(1, 1, 64)
    with pytest.raises(ValueError, match="group_size=48"):
        cpu_layers.decoder_layers(x, torch.zeros(2, 8, dtype=torch.int64), 1e-5, None, None, None, None, 4, 2, 16,
                                  112, bits=4, group_size=48)


@needs_kernels
def test_a_replaced_layer_s_packed_copy_goes_with_it():
    import gc

    model = copy.deepcopy(as_native(tiny_model("llama", torch.float32)))
    ids, positions = torch.tensor([[5, 6, 7]]), torch.arange(3)[None]
    with torch.no_grad():
        model(ids, positions, model.new_cache(1, 4))
        assert len(model.runner._packs) == 2 * 4 + 1
        specdec.quantize(model, "int8")
        gc.collect()
        model(ids, positions, model.new_cache(1, 4))
    assert len(model.runner._packs) == 2 * 4 + 1  # the float layers' copies are gone
    assert all(isinstance(layer, QuantizedLinear) for layer in model.runner._packs.keys())


def test_output_layer_false_keeps_it_in_float():
    model = specdec.quantize(copy.deepcopy(as_native(tiny_model("llama", torch.float32))), "int8",
                             output_layer=False)
    assert type(model.lm_head) is torch.nn.Linear
    assert isinstance(model.model.layers[0].mlp.down_proj, QuantizedLinear)


@needs_kernels
def test_generate_checks_the_kernel_state_once_per_call_and_sees_a_change_between_calls(monkeypatch):
    """Inside one generate() call the weights stay put: the one-call table is checked against the layers on the
    first forward only (runner.steady()); a weight changed between calls is seen by the next call."""
    from specdec.kernels.cpu_runner import CpuRunner

    model = _quantized("llama", torch.float32, "int8")
    floats = copy.deepcopy(as_native(tiny_model("llama", torch.float32)))
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    checks = []
    packed = CpuRunner._packed
    monkeypatch.setattr(CpuRunner, "_packed", lambda self, layer, dtype: checks.append(1) or packed(self, layer,
                                                                                                        dtype))
    for target in (model, floats):
        checks.clear()
        specdec.generate(target, ids, max_new_tokens=12, eos_token_id=[])
        assert len(checks) == 4 * len(target.model.layers) + 12  # one table check; the output layer each step
    before = specdec.generate(floats, ids, max_new_tokens=12, eos_token_id=[])
    with torch.no_grad():
        floats.model.layers[0].mlp.down_proj.weight.mul_(-3.0)
    after = specdec.generate(floats, ids, max_new_tokens=12, eos_token_id=[])
    fresh = copy.deepcopy(floats)  # a new runner: nothing cached
    assert torch.equal(after, specdec.generate(fresh, ids, max_new_tokens=12, eos_token_id=[]))
    assert not torch.equal(after, before)
