/* bfloat16 linear layer for decode and verification on x86 CPUs with AVX512-BF16: y = x @ w^T (+ bias).
 *
 * Why it exists: at a few rows, a linear layer is a pass over its weights and should run at memory speed.
 * On a 2-core AVX-512 VM, over SmolLM2-135M's weight shapes with weights out of cache, oneDNN's prepacked
 * bfloat16 path moves 8-18 GB/s at one row (worst on the small 576 x 576 and 960 x 576 matrices); this
 * loop moves 15-20 GB/s by streaming 8 weight rows at a time with a software prefetch two blocks ahead.
 *
 * Numerics: products and sums in float32 with one rounding to bfloat16 at the end, as the reference; but
 * vdpbf16ps treats denormal inputs as zero (bfloat16 below ~1.2e-38), where the float32 reference keeps them.
 *
 * Batch invariance: every output y[m, n] is accumulated in the same order (32-wide chunks of k, then one
 * fixed horizontal sum) whatever M is: each row's bits do not depend on the rows beside it. (The model uses
 * the kernel up to 8 rows only, and torch's SDPA is not row-invariant in bfloat16 either, so a verification
 * pass can still differ from plain steps in the last bit; speculative greedy == plain greedy is exact in
 * float32/float64, and reported as near-tie flips in bfloat16.)
 *
 * Built by specdec/kernels/cpu_linear.py with the system C compiler on first use (-O3 -march=native
 * -fopenmp). OpenMP is torch's own runtime: torch has already loaded a libgomp.so.1, and the dynamic
 * loader reuses it, so this shares torch's thread pool and its torch.set_num_threads setting.
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define NR 8 /* weight rows per block: 8 independent accumulators, 8 sequential streams for the prefetcher */
#define PREFETCH_BLOCKS 2

static inline uint16_t to_bf16(float f) { /* round to nearest even, as torch's cast (NaN: any quiet NaN) */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

int specdec_cpu_supported(void) { return __builtin_cpu_supports("avx512bf16"); }

/* Dot products of NX input rows (NX = 1 or 2, a constant once inlined) with the NR weight rows of a block,
 * into out[i][r]. Two input rows share each weight load (10-13% faster at 2-5 rows than one at a time);
 * every dot product is the same sequence of instructions either way, so a row's bits do not depend on
 * whether it was paired. */
static inline __attribute__((always_inline)) void dot_block(const uint16_t *const *rows, const uint16_t *const *xs,
                                                            const int NX, long K, int prefetch, float out[2][NR]) {
    const long kfull = K / 32, ktail = K % 32, kchunks = kfull + (ktail ? 1 : 0);
    const __mmask32 tail = (__mmask32)((1ull << ktail) - 1);
    __m512 acc[2][NR];
    for (int i = 0; i < NX; i++)
        for (int r = 0; r < NR; r++) acc[i][r] = _mm512_setzero_ps();
    for (long c = 0; c < kchunks; c++) {
        const __mmask32 mask = c < kfull ? (__mmask32)0xffffffffu : tail;
        __m512bh xv[2];
        for (int i = 0; i < NX; i++) xv[i] = (__m512bh)_mm512_maskz_loadu_epi16(mask, xs[i] + c * 32);
        for (int r = 0; r < NR; r++) {
            const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(mask, rows[r] + c * 32);
            if (prefetch) _mm_prefetch((const char *)(rows[r] + PREFETCH_BLOCKS * NR * K + c * 32), _MM_HINT_T0);
            for (int i = 0; i < NX; i++) acc[i][r] = _mm512_dpbf16_ps(acc[i][r], xv[i], wv);
        }
    }
    for (int i = 0; i < NX; i++)
        for (int r = 0; r < NR; r++) out[i][r] = _mm512_reduce_add_ps(acc[i][r]);
}

/* x [M, K], w [N, K], bias [N] or NULL, y [M, N]: all bfloat16 bit patterns, rows contiguous. */
void specdec_linear_bf16(const uint16_t *x, const uint16_t *w, const uint16_t *bias, uint16_t *y,
                         long M, long N, long K) {
    const long nblocks = (N + NR - 1) / NR;
#pragma omp parallel for schedule(static)
    for (long nb = 0; nb < nblocks; nb++) {
        const long n0 = nb * NR, nr = N - n0 < NR ? N - n0 : NR;
        const uint16_t *rows[NR];
        for (int r = 0; r < NR; r++) rows[r] = w + (n0 + (r < nr ? r : 0)) * K; /* short block: repeat row 0 */
        const int prefetch = nb + PREFETCH_BLOCKS < nblocks; /* the first pass over the block fetches ahead */
        for (long m = 0; m < M; m += 2) {
            const int nx = m + 1 < M ? 2 : 1;
            const uint16_t *xs[2] = {x + m * K, x + (m + nx - 1) * K}; /* odd M: the second is never read */
            float out[2][NR];
            if (nx == 2)
                dot_block(rows, xs, 2, K, prefetch && m == 0, out);
            else
                dot_block(rows, xs, 1, K, prefetch && m == 0, out);
            for (int i = 0; i < nx; i++)
                for (long r = 0; r < nr; r++) {
                    y[(m + i) * N + n0 + r] = to_bf16(bias ? out[i][r] + from_bf16(bias[n0 + r]) : out[i][r]);
                }
        }
    }
}
