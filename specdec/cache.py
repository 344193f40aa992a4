"""The KV cache: preallocated, compact (slot == position), one length per sequence; and the engine's
paged pool (fixed-size blocks shared by all sequences, one block table per sequence).

Rollback only sets lengths: the next append overwrites the rejected slots, and attention never looks
past a query's own position, so stale entries are invisible. Nothing is reallocated while decoding.
"""

from __future__ import annotations

import torch


class SequenceLengths:
    """Per-row lengths and the operations on them that every cache shares."""

    lengths: torch.Tensor  # [batch]
    max_len: int

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    def check_room(self, positions) -> int:
        """positions [batch, T] -> span: slots 0..span-1 cover them (one host sync); refuses overflow."""
        span = int(positions.max()) + 1
        if span > self.max_len:
            raise ValueError(f"positions up to {span - 1} do not fit a KV cache of max_len={self.max_len}")
        return span

    def advance(self, positions) -> None:
        """After a forward: each row's length covers the new tokens it was given. positions [batch, T]"""
        self.lengths = torch.maximum(self.lengths, positions.amax(dim=1) + 1)

    def rollback(self, lengths) -> None:
        """Keep the first ``lengths[b]`` slots of each row; the rest is overwritten by the next append.

        lengths [batch] (or a scalar for all rows)
        """
        lengths = torch.as_tensor(lengths, dtype=torch.long, device=self.lengths.device).expand(self.batch_size)
        if bool(((lengths < 0) | (lengths > self.lengths)).any()):
            raise ValueError(f"rollback lengths={lengths.tolist()} must lie in 0..{self.lengths.tolist()}")
        self.lengths = lengths.clone()

    def next_positions(self, num_new, width: int):
        """Positions for appending ``num_new[b]`` tokens to each row, right-padded to ``width`` with -1.

        num_new [batch] -> positions [batch, width]
        """
        offsets = torch.arange(width, device=self.lengths.device)  # [width]
        positions = self.lengths[:, None] + offsets
        return torch.where(offsets < torch.as_tensor(num_new, device=self.lengths.device)[..., None], positions, -1)


class KVCache(SequenceLengths):
    """features: if > 0, the cache also keeps the model's last hidden state (``features`` wide) of every
    position it holds — what a feature-conditioned draft head reads (``models/head.py``); it rolls back
    with the keys and values."""

    def __init__(self, *, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu", features: int = 0):
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"KVCache needs batch_size >= 1 and max_len >= 1, got {batch_size=}, {max_len=}")
        self.max_len = max_len
        # One slot past max_len is the trash slot: padding tokens (position -1) write there, so a ragged
        # batch is written with one index_put per layer instead of a mask-and-copy.
        shape = (num_layers, batch_size, num_kv_heads, max_len + 1, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)  # [layers, batch, kv_heads, max_len + 1, head_dim]
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # [batch]
        self._rows = torch.arange(batch_size, device=device)[:, None]  # [batch, 1]
        # [batch, max_len + 1, features] or None
        self.features = torch.zeros(batch_size, max_len + 1, features, dtype=dtype, device=device) if features else None
        self.graphs = {}  # model -> its LayerGraphs over this cache (CUDA graphs hold these tensors' addresses)

    def slots(self, positions):
        """Where new tokens go: slot == position, padding (-1) to the trash slot. [batch, T] -> [batch, T]"""
        return torch.where(positions < 0, self.max_len, positions)

    def write(self, layer: int, slots, k, v) -> None:
        """Store new keys/values at ``slots`` (from ``slots()``).

        slots [batch, T]; k, v [batch, T, kv_heads, head_dim]
        """
        self.keys[layer][self._rows, :, slots] = k
        self.values[layer][self._rows, :, slots] = v

    def write_features(self, positions, x) -> None:
        """positions [batch, T] (-1: padding, to the trash slot); x [batch, T, features]"""
        self.features[self._rows, self.slots(positions)] = x.to(self.features.dtype)

    def features_at(self, positions):
        """positions [batch, T] -> [batch, T, features] (padding reads the trash slot)"""
        return self.features[self._rows, self.slots(positions)]

    def pools(self, layer: int):
        """What attention reads: the paged pool's special case of one block per row, no block table.

        returns keys, values [batch, max_len + 1, kv_heads, head_dim] (views) and None
        """
        return self.keys[layer].transpose(1, 2), self.values[layer].transpose(1, 2), None


