/* The arguments of the exported CPU kernels, by name: each kernel takes a pointer to one of these structs,
 * and kernels/cpu.py declares the same fields, in the same order, with ctypes. Shapes count elements. */
#ifndef SPECDEC_CPU_ARGS_H
#define SPECDEC_CPU_ARGS_H
#include <stdint.h>

typedef struct { /* y = residual + fused_input(x) @ weight^T + bias (cpu_linear.c) */
    const void *x;        /* [rows, in] ([rows, 2 in] if gated: gate then up) */
    const void *weight;   /* [out, in] in the packed layout (cpu_linear.py: pack, quantized.py: pack) */
    const void *bias;     /* [out] or NULL */
    const void *norm;     /* [in] RMSNorm weight, or NULL */
    long norm_parts;      /* the norm normalises each of this many equal slices of x's row on its own (0, 1: the
                             whole row; 2: a draft head's token and feature halves); not with gated */
    const void *residual; /* [rows, out] or NULL; may be y itself */
    void *y;              /* [rows, out] */
    long rows, out, in;
    float eps;            /* the RMSNorm's */
    int gated;            /* SiLU(gate) * up before the norm */
    int bf16;             /* every tensor bfloat16 (else float32), the weight too unless it is quantized */
    int bits;             /* 0: a float weight; 4 or 8: quantized in groups of group_size input features */
    long group_size;      /* even, dividing in (rounded up to even); 0: one group per output channel */
    int act8;             /* activations quantized to int8 in blocks of 32 (cpu_linear.c), the weight packed for it */
} LinearArgs;

typedef struct { /* RoPE, the cache write and attention of one layer (cpu_attention.c) */
    const void *qkv;        /* [batch, T, heads + 2 kv_heads, head_dim], contiguous */
    const void *cos, *sin;  /* [batch, T, head_dim], sin carrying rotate_half's sign */
    const long *positions;  /* [batch, T], -1: padding */
    long batch, T, heads, kv_heads, head_dim;
    void *keys, *values;    /* the pools: [blocks, block_size, kv_heads, head_dim] at the strides below */
    long block_stride, slot_stride, head_stride;
    const long *block_table; /* [batch, max_blocks], or NULL: row b is block b */
    long max_blocks, block_size, blocks;
    float scale;            /* of the scores: head_dim^-1/2 */
    int bf16;
    void *out;              /* [batch, T, heads, head_dim] */
} AttentionArgs;

typedef struct { /* every decoder layer (cpu_layers.c) */
    void *x;                /* [batch * T, hidden]: the residual stream, updated in place */
    long hidden, inner, layers;
    const int64_t *weights; /* [layers, 8] addresses (cpu_layers.c) */
    float eps;              /* of every RMSNorm */
    int bits;               /* of every weight, their group_size and act8 (LinearArgs) */
    long group_size;
    int act8;
    void *qkv, *attn, *h;   /* scratch, rows = batch * T: qkv [rows, (heads + 2 kv_heads) head_dim], attn [rows,
                               heads head_dim], h [rows, 2 inner] */
    long layer_stride;      /* elements from one layer's key (and value) pool to the next's */
    AttentionArgs attention; /* layer 0's; per layer its pools move by layer_stride, qkv and out are the scratch */
} LayersArgs;

typedef struct { /* a draft head's greedy drafts (cpu_head.c); rows = batch * T, the first step's */
    const long *positions;   /* [batch, T]: the first step's, -1: padding */
    const long *last;        /* [batch]: which of its first-step tokens each row drafts from */
    const long *next;        /* [batch]: the position of each row's second step; -1: a row that does not draft */
    long batch, T, steps;    /* steps: drafts per row */
    const void *embedding;   /* [vocab, hidden]: the target's token embedding, bfloat16 if embedding_bf16 else
                                float32 */
    int embedding_bf16;
    const long *vocab_ids;   /* [kept]: the target id of each of the head's outputs */
    const void *cos_table, *sin_table; /* [rope_len, head_dim]: RoPE at every position (models/llama.py: rope) */
    long rope_len;
    LinearArgs fc, lm_head;  /* weight, norm and format of each: x, y and rows are set per step */
    LayersArgs layers;       /* the head's decoder layers over x = its residual stream [rows, hidden], scratch
                                for rows; attention's positions, cos, sin, batch and T are set per step */
    void *input;             /* [rows, 2 hidden]: per row its token's embedding, then its predecessor's feature;
                                the first step's given, the later ones' written here */
    void *cos, *sin;         /* [rows, head_dim] scratch */
    void *features;          /* [batch, hidden] scratch: the feature each row drafts from */
    void *logits;            /* [batch, kept] scratch */
    long *step_positions;    /* [batch] scratch */
    long *drafts;            /* [batch, steps]: the drafted target ids */
} HeadArgs;

int specdec_linear(const LinearArgs *args);
int specdec_attention(const AttentionArgs *args);
int specdec_layers(const LayersArgs *args);
int specdec_head_drafts(const HeadArgs *args);

#endif
