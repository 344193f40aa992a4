/* One decoder layer's attention on the CPU, after its q/k/v projection: RoPE on q and k, k and v written
 * into the KV cache, and causal attention of every new query over its row's cached keys, in one call.
 *
 * Why it exists: at decode size these are ~12 torch ops per layer (rotate, split, two cache writes, the
 * mask, SDPA and its transposes), 40-100 us each inside a step whose weights stream through the caches:
 * 3-5 ms of a 36 ms SmolLM2 step. The arithmetic is ~0.5 M multiply-adds per layer at 200 cached tokens.
 *
 * Cache: a pool of blocks [blocks, block_size, kv_heads, head_dim] with any strides (the last one 1) and a
 * block table per row, or, with no block table, one block per row (row b's keys are block b): the native
 * model's contiguous cache and the engine's paged pool are the same code. Key j of row b lives in block
 * table[b][j / block_size] at offset j % block_size. Padding tokens (position -1) write nothing and read
 * nothing; their output rows are zeros.
 *
 * Numerics follow the torch ops: RoPE as x * cos + rotate_half(x) * sin with a rounding to the model's dtype
 * after each product and the sum (sin carries rotate_half's sign, see kernels/runner.py: rotate); scores,
 * softmax and the weighted sum of values in float32 (as SDPA upcasts), one rounding of the output. Query t
 * of row b at position p sees keys 0..p. Up to MAX_QUERIES new tokens of a row are attended together, so
 * each key and value is loaded once for all of them (8 tokens at 200 keys, 9 query / 3 kv heads, bfloat16:
 * 145 -> 54 us per layer, with the dot products kept in registers), yet each query's numbers are the same
 * chain of operations as when it is alone: its bits do not depend on how many queries or rows share the call
 * (a verification pass reproduces plain decode steps).
 */
#include <immintrin.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_args.h"
#include "cpu_common.h"

#define MAX_GROUP 16 /* query heads per kv head */
#define MAX_QUERIES 4 /* new tokens of a row attended together: they share each key's load (a verification pass
                       * of 8 tokens, 3 kv heads: 6 pieces of work for the threads) */
#define MAX_QUERY_HEADS (MAX_QUERIES * MAX_GROUP)
#define PV_BLOCK 8 /* query heads summing values together: 16 accumulators, a value, a weight in registers */

typedef struct {
    char *base;             /* the pool's first element */
    long block, slot, head; /* strides in elements */
} Pool;

static inline long slot_of(const long *table, long max_blocks, long block_size, long b, long j, long *offset) {
    *offset = j % block_size;
    return table ? table[b * max_blocks + j / block_size] : b;
}

static inline void *at(const Pool *p, long blk, long off, long h, long elem) {
    return p->base + (blk * p->block + off * p->slot + h * p->head) * elem;
}

/* RoPE on one head of D values (float32 out): round(round(x * cos) + round(flip(x) * sin)), where flip(x)
 * swaps the two halves (x2, x1) */
static inline __attribute__((always_inline)) void rotate(const int BF16, const void *x, const void *cos,
                                                         const void *sin, long D, float *out) {
    const long half = D / 2;
    float xs[D], flipped[D];
    for (long d = 0; d < D; d += 16) {
        const __mmask16 m = D - d >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (D - d)) - 1);
        _mm512_mask_storeu_ps(xs + d, m, load16(BF16, x, d, m));
    }
    memcpy(flipped, xs + half, sizeof(float) * half);
    memcpy(flipped + half, xs, sizeof(float) * half);
    for (long d = 0; d < D; d += 16) {
        const __mmask16 m = D - d >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (D - d)) - 1);
        const __m512 a = round_to(BF16, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, xs + d), load16(BF16, cos, d, m)));
        const __m512 b = round_to(BF16, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, flipped + d), load16(BF16, sin, d, m)));
        _mm512_mask_storeu_ps(out + d, m, round_to(BF16, _mm512_add_ps(a, b)));
    }
}

static inline void store16(const int BF16, void *dst, long d, __mmask16 m, __m512 v) {
    if (BF16)
        _mm256_mask_storeu_epi16((uint16_t *)dst + d, m, to_bf16(v));
    else
        _mm512_mask_storeu_ps((float *)dst + d, m, v);
}

/* Lane j of the result: the sum of the 16 lanes of a[j]. Pairs of vectors are added within 128-bit blocks
 * (unpack, then shuffle), leaving keys 4i..4i+3 in each block of c[i]; the blocks are then summed across. */