class KVPool:
    """Fixed-size blocks of keys and values for one model, shared by every sequence the engine runs.

    A sequence owns a list of block ids (its block table); position p lives in block table[p // block_size]
    at offset p % block_size. One extra block past ``num_blocks`` is the trash block: padding tokens write
    there and short block tables are padded with it; it is never handed out, and what it holds is never
    attended (the mask stops at each row's length).
    """

    def __init__(self, *, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu", features: int = 0):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"KVPool needs num_blocks >= 1 and block_size >= 1, got {num_blocks=}, {block_size=}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.trash = num_blocks
        shape = (num_layers, num_blocks + 1, block_size, num_kv_heads, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)  # [layers, blocks + 1, block_size, kv_heads, head_dim]
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        # [blocks + 1, block_size, features] or None: as KVCache.features
        self.features = (torch.zeros(num_blocks + 1, block_size, features, dtype=dtype, device=device) if features
                         else None)
        # a stack: the most recently freed block is reused first (its memory is the likeliest to be cached)
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_positions: int) -> int:
        """Blocks that hold positions 0..num_positions-1."""
        return -(-num_positions // self.block_size)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise ValueError(f"KVPool: {n} blocks wanted, {len(self._free)} free")
        taken, self._free = self._free[len(self._free) - n:], self._free[:len(self._free) - n]
        return taken[::-1]

    def release(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


class PagedKVCache(SequenceLengths):
    """A batch of sequences over a shared KVPool: the cache one engine step hands to the model.

    block_tables  one list of block ids per row (owned by the engine, which sized them for this step)
    lengths       [batch] cached positions per row
    The rows' blocks are disjoint, so writes never collide; the engine reads ``lengths`` back after the step.
    """

    def __init__(self, pool: KVPool, block_tables: list[list[int]], lengths):
        self.pool = pool
        width = max(1, max(len(t) for t in block_tables))
        table = [t + [pool.trash] * (width - len(t)) for t in block_tables]
        device = pool.keys.device
        self.block_table = torch.tensor(table, dtype=torch.long, device=device)  # [batch, max_blocks]
        self.capacity = torch.tensor([len(t) * pool.block_size for t in block_tables], device=device)  # [batch]
        self.lengths = torch.as_tensor(lengths, dtype=torch.long, device=device).clone()  # [batch]
        self.max_len = width * pool.block_size
        self.features = pool.features

    def check_room(self, positions) -> int:
        span = super().check_room(positions)
        # a position past a row's own blocks would land in the trash block and be silently lost
        if bool((positions >= self.capacity[:, None]).any()):
            raise ValueError(f"positions {positions.amax(dim=1).tolist()} overflow the blocks held "
                             f"({self.capacity.tolist()} positions per row)")
        return span

    def slots(self, positions):
        """Flat slot (block * block_size + offset) of each new token; padding to the trash block.

        positions [batch, T] -> [batch, T]
        """
        bs = self.pool.block_size
        p = positions.clamp(min=0)
        slots = self.block_table.gather(1, p // bs) * bs + p % bs
        return torch.where(positions < 0, self.pool.trash * bs, slots)

    def write(self, layer: int, slots, k, v) -> None:
        """slots [batch, T] from ``slots()``; k, v [batch, T, kv_heads, head_dim]"""
        flat = slots.reshape(-1)
        keys, values = self.pool.keys[layer], self.pool.values[layer]
        keys.view(-1, *keys.shape[2:])[flat] = k.reshape(flat.shape[0], *keys.shape[2:])
        values.view(-1, *values.shape[2:])[flat] = v.reshape(flat.shape[0], *values.shape[2:])

    def write_features(self, positions, x) -> None:
        """positions [batch, T] (-1: padding); x [batch, T, features]"""
        width = self.pool.features.shape[-1]
        self.pool.features.view(-1, width)[self.slots(positions).reshape(-1)] = x.reshape(-1, width).to(
            self.pool.features.dtype)

    def features_at(self, positions):
        """positions [batch, T] -> [batch, T, features]"""
        flat = self.pool.features.view(-1, self.pool.features.shape[-1])
        return flat[self.slots(positions)]

    def pools(self, layer: int):
        """keys, values [num_blocks + 1, block_size, kv_heads, head_dim] and block_table [batch, max_blocks]"""
        return self.pool.keys[layer], self.pool.values[layer], self.block_table


def select(logits, logits_index=None):
    """logits [batch, T, vocab] -> the rows at logits_index [batch, n] (all if None), float32 or float64."""
    if logits_index is not None:
        logits = logits.gather(1, logits_index[..., None].expand(-1, -1, logits.shape[-1]))
    return logits if logits.dtype == torch.float64 else logits.float()
