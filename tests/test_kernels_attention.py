"""Verification attention (Triton, under TRITON_INTERPRET=1 on the CPU) against its reference."""

import pytest
import torch

from specdec.kernels.dispatch import triton_available
from specdec.kernels.verify_attention import verify_attention_reference, verify_attention_triton

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
# on a GPU machine the same tests run the compiled kernels on CUDA (bench/gpu_check.py runs them there)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-3, torch.float16: 2e-3}
BLOCK = 16


def _paged_case(dtype, head_dim, contexts, query_lens, heads=4, kv_heads=2, seed=0):
    """A pool whose blocks are handed out in a shuffled order; keys of the new tokens already written."""
    gen = torch.Generator().manual_seed(seed)
    batch, T = len(contexts), max(query_lens)
    need = [-(-(c + n) // BLOCK) for c, n in zip(contexts, query_lens)]
    order = torch.randperm(sum(need) + 3, generator=gen)  # spare blocks, not in order
    table = torch.zeros(batch, max(need), dtype=torch.int32)
    used = 0
    for b, m in enumerate(need):
        table[b, :m] = order[used:used + m]
        used += m
    num_blocks = sum(need) + 3
    k_pool = torch.randn(num_blocks, BLOCK, kv_heads, head_dim, generator=gen).to(dtype)
    v_pool = torch.randn(num_blocks, BLOCK, kv_heads, head_dim, generator=gen).to(dtype)
    q = torch.randn(batch, T, heads, head_dim, generator=gen).to(dtype)
    return tuple(t.to(DEVICE) for t in (q, k_pool, v_pool, table, torch.tensor(contexts), torch.tensor(query_lens)))


def _relative(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_kernel_matches_reference_on_ragged_paged_batches(dtype, head_dim):
    # T = 1 (plain decode) and T = 9 (k = 8) side by side; contexts 0, 1, 17, 300
    args = _paged_case(dtype, head_dim, contexts=[0, 1, 17, 300], query_lens=[9, 1, 9, 1])
    q, k_pool, v_pool, *rest = args
    # The oracle in float32 on the same (rounded) inputs, compared with the kernel's float32 result before
    # the final cast: a bfloat16 output's own rounding is up to 2^-8 relative, larger than the bound, so the
    # bound is on the accumulation; the cast itself is then checked to be torch's round-to-nearest.
    want = verify_attention_reference(q.float(), k_pool.float(), v_pool.float(), *rest)
    got32 = verify_attention_triton(*args, out_dtype=torch.float32)
    got = verify_attention_triton(*args)
    if DEVICE == "cuda" and dtype != torch.float32:
        # on a GPU 16-bit inputs multiply on tensor cores (16-bit products, float32 sums), as torch's own
        # flash attention does; the bound is then torch's SDPA in that dtype on the same data, within 2x
        assert _relative(got, want) <= 2 * _relative(verify_attention_reference(*args), want)
    else:
        assert _relative(got32, want) < TOLERANCE[dtype]
    assert got.dtype == dtype and torch.equal(got, got32.to(dtype))
    assert (got[1, 1:] == 0).all() and (got[3, 1:] == 0).all()  # the kernel leaves padding rows at zero


def test_contiguous_cache_is_one_block_per_sequence():
    """The native model's layout [batch, kv_heads, S, head_dim] viewed as a pool of one block per row."""
    gen = torch.Generator().manual_seed(1)
    batch, kv_heads, S, D = 3, 2, 40, 64
    keys = torch.randn(batch, kv_heads, S, D, generator=gen)
    values = torch.randn(batch, kv_heads, S, D, generator=gen)
    q = torch.randn(batch, 5, 4, D, generator=gen)
    contexts, qlens = torch.tensor([10, 0, 30]), torch.tensor([5, 3, 1])
    table = torch.arange(batch, dtype=torch.int32)[:, None]
    q, keys, values, table, contexts, qlens = (t.to(DEVICE) for t in (q, keys, values, table, contexts, qlens))
    args = (q, keys.transpose(1, 2), values.transpose(1, 2), table, contexts, qlens)  # strided views, no copy
    want = verify_attention_reference(*args)
    assert _relative(verify_attention_triton(*args), want) < 1e-5
    assert torch.equal(verify_attention_reference(q, *args[1:3], None, contexts, qlens), want)  # table=None: a view
    # and the reference agrees with attention written out by hand, row by row, head by head
    for b in range(batch):
        L, n = int(contexts[b]), int(qlens[b])
        k = keys[b, :, :L + n].repeat_interleave(2, dim=0)  # [heads, L + n, D]: 4 heads on 2 kv heads
        v = values[b, :, :L + n].repeat_interleave(2, dim=0)
        scores = torch.einsum("thd,hsd->hts", q[b, :n], k) / D ** 0.5
        visible = (torch.arange(L + n)[None, :] <= (L + torch.arange(n))[:, None]).to(DEVICE)
        by_hand = torch.einsum("hts,hsd->thd", scores.masked_fill(~visible, float("-inf")).softmax(-1), v)
        assert torch.allclose(by_hand, want[b, :n], atol=1e-5)


def test_a_wrong_mask_is_caught():
    """A kernel that let each query see one key too many (its successor) must fail the comparison."""
    args = _paged_case(torch.float32, 64, contexts=[5, 17], query_lens=[9, 4])
    wrong = verify_attention_reference(*args, causal_offset=1)
    assert _relative(verify_attention_triton(*args), wrong) > 1e-2


@pytest.mark.skipif(DEVICE == "cuda", reason="runs the kernels on CPU tensors in Triton's interpreter")
def test_native_model_through_the_kernels_equals_the_cpu_path(monkeypatch):
    """The whole speculative loop with both kernels (attention, sampler) in the interpreter: same tokens."""
    from conftest import tiny_model

    import specdec

    target = tiny_model("llama", torch.float32)  # head_dim 16
    draft = tiny_model("smollm2", torch.float32, seed=7)
    ids = torch.tensor([[0, 0, 5, 6, 7], [3, 4, 5, 6, 7]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    plain = specdec.generate(target, ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[])
    want = specdec.generate(target, ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[], draft_model=draft,
                            num_draft_tokens=3, do_sample=True, generator=torch.Generator().manual_seed(0))
    native = specdec.models.loading.as_native(target)
    right = torch.tensor([[5, 6, 7, 0, 0], [3, 4, 5, 6, 7]])  # ragged, right-padded, as generate() feeds it
    positions = torch.tensor([[0, 1, 2, -1, -1], [0, 1, 2, 3, 4]])
    with torch.no_grad():
        by_sdpa = native(right, positions, native.new_cache(2, 16))
        monkeypatch.setenv("SPECDEC_TRITON_ON_CPU", "1")
        by_kernel = native(right, positions, native.new_cache(2, 16))
    valid = positions >= 0
    assert torch.allclose(by_kernel[valid], by_sdpa[valid], rtol=0, atol=1e-4)
    assert torch.equal(specdec.generate(target, ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[],
                                        draft_model=draft, num_draft_tokens=3), plain)
    got = specdec.generate(target, ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[], draft_model=draft,
                           num_draft_tokens=3, do_sample=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(got, want)  # the sampler kernel draws bit-identically from the same random numbers


def test_training_keeps_the_references(monkeypatch):
    """The kernels have no backward: a forward that autograd records (a draft head training on a GPU) runs the
    references, and its gradients reach the weights; the same forward without grad runs the kernel."""
    from conftest import tiny_model

    import specdec
    from specdec.kernels.dispatch import use_triton
    from specdec.models.head import DraftHead

    monkeypatch.setenv("SPECDEC_TRITON_ON_CPU", "1")
    x = torch.ones(2, device=DEVICE, requires_grad=True)
    assert use_triton(x.detach()) and not use_triton(x)
    with torch.no_grad():
        assert use_triton(x)
    target = specdec.models.loading.as_native(tiny_model("llama", torch.float32)).to(DEVICE)
    head = DraftHead.for_target(target.config, torch.arange(32)).to(DEVICE, torch.float32)
    ids, positions = torch.tensor([[3, 4, 5]], device=DEVICE), torch.arange(3, device=DEVICE)[None]
    features = torch.randn(1, 3, target.config.hidden_size, device=DEVICE)
    logits = head(target.model.embed_tokens(ids).detach(), features, positions, head.new_cache(1, 8))
    logits.sum().backward()
    qkv = head.body.model.layers[0].self_attn.qkv_proj.weight  # its gradient flows through attention alone
    assert qkv.grad is not None and bool(qkv.grad.abs().sum() > 0)


def test_more_queries_than_one_tile_and_a_group_of_four():
    """T = 20 spans two query tiles (a prefill); 8 query heads on 2 kv heads."""
    args = _paged_case(torch.float32, 64, contexts=[3, 0], query_lens=[20, 7], heads=8, kv_heads=2, seed=4)
    assert _relative(verify_attention_triton(*args), verify_attention_reference(*args)) < 1e-5


@pytest.mark.parametrize("num_splits", [2, 3, 7])
def test_keys_split_across_programs_combine_to_the_same_attention(num_splits):
    """Flash-decoding: the keys of each row shared out among programs, their partial softmaxes merged.
    Contexts 0 and 1 leave most splits empty; 300 crosses every split; T = 9 and T = 1 side by side."""
    args = _paged_case(torch.float32, 64, contexts=[0, 1, 17, 300], query_lens=[9, 1, 9, 1], seed=5)
    want = verify_attention_reference(*args)
    got = verify_attention_triton(*args, num_splits=num_splits)
    assert _relative(got, want) < 1e-5
    assert (got[1, 1:] == 0).all() and (got[3, 1:] == 0).all()  # padding rows stay zero through the combine
    # span: the model's bound on the keys attended (here exact) gives the same result with fewer empty splits
    assert _relative(verify_attention_triton(*args, num_splits=num_splits, span=309), want) < 1e-5


def test_the_bound_would_catch_a_split_left_out_of_the_combine():
    """What a combine that lost one split's share would return: attention over the keys of the other splits
    only. Over 200 keys in 3 splits, leaving out the first 64 moves the result far past the bound above."""
    q, k_pool, v_pool, table, contexts, qlens = _paged_case(torch.float32, 64, contexts=[200], query_lens=[1])
    full = verify_attention_triton(q, k_pool, v_pool, table, contexts, qlens, num_splits=3)
    keys = k_pool[table[0].long()].reshape(-1, *k_pool.shape[2:])[:201]  # [201, kv_heads, D] in position order
    values = v_pool[table[0].long()].reshape(-1, *v_pool.shape[2:])[:201]
    without_first = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), keys[None, 64:].transpose(1, 2), values[None, 64:].transpose(1, 2),
        enable_gqa=True).transpose(1, 2)  # [1, 1, heads, D]: the last query sees every key, no mask needed
    assert _relative(full, verify_attention_reference(q, k_pool, v_pool, table, contexts, qlens)) < 1e-5
    assert _relative(without_first, full) > 1e-2
