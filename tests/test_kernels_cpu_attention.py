"""The CPU attention kernel (RoPE, cache write, causal attention in one call) against the torch ops it
replaces, on the contiguous and the paged cache, and the batch invariance it gives the whole model."""

import copy
import functools

import pytest
import torch
from conftest import tiny_model

from specdec.cache import KVCache, KVPool, PagedKVCache
from specdec.kernels import cpu, cpu_attention, cpu_layers
from specdec.kernels.verify_attention import verify_attention_reference
from specdec.models.loading import as_native
from specdec.kernels.runner import rotate

pytestmark = pytest.mark.skipif(not cpu.available(), reason="no AVX-512 CPU or no C compiler: no CPU kernels here")


def _inputs(dtype, head_dim, heads, kv_heads, paged, seed=0):
    """A ragged batch of 3 rows continuing caches of 5, 0 and 21 tokens with 4, 2 and 3 new tokens (right-
    padded with position -1; up to 24 keys, past one vector of 16 scores), on a cache whose every slot holds
    random numbers (stale entries included)."""
    g = torch.Generator().manual_seed(seed)
    context, new, T = torch.tensor([5, 0, 21]), torch.tensor([4, 2, 3]), 4
    t = torch.arange(T)
    positions = torch.where(t < new[:, None], context[:, None] + t, -1)  # [3, T]
    qkv = torch.randn(3, T, (heads + 2 * kv_heads) * head_dim, generator=g).to(dtype)
    angles = positions.clamp(min=0).float()[..., None] * 0.3 ** torch.arange(head_dim // 2)  # [3, T, hd/2]
    cos = torch.cat((angles.cos(), angles.cos()), -1)[:, :, None].to(dtype)
    sin = torch.cat((-angles.sin(), angles.sin()), -1)[:, :, None].to(dtype)
    if paged:
        pool = KVPool(num_layers=1, num_blocks=14, block_size=3, num_kv_heads=kv_heads, head_dim=head_dim,
                      dtype=dtype)
        tables = [[7, 2, 10], [0], [11, 4, 9, 1, 5, 13, 3, 6]]  # scattered blocks of 3 positions, enough for each
        cache = PagedKVCache(pool, tables, context)
    else:
        cache = KVCache(num_layers=1, batch_size=3, num_kv_heads=kv_heads, head_dim=head_dim, max_len=30,
                        dtype=dtype)
        cache.lengths = context.clone()
    keys, values = cache.pools(0)[:2]
    keys.copy_(torch.randn(keys.shape, generator=g))
    values.copy_(torch.randn(values.shape, generator=g))
    return qkv, cos, sin, positions, context, new, cache


def _torch_ops(qkv, cos, sin, positions, context, new, cache, heads, kv_heads, causal_offset=0):
    """What the torch runner's attention does (kernels/runner.py), the kernel's oracle."""
    batch, T, _ = qkv.shape
    parts = qkv.view(batch, T, heads + 2 * kv_heads, -1)
    qk = rotate(parts[:, :, : heads + kv_heads], cos, sin)
    q, k = qk.split((heads, kv_heads), dim=2)
    cache.write(0, cache.slots(positions), k, parts[:, :, heads + kv_heads:])
    k_pool, v_pool, table = cache.pools(0)
    return verify_attention_reference(q, k_pool, v_pool, table, context, new, causal_offset=causal_offset)


def _written(cache, positions):
    """The keys and values at the new tokens' slots. -> [tokens, kv_heads, head_dim] each"""
    k_pool, v_pool, table = cache.pools(0)
    rows, steps = (positions >= 0).nonzero(as_tuple=True)
    p = positions[rows, steps]
    if table is None:
        return k_pool[rows, p], v_pool[rows, p]
    blocks, offsets = table[rows, p // k_pool.shape[1]], p % k_pool.shape[1]
    return k_pool[blocks, offsets], v_pool[blocks, offsets]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("shape", [(16, 4, 2), (64, 9, 3), (40, 2, 2), (24, 3, 1)])  # head_dim, heads, kv_heads
def test_matches_the_torch_ops(dtype, paged, shape):
    head_dim, heads, kv_heads = shape
    qkv, cos, sin, positions, context, new, cache = _inputs(dtype, head_dim, heads, kv_heads, paged)
    twin = copy.deepcopy(cache)
    want = _torch_ops(qkv, cos, sin, positions, context, new, twin, heads, kv_heads)
    k_pool, v_pool, table = cache.pools(0)
    got = cpu_attention.rope_write_attend(qkv, cos, sin, positions, k_pool, v_pool, table, heads, kv_heads)
    # RoPE and the cache write are the same elementwise roundings: bitwise equal
    for mine, theirs in zip(_written(cache, positions), _written(twin, positions)):
        assert torch.equal(mine, theirs)
    # attention: float32 sums in another order; an output is a weighted mean of values (|v| <= max|v|), so
    # float32 leaves ~1e-6 of max|v|, and bfloat16 adds its one output rounding: 2^-8 relative, 2^-7 allowed
    scale = v_pool.float().abs().max()
    bound = (2.0**-7 if dtype == torch.bfloat16 else 1e-5) * scale
    real = (positions >= 0)[..., None, None]
    assert ((got.float() - want.float()).abs() <= bound).all()
    assert (got[~real.expand_as(got)] == 0).all()  # padding rows are zeros
    # the companion: a mask that lets each query see one key too many is caught by the same bound
    wrong = _torch_ops(qkv, cos, sin, positions, context, new, copy.deepcopy(cache), heads, kv_heads, causal_offset=1)
    assert not ((got.float() - wrong.float()).abs() <= bound).all()


@pytest.mark.parametrize("paged", [False, True])
def test_bad_input_is_refused_before_anything_is_written(paged):
    qkv, cos, sin, positions, *_, cache = _inputs(torch.float32, 16, 4, 2, paged)
    k_pool, v_pool, table = cache.pools(0)
    before = k_pool.clone(), v_pool.clone()
    attend = cpu_attention.rope_write_attend
    bad = [
        lambda: attend(qkv, cos, sin, positions, k_pool, v_pool.bfloat16(), table, 4, 2),  # v of another dtype
        lambda: attend(qkv, cos[:1], sin[:1], positions, k_pool, v_pool, table, 4, 2),  # broadcast cos/sin
        lambda: attend(qkv, cos, sin, positions, k_pool, v_pool, table, 3, 2),  # heads not a multiple
        lambda: attend(qkv, cos, sin, positions[:, :2], k_pool, v_pool, table, 4, 2),
        lambda: attend(qkv, cos, sin, positions + 40, k_pool, v_pool, table, 4, 2),  # past the pool
    ]
    if paged:
        bad.append(lambda: attend(qkv, cos, sin, positions, k_pool, v_pool, table + 100, 4, 2))  # no such block
    for call in bad:
        with pytest.raises(ValueError, match="rope_write_attend"):
            call()
    assert torch.equal(k_pool, before[0]) and torch.equal(v_pool, before[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "smollm2"])
def test_a_pass_of_several_tokens_gives_each_the_bits_of_single_steps(arch, dtype):
    # with the CPU kernels every linear layer and the attention compute each token alone, so a verification
    # pass of k + 1 tokens reproduces plain decode steps bit for bit (not just within rounding)
    model = as_native(tiny_model(arch, dtype))
    ids = torch.randint(3, 90, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        cache = model.new_cache(1, 16)
        model(ids[:, :7], torch.arange(7)[None], cache)
        passed = model(ids[:, 7:], torch.arange(7, 12)[None], cache)  # [1, 5, vocab]
        cache.rollback(7)
        steps = torch.cat([model(ids[:, t:t + 1], torch.tensor([[t]]), cache) for t in range(7, 12)], dim=1)
    assert torch.equal(passed, steps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ["llama", "llama-bias", "qwen2", "smollm2"])
@pytest.mark.parametrize("paged", [False, True])
def test_the_layers_in_one_call_give_the_bits_of_the_python_loop(arch, dtype, paged):
    # kernels/cpu_layers.c makes the same kernel calls as the CPU runner's loop: same logits, same cache.
    # Biases (q/k/v for qwen2, also o for llama-bias) and norm weights made random: initialised to 0 and 1,
    # a dropped or swapped one would give the same bits
    model = copy.deepcopy(as_native(tiny_model(arch, dtype)))
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if "norm" in name else 0.0))
    ids = torch.randint(3, 90, (2, 9), generator=torch.Generator().manual_seed(5))
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8], [0, 1, 2, 3, 4, 5, -1, -1, -1]])
    caches, logits = [], []
    for one_call in (True, False):
        if paged:
            attn = model.model.layers[0].self_attn
            pool = KVPool(num_layers=len(model.model.layers), num_blocks=8, block_size=4,
                          num_kv_heads=attn.num_kv_heads, head_dim=attn.head_dim, dtype=dtype)
            cache = PagedKVCache(pool, [[5, 1, 6], [2, 7]], [0, 0])
        else:
            cache = model.new_cache(2, 12)
        model.runner.one_call = one_call
        try:
            with torch.no_grad():
                assert model.runner.layer_addresses(model) is not None  # every layer is on the kernels' path
                first = model(ids[:, :5], positions[:, :5], cache)
                rest = model(ids[:, 5:], positions[:, 5:] - 5 * (positions[:, 5:] < 0), cache)  # a pass of 4
        finally:
            model.runner.one_call = True
        logits.append(torch.cat([first, rest], dim=1))
        caches.append((cache.pool.keys, cache.pool.values) if paged else (cache.keys, cache.values))
    assert torch.equal(logits[0], logits[1])
    for mine, theirs in zip(*caches):  # every layer's keys and values
        assert torch.equal(mine, theirs)


