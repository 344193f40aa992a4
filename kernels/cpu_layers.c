/* All decoder layers of a Llama-family model in one call on the CPU: per layer, the q/k/v projection (its
 * RMSNorm fused), RoPE + cache write + attention (cpu_attention.c), the output projection (residual add
 * fused), the gate/up projection (RMSNorm fused) and the down projection (SiLU(gate) * up and the residual
 * add fused) — the same five kernel calls, in the same order, as the CPU runner makes from Python
 * (kernels/cpu_runner.py, its layers looped).
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

#include "cpu_args.h"

enum { QKV, QKV_BIAS, NORM1, O, O_BIAS, NORM2, GATE_UP, DOWN, ADDRESSES };

int specdec_layers(const LayersArgs *a) {
    const AttentionArgs *at = &a->attention;
    const long M = at->batch * at->T, H = at->heads, Hkv = at->kv_heads, D = at->head_dim, elem = at->bf16 ? 2 : 4;
    for (long l = 0; l < a->layers; l++) {
        const int64_t *w = a->weights + l * ADDRESSES;
#define W(name) ((const void *)(intptr_t)w[name])
        AttentionArgs attention = *at;
        attention.qkv = a->qkv;
        attention.out = a->attn;
        attention.keys = (char *)at->keys + l * a->layer_stride * elem;
        attention.values = (char *)at->values + l * a->layer_stride * elem;
        const LinearArgs qkv = {.x = a->x, .weight = W(QKV), .bias = W(QKV_BIAS), .norm = W(NORM1), .y = a->qkv,
                                .rows = M, .out = (H + 2 * Hkv) * D, .in = a->hidden, .eps = a->eps, .bf16 = at->bf16,
                                .bits = a->bits, .group_size = a->group_size, .act8 = a->act8};
        const LinearArgs o = {.x = a->attn, .weight = W(O), .bias = W(O_BIAS), .residual = a->x, .y = a->x,
                              .rows = M, .out = a->hidden, .in = H * D, .bf16 = at->bf16, .bits = a->bits,
                              .group_size = a->group_size, .act8 = a->act8};
        const LinearArgs gate_up = {.x = a->x, .weight = W(GATE_UP), .norm = W(NORM2), .y = a->h, .rows = M,
                                    .out = 2 * a->inner, .in = a->hidden, .eps = a->eps, .bf16 = at->bf16,
                                    .bits = a->bits, .group_size = a->group_size, .act8 = a->act8};
        const LinearArgs down = {.x = a->h, .weight = W(DOWN), .residual = a->x, .y = a->x, .rows = M,
                                 .out = a->hidden, .in = a->inner, .gated = 1, .bf16 = at->bf16, .bits = a->bits,
                                 .group_size = a->group_size, .act8 = a->act8};
#undef W
        int failed = specdec_linear(&qkv);
        if (!failed) failed = specdec_attention(&attention);
        if (!failed) failed = specdec_linear(&o);
        if (!failed) failed = specdec_linear(&gate_up);
        if (!failed) failed = specdec_linear(&down);
        if (failed) return failed; /* -2 from layer 0: every layer checks the same positions and formats */
    }
    return 0;
}

/* sizeof each argument struct, for kernels/cpu.py to check its ctypes mirrors against at load */
void specdec_args_sizes(long *sizes) {
    sizes[0] = sizeof(LinearArgs);
    sizes[1] = sizeof(AttentionArgs);
    sizes[2] = sizeof(LayersArgs);
    sizes[3] = sizeof(HeadArgs);
}
