/* Linear layer y = x @ w^T (+ bias) for decode, verification and prefill on x86 CPUs with AVX-512:
 * float32 or bfloat16 weights, packed once (cpu_linear.py: pack) so that one pass streams them in order.
 *
 * Why it exists: at a few rows, a linear layer is a pass over its weights and should run at memory speed;
 * at 2-16 rows (a verification pass) it should still cost about one pass. On a 2-core AVX-512 VM without
 * AMX, over SmolLM2-135M's weight shapes (all 211 linear layers, weights out of cache), torch's paths do
 * neither: MKL's float32 sgemm takes 28 ms at 1 row and 59 ms at 8; oneDNN's prepacked bfloat16 26 ms and
 * 40 ms. This kernel: float32 25 / 31 ms, bfloat16 14 / 19 ms, and it stays ahead up to 512 rows.
 *
 * Layout: weights in tiles of 32 output columns; inside a tile, for each pair of input features (k, k+1),
 * the 32 columns' values: bfloat16 [tiles, K/2, 32, 2] (each 32-bit lane holds w[n, k] low, w[n, k+1]
 * high), float32 [tiles, K/2, 2, 32]. A tile is one contiguous stream, read front to back, with a software
 * prefetch 4 KB ahead (the hardware prefetcher alone left 1 row at 15 GB/s; 4 KB ahead gives 18-20).
 * Quantized weights (kernels/quantized.py: int4 or int8 in groups along the input, w = q * scale + zero, the
 * GGUF Q4_0 / Q4_1 / Q8_0 blocks among them): the same tiles, per group a header of the 32 columns' float16
 * scales and zeros, then per pair of input features the 32 columns' values (int4: one byte per column, the
 * even feature in the low nibble; int8: 32 bytes of even features, 32 of odd ones). Each pair is dequantized
 * once per pass, exactly (q * scale is exact in float32, the FMA rounds once, as q * scale + zero does), and
 * feeds every row of the pass: with float32 activations the output is the float kernel's on the dequantized
 * weight, bit for bit.
 *
 * Arithmetic: float32 FMAs on float32 copies of the inputs (bfloat16 -> float32 is exact: a shift), two
 * accumulators (32 columns) per input row, up to 12 rows per pass over a tile (24 accumulators + 4 weight
 * registers). Not vdpbf16ps: on this CPU it retires 1.3 G/s per core (43 G multiply-adds), where two
 * float32 FMA ports give 5.5 G/s (88 G multiply-adds), so an 8-row pass was compute-bound at 31 ms with it.
 *
 * Fused around it, because each torch op costs 5-80 us at decode size and a decoder layer had ~25 of them
 * (9-11 ms of a 38 ms SmolLM2 step): on the input, the RMSNorm that precedes the q/k/v and gate/up
 * projections, or SiLU(gate) * up before the down projection; on the output, the residual add. Each follows
 * the torch ops it replaces, rounding to the model's dtype wherever they do (sums in another order).
 *
 * Batch invariance: y[m, n] is always the same chain of FMAs over k = 0, 1, 2, ... from zero, whatever M
 * is and however rows are grouped into passes: each row's bits do not depend on the rows beside it, so a
 * verification pass reproduces the bits of plain decode steps.
 *
 * Built with cpu_attention.c by specdec/kernels/cpu.py with the system C compiler on first use (-O3
 * -march=native -ffp-contract=off -fopenmp). OpenMP is torch's own runtime: torch has already loaded a
 * libgomp.so.1, and the dynamic loader reuses it, so this shares torch's thread pool and its
 * torch.set_num_threads setting.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_args.h"
#include "cpu_common.h"

#define TILE 32         /* output columns per tile: two zmm of float32 accumulators per input row */
#define MAX_PASS_ROWS 12 /* input rows per pass over a tile: 24 accumulators, 4 weights, 1 broadcast */
#define PREFETCH_BYTES 4096

