"""RoPE, the KV cache write and causal attention of one decoder layer in one call on the CPU
(``cpu_attention.c``); the torch runner's ops (``runner.py``: TorchRunner.attention) are its fallback and its
oracle."""

from __future__ import annotations

import torch

from specdec.kernels.cpu import AttentionArgs, library

DTYPES = (torch.float32, torch.bfloat16)
MAX_GROUP = 16  # query heads per kv head (cpu_attention.c)


def usable(x: torch.Tensor, head_dim: int, group: int) -> bool:
    """Whether the kernel takes a model of this dtype and shape here: float32 or bfloat16 on the CPU, an even
    head_dim (RoPE's halves), at most 16 query heads per kv head."""
    return (x.device.type == "cpu" and x.dtype in DTYPES and head_dim % 2 == 0 and group <= MAX_GROUP
            and library() is not None)


def rope_write_attend(qkv, cos, sin, positions, k_pool, v_pool, block_table, num_heads: int, num_kv_heads: int):
    """qkv [batch, T, (heads + 2 kv_heads) * head_dim]: the q/k/v projection's output, unrotated;
    cos, sin [batch, T, 1, head_dim] in qkv's dtype (sin carrying rotate_half's sign: kernels/runner.py: rotate);
    positions [batch, T] (-1: padding); k_pool, v_pool [blocks, block_size, kv_heads, head_dim] (any strides,
    the last 1); block_table [batch, max_blocks] or None (row b is block b: the contiguous cache)
    -> out [batch, T, heads, head_dim], zeros in padding rows. Rotated keys and values land in the pools."""
    lib = library()
    batch, T, width = qkv.shape
    args = checked("rope_write_attend", qkv, cos, sin, positions, k_pool, v_pool, block_table, num_heads, num_kv_heads)
    out = torch.empty(batch, T, num_heads, width // (num_heads + 2 * num_kv_heads), dtype=qkv.dtype)
    qkv = qkv.contiguous()  # held until the call returns
    args.qkv, args.out = qkv.data_ptr(), out.data_ptr()
    failed = lib.specdec_attention(args)
    raise_failure("rope_write_attend", failed, k_pool, batch, T)
    return out


def checked(caller: str, qkv, cos, sin, positions, k_pool, v_pool, block_table, num_heads: int, num_kv_heads: int):
    """Everything C would trust, checked (a wrong shape or dtype must raise, not write past a buffer) ->
    specdec_attention's arguments but qkv and out (AttentionArgs), holding the contiguous tensors they point
    to (``args.held``) until the call returns."""
    batch, T, width = qkv.shape
    if num_kv_heads < 1 or num_heads % num_kv_heads or num_heads // num_kv_heads > MAX_GROUP:
        raise ValueError(f"{caller}: {num_heads=} must be a multiple of {num_kv_heads=}, at most "
                         f"{MAX_GROUP} per kv head")
    head_dim, rest = divmod(width, num_heads + 2 * num_kv_heads)
    if rest or head_dim % 2:
        raise ValueError(f"{caller}: qkv width {width} is not (heads + 2 kv_heads) x an even head_dim")
    for name, t, shape in (("cos", cos, (batch, T, 1, head_dim)), ("sin", sin, (batch, T, 1, head_dim)),
                           ("k_pool", k_pool, (*k_pool.shape[:2], num_kv_heads, head_dim)),
                           ("v_pool", v_pool, tuple(k_pool.shape))):
        if t.dtype != qkv.dtype or tuple(t.shape) != shape or t.device.type != "cpu":
            raise ValueError(f"{caller}: {name} must be a CPU tensor {shape} of {qkv.dtype}, got "
                             f"{tuple(t.shape)} {t.dtype} on {t.device}")
    if k_pool.stride() != v_pool.stride() or k_pool.stride(-1) != 1:
        raise ValueError(f"{caller}: key and value pools with equal strides and contiguous heads "
                         f"wanted, got {k_pool.stride()} / {v_pool.stride()}")
    if positions.shape != (batch, T):
        raise ValueError(f"{caller}: positions {tuple(positions.shape)} for qkv of {batch} x {T} tokens")
    if block_table is not None and block_table.shape[0] != batch:
        raise ValueError(f"{caller}: block_table has {block_table.shape[0]} rows for {batch}")
    cos, sin = cos.contiguous(), sin.contiguous()
    positions = positions.contiguous().long()
    table = None if block_table is None else block_table.contiguous().long()
    block, slot, head, _ = k_pool.stride()
    args = AttentionArgs(cos=cos.data_ptr(), sin=sin.data_ptr(), positions=positions.data_ptr(), batch=batch, T=T,
                         heads=num_heads, kv_heads=num_kv_heads, head_dim=head_dim, keys=k_pool.data_ptr(),
                         values=v_pool.data_ptr(), block_stride=block, slot_stride=slot, head_stride=head,
                         block_table=0 if table is None else table.data_ptr(),
                         max_blocks=0 if table is None else table.shape[1], block_size=k_pool.shape[1],
                         blocks=k_pool.shape[0], scale=head_dim**-0.5, bf16=qkv.dtype == torch.bfloat16)
    args.held = (cos, sin, positions, table)
    return args


def raise_failure(caller: str, failed: int, k_pool, batch: int, T: int) -> None:
    if failed == -2:  # checked in C, before anything is written: no host sync here
        raise ValueError(f"{caller}: a position or block id falls outside the pool of {k_pool.shape[0]} "
                         f"blocks of {k_pool.shape[1]} positions")
    if failed:
        raise MemoryError(f"{caller}: no memory for the scratch of {batch} x {T} queries")
