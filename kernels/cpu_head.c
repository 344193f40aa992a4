/* A draft head's greedy drafts in one call on the CPU (models/head.py, specdec/proposers.py: HeadProposer):
 * k head steps, each the fc layer over the token's embedding and its predecessor's feature (both RMSNorms
 * fused into it), the head's decoder layers (cpu_layers.c), its output layer over the kept ids (the final
 * RMSNorm fused) and the argmax, the next step reading the drafted token and the feature just predicted.
 *
 * Why it exists: from Python a head step is ~100 small torch ops around its three kernel calls (input
 * concatenation, RoPE angles, cache bookkeeping, the gather of the drafting token, the argmax): ~0.6 ms of a
 * SmolLM2 head step whose kernels take ~0.2 ms, 0.08-0.1 of a plain step of the target for each draft. Here
 * they are C loops over a few rows. The numbers are the Python loop's: the same kernel calls on the same
 * rows, RoPE read from a table of the model's own angles, the first maximum's id as torch's argmax picks it;
 * the drafts equal the Python loop's bit for bit (tests/test_head.py).
 *
 * The first step runs the rows of HeadArgs.input (each row's unseen tokens, as generate() hands them to the
 * head); each later step one row per sequence at position next[b] + step - 1. The head's cache receives every
 * step's keys and values; its features do not (the next step reads them from the scratch). */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "cpu_args.h"
#include "cpu_common.h"

/* A row of n values from src (bfloat16 bits if src_bf16, else float32) to dst in the other format or the same
 * (float32 -> bfloat16 to the nearest, ties to even, as torch's cast). */
static void convert_row(const void *src, int src_bf16, void *dst, int dst_bf16, long n) {
    if (src_bf16 == dst_bf16) {
        memcpy(dst, src, n * (src_bf16 ? 2 : 4));
        return;
    }
    for (long i = 0; i < n; i += 16) {
        const __mmask16 m = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1);
        const __m512 v = load16(src_bf16, src, i, m);
        if (dst_bf16) _mm256_mask_storeu_epi16((uint16_t *)dst + i, m, to_bf16(v));
        else _mm512_mask_storeu_ps((float *)dst + i, m, v);
    }
}

/* The index of the first maximum of row[0 .. n) (a NaN counts as the maximum, as torch's argmax has it) */
static long argmax(const void *row, int bf16, long n) {
    long best = 0;
    float top = -INFINITY;
    for (long i = 0; i < n; i++) {
        float v;
        if (bf16) {
            const uint32_t bits = (uint32_t)((const uint16_t *)row)[i] << 16;
            memcpy(&v, &bits, 4);
        } else {
            v = ((const float *)row)[i];
        }
        if (isnan(v)) return i;
        if (v > top || i == 0) top = v, best = i;
    }
    return best;
}

/* Returns 0; -2 (nothing written to the cache by the failing step) for a position past the RoPE table or the
 * pool; -1 without memory for a kernel's scratch. */
int specdec_head_drafts(const HeadArgs *a) {
    const int bf16 = a->layers.attention.bf16;
    const long B = a->batch, H = a->layers.hidden, D = a->layers.attention.head_dim, kept = a->lm_head.out;
    const long elem = bf16 ? 2 : 4;
    for (long s = 0; s < a->steps; s++) {
        const long T = s == 0 ? a->T : 1, M = B * T;
        long *positions = s == 0 ? (long *)a->positions : a->step_positions;
        for (long m = 0; m < M; m++) { /* the rows' inputs and RoPE angles */
            const long b = m / T;
            if (s > 0) {
                positions[b] = a->next[b] < 0 ? -1 : a->next[b] + s - 1;
                const long token = a->drafts[b * a->steps + s - 1];
                char *row = (char *)a->input + m * 2 * H * elem;
                convert_row((const char *)a->embedding + token * H * (a->embedding_bf16 ? 2 : 4),
                            a->embedding_bf16, row, bf16, H);
                memcpy(row + H * elem, (const char *)a->features + b * H * elem, H * elem);
            }
            const long p = positions[m] < 0 ? 0 : positions[m];
            if (p >= a->rope_len) return -2;
            memcpy((char *)a->cos + m * D * elem, (const char *)a->cos_table + p * D * elem, D * elem);
            memcpy((char *)a->sin + m * D * elem, (const char *)a->sin_table + p * D * elem, D * elem);
        }
        LinearArgs fc = a->fc;
        fc.x = a->input, fc.y = a->layers.x, fc.rows = M;
        LayersArgs layers = a->layers;
        layers.attention.positions = positions, layers.attention.batch = B, layers.attention.T = T;
        layers.attention.cos = a->cos, layers.attention.sin = a->sin;
        int failed = specdec_linear(&fc);
        if (!failed) failed = specdec_layers(&layers);
        if (failed) return failed;
        for (long b = 0; b < B; b++) { /* the feature each row drafts from: its last token's (features [B, H]) */
            const long row = s == 0 ? b * T + a->last[b] : b;
            memcpy((char *)a->features + b * H * elem, (const char *)a->layers.x + row * H * elem, H * elem);
        }
        LinearArgs out = a->lm_head;
        out.x = a->features, out.y = a->logits, out.rows = B;
        failed = specdec_linear(&out);
        if (failed) return failed;
        for (long b = 0; b < B; b++)
            a->drafts[b * a->steps + s] = a->vocab_ids[argmax((const char *)a->logits + b * kept * elem, bf16, kept)];
    }
    return 0;
}