def test_the_layers_in_one_call_refuse_bad_input_and_write_nothing():
    # the model checks room itself; the C call must refuse on its own too, before any layer writes a key
    model = as_native(tiny_model("smollm2", torch.float32))
    attn = model.model.layers[0].self_attn
    cache = model.new_cache(1, 6)
    with torch.no_grad():
        model(torch.tensor([[5, 6, 7]]), torch.arange(3)[None], cache)
        before = cache.keys.clone(), cache.values.clone()
        x = model.model.embed_tokens(torch.tensor([[8, 9]]))
        cos = sin = torch.ones(1, 2, 1, attn.head_dim)
        call = functools.partial(cpu_layers.decoder_layers, x, model.runner.layer_addresses(model), 1e-5, cos, sin,
                                 cache=cache, num_heads=attn.num_heads, num_kv_heads=attn.num_kv_heads,
                                 head_dim=attn.head_dim, inner=model.config.intermediate_size)
        with pytest.raises(ValueError, match="outside the pool"):
            call(positions=torch.tensor([[3, 40]]))
        with pytest.raises(ValueError, match="positions"):
            call(positions=torch.tensor([[3, 4, 5]]))
        with pytest.raises(ValueError, match="k_pool"):  # a cache of another head_dim than the weights'
            wide = model.new_cache(1, 6)
            wide.keys = wide.values = torch.zeros(*wide.keys.shape[:-1], 2 * attn.head_dim)
            call(positions=torch.tensor([[3, 4]]), cache=wide)
        with pytest.raises(ValueError, match="addresses"):
            cpu_layers.decoder_layers(x, model.runner.layer_addresses(model)[:, :7], 1e-5, cos, sin, torch.tensor([[3, 4]]),
                                      cache, attn.num_heads, attn.num_kv_heads, attn.head_dim,
                                      model.config.intermediate_size)
        assert torch.equal(cache.keys, before[0]) and torch.equal(cache.values, before[1])
        again = model(torch.tensor([[8]]), torch.tensor([[3]]), cache)  # and the cache still serves
    assert again.shape == (1, 1, model.vocab_size)


