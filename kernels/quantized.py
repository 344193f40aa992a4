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


def check_group_size(bits: int, group_size: int | None, in_features: int) -> int:
    """The group size to use (None: per output channel, i.e. the whole input), validated; 0 means per channel."""
    if bits not in BITS:
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    if group_size is None:
        return 0
    if (not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 2 or group_size % 2
            or in_features % group_size):
        raise ValueError(f"group_size must be an even number dividing the layer's {in_features} input features, "
                         f"or None (one group per output channel), got {group_size!r}")
    return group_size


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


def packed_size(out_features: int, in_features: int, bits: int, group_size: int) -> int:
    """Bytes of ``pack``'s layout for a weight [out, in] of this format (what cpu_linear.c reads): per tile
    of 32 output columns and per group, 32 float16 scales and zeros, then the values; -1 if group_size does
    not divide the (even) input width."""
    width = in_features + in_features % 2
    group = group_size or width
    if width % group:
        return -1
    pair_bytes = TILE if bits == 4 else 2 * TILE
    return -(-out_features // TILE) * (width // group) * (4 * TILE + group // 2 * pair_bytes)