int specdec_cpu_supported(void) { return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw"); }

/* The float32 weights of input features 2kp (even: e0 columns 0-15, e1 columns 16-31) and 2kp+1 (odd). */
static inline __attribute__((always_inline)) void load_pair(const int BF16, const void *tile, long kp, __m512 *e0,
                                                            __m512 *e1, __m512 *o0, __m512 *o1) {
    if (BF16) {
        const uint16_t *p = (const uint16_t *)tile + kp * 2 * TILE;
        const __m512i hi = _mm512_set1_epi32((int)0xffff0000u);
        const __m512i l0 = _mm512_loadu_si512(p), l1 = _mm512_loadu_si512(p + TILE);
        *e0 = _mm512_castsi512_ps(_mm512_slli_epi32(l0, 16));
        *e1 = _mm512_castsi512_ps(_mm512_slli_epi32(l1, 16));
        *o0 = _mm512_castsi512_ps(_mm512_and_si512(l0, hi));
        *o1 = _mm512_castsi512_ps(_mm512_and_si512(l1, hi));
    } else {
        const float *p = (const float *)tile + kp * 2 * TILE;
        *e0 = _mm512_loadu_ps(p), *e1 = _mm512_loadu_ps(p + 16);
        *o0 = _mm512_loadu_ps(p + 32), *o1 = _mm512_loadu_ps(p + 48);
    }
}

/* The float32 weights of one pair of input features from a quantized tile (BITS 4 or 8): q * scale + zero, the
 * scales and zeros of the pair's group in s0, s1, z0, z1 (columns 0-15, 16-31). int4: byte c holds column c's
 * even feature in its low nibble, its odd feature in the high one; int8: 32 bytes of even features, then 32
 * of odd ones. The FMA rounds once, as q * scale (exact: 8 + 11 significant bits) + zero does. */
static inline __attribute__((always_inline)) void load_quantized(const int BITS, const unsigned char *pair,
                                                                 const __m512 s[2], const __m512 z[2], __m512 *e0,
                                                                 __m512 *e1, __m512 *o0, __m512 *o1) {
    __m512i qe0, qe1, qo0, qo1;
    if (BITS == 4) {
        const __m512i low = _mm512_set1_epi32(15);
        const __m512i b0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)pair));
        const __m512i b1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(pair + 16)));
        qe0 = _mm512_and_si512(b0, low), qo0 = _mm512_srli_epi32(b0, 4);
        qe1 = _mm512_and_si512(b1, low), qo1 = _mm512_srli_epi32(b1, 4);
    } else {
        qe0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)pair));
        qe1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(pair + 16)));
        qo0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(pair + 32)));
        qo1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(pair + 48)));
    }
    *e0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(qe0), s[0], z[0]);
    *e1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(qe1), s[1], z[1]);
    *o0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(qo0), s[0], z[0]);
    *o1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(qo1), s[1], z[1]);
}

/* Bytes of one pair of input features of a tile, and of a quantized group's header (32 float16 scales, then
 * 32 float16 zeros). */
#define PAIR_BYTES(BF16, BITS) ((BITS) == 4 ? TILE : (BITS) == 8 ? 2 * TILE : ((BF16) ? 2 : 4) * 2 * TILE)
#define HEADER_BYTES(BITS) ((BITS) ? 4 * TILE : 0)

/* One input row as float32, through the fused prologue, into row[0 .. 2*K2): x's K features, or
 * SiLU(gate) * up from its 2K (gated), then RMSNorm (norm != NULL). Rounds to the model's dtype where the
 * torch ops do: silu(gate) and its product with up; x * rsqrt(mean(x^2) + eps); the norm weight's product.
 * An odd K gets a zero feature, as the packed weights do. */