static inline __m512 hsum16(const __m512 a[16]) {
    __m512 b[8], c[4];
    for (int i = 0; i < 8; i++)
        b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 4; i++)
        c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0x44),
                             _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0xEE));
    const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x44), _mm512_shuffle_f32x4(c[0], c[1], 0xEE));
    const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], 0x44), _mm512_shuffle_f32x4(c[2], c[3], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, 0x88), _mm512_shuffle_f32x4(s01, s23, 0xDD));
}

/* The weighted sums of values for NB query heads (NB a constant once inlined: the accumulators live in
 * registers) over features d..d+15: sum_j p_i[j] v_j in two FMA chains (even and odd keys, then added), each
 * value vector loaded once for all NB heads. Keys 0..common-1 are seen by every head, keys common..n-1 only
 * by the heads whose last key they do not pass: a head's sum is the same chain of FMAs over its keys 0..last
 * whichever heads share the call. Divided by each head's softmax sum (inv), rounded into out[i]. */
static inline __attribute__((always_inline)) void weigh_values(const int NB, const int BF16, float *const *p,
                                                               const long *last, const float *inv, long common,
                                                               long n, const char *vbase, const long *where,
                                                               long d, __mmask16 m, char *const *out) {
    const long elem = BF16 ? 2 : 4;
    __m512 even[PV_BLOCK], odd[PV_BLOCK];
    for (int i = 0; i < NB; i++) even[i] = odd[i] = _mm512_setzero_ps();
    long j = 0;
    for (; j + 2 <= common; j += 2) {
        const __m512 v0 = load16(BF16, vbase + where[j] * elem, d, m);
        const __m512 v1 = load16(BF16, vbase + where[j + 1] * elem, d, m);
        for (int i = 0; i < NB; i++) {
            even[i] = _mm512_fmadd_ps(_mm512_set1_ps(p[i][j]), v0, even[i]);
            odd[i] = _mm512_fmadd_ps(_mm512_set1_ps(p[i][j + 1]), v1, odd[i]);
        }
    }
    for (; j < n; j++) { /* an odd common key, then the keys some heads do not see */
        const __m512 vj = load16(BF16, vbase + where[j] * elem, d, m);
        for (int i = 0; i < NB; i++) {
            const __mmask16 seen = j <= last[i] ? (__mmask16)0xffff : 0;
            if (j & 1) odd[i] = _mm512_mask3_fmadd_ps(_mm512_set1_ps(p[i][j]), vj, odd[i], seen);
            else even[i] = _mm512_mask3_fmadd_ps(_mm512_set1_ps(p[i][j]), vj, even[i], seen);
        }
    }
    for (int i = 0; i < NB; i++)
        store16(BF16, out[i], d, m, _mm512_mul_ps(_mm512_add_ps(even[i], odd[i]), _mm512_set1_ps(inv[i])));
}

/* Attention of Q query heads (float32 rows of D; query head i sees keys 0..last[i], the last ones ascending
 * or not) of row b over kv head h, into out[i] (the model's dtype). The queries of one row share every key's
 * and value's load (a verification pass of k + 1 tokens reads its keys once, not k + 1 times), while each
 * head's numbers are the same chain of operations as when it is alone.
 * scratch: n = max(last) + 1 key offsets, then 16 keys as float32 rows, Q * n scores. */
