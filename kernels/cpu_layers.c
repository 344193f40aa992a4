/* All decoder layers of a Llama-family model in one call on the CPU: per layer, the q/k/v projection (its
 * RMSNorm fused), RoPE + cache write + attention (cpu_attention.c), the output projection (residual add
 * fused), the gate/up projection (RMSNorm fused) and the down projection (SiLU(gate) * up and the residual
 * add fused) — the same five kernel calls, in the same order, as models/llama.py makes from Python.
 *
 * Why it exists: from Python those are 151 calls per SmolLM2 step, each behind a module call, a packed-
 * weight check and a ctypes call: ~3.8 ms of a 29 ms float32 decode step (measured with the C stubbed out),
 * all of it overhead on top of the weight stream. Here they are C function calls. The numbers are the
 * kernels' own: a step through this call has the bits of the Python loop over the same kernels.
 *
 * weights: for each layer 8 addresses — qkv packed, qkv bias (0: none), input norm, o packed, o bias (0),
 * post-attention norm, gate/up packed, down packed (cpu_linear.py: pack). x [M, hidden] is the residual
 * stream, updated in place; qkv [M, (H + 2 Hkv) D], attn [M, H D], h [M, 2 inner] are scratch. The key and
 * value pools of layer l start layer_stride elements after those of layer l - 1 (one tensor for all layers,
 * as specdec/cache.py keeps them). Returns 0; -2, having written nothing to the pools, if a position or block
 * id falls outside the pool; -1 without memory for a scratch.
 */
#include <stdint.h>

int specdec_linear(const void *x, const void *p, const void *bias, void *y, long M, long N, long K, int bf16,
                   const void *norm, float eps, int gated, const void *residual);
int specdec_attention(const void *qkv, const void *cos, const void *sin, const long *positions, long B, long T,
                      long H, long Hkv, long D, void *kbase, void *vbase, long block_stride, long slot_stride,
                      long head_stride, const long *table, long max_blocks, long block_size, long nblocks,
                      float scale, int bf16, void *out);

enum { QKV, QKV_BIAS, NORM1, O, O_BIAS, NORM2, GATE_UP, DOWN, ADDRESSES };

/* After the layers' own arguments, those of specdec_attention between its qkv and out, in its order. */
int specdec_layers(void *x, long hidden, long inner, const int64_t *weights, long layers, float eps, void *qkv,
                   void *attn, void *h, long layer_stride, const void *cos, const void *sin, const long *positions,
                   long B, long T, long H, long Hkv, long D, void *kbase, void *vbase, long block_stride,
                   long slot_stride, long head_stride, const long *table, long max_blocks, long block_size,
                   long nblocks, float scale, int bf16) {
    const long M = B * T, elem = bf16 ? 2 : 4;
#define W(name) ((const void *)(intptr_t)w[name])
    for (long l = 0; l < layers; l++) {
        const int64_t *w = weights + l * ADDRESSES;
        char *k = (char *)kbase + l * layer_stride * elem, *v = (char *)vbase + l * layer_stride * elem;
        int failed = specdec_linear(x, W(QKV), W(QKV_BIAS), qkv, M, (H + 2 * Hkv) * D, hidden, bf16, W(NORM1), eps, 0,
                                    0);
        if (!failed)
            failed = specdec_attention(qkv, cos, sin, positions, B, T, H, Hkv, D, k, v, block_stride, slot_stride,
                                       head_stride, table, max_blocks, block_size, nblocks, scale, bf16, attn);
        if (!failed) failed = specdec_linear(attn, W(O), W(O_BIAS), x, M, hidden, H * D, bf16, 0, 0.0f, 0, x);
        if (!failed) failed = specdec_linear(x, W(GATE_UP), 0, h, M, 2 * inner, hidden, bf16, W(NORM2), eps, 0, 0);
        if (!failed) failed = specdec_linear(h, W(DOWN), 0, x, M, hidden, inner, bf16, 0, 0.0f, 1, x);
        if (failed) return failed; /* -2 can only come from layer 0 (every layer checks the same positions) */
    }
#undef W
    return 0;
}
