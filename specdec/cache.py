"""The KV cache: preallocated, compact (slot == position), one length per sequence.

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
    def __init__(self, *, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
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

    def slots(self, positions):
        """Where new tokens go: slot == position, padding (-1) to the trash slot. [batch, T] -> [batch, T]"""
        return torch.where(positions < 0, self.max_len, positions)

    def write(self, layer: int, slots, k, v) -> None:
        """Store new keys/values at ``slots`` (from ``slots()``).

        slots [batch, T]; k, v [batch, kv_heads, T, head_dim]
        """
        self.keys[layer][self._rows, :, slots] = k.transpose(1, 2)
        self.values[layer][self._rows, :, slots] = v.transpose(1, 2)


def select(logits, logits_index=None):
    """logits [batch, T, vocab] -> the rows at logits_index [batch, n] (all if None), float32 or float64."""
    if logits_index is not None:
        logits = logits.gather(1, logits_index[..., None].expand(-1, -1, logits.shape[-1]))
    return logits if logits.dtype == torch.float64 else logits.float()