static inline __attribute__((always_inline)) void input_row(const int BF16, const void *x, long K, int gated,
                                                            const void *norm, float eps, float *row) {
    const __m512 one = _mm512_set1_ps(1.0f);
    const __m512i sign = _mm512_set1_epi32((int)0x80000000u);
    __m512 squares = _mm512_setzero_ps();
    for (long k = 0; k < K; k += 16) {
        const __mmask16 m = K - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (K - k)) - 1);
        __m512 v = load16(BF16, x, k, m);
        if (gated) { /* silu(g) = g / (1 + e^-g), as torch computes it */
            const __m512 up = load16(BF16, (const char *)x + K * (BF16 ? 2 : 4), k, m);
            const __m512 minus = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(v), sign));
            const __m512 act = round_to(BF16, _mm512_div_ps(v, _mm512_add_ps(one, exp16(minus))));
            v = round_to(BF16, _mm512_mul_ps(act, up));
        }
        squares = _mm512_fmadd_ps(v, v, squares);
        _mm512_mask_storeu_ps(row + k, m, v);
    }
    if (norm) {
        const __m512 scale = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(squares) / (float)K + eps));
        for (long k = 0; k < K; k += 16) {
            const __mmask16 m = K - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (K - k)) - 1);
            const __m512 v = round_to(BF16, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, row + k), scale));
            _mm512_mask_storeu_ps(row + k, m, round_to(BF16, _mm512_mul_ps(load16(BF16, norm, k, m), v)));
        }
    }
    if (K & 1) row[K] = 0.0f;
}

/* The ROWS rows of accumulators acc (columns n0 .. n0+31 of y) + bias, + residual, stored in the model's dtype. */
static inline __attribute__((always_inline)) void store_rows(const int ROWS, const int BF16, __m512 acc[][2],
                                                             const void *bias, const void *residual, void *y, long N,
                                                             long n0) {
    for (int h = 0; h < 2; h++) {
        const long c0 = n0 + h * 16;
        if (c0 >= N) break;
        const __mmask16 keep = N - c0 >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (N - c0)) - 1);
        __m512 b = _mm512_setzero_ps();
        if (bias) b = load16(BF16, bias, c0, keep);
        for (int i = 0; i < ROWS; i++) {
            __m512 v = bias ? _mm512_add_ps(acc[i][h], b) : acc[i][h];
            if (residual) /* the layer's output rounds to the model's dtype, then the sum does again */
                v = _mm512_add_ps(load16(BF16, residual, i * N + c0, keep), round_to(BF16, v));
            if (BF16)
                _mm256_mask_storeu_epi16((uint16_t *)y + i * N + c0, keep, to_bf16(v));
            else
                _mm512_mask_storeu_ps((float *)y + i * N + c0, keep, v);
        }
    }
}


/* y[i, n0 .. n0+31] for the ROWS input rows of xf (float32, rows of 2*K2) against one tile, whose weights
 * are BF16's float type (BITS 0: one group of K2 pairs) or quantized in groups of G2 pairs. ROWS, BF16, BITS
 * and PREFETCH are constants once inlined, so the accumulators live in registers. */
