"""Quantized weights: int4 or int8 values in groups along the input features, each group of each output
channel with a float16 scale and zero, ``w = q * scale + zero`` (q unsigned: 0..15 or 0..255).

Symmetric quantization is the case zero = -8 scale (int4) or -128 scale (int8); GGUF's Q4_0, Q4_1 and Q8_0
blocks are this format with groups of 32 (models/gguf.py), exactly. ``dequantize`` is the reference every
kernel is held to: float32 ``q * scale + zero``, exact in the product (8 + 11 significant bits), one rounding
in the sum, as the C kernel's FMA computes it.

``pack`` makes the layout of ``cpu_linear.c`` (its comment has it); ``cpu_linear.linear`` takes the result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

TILE = 32  # output columns per tile (cpu_linear.c)
BLOCK = 32  # input features per int8 block of activations (cpu_linear.c)
BITS = (4, 8)


@dataclass(frozen=True)
class Quantized:
    """A quantized weight [out, in], unpacked: the form a module keeps and a state dict saves."""

    q: torch.Tensor  # uint8 [out, groups * group] values, 0 .. 2^bits - 1 (input features past `in` are padding)
    scale: torch.Tensor  # float16 [out, groups]
    zero: torch.Tensor  # float16 [out, groups]
    bits: int

    @property
    def group_size(self) -> int:
        return self.q.shape[1] // self.scale.shape[1]


@dataclass(frozen=True)
class QuantizedWeight:
    """A quantized weight in ``cpu_linear.c``'s packed layout (a second copy beside the module's)."""

    data: torch.Tensor  # uint8 [tiles, groups, 128 + group / 2 * (32 if int4 else 64)]
    out_features: int
    in_features: int
    bits: int
    group_size: int  # 0: one group per output channel
    act8: bool = False  # packed for int8 activations (``pack_int8_activations``)


def check_group_size(bits: int, group_size: int | None, in_features: int, int8_activations: bool = False) -> int:
    """The group size to use (None: per output channel, i.e. the whole input), validated; 0 means per channel.
    int8 activations take groups of whole blocks of 32 features."""
    if bits not in BITS:
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    if group_size is None:
        return 0
    if (not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 2 or group_size % 2
            or in_features % group_size):
        raise ValueError(f"group_size must be an even number dividing the layer's {in_features} input features, "
                         f"or None (one group per output channel), got {group_size!r}")
    if int8_activations:
        check_activation_groups(group_size)
    return group_size


def check_activation_groups(group_size: int) -> None:
    """ValueError unless int8 activations can take groups of ``group_size`` features: multiples of 32, or 0
    (one group per output channel)."""
    if group_size % BLOCK:
        raise ValueError(f"group_size must be a multiple of {BLOCK} (or None) for int8 activations, got "
                         f"{group_size!r}; activations='float' takes any even group size")


def activation_groups(quantized: Quantized) -> int:
    """The group size a quantized weight was made with, 0 for one group per output channel."""
    return 0 if quantized.scale.shape[1] == 1 else quantized.group_size


def quantize(weight: torch.Tensor, bits: int, group_size: int | None = 32, zero_point: bool = False) -> Quantized:
    """weight [out, in] (any float dtype) -> its quantized form. Symmetric (zero_point=False): the scale maps the
    group's largest magnitude to 7 (int4) or 127 (int8), zero = -8 or -128 scales. With a zero point: the group's
    [min, max] onto 0 .. 2^bits - 1. Scales and zeros are rounded to float16 before q is computed from them."""
    out, n = weight.shape
    group = check_group_size(bits, group_size, n) or n + n % 2  # per channel: one group of the (even) width
    w = F.pad(weight.detach().float(), (0, group * -(-n // group) - n)).view(out, -1, group)  # [out, groups, group]
    levels = 2**bits - 1
    if zero_point:
        low, high = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)  # 0 stays representable (padding, zeros)
        scale = ((high - low) / levels).clamp(min=2**-24).half()
        zero = low.half()
    else:
        scale = (w.abs().amax(-1) / (levels // 2)).clamp(min=2**-24).half()
        zero = (-(levels // 2 + 1) * scale.float()).half()
    if not (scale.isfinite().all() and zero.isfinite().all()):
        raise ValueError(f"quantize: a group's scale or zero exceeds float16 (largest |weight| "
                         f"{float(w.abs().max()):.4g}); scale such a layer down or keep it in float")
    q = ((w - zero.float()[..., None]) / scale.float()[..., None]).round().clamp(0, levels).to(torch.uint8)
    return Quantized(q.view(out, -1), scale, zero, bits)


def dequantize(quantized: Quantized, in_features: int | None = None) -> torch.Tensor:
    """The reference: float32 [out, in] = q * scale + zero."""
    out = quantized.q.shape[0]
    q = quantized.q.view(out, quantized.scale.shape[1], -1).float()  # [out, groups, group]
    w = q * quantized.scale.float()[..., None] + quantized.zero.float()[..., None]
    return w.view(out, -1)[:, :in_features]


def pack(quantized: Quantized, in_features: int, per_channel: bool) -> QuantizedWeight:
    """The layout of cpu_linear.c: tiles of 32 output columns; in a tile, per group, the 32 columns' float16
    scales, then their zeros, then per pair of input features (2j, 2j + 1) the 32 columns' values: int4 one
    byte per column (low nibble: feature 2j), int8 32 bytes of features 2j then 32 of 2j + 1. Padded with
    zero-valued columns to whole tiles."""
    q, bits = quantized.q, quantized.bits
    out, width = q.shape
    groups, tiles = quantized.scale.shape[1], -(-out // TILE)
    pad = tiles * TILE - out
    q = F.pad(q, (0, 0, 0, pad)).view(tiles, TILE, groups, -1, 2)  # [tiles, 32, groups, pairs, 2]
    q = q.permute(0, 2, 3, 4, 1)  # [tiles, groups, pairs, 2 (even, odd), 32 columns]
    if bits == 4:
        q = q[..., 0, :] | (q[..., 1, :] << 4)  # [tiles, groups, pairs, 32]
    header = [F.pad(t, (0, 0, 0, pad)).view(torch.int16).view(tiles, TILE, groups).permute(0, 2, 1)
              for t in (quantized.scale, quantized.zero)]  # [tiles, groups, 32] float16 bits
    header = torch.stack(header, 2).contiguous().view(torch.uint8).view(tiles, groups, -1)  # [tiles, groups, 128]
    data = torch.cat([header, q.reshape(tiles, groups, -1)], -1).contiguous()
    return QuantizedWeight(data, out, in_features, bits, 0 if per_channel else width // groups)


def packed_size(out_features: int, in_features: int, bits: int, group_size: int, act8: bool = False) -> int:
    """Bytes of ``pack``'s layout (act8: ``pack_int8_activations``'s) for a weight [out, in] of this format
    (what cpu_linear.c reads): per tile of 32 output columns and per group, 32 float16 scales and zeros, then
    the values; -1 if group_size does not divide the (even, act8: whole blocks of 32) input width."""
    width = in_features + in_features % 2
    if act8:
        width = -(-in_features // BLOCK) * BLOCK
        if group_size % BLOCK:
            return -1
    group = group_size or width
    if width % group:
        return -1
    pair_bytes = TILE if bits == 4 else 2 * TILE
    return -(-out_features // TILE) * (width // group) * (4 * TILE + group // 2 * pair_bytes)


def _blocks(quantized: Quantized, in_features: int) -> tuple[torch.Tensor, int]:
    """q [out, KB * 32] (per channel: padded to whole blocks of 32 features; the padding meets zero
    activations) and the blocks per group; ValueError where groups are not whole blocks."""
    check_activation_groups(activation_groups(quantized))
    q, blocks = quantized.q, -(-in_features // BLOCK)
    if quantized.scale.shape[1] == 1:  # per channel
        return F.pad(q[:, :in_features], (0, blocks * BLOCK - in_features)), blocks
    return q, quantized.group_size // BLOCK


def pack_int8_activations(quantized: Quantized, in_features: int) -> QuantizedWeight:
    """The layout of cpu_linear.c for int8 activations: tiles of 32 output columns; in a tile, per group, the
    header (as ``pack``), then per block of 32 input features, per half of the tile (columns 0-15, 16-31),
    per quad j of features (4j .. 4j+3), 16 columns' 4 values each (64 bytes): int8 8 quads; int4 4, quad j in
    the low nibbles and quad j + 4 in the high ones."""
    q, per_group = _blocks(quantized, in_features)
    out, bits, groups = q.shape[0], quantized.bits, quantized.scale.shape[1]
    tiles = -(-out // TILE)
    pad = tiles * TILE - out
    q = F.pad(q, (0, 0, 0, pad)).view(tiles, 2, 16, groups, per_group, 8, 4)  # [t, half, col, g, block, quad, 4]
    q = q.permute(0, 3, 4, 1, 5, 2, 6)  # [tiles, groups, blocks, half, quad, 16 columns, 4 values]
    if bits == 4:
        q = q[:, :, :, :, :4] | (q[:, :, :, :, 4:] << 4)
    header = [F.pad(t, (0, 0, 0, pad)).view(torch.int16).view(tiles, TILE, groups).permute(0, 2, 1)
              for t in (quantized.scale, quantized.zero)]  # [tiles, groups, 32] float16 bits
    header = torch.stack(header, 2).contiguous().view(torch.uint8).view(tiles, groups, -1)  # [tiles, groups, 128]
    data = torch.cat([header, q.reshape(tiles, groups, -1)], -1).contiguous()
    return QuantizedWeight(data, out, in_features, bits, 0 if groups == 1 else quantized.group_size, act8=True)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., in] float32 -> (xq [..., KB, 32] int8 values as float32, dx [..., KB]): per block of 32 features
    (the last padded with zeros) dx = max |x| / 127 and xq = round(x / dx), ties to even; 0 where dx is 0."""
    blocks = -(-x.shape[-1] // BLOCK)
    xb = F.pad(x.float(), (0, blocks * BLOCK - x.shape[-1])).unflatten(-1, (blocks, BLOCK))
    dx = xb.abs().amax(-1) / 127
    xq = (xb / dx[..., None]).round().clamp(-127, 127)
    return torch.where(dx[..., None] > 0, xq, 0.0), dx


def linear_int8_activations(x: torch.Tensor, quantized: Quantized, in_features: int) -> torch.Tensor:
    """The reference of cpu_linear.c with int8 activations: x [..., in] (float32 values, after the layer's
    prologue) -> float32 [..., out], before bias and residual. Per row and output column: per group, in order,
    acc += p * scale + S * zero, where p = the sum over the group's blocks, in order, of float(isum) * dx, isum
    = xq . q (exact, here in float64) and S = the sum over the blocks of dx * sum(xq): x @ w^T with x replaced
    by its int8 blocks (w = q * scale + zero). Each float32 operation rounds once, as in C."""
    xq, dx = quantize_activations(x)  # [..., KB, 32], [..., KB]
    q, per_group = _blocks(quantized, in_features)
    q = q.view(q.shape[0], -1, BLOCK).double()  # [out, KB, 32]
    isum = torch.einsum("...bk,nbk->...nb", xq.double(), q).float()  # [..., out, KB]
    t, xs = isum * dx[..., None, :], dx * xq.sum(-1)  # [..., out, KB], [..., KB]
    scale, zero = quantized.scale.float(), quantized.zero.float()  # [out, groups]
    acc = torch.zeros(t.shape[:-1], device=t.device)  # [..., out]
    for g in range(scale.shape[1]):
        blocks = range(g * per_group, (g + 1) * per_group)
        p, s = t[..., blocks[0]], xs[..., blocks[0], None]
        for b in blocks[1:]:
            p, s = p + t[..., b], s + xs[..., b, None]
        acc = acc + (p * scale[:, g] + s * zero[:, g])
    return acc