static inline __attribute__((always_inline)) void attend(const int BF16, float *const *q, const long *last, long Q,
                                                         long D, float scale, const Pool *k, const Pool *v,
                                                         const long *table, long max_blocks, long block_size,
                                                         long b, long h, long *scratch, char *const *out) {
    const long elem = BF16 ? 2 : 4, Dp = (D + 15) / 16 * 16;
    long n = 0, common = LONG_MAX;
    for (long i = 0; i < Q; i++) {
        n = last[i] + 1 > n ? last[i] + 1 : n;
        common = last[i] + 1 < common ? last[i] + 1 : common;
    }
    long *where = scratch; /* element offset of key j in either pool (their strides are equal) */
    float *keys16 = (float *)(scratch + n), *scores = keys16 + 16 * Dp, *p[MAX_QUERY_HEADS];
    for (long j = 0, off = 0, i = 0; j < n; j++) { /* block by block: no division per key */
        const long blk = table ? table[b * max_blocks + i] : b;
        where[j] = blk * k->block + off * k->slot + h * k->head;
        if (++off == block_size) off = 0, i++;
    }
    float top[MAX_QUERY_HEADS], inv[MAX_QUERY_HEADS];
    for (long i = 0; i < Q; i++) p[i] = scores + i * n;
    for (long j0 = 0; j0 < n; j0 += 16) { /* scores[i][j] = scale * q_i . k_j, 16 keys at a time */
        const long keys = n - j0 < 16 ? n - j0 : 16;
        for (long jj = 0; jj < 16; jj++) /* as float32, once for all Q heads (zeros past D and past n) */
            for (long d = 0; d < Dp; d += 16) {
                const __mmask16 m = jj >= keys  ? 0
                                    : D - d >= 16 ? (__mmask16)0xffff
                                                  : (__mmask16)((1u << (D - d)) - 1);
                _mm512_storeu_ps(keys16 + jj * Dp + d,
                                 m ? load16(BF16, k->base + where[j0 + jj] * elem, d, m) : _mm512_setzero_ps());
            }
        for (long i = 0; i < Q; i++) {
            if (j0 > last[i]) continue;
            const long seen = last[i] + 1 - j0 < keys ? last[i] + 1 - j0 : keys;
            const __mmask16 km = seen == 16 ? (__mmask16)0xffff : (__mmask16)((1u << seen) - 1);
            __m512 dots[16]; /* lane sums of q_i * k_j for the 16 keys, features in order (registers: d outside) */
            for (long jj = 0; jj < 16; jj++) dots[jj] = _mm512_setzero_ps();
            for (long d = 0; d < Dp; d += 16) {
                const __mmask16 m = D - d >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (D - d)) - 1);
                const __m512 qd = _mm512_maskz_loadu_ps(m, q[i] + d);
                for (long jj = 0; jj < 16; jj++)
                    dots[jj] = _mm512_fmadd_ps(qd, _mm512_loadu_ps(keys16 + jj * Dp + d), dots[jj]);
            }
            const __m512 sc = _mm512_mul_ps(hsum16(dots), _mm512_set1_ps(scale));
            _mm512_mask_storeu_ps(p[i] + j0, km, sc);
            const float best = _mm512_mask_reduce_max_ps(km, sc);
            top[i] = j0 == 0 || best > top[i] ? best : top[i];
        }
    }
    for (long i = 0; i < Q; i++) { /* softmax numerators e^(s - max) and their sum */
        const long seen = last[i] + 1;
        __m512 total = _mm512_setzero_ps();
        for (long j = 0; j < seen; j += 16) {
            const __mmask16 m = seen - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (seen - j)) - 1);
            const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, p[i] + j), _mm512_set1_ps(top[i])));
            _mm512_mask_storeu_ps(p[i] + j, m, e);
            total = _mm512_add_ps(total, _mm512_maskz_mov_ps(m, e));
        }
        inv[i] = 1.0f / _mm512_reduce_add_ps(total);
    }
    for (long d = 0; d < D; d += 16) { /* sum_j e_j v_j / sum_j e_j, PV_BLOCK heads at a time */
        const __mmask16 m = D - d >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (D - d)) - 1);
        for (long i0 = 0; i0 < Q; i0 += PV_BLOCK) {
            const long nb = Q - i0 < PV_BLOCK ? Q - i0 : PV_BLOCK;
#define BLOCK(NB) \
    case NB: \
        weigh_values(NB, BF16, p + i0, last + i0, inv + i0, common, n, v->base, where, d, m, out + i0); \
        break;
            switch (nb) { BLOCK(1) BLOCK(2) BLOCK(3) BLOCK(4) BLOCK(5) BLOCK(6) BLOCK(7) BLOCK(8) }
#undef BLOCK
        }
    }
}

/* qkv [B, T, H + 2 Hkv, D] (the projection's output, contiguous), cos, sin [B, T, D], positions [B, T]
 * (-1: padding), the key and value pools of nblocks blocks with their strides, block_table [B, max_blocks]
 * or NULL (row b is block b), out [B, T, H, D]. Returns 0; -2, having written nothing, if a position or
 * block id falls outside the pool; -1 without memory for the scratch. */