static inline __attribute__((always_inline)) void tile_pass(const int ROWS, const int BF16, const int BITS,
                                                            const int PREFETCH, const float *xf, long K2, long G2,
                                                            const void *tile, const void *bias,
                                                            const void *residual, void *y, long N, long n0) {
    const long pair_bytes = PAIR_BYTES(BF16, BITS), group_bytes = HEADER_BYTES(BITS) + G2 * pair_bytes;
    __m512 acc[MAX_PASS_ROWS][2];
    for (int i = 0; i < ROWS; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (long g = 0; g < K2 / G2; g++) {
        const unsigned char *group = (const unsigned char *)tile + g * group_bytes, *pairs = group + HEADER_BYTES(BITS);
        if (PREFETCH) /* the stream's header lines too: left out, they were one demand miss in every 5-10 lines */
            for (long line = 0; line < HEADER_BYTES(BITS); line += 64)
                _mm_prefetch((const char *)group + PREFETCH_BYTES + line, _MM_HINT_T1);
        __m512 s[2], z[2];
        if (BITS)
            for (int h = 0; h < 2; h++) {
                s[h] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(group + 32 * h)));
                z[h] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(group + 64 + 32 * h)));
            }
        for (long j = 0; j < G2; j++) {
            const long kp = g * G2 + j;
            if (PREFETCH) /* past the tile's end it fetches the next tile, which this thread usually takes next */
                for (long line = 0; line < pair_bytes; line += 64)
                    _mm_prefetch((const char *)pairs + j * pair_bytes + PREFETCH_BYTES + line, _MM_HINT_T1);
            __m512 e0, e1, o0, o1;
            if (BITS) load_quantized(BITS, pairs + j * pair_bytes, s, z, &e0, &e1, &o0, &o1);
            else load_pair(BF16, tile, kp, &e0, &e1, &o0, &o1);
            for (int i = 0; i < ROWS; i++) {
                const __m512 xe = _mm512_set1_ps(xf[i * 2 * K2 + 2 * kp]);
                const __m512 xo = _mm512_set1_ps(xf[i * 2 * K2 + 2 * kp + 1]);
                acc[i][0] = _mm512_fmadd_ps(xe, e0, acc[i][0]);
                acc[i][1] = _mm512_fmadd_ps(xe, e1, acc[i][1]);
                acc[i][0] = _mm512_fmadd_ps(xo, o0, acc[i][0]);
                acc[i][1] = _mm512_fmadd_ps(xo, o1, acc[i][1]);
            }
        }
    }
    store_rows(ROWS, BF16, acc, bias, residual, y, N, n0);
}

#define PASS(n) \
    case n: \
        if (first) tile_pass(n, BF16, BITS, 1, xf, K2, G2, tile, bias, residual, y, N, n0); \
        else tile_pass(n, BF16, BITS, 0, xf, K2, G2, tile, bias, residual, y, N, n0); \
        break;

static inline __attribute__((always_inline)) void dispatch(const int BF16, const int BITS, long rows, int first,
                                                           const float *xf, long K2, long G2, const void *tile,
                                                           const void *bias, const void *residual, void *y, long N,
                                                           long n0) {
    switch (rows) {
        PASS(1) PASS(2) PASS(3) PASS(4) PASS(5) PASS(6) PASS(7) PASS(8) PASS(9) PASS(10) PASS(11) PASS(12)
    }
}

/* Activations quantized to int8 (act8): each input row, after the fused prologue, in blocks of 32 features
 * (the last one padded with zeros): dx = max |x| / 127, xq = round(x / dx) to the nearest, ties to even (0
 * where dx is 0); per weight group g, S[g] = the sum over its blocks, in order, of dx * (the block's sum of
 * xq). The weight's layout for them: per tile and group the same header, then per block of 32 features, per
 * half of the tile (columns 0-15, 16-31), per quad j of features (4j .. 4j+3) one 64-byte vector whose lane c
 * holds column c's 4 values: int8 8 quads (512 bytes a half); int4 4 vectors (256 bytes a half), quad j in the
 * low nibbles and quad j + 4 in the high ones. VNNI's vpdpbusd multiplies the 4 unsigned values of a lane by
 * 4 signed activations and adds the products to the lane's int32, exactly (|sum| < 2^20 per block); CPUs
 * without VNNI compute the same integers with 32-bit multiplies (dot4).
 *
 * y[m, n] = sum over groups g, in order, of (p_g * scale + S[g] * zero), each product and sum rounded in
 * float32, where p_g = the sum over g's blocks, in order, of float(isum) * dx and isum = sum xq * q: since
 * w = q * scale + zero, this is x @ w^T with x replaced by its int8 blocks. kernels/quantized.py:
 * linear_int8_activations computes the same operations in torch, the reference this is tested against. */