def test_the_layers_in_one_call_see_a_weight_changed_in_place():
    # the C call reads packed copies and raw addresses: a weight, bias or norm changed after the first forward
    # must be repacked / re-read, exactly as the Python loop does
    model = copy.deepcopy(as_native(tiny_model("qwen2", torch.float32)))
    ids, positions = torch.tensor([[5, 6, 7]]), torch.arange(3)[None]

    def both():
        out = []
        for one_call in (True, False):
            model.runner.one_call = one_call
            with torch.inference_mode():
                out.append(model(ids, positions, model.new_cache(1, 4)))
        model.runner.one_call = True
        assert torch.equal(out[0], out[1])
        return out[0]

    before = both()
    layer = model.model.layers[1]
    changes = [lambda: layer.mlp.down_proj.weight.mul_(1.5), lambda: layer.self_attn.qkv_proj.bias.add_(0.3),
               lambda: layer.post_attention_layernorm.weight.mul_(0.5),
               lambda: setattr(layer.input_layernorm, "weight", torch.nn.Parameter(layer.input_layernorm.weight * 2))]
    for change in changes:
        with torch.no_grad():
            change()
        after = both()
        assert not torch.equal(after, before)
        before = after
    model.to(torch.bfloat16)  # every weight replaced after the table was made: repacked, re-read
    with torch.inference_mode():
        assert model.runner.layer_addresses(model) is not None
    assert not torch.equal(both(), before)
