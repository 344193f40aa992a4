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

/* x [M, K] (bfloat16 bits if bf16, else float32; [M, 2K] if gated), packed weights p (see the layout
 * above), bias [N] of the same type or NULL, norm [K] (RMSNorm weight) or NULL with its eps, residual [M, N]
 * or NULL, y [M, N]. Returns 0, or -1 if the float32 copy of x cannot be had. */
int specdec_linear(const LinearArgs *a) {
    const void *x = a->x, *p = a->weight, *bias = a->bias, *norm = a->norm, *residual = a->residual;
    void *y = a->y;
    const long M = a->rows, N = a->out, K = a->in;
    const float eps = a->eps;
    const int bf16 = a->bf16, gated = a->gated, bits = a->bits;
    const long K2 = (K + 1) / 2, tiles = (N + TILE - 1) / TILE, elem = bf16 ? 2 : 4, x_row = (gated ? 2 : 1) * K;
    /* pairs per group: the float formats, and group_size 0 (one scale per output channel), are one group */
    const long G2 = bits && a->group_size ? a->group_size / 2 : K2;
    if ((bits != 0 && bits != 4 && bits != 8) || a->group_size < 0 || a->group_size % 2 || K2 % G2) return -2;
    const long tile_bytes = K2 / G2 * (HEADER_BYTES(bits) + G2 * PAIR_BYTES(bf16, bits));
    const long passes = (M + MAX_PASS_ROWS - 1) / MAX_PASS_ROWS, rows = passes ? (M + passes - 1) / passes : 1;
    /* x as float32 rows of 2*K2, read 2*N/32 times per row by the passes below, so made once here */
    float *xf = malloc(sizeof(float) * (M * 2 * K2 + 1));
    if (!xf) return -1;
    for (long m = 0; m < M; m++) {
        const void *xm = (const char *)x + m * x_row * elem;
        if (bf16)
            input_row(1, xm, K, gated, norm, eps, xf + m * 2 * K2);
        else
            input_row(0, xm, K, gated, norm, eps, xf + m * 2 * K2);
    }
#pragma omp parallel for schedule(static)
    for (long t = 0; t < tiles; t++) {
        const void *tile = (const char *)p + t * tile_bytes;
        for (long m0 = 0; m0 < M; m0 += rows) { /* later passes find the tile in L2: prefetch on the first */
            const long r = M - m0 < rows ? M - m0 : rows;
            void *ym = (char *)y + m0 * N * elem;
            const void *res = residual ? (const char *)residual + m0 * N * elem : NULL;
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
    free(xf);
    return 0;
}