#define QBLOCK 32
#define MAX_Q8_ROWS 4 /* per pass: 8 int32 + 8 float32 accumulators, the partial sums and weights beside them */
/* per pass where a group is one block (GGUF's Q4_0, Q4_1 and Q8_0; groups of 32): a block's partial sum goes
 * straight into the accumulators, so 6 rows fit, and a verification pass of 5 or 6 tokens reads each weight
 * vector once instead of twice */
#define MAX_Q8_ROWS_ONE_BLOCK 6
#define BLOCK_BYTES(BITS) ((BITS) * QBLOCK * TILE / 8)

/* acc + the products of lane i's 4 unsigned bytes of w with its 4 signed bytes of x, summed per lane (vpdpbusd);
 * without VNNI, the same integers byte by byte (exact: no intermediate can overflow). */
static inline __m512i dot4(__m512i acc, __m512i w, __m512i x) {
#ifdef __AVX512VNNI__
    return _mm512_dpbusd_epi32(acc, w, x);
#else
    for (int i = 0; i < 4; i++) {
        const __m512i wi = _mm512_and_si512(_mm512_srli_epi32(w, 8 * i), _mm512_set1_epi32(255));
        const __m512i xi = _mm512_srai_epi32(_mm512_slli_epi32(x, 24 - 8 * i), 24);
        acc = _mm512_add_epi32(acc, _mm512_mullo_epi32(wi, xi));
    }
    return acc;
#endif
}

