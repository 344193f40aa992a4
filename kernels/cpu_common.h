/* What the CPU kernels share: float32 <-> bfloat16 on AVX-512 vectors of 16, and a vector e^x. */
#ifndef SPECDEC_CPU_COMMON_H
#define SPECDEC_CPU_COMMON_H
#include <immintrin.h>
#include <stdint.h>

/* float32 -> the nearest bfloat16 (BF16; else unchanged), ties to even as torch's cast; NaN stays a quiet NaN */
static inline __m512 round_to(const int BF16, __m512 v) {
    if (!BF16) return v;
    const __m512i u = _mm512_castps_si512(v), top = _mm512_set1_epi32((int)0xffff0000u);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_and_si512(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd)), top);
    const __m512i quiet = _mm512_or_si512(_mm512_and_si512(u, top), _mm512_set1_epi32(0x400000));
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), quiet);
    return _mm512_castsi512_ps(r);
}

/* float32 -> bfloat16 bits */
static inline __m256i to_bf16(__m512 v) {
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(round_to(1, v)), 16));
}

/* 16 features from k (mask m: the ones < K) as float32 */
static inline __m512 load16(const int BF16, const void *src, long k, __mmask16 m) {
    if (BF16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, (const uint16_t *)src + k)), 16));
    return _mm512_maskz_loadu_ps(m, (const float *)src + k);
}

/* e^x within ~2 float32 ulp: x = n ln2 + r, |r| <= ln2/2, e^r by its degree-7 Taylor polynomial (truncation
 * 0.35^8 / 8! = 5e-9, under an ulp), times 2^n by scalef, which saturates to inf as expf does; below -104
 * (e^-104 is under the smallest denormal) x is clamped so that r stays small and the result is 0. NaN stays
 * NaN (max_ps returns its second operand, x, when either is NaN). */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(_mm512_set1_ps(-104.0f), x);
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x); /* ln2 in two parts (Cody-Waite) */
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    const float c[8] = {1.0f / 5040, 1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f};
    __m512 p = _mm512_set1_ps(c[0]);
    for (int i = 1; i < 8; i++) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c[i]));
    return _mm512_scalef_ps(p, n);
}

#endif
