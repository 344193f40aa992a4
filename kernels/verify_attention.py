"""Verification attention: T = k + 1 new queries per sequence over its cached keys, through a block table.

Row b has context_lens[b] cached tokens and query_lens[b] new ones at positions L .. L + T - 1, whose keys
and values are already in the pool; query t attends to keys 0 .. L + t (causal over the new ones). Keys
live in a paged pool [num_blocks, block_size, kv_heads, head_dim] (any strides) addressed through
block_table [batch, max_blocks]; a contiguous per-sequence cache is the special case of one block per
sequence (block_table[b] = [b], block_size = its capacity). GQA: query head h reads kv head h // group.
The kernel is flash-style: one pass over the keys with an online softmax in float32 accumulators, so each
key and value is read once per (sequence, kv head) instead of materialising a [T, L + T] score matrix. Long
contexts are split across programs (flash-decoding) whose partial softmaxes a second kernel merges, so that
batch 1 fills the GPU. On a GPU 16-bit inputs multiply on tensor cores (16-bit products, float32 sums, as
torch's flash attention does); in Triton's CPU interpreter (the only place CI can run it), whose bfloat16
dot returns garbage, and for float32 inputs the products are IEEE float32. bench/gpu_check.py measures it
against torch's SDPA on the same data (bench/RESULTS.md).
"""

from __future__ import annotations

import functools

import torch

from specdec.kernels.dispatch import triton_available, use_triton


def verify_attention(q, k_pool, v_pool, block_table, context_lens, query_lens, scale=None, span=None, mask=None,
                     row_ok=None):
    """q [batch, T, heads, head_dim] (rows t >= query_lens[b] are padding); k_pool, v_pool
    [num_blocks, block_size, kv_heads, head_dim]; block_table [batch, max_blocks] int, or None for the
    contiguous special case (row b's keys are k_pool[b]); context_lens, query_lens [batch]
    -> out [batch, T, heads, head_dim] (zeros in padding rows)
    span, mask, row_ok: what the reference derives from the lengths (``attention_span_and_mask``), for a
    caller that has them already — the native model makes them once per forward instead of once per layer"""
    if use_triton(q) and q.dtype != torch.float64:  # the kernel computes in float32
        return verify_attention_triton(q, k_pool, v_pool, block_table, context_lens, query_lens, scale, span=span)
    return verify_attention_reference(q, k_pool, v_pool, block_table, context_lens, query_lens, scale,
                                      span=span, mask=mask, row_ok=row_ok)


def attention_span_and_mask(context_lens, query_lens, T: int, span=None, causal_offset=0):
    """span: keys any row attends to (a host sync unless given); mask [batch, 1, T, span]: query t of row b
    sees keys 0..L_b + t; padding rows see key 0 only, which keeps their softmax finite (they are dropped);
    row_ok [batch, T, 1, 1]: the real (not padding) queries."""
    if span is None:
        span = int((context_lens + query_lens).max())
    j = torch.arange(span, device=context_lens.device)
    t = torch.arange(T, device=context_lens.device)
    row_ok = _real_queries(query_lens, T)[..., 0]  # [batch, T, 1]
    visible = j <= (context_lens[:, None] + t + causal_offset)[..., None]  # [batch, T, span]
    return span, ((visible & row_ok) | (~row_ok & (j == 0)))[:, None], row_ok[..., None]


def _real_queries(query_lens, T: int):
    """query_lens [batch] -> [batch, T, 1, 1] bool: query t of row b is real (t < query_lens[b])."""
    return (torch.arange(T, device=query_lens.device) < query_lens[:, None])[..., None, None]