static inline void quantize_row(const float *xf, long K, long KB, long GB, int8_t *xq, float *dx, float *S) {
    for (long b = 0; b < KB; b++) {
        __m512 v[2];
        __m512 amax = _mm512_setzero_ps();
        for (int h = 0; h < 2; h++) {
            const long k = b * QBLOCK + 16 * h, left = K - k;
            const __mmask16 m = left >= 16 ? (__mmask16)0xffff : left > 0 ? (__mmask16)((1u << left) - 1) : 0;
            v[h] = _mm512_maskz_loadu_ps(m, xf + k);
            amax = _mm512_max_ps(amax, _mm512_abs_ps(v[h]));
        }
        const float d = _mm512_reduce_max_ps(amax) / 127.0f;
        int sum = 0;
        for (int h = 0; h < 2; h++) {
            __m512i q = _mm512_setzero_si512();
            if (d > 0.0f) /* round to nearest, ties to even: the default rounding mode */
                q = _mm512_max_epi32(_mm512_min_epi32(_mm512_cvtps_epi32(_mm512_div_ps(v[h], _mm512_set1_ps(d))),
                                                      _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
            _mm_storeu_si128((__m128i *)(xq + b * QBLOCK + 16 * h), _mm512_cvtepi32_epi8(q));
            sum += _mm512_reduce_add_epi32(q);
        }
        dx[b] = d;
        const float t = d * (float)sum;
        S[b / GB] = b % GB ? S[b / GB] + t : t;
    }
}

/* y[i, n0 .. n0+31] for ROWS rows of int8 activations xq (rows of KB blocks, with dx [KB] and S [KB / GB] per
 * row) against one tile quantized in groups of GB blocks (the layout above). */
static inline __attribute__((always_inline)) void tile_pass_q8(const int ROWS, const int BF16, const int BITS,
                                                               const int PREFETCH, const int8_t *xq, const float *dx,
                                                               const float *S, long KB, long GB, const void *tile,
                                                               const void *bias, const void *residual, void *y,
                                                               long N, long n0) {
    const long group_bytes = HEADER_BYTES(BITS) + GB * BLOCK_BYTES(BITS), groups = KB / GB;
    const __m512i low = _mm512_set1_epi8(15);
    __m512 acc[MAX_Q8_ROWS_ONE_BLOCK][2], p[MAX_Q8_ROWS_ONE_BLOCK][2];
    for (int i = 0; i < ROWS; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (long g = 0; g < groups; g++) {
        const unsigned char *group = (const unsigned char *)tile + g * group_bytes;
        if (PREFETCH) /* the header lines (tile_pass) */
            for (long line = 0; line < HEADER_BYTES(BITS); line += 64)
                _mm_prefetch((const char *)group + PREFETCH_BYTES + line, _MM_HINT_T1);
        for (long bb = 0; bb < GB; bb++) {
            const long b = g * GB + bb;
            const unsigned char *block = group + HEADER_BYTES(BITS) + bb * BLOCK_BYTES(BITS);
            if (PREFETCH)
                for (long line = 0; line < BLOCK_BYTES(BITS); line += 64)
                    _mm_prefetch((const char *)block + PREFETCH_BYTES + line, _MM_HINT_T1);
            __m512i isum[MAX_Q8_ROWS_ONE_BLOCK][2]; /* both halves of the tile per row: each broadcast serves two */
            for (int i = 0; i < ROWS; i++) isum[i][0] = isum[i][1] = _mm512_setzero_si512();
            const int per_half = BITS == 4 ? 4 : 8; /* 64-byte vectors per half of the tile */
            for (int j = 0; j < per_half; j++) {
                const __m512i w0 = _mm512_loadu_si512(block + j * 64);
                const __m512i w1 = _mm512_loadu_si512(block + (per_half + j) * 64);
                const __m512i q0 = BITS == 4 ? _mm512_and_si512(w0, low) : w0;
                const __m512i q1 = BITS == 4 ? _mm512_and_si512(w1, low) : w1;
                for (int i = 0; i < ROWS; i++) {
                    const __m512i xj = _mm512_set1_epi32(((const int32_t *)(xq + (i * KB + b) * QBLOCK))[j]);
                    isum[i][0] = dot4(isum[i][0], q0, xj);
                    isum[i][1] = dot4(isum[i][1], q1, xj);
                }
                if (BITS == 4) { /* the high nibbles: quad j + 4 */
                    const __m512i r0 = _mm512_and_si512(_mm512_srli_epi16(w0, 4), low);
                    const __m512i r1 = _mm512_and_si512(_mm512_srli_epi16(w1, 4), low);
                    for (int i = 0; i < ROWS; i++) {
                        const __m512i xj = _mm512_set1_epi32(((const int32_t *)(xq + (i * KB + b) * QBLOCK))[j + 4]);
                        isum[i][0] = dot4(isum[i][0], r0, xj);
                        isum[i][1] = dot4(isum[i][1], r1, xj);
                    }
                }
            }
            for (int i = 0; i < ROWS; i++) {
                const __m512 d = _mm512_set1_ps(dx[i * KB + b]);
                for (int h = 0; h < 2; h++) {
                    const __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(isum[i][h]), d);
                    p[i][h] = bb ? _mm512_add_ps(p[i][h], t) : t;
                }
            }
        }
        for (int h = 0; h < 2; h++) {
            const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(group + 32 * h)));
            const __m512 z = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(group + 64 + 32 * h)));
            for (int i = 0; i < ROWS; i++) {
                const __m512 t = _mm512_add_ps(_mm512_mul_ps(p[i][h], s),
                                               _mm512_mul_ps(_mm512_set1_ps(S[i * groups + g]), z));
                acc[i][h] = _mm512_add_ps(acc[i][h], t);
            }
        }
    }
    store_rows(ROWS, BF16, acc, bias, residual, y, N, n0);
}

#define PASS_Q8(n) \
    case n: \
        if (first) tile_pass_q8(n, BF16, BITS, 1, xq, dx, S, KB, GB, tile, bias, residual, y, N, n0); \
        else tile_pass_q8(n, BF16, BITS, 0, xq, dx, S, KB, GB, tile, bias, residual, y, N, n0); \
        break;

static inline __attribute__((always_inline)) void dispatch_q8(const int BF16, const int BITS, long rows, int first,
                                                              const int8_t *xq, const float *dx, const float *S,
                                                              long KB, long GB, const void *tile, const void *bias,
                                                              const void *residual, void *y, long N, long n0) {
    switch (rows) { PASS_Q8(1) PASS_Q8(2) PASS_Q8(3) PASS_Q8(4) }
}

