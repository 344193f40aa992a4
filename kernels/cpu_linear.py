"""Linear layers for the CPU path (``cpu_linear.c``): float32 and bfloat16 weights packed once, then
streamed at memory speed for decode and verification; and the reference they are tested against.
Where the kernels cannot be built (``kernels/cpu.py``), ``available()`` is False and callers keep torch's path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from specdec.kernels.cpu import LinearArgs, available, library  # noqa: F401 (available: for callers)
from specdec.kernels.quantized import QuantizedWeight, packed_size

TILE = 32  # output columns per tile of the packed layout (cpu_linear.c)
DTYPES = (torch.float32, torch.bfloat16)


@dataclass(frozen=True)
class PackedWeight:
    """A weight [out, in] in the kernel's layout: tiles of 32 output columns; in each, for every pair of input
    features, the 32 columns' two values (bfloat16: [tiles, in/2, 32, 2]; float32: [tiles, in/2, 2, 32]).
    Padded with zeros to whole tiles and an even ``in``. A second copy of the weight in memory."""

    data: torch.Tensor
    out_features: int
    in_features: int

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype


def pack(weight: torch.Tensor) -> PackedWeight:
    """weight [out, in], float32 or bfloat16 on the CPU -> the kernel's layout (one pass, at load time)."""
    if weight.dim() != 2 or weight.dtype not in DTYPES or weight.device.type != "cpu":
        raise ValueError(f"pack takes a 2-d float32 or bfloat16 CPU weight, got {tuple(weight.shape)} "
                         f"{weight.dtype} on {weight.device}")
    n, k = weight.shape
    tiles, pairs = -(-n // TILE), -(-k // 2)
    w = torch.nn.functional.pad(weight.detach(), (0, 2 * pairs - k, 0, tiles * TILE - n))  # [tiles*32, 2*pairs]
    w = w.view(tiles, TILE, pairs, 2)
    # bfloat16: each 32-bit lane holds w[n, 2p] (low half) and w[n, 2p+1], the operand order of one FMA pair
    order = (0, 2, 1, 3) if weight.dtype == torch.bfloat16 else (0, 2, 3, 1)
    return PackedWeight(w.permute(order).contiguous(), n, k)


def linear(x: torch.Tensor, weight: PackedWeight | QuantizedWeight, bias: torch.Tensor | None = None, *,
           norm: torch.Tensor | None = None, eps: float = 0.0, gated: bool = False,
           residual: torch.Tensor | None = None, norm_parts: int = 1) -> torch.Tensor:
    """``residual + fused_input(x, norm, eps, gated, norm_parts) @ weight^T + bias``, through the packed weight.

    x [..., in] of the weight's dtype ([..., 2 * in] if gated: gate then up); norm [in] an RMSNorm weight or
    None, over ``norm_parts`` equal slices of the features, each normalised on its own (each an even number
    of features; not with gated); bias [out] or None; residual [..., out] or None -> [..., out].
    Each output row depends only on its input row (one fixed FMA chain per element): the same token gives
    the same bits in a 1-row decode step, a (k + 1)-row verification pass and a batch of requests.
    """
    lib = library()
    if lib is None:
        raise RuntimeError("the CPU linear kernel is not available here; check kernels.cpu_linear.available()")
    # called once per linear layer per decode step (121 times for SmolLM2, ~3 us in C at 1 row): the checks
    # below are plain comparisons, the optional tensors checked only when given
    quantized = type(weight) is QuantizedWeight  # its activations: float32 or bfloat16
    dtype, n, k = x.dtype if quantized else weight.data.dtype, weight.out_features, weight.in_features
    if x.dtype != dtype or dtype not in DTYPES or x.device.type != "cpu" or x.shape[-1] != (2 * k if gated else k):
        raise ValueError(f"linear: x [..., {x.shape[-1]}] of dtype {x.dtype} on {x.device} does not fit a weight "
                         f"[{n}, {k}] of dtype {dtype}"
                         + (" (gated: x holds gate and up, 2 x in features)" if gated else ""))
    if norm_parts != 1 and (norm_parts < 1 or gated or k % (2 * norm_parts)):
        raise ValueError(f"linear: norm_parts={norm_parts} must be 1, or split in={k} into slices of an even "
                         f"number of features (not with gated={gated})")
    size = packed_size(n, k, weight.bits, weight.group_size, weight.act8) if quantized else None
    if quantized and weight.data.numel() != size:  # C reads exactly that many bytes
        raise ValueError(f"linear: a quantized weight [{n}, {k}] of int{weight.bits}, group_size {weight.group_size}, "
                         f"has {weight.data.numel()} bytes, not {size}")
    x = x.contiguous()  # held, as the others below, until the call returns
    out = torch.empty(*x.shape[:-1], n, dtype=dtype)  # [..., out]
    pointers, held = [0, 0, 0], []  # bias, norm, residual; held: contiguous copies alive until the call returns
    optional = (("bias", bias, (n,)), ("norm", norm, (k,)), ("residual", residual, out.shape))
    for i, (name, t, shape) in enumerate(optional):
        if t is not None:
            if t.dtype != dtype or t.device.type != "cpu" or t.shape != shape:
                raise ValueError(f"linear: {name} of shape {tuple(t.shape)} ({t.dtype} on {t.device}) does not "
                                 f"fit; expected a CPU tensor {tuple(shape)} of {dtype}")
            held.append(t.contiguous())
            pointers[i] = held[-1].data_ptr()
    args = linear_args(weight, dtype, norm=pointers[1], eps=eps, norm_parts=norm_parts, x=x.data_ptr(),
                       bias=pointers[0], residual=pointers[2], y=out.data_ptr(), rows=x.numel() // x.shape[-1],
                       gated=gated)
    failed = lib.specdec_linear(args)
    if failed == -2:
        raise ValueError(f"linear: a quantized weight's group_size {args.group_size} does not divide its {k} "
                         f"input features")
    if failed:
        raise MemoryError(f"linear: no memory for a float32 copy of x {tuple(x.shape)}")
    return out


def linear_args(weight: PackedWeight | QuantizedWeight, dtype: torch.dtype, *, norm: int = 0, eps: float = 0.0,
                norm_parts: int = 1, **fields) -> LinearArgs:
    """specdec_linear's arguments for a packed weight and activations of ``dtype``: the weight's own fields
    (address, shape, format), the norm's address (0: none) and the rest (x, y, rows, ...) as given."""
    quantized = type(weight) is QuantizedWeight
    return LinearArgs(weight=weight.data.data_ptr(), norm=norm, norm_parts=norm_parts, out=weight.out_features,
                      in_=weight.in_features, eps=eps, bf16=dtype == torch.bfloat16,
                      bits=weight.bits if quantized else 0, group_size=weight.group_size if quantized else 0,
                      act8=quantized and weight.act8, **fields)


def fused_input(x, norm=None, eps=0.0, gated=False, norm_parts=1):
    """The kernel's prologue in torch ops (the CPU fallback and the oracle): SiLU(gate) * up if gated, then
    RMSNorm with weight ``norm``, normalised in float32 and scaled in x's dtype, as transformers does; with
    ``norm_parts`` > 1 each of that many equal slices of the features is normalised on its own."""
    if norm_parts > 1 and norm is not None:
        return torch.cat([fused_input(*pair, eps) for pair in zip(x.chunk(norm_parts, -1), norm.chunk(norm_parts))],
                         dim=-1)
    if gated:
        gate, up = x.chunk(2, dim=-1)
        x = F.silu(gate) * up
    if norm is not None:
        # F.rms_norm is one fused op for the five of h * rsqrt(mean(h^2) + eps), bitwise equal to them
        x = norm * F.rms_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype)
    return x


def linear_reference(x, weight, bias=None, *, norm=None, eps=0.0, gated=False, residual=None, norm_parts=1):
    """The oracle: the prologue in torch ops, then float64 products and sums, one rounding to x's dtype, and
    the residual added in x's dtype (as the torch ops round the layer's output before adding)."""
    x = fused_input(x, norm, eps, gated, norm_parts)
    y = x.double() @ weight.double().t()
    if bias is not None:
        y = y + bias.double()
    y = y.to(x.dtype)
    return y if residual is None else residual + y