int specdec_attention(const AttentionArgs *a) {
    const void *qkv = a->qkv, *cos = a->cos, *sin = a->sin;
    const long *positions = a->positions, *table = a->block_table;
    const long B = a->batch, T = a->T, H = a->heads, Hkv = a->kv_heads, D = a->head_dim;
    const long block_stride = a->block_stride, slot_stride = a->slot_stride, head_stride = a->head_stride;
    const long max_blocks = a->max_blocks, block_size = a->block_size, nblocks = a->blocks;
    void *kbase = a->keys, *vbase = a->values, *out = a->out;
    const float scale = a->scale;
    const int bf16 = a->bf16;
    if (Hkv < 1 || H % Hkv || H / Hkv > MAX_GROUP) return -2; /* the per-item arrays hold MAX_QUERY_HEADS */
    const long elem = bf16 ? 2 : 4, width = H + 2 * Hkv, G = H / Hkv;
    for (long bt = 0; bt < B * T; bt++) {
        const long pos = positions[bt];
        long off;
        if (pos < 0) continue;
        if (pos >= (table ? max_blocks * block_size : block_size)) return -2;
        for (long j = pos % block_size; j <= pos; j += block_size) { /* every block it reads: 0..pos */
            const long blk = slot_of(table, max_blocks, block_size, bt / T, j, &off);
            if (blk < 0 || blk >= nblocks) return -2;
        }
    }
    const Pool k = {kbase, block_stride, slot_stride, head_stride}, v = {vbase, block_stride, slot_stride, head_stride};
    float *q = malloc(sizeof(float) * B * T * H * D); /* rotated queries, float32 */
    if (!q) return -1;
    int failed = 0;
#pragma omp parallel
    {
        /* 1. RoPE; rotated keys and the values into the cache (each token's own slot: no two writers) */
#pragma omp for schedule(static)
        for (long bt = 0; bt < B * T; bt++) {
            const long b = bt / T, pos = positions[bt];
            const char *row = (const char *)qkv + bt * width * D * elem;
            const char *c = (const char *)cos + bt * D * elem, *s = (const char *)sin + bt * D * elem;
            if (pos < 0) continue;
            float rotated[D];
            for (long h = 0; h < H; h++) {
                if (bf16) rotate(1, row + h * D * elem, c, s, D, q + (bt * H + h) * D);
                else rotate(0, row + h * D * elem, c, s, D, q + (bt * H + h) * D);
            }
            long off;
            const long blk = slot_of(table, max_blocks, block_size, b, pos, &off);
            for (long h = 0; h < Hkv; h++) {
                if (bf16) rotate(1, row + (H + h) * D * elem, c, s, D, rotated);
                else rotate(0, row + (H + h) * D * elem, c, s, D, rotated);
                for (long d = 0; d < D; d += 16) {
                    const __mmask16 m = D - d >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (D - d)) - 1);
                    store16(bf16, at(&k, blk, off, h, elem), d, m, _mm512_maskz_loadu_ps(m, rotated + d));
                }
                memcpy(at(&v, blk, off, h, elem), row + (H + Hkv + h) * D * elem, D * elem);
            }
        }
        /* (the implied barrier: every key is in the cache before any query reads it) */
        /* 2. attention: up to MAX_QUERIES tokens of a row with one kv head at a time, their G query heads each */
        long longest = 0;
        for (long bt = 0; bt < B * T; bt++) longest = positions[bt] + 1 > longest ? positions[bt] + 1 : longest;
        const long Dp = (D + 15) / 16 * 16, chunks = (T + MAX_QUERIES - 1) / MAX_QUERIES;
        long *scratch = malloc(sizeof(long) * longest + sizeof(float) * (16 * Dp + MAX_QUERIES * G * longest) + 64);
        if (!scratch) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (long w = 0; w < B * chunks * Hkv; w++) {
            const long b = w / (chunks * Hkv), t0 = w / Hkv % chunks * MAX_QUERIES, h = w % Hkv;
            float *qs[MAX_QUERY_HEADS];
            char *outs[MAX_QUERY_HEADS];
            long last[MAX_QUERY_HEADS], Q = 0;
            for (long t = t0; t < t0 + MAX_QUERIES && t < T; t++) {
                const long bt = b * T + t, pos = positions[bt];
                char *o = (char *)out + (bt * H + h * G) * D * elem;
                if (pos < 0 || !scratch) {
                    memset(o, 0, G * D * elem);
                    continue;
                }
                for (long g = 0; g < G; g++, Q++) {
                    qs[Q] = q + (bt * H + h * G + g) * D;
                    outs[Q] = o + g * D * elem;
                    last[Q] = pos;
                }
            }
            if (!Q) continue;
            if (bf16)
                attend(1, qs, last, Q, D, scale, &k, &v, table, max_blocks, block_size, b, h, scratch, outs);
            else
                attend(0, qs, last, Q, D, scale, &k, &v, table, max_blocks, block_size, b, h, scratch, outs);
        }
        free(scratch);
    }
    free(q);
    return failed ? -1 : 0;
}