/* dispatch_q8 for groups of one block: GB a constant 1, up to MAX_Q8_ROWS_ONE_BLOCK rows */
static inline __attribute__((always_inline)) void dispatch_q8_one_block(const int BF16, const int BITS, long rows,
                                                                        int first, const int8_t *xq, const float *dx,
                                                                        const float *S, long KB, const void *tile,
                                                                        const void *bias, const void *residual,
                                                                        void *y, long N, long n0) {
    const long GB = 1;
    switch (rows) { PASS_Q8(1) PASS_Q8(2) PASS_Q8(3) PASS_Q8(4) PASS_Q8(5) PASS_Q8(6) }
}

/* The passes over every tile for float activations xf [M, 2*K2] (rows of tile_pass). */
static void float_passes(const LinearArgs *a, const float *xf, long K2, long G2) {
    const long M = a->rows, N = a->out, tiles = (N + TILE - 1) / TILE, elem = a->bf16 ? 2 : 4;
    const long tile_bytes = K2 / G2 * (HEADER_BYTES(a->bits) + G2 * PAIR_BYTES(a->bf16, a->bits));
    const long passes = (M + MAX_PASS_ROWS - 1) / MAX_PASS_ROWS, rows = passes ? (M + passes - 1) / passes : 1;
    const void *bias = a->bias;
    const int bf16 = a->bf16, bits = a->bits;
#pragma omp parallel for schedule(static)
    for (long t = 0; t < tiles; t++) {
        const void *tile = (const char *)a->weight + t * tile_bytes;
        for (long m0 = 0; m0 < M; m0 += rows) { /* later passes find the tile in L2: prefetch on the first */
            const long r = M - m0 < rows ? M - m0 : rows;
            void *ym = (char *)a->y + m0 * N * elem;
            const void *res = a->residual ? (const char *)a->residual + m0 * N * elem : NULL;
            const float *xm = xf + m0 * 2 * K2;
#define FORMAT(BF16, BITS) dispatch(BF16, BITS, r, m0 == 0, xm, K2, G2, tile, bias, res, ym, N, t * TILE)
            if (bf16) {
                if (bits == 4) FORMAT(1, 4);
                else if (bits == 8) FORMAT(1, 8);
                else FORMAT(1, 0);
            } else {
                if (bits == 4) FORMAT(0, 4);
                else if (bits == 8) FORMAT(0, 8);
                else FORMAT(0, 0);
            }
#undef FORMAT
        }
    }
}

/* The passes over every tile for int8 activations (made here from xf [M, 2*K2]) against a weight quantized in
 * groups of GB blocks of 32 features. Returns 0, or -1 without memory for them. */