def verify_attention_reference(q, k_pool, v_pool, block_table, context_lens, query_lens, scale=None,
                               span=None, mask=None, row_ok=None, causal_offset=0):
    """The CPU path and the oracle: gather keys through the block table, then SDPA with the causal mask.
    causal_offset exists only for the test that a wrong mask is caught (query t sees keys <= L + t + offset)."""
    batch, T, _, head_dim = q.shape
    if mask is None:
        span, mask, row_ok = attention_span_and_mask(context_lens, query_lens, T, span, causal_offset)
    elif row_ok is None:  # a caller's own mask stays; only the padding rows are derived
        row_ok = _real_queries(query_lens, T)
    if block_table is None:  # contiguous: a view, no gather (the native model's cache on the CPU)
        keys, values = k_pool[:batch, :span], v_pool[:batch, :span]  # [batch, S, kv_heads, head_dim]
    else:
        j = torch.arange(span, device=q.device)  # [S] key positions
        block_size = k_pool.shape[1]
        blocks = block_table.long()[:, (j // block_size).clamp(max=block_table.shape[1] - 1)]  # [batch, S]
        keys, values = k_pool[blocks, j % block_size], v_pool[blocks, j % block_size]
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask, scale=scale,
        enable_gqa=True)  # [batch, heads, T, head_dim]
    return out.transpose(1, 2) * row_ok  # zeros in padding rows, as the kernel leaves them


if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _verify_attention_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr,  # q [batch, T, heads, D]; k, v pools [blocks, block_size, kv_heads, D]
        m_ptr, l_ptr,  # with splits: running max and sum [batch, T, heads, splits] (out is then [..., splits, D])
        sm_b, sm_t, sm_h,  # strides of m and l (the same layout)
        table_ptr, ctx_ptr, qlen_ptr,  # block table [batch, max_blocks]; context_lens, query_lens [batch]
        sq_b, sq_t, sq_h, sq_d, sk_b, sk_s, sk_h, sk_d, sv_b, sv_s, sv_h, sv_d, so_b, so_t, so_h, so_d,
        st_b, block_size, group, scale, num_splits, chunk,
        HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        SPLIT: tl.constexpr, LOW_PRECISION: tl.constexpr,
    ):
        # One program per (sequence, kv head, tile of BLOCK_T queries, split of the keys): its rows are every
        # query head of the group times those queries (row r: head kv_head * group + r // BLOCK_T, query
        # r % BLOCK_T), so each key and value tile is read once for the whole group — GQA's 4 query heads per
        # kv head in Llama 3 would otherwise read the cache 4 times. Split s covers keys [s * chunk,
        # (s + 1) * chunk): at batch 1 a Llama-3-8B layer has 8 (sequence, kv head) pairs for 132
        # multiprocessors, so without splits 94% of an H100 idles while one program walks the whole context.
        b, kv_head = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
        tb, split = tl.program_id(2) // num_splits, tl.program_id(2) % num_splits
        L = tl.load(ctx_ptr + b).to(tl.int64)
        n = tl.load(qlen_ptr + b).to(tl.int64)
        r = tl.arange(0, BLOCK_M)
        g = r // BLOCK_T
        t = tb * BLOCK_T + r % BLOCK_T  # query index of each row
        head = kv_head * group + g
        row_ok = (g < group) & (t < n)
        d = tl.arange(0, HEAD_DIM)
        q = tl.load(q_ptr + b * sq_b + t[:, None] * sq_t + head[:, None] * sq_h + d[None, :] * sq_d,
                    mask=row_ok[:, None], other=0.0)  # [BLOCK_M, HEAD_DIM]
        if not LOW_PRECISION:
            q = q.to(tl.float32)
        # keys up to the last valid query of this tile (none at all when the tile is padding), this split's part
        end = tl.where(tb * BLOCK_T < n, L + tl.minimum(n, (tb + 1) * BLOCK_T), 0)
        lo = split * chunk
        hi = tl.minimum(lo + chunk, end)
        qk_scale = scale * 1.4426950408889634  # exp(x) = exp2(x * log2(e)): one multiply folded into the scale
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        for start in range(lo, hi, BLOCK_N):
            j = start + tl.arange(0, BLOCK_N)  # key positions
            block = tl.load(table_ptr + b * st_b + j // block_size, mask=j < hi, other=0).to(tl.int64)
            slot = j % block_size
            kv_mask = j[:, None] < hi
            k = tl.load(k_ptr + block[:, None] * sk_b + slot[:, None] * sk_s + kv_head * sk_h + d[None, :] * sk_d,
                        mask=kv_mask, other=0.0)  # [BLOCK_N, HEAD_DIM]
            v = tl.load(v_ptr + block[:, None] * sv_b + slot[:, None] * sv_s + kv_head * sv_h + d[None, :] * sv_d,
                        mask=kv_mask, other=0.0)
            if LOW_PRECISION:  # tensor cores: 16-bit products, float32 sums (what flash attention does)
                s = tl.dot(q, tl.trans(k)) * qk_scale  # [BLOCK_M, BLOCK_N]
            else:
                s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee") * qk_scale
            visible = (j[None, :] <= L + t[:, None]) & (j[None, :] < hi)
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key yet
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if LOW_PRECISION:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            else:
                acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
            m_i = m_new
        o = b * so_b + t[:, None] * so_t + head[:, None] * so_h
        if SPLIT:  # unnormalised; _combine_splits weighs the splits by their maxima and sums
            stats = b * sm_b + t * sm_t + head * sm_h + split  # [BLOCK_M] into m, l
            tl.store(m_ptr + stats, m_i, mask=row_ok)
            tl.store(l_ptr + stats, l_i, mask=row_ok)
            tl.store(out_ptr + o + split * HEAD_DIM + d[None, :] * so_d, acc, mask=row_ok[:, None])
        else:
            out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
            tl.store(out_ptr + o + d[None, :] * so_d, out, mask=row_ok[:, None])

    @triton.jit
    def _combine_splits(part_ptr, m_ptr, l_ptr, out_ptr, qlen_ptr, T, heads, num_splits,
                        HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr):
        # part [batch, T, heads, splits, D], m, l [batch, T, heads, splits] (contiguous), out [batch, T, heads, D]
        # (contiguous), query_lens [batch]
        # one program per (sequence, query, head): out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s
        row = tl.program_id(0).to(tl.int64)  # b * T * heads + t * heads + head
        t = (row // heads) % T
        n = tl.load(qlen_ptr + row // (T * heads))
        s = tl.arange(0, SPLITS)
        d = tl.arange(0, HEAD_DIM)
        ok = (s < num_splits) & (s * 0 + t < n)  # [SPLITS] (the interpreter wants the mask a vector)
        m = tl.load(m_ptr + row * num_splits + s, mask=ok, other=float("-inf"))
        l_s = tl.load(l_ptr + row * num_splits + s, mask=ok, other=0.0)
        acc = tl.load(part_ptr + (row * num_splits + s[:, None]) * HEAD_DIM + d[None, :], mask=ok[:, None], other=0.0)
        top = tl.max(m, axis=0)
        w = tl.where(m == float("-inf"), 0.0, tl.exp2(m - tl.where(top == float("-inf"), 0.0, top)))
        total = tl.sum(w * l_s, axis=0)
        out = tl.sum(w[:, None] * acc, axis=0) / tl.where(total == 0.0, 1.0, total)
        tl.store(out_ptr + row * HEAD_DIM + d, out)


@functools.cache
def _multiprocessors(device) -> int:  # (asked by every layer of every pass)
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def verify_attention_triton(q, k_pool, v_pool, block_table, context_lens, query_lens, scale=None,
                            block_n=None, out_dtype=None, span=None, num_splits=None):
    """span: an upper bound on the keys any row attends to (the model knows it from its one host sync;
    otherwise the pool's capacity per row); num_splits: programs per (sequence, kv head, query tile) that
    share its keys; by default splits only while those programs are fewer than the multiprocessors, up to two
    programs per multiprocessor, each >= 1024 keys (1 on the CPU)."""
    batch, T, heads, head_dim = q.shape
    # float32 out, rounded by torch at the end: Triton's interpreter truncates float32 -> bfloat16 stores,
    # which would put a whole unit in the last place between the CPU test and the GPU; the extra write is
    # [batch, T, heads, head_dim], nothing next to the cache reads
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    scale = head_dim ** -0.5 if scale is None else scale
    kv_heads = k_pool.shape[2]
    group = heads // kv_heads
    block_t = triton.next_power_of_2(min(T, 16))
    block_m = max(16, triton.next_power_of_2(group) * block_t)  # tl.dot wants at least 16 rows
    # 64 keys a tile on a GPU; 16 in the interpreter, so that the CPU tests cross many tiles
    block_n = block_n or (64 if q.is_cuda else 16)
    # Triton's interpreter computes 16-bit dots wrongly, so there (and for float32) the products are float32
    low_precision = q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)
    if block_table is None:  # contiguous: row b is block b, as long as the row's capacity
        block_table = torch.arange(batch, dtype=torch.int32, device=q.device)[:, None]
    if span is None:
        span = block_table.shape[1] * k_pool.shape[1]
    tiles = triton.cdiv(T, block_t)
    if num_splits is None:
        # Split only while the programs are fewer than the multiprocessors, each split >= 1024 keys. On an
        # H200 (bench/RESULTS.md), splitting every context cost 512 keys 150 -> 200-300 us (a second launch and
        # three allocations, where launches dominate), 4096 keys came out even, 16384 keys gained 2-3x at
        # batch 1 and 8 (869 -> 269 us); at batch 32 (256 programs already) splits lost 5-20% but one case.
        programs = batch * kv_heads * tiles
        sms = _multiprocessors(q.device)
        num_splits = max(1, min(triton.cdiv(2 * sms, programs), span // 1024)) if programs < sms else 1
    chunk = triton.cdiv(triton.cdiv(max(span, 1), num_splits), block_n) * block_n  # keys per split
    num_splits = triton.cdiv(max(span, 1), chunk)
    split = num_splits > 1
    part = torch.empty(batch, T, heads, num_splits, head_dim, dtype=torch.float32, device=q.device) if split else out
    m = torch.empty(batch, T, heads, num_splits, dtype=torch.float32, device=q.device) if split else out
    l_sum = torch.empty_like(m) if split else out
    _verify_attention_kernel[(batch, kv_heads, tiles * num_splits)](
        q, k_pool, v_pool, part, m, l_sum, *(m.stride()[:3] if split else (0, 0, 0)),
        block_table, context_lens, query_lens,
        *q.stride(), *k_pool.stride(), *v_pool.stride(), *part.stride()[:3],
        part.stride(-1), block_table.stride(0), k_pool.shape[1], group, scale, num_splits, chunk,
        HEAD_DIM=head_dim, BLOCK_T=block_t, BLOCK_M=block_m, BLOCK_N=block_n, SPLIT=split,
        LOW_PRECISION=low_precision,
    )
    if split:
        _combine_splits[(batch * T * heads,)](part, m, l_sum, out, query_lens, T, heads, num_splits,
                                              HEAD_DIM=head_dim, SPLITS=triton.next_power_of_2(num_splits))
    return out.to(out_dtype or q.dtype)
