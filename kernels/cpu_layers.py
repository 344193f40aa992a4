"""All decoder layers of a Llama-family model in one C call on the CPU (``cpu_layers.c``): the same kernel
calls as the CPU runner's loop over the layers, without ~150 Python calls around them per forward."""

from __future__ import annotations

import torch

from specdec.kernels.cpu import LayersArgs, library
from specdec.kernels.cpu_attention import checked, raise_failure

ADDRESSES = 8  # per layer: qkv, qkv bias, input norm, o, o bias, post-attention norm, gate/up, down (cpu_layers.c)


def decoder_layers(x, addresses, eps: float, cos, sin, positions, cache, num_heads: int, num_kv_heads: int,
                   head_dim: int, inner: int, bits: int = 0, group_size: int = 0, act8: bool = False):
    """x [batch, T, hidden] (left as it is) -> the last layer's output [batch, T, hidden]; every layer's
    rotated keys and values land in ``cache`` (any cache whose ``pools(layer)`` are slices of one tensor).

    addresses int64 [layers, 8]: per layer the packed q/k/v weight, its bias (0: none), the input RMSNorm
    weight, the packed output weight, its bias (0), the post-attention RMSNorm weight, the packed gate/up and
    down weights. The caller guarantees what C cannot see: that they are alive and of x's dtype, with the
    shapes [out, in] that hidden = x.shape[-1], the heads, head_dim and inner give (q/k/v [(heads + 2
    kv_heads) head_dim, hidden], o [hidden, heads head_dim], gate/up [2 inner, hidden], down [hidden, inner];
    biases and norms of their layer's out / hidden); x and the cache are checked here against those sizes.
    cos, sin, positions as for cpu_attention.rope_write_attend. bits, group_size: every weight's, where they are
    quantized (QuantizedWeight; 0, 0: float weights of x's dtype), and act8: packed for int8 activations.
    """
    x = x.clone(memory_format=torch.contiguous_format)  # the residual stream, updated in place by C
    args = layers_args(x, addresses, eps, cos, sin, positions, cache, num_heads, num_kv_heads, head_dim, inner,
                       bits, group_size, act8)
    failed = library().specdec_layers(args)
    raise_failure("decoder_layers", failed, cache.pools(0)[0], *x.shape[:2])
    return x


def layers_args(x, addresses, eps: float, cos, sin, positions, cache, num_heads: int, num_kv_heads: int,
                head_dim: int, inner: int, bits: int = 0, group_size: int = 0, act8: bool = False) -> LayersArgs:
    """specdec_layers' arguments for the residual stream x [batch, T, hidden] (contiguous: C updates it in
    place), everything C would trust checked (``decoder_layers`` says what); the scratch they point to, and
    the tensors made contiguous, held by ``args.held``."""
    batch, T, hidden = x.shape
    layers = addresses.shape[0]
    widths = (hidden, num_heads * head_dim, inner)  # the input widths of q/k/v and gate/up, o, down
    if (bits not in (0, 4, 8) or group_size < 0 or group_size % (32 if act8 else 2)
            or any(group_size and n % group_size for n in widths) or (act8 and not bits)):
        raise ValueError(f"decoder_layers: bits={bits} must be 0, 4 or 8 and group_size={group_size} an even number "
                         f"(a multiple of 32 with int8 activations, act8={act8}, which need bits) dividing {widths} "
                         f"(or 0)")
    if addresses.shape != (layers, ADDRESSES) or addresses.dtype != torch.int64:
        raise ValueError(f"decoder_layers: addresses must be int64 [layers, {ADDRESSES}], got "
                         f"{tuple(addresses.shape)} {addresses.dtype}")
    k_pool, v_pool, table = cache.pools(0)
    elem = k_pool.element_size()
    stride = 0 if layers == 1 else (cache.pools(1)[0].data_ptr() - k_pool.data_ptr()) // elem
    for layer in (1, layers - 1) if layers > 1 else ():  # the layers' pools must be one tensor's evenly spaced slices
        k, v, _ = cache.pools(layer)
        if (k.data_ptr() - k_pool.data_ptr(), v.data_ptr() - v_pool.data_ptr()) != (layer * stride * elem,) * 2 \
                or k.stride() != k_pool.stride():
            raise ValueError("decoder_layers: the cache's layers are not evenly spaced slices of one tensor")
    width = (num_heads + 2 * num_kv_heads) * head_dim
    qkv = torch.empty(batch, T, width, dtype=x.dtype)  # [batch, T, (q + k + v heads) * head_dim]
    attention = checked("decoder_layers", qkv, cos, sin, positions, k_pool, v_pool, table, num_heads, num_kv_heads)
    if x.dtype not in (torch.float32, torch.bfloat16) or x.device.type != "cpu":
        raise ValueError(f"decoder_layers: x must be a float32 or bfloat16 CPU tensor, got {x.dtype} on {x.device}")
    if not x.is_contiguous():
        raise ValueError("decoder_layers: the residual stream x must be contiguous")
    attn = torch.empty(batch, T, num_heads * head_dim, dtype=x.dtype)  # [batch, T, heads * head_dim]
    h = torch.empty(batch, T, 2 * inner, dtype=x.dtype)  # [batch, T, gate and up]
    addresses = addresses.contiguous()
    args = LayersArgs(x=x.data_ptr(), hidden=hidden, inner=inner, layers=layers, weights=addresses.data_ptr(),
                      eps=eps, bits=bits, group_size=group_size, act8=act8, qkv=qkv.data_ptr(), attn=attn.data_ptr(),
                      h=h.data_ptr(), layer_stride=stride, attention=attention)
    args.held = (qkv, attn, h, addresses, attention.held)
    return args