static int int8_passes(const LinearArgs *a, const float *xf, long K2, long GB) {
    const long M = a->rows, N = a->out, K = a->in, tiles = (N + TILE - 1) / TILE, elem = a->bf16 ? 2 : 4;
    const long KB = (K + QBLOCK - 1) / QBLOCK, groups = KB / GB;
    const long tile_bytes = groups * (HEADER_BYTES(a->bits) + GB * BLOCK_BYTES(a->bits));
    const long most = GB == 1 ? MAX_Q8_ROWS_ONE_BLOCK : MAX_Q8_ROWS;
    const long passes = (M + most - 1) / most, rows = passes ? (M + passes - 1) / passes : 1;
    int8_t *xq = malloc(M * KB * QBLOCK + 1);
    float *dx = malloc(sizeof(float) * (M * (KB + groups) + 1)), *S = dx + M * KB;
    if (!xq || !dx) {
        free(xq), free(dx);
        return -1;
    }
    for (long m = 0; m < M; m++)
        quantize_row(xf + m * 2 * K2, K, KB, GB, xq + m * KB * QBLOCK, dx + m * KB, S + m * groups);
    const void *bias = a->bias;
    const int bf16 = a->bf16, bits = a->bits;
#pragma omp parallel for schedule(static)
    for (long t = 0; t < tiles; t++) {
        const void *tile = (const char *)a->weight + t * tile_bytes;
        for (long m0 = 0; m0 < M; m0 += rows) {
            const long r = M - m0 < rows ? M - m0 : rows;
            void *ym = (char *)a->y + m0 * N * elem;
            const void *res = a->residual ? (const char *)a->residual + m0 * N * elem : NULL;
            const int8_t *xm = xq + m0 * KB * QBLOCK;
            const float *dm = dx + m0 * KB, *Sm = S + m0 * groups;
#define FORMAT(BF16, BITS) \
    do { \
        if (GB == 1) dispatch_q8_one_block(BF16, BITS, r, m0 == 0, xm, dm, Sm, KB, tile, bias, res, ym, N, t * TILE); \
        else dispatch_q8(BF16, BITS, r, m0 == 0, xm, dm, Sm, KB, GB, tile, bias, res, ym, N, t * TILE); \
    } while (0)
            if (bf16) {
                if (bits == 4) FORMAT(1, 4);
                else FORMAT(1, 8);
            } else {
                if (bits == 4) FORMAT(0, 4);
                else FORMAT(0, 8);
            }
#undef FORMAT
        }
    }
    free(xq), free(dx);
    return 0;
}

/* x [M, K] (bfloat16 bits if bf16, else float32; [M, 2K] if gated), packed weights p (see the layouts
 * above), bias [N] of the same type or NULL, norm [K] (RMSNorm weight, over norm_parts slices of the row) or
 * NULL with its eps, residual [M, N]
 * or NULL, y [M, N]. Returns 0; -1 without memory for the float32 copy of x; -2 for a format it cannot take. */
int specdec_linear(const LinearArgs *a) {
    const long M = a->rows, K = a->in, K2 = (K + 1) / 2, elem = a->bf16 ? 2 : 4, x_row = (a->gated ? 2 : 1) * K;
    const int bits = a->bits;
    /* pairs per group: the float formats, and group_size 0 (one scale per output channel), are one group */
    const long G2 = bits && a->group_size ? a->group_size / 2 : K2;
    if ((bits != 0 && bits != 4 && bits != 8) || a->group_size < 0 || a->group_size % 2 || K2 % G2) return -2;
    /* int8 activations: groups of whole blocks of 32 features (per channel: all the blocks) */
    const long GB = a->group_size ? a->group_size / QBLOCK : (K + QBLOCK - 1) / QBLOCK;
    if (a->act8 && (!bits || a->group_size % QBLOCK)) return -2;
    /* a norm over equal slices of the row: each an even number of features (no padding between them) */
    const long parts = a->norm_parts > 1 ? a->norm_parts : 1, P = K / parts;
    if (parts > 1 && (K % parts || P % 2 || a->gated)) return -2;
    /* x as float32 rows of 2*K2, read 2*N/32 times per row by the passes below, so made once here */
    float *xf = malloc(sizeof(float) * (M * 2 * K2 + 1));
    if (!xf) return -1;
    for (long m = 0; m < M; m++) {
        for (long p = 0; p < parts; p++) {
            const void *xm = (const char *)a->x + (m * x_row + p * P) * elem;
            const void *norm = a->norm ? (const char *)a->norm + p * P * elem : NULL;
            if (a->bf16)
                input_row(1, xm, P, a->gated, norm, a->eps, xf + m * 2 * K2 + p * P);
            else
                input_row(0, xm, P, a->gated, norm, a->eps, xf + m * 2 * K2 + p * P);
        }
    }
    int failed = 0;
    if (a->act8) failed = int8_passes(a, xf, K2, GB);
    else float_passes(a, xf, K2, G2);
    free(xf);
    return failed;
}
