"""Architectures without a native implementation (GPT-2, OPT, ...) run through transformers' own forward.

Slower, still exact. transformers' DynamicCache keeps all rows at one length, so ragged rows are kept
as a mask over slots: every call appends its (right-padded) tokens as new slots for all rows, padding
and rolled-back slots are masked out, and the cache is cropped to the last slot any row still uses.
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache, PreTrainedModel

from specdec.cache import SequenceLengths, select


class TransformersCache(SequenceLengths):
    def __init__(self, batch_size: int, max_len: int, device):
        self.max_len = max_len
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # [batch]
        self.slot_positions = torch.zeros(batch_size, 0, dtype=torch.long, device=device)  # [batch, slots]; -1 = unused
        self.past = DynamicCache()

    def rollback(self, lengths) -> None:
        super().rollback(lengths)
        self.slot_positions = self.slot_positions.masked_fill(self.slot_positions >= self.lengths[:, None], -1)
        used = (self.slot_positions >= 0).any(dim=0).nonzero()
        keep = int(used.max()) + 1 if used.numel() else 0
        if keep < self.slot_positions.shape[1]:
            self.past.crop(keep - self.slot_positions.shape[1])  # negative: "remove this many" in every version
            self.slot_positions = self.slot_positions[:, :keep]


class TransformersModel:
    """Drives a transformers causal LM through the same interface as the native models."""

    is_specdec_model = True

    def __init__(self, hf_model: PreTrainedModel):
        self.hf_model = hf_model
        self.config = hf_model.config
        self.generation_config = hf_model.generation_config
        # transformers renamed past_key_values to cache (deprecated from 5.2x on); use what this version takes
        params = inspect.signature(hf_model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"

    @property
    def vocab_size(self) -> int:
        return self.hf_model.get_output_embeddings().weight.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.hf_model.dtype

    @property
    def device(self) -> torch.device:
        return self.hf_model.device

    def new_cache(self, batch_size: int, max_len: int) -> TransformersCache:
        return TransformersCache(batch_size, max_len, self.device)

    def __call__(self, input_ids, positions, cache: TransformersCache, logits_index=None):
        """Same contract as ``LlamaModel.forward``: input_ids, positions [batch, T]; -1 = padding."""
        cache.check_room(positions)
        slot_positions = torch.cat((cache.slot_positions, positions), dim=1)  # [batch, slots + T]
        out = self.hf_model(
            input_ids=input_ids, position_ids=positions.clamp(min=0), attention_mask=(slot_positions >= 0).long(),
            use_cache=True, **{self._cache_kwarg: cache.past},
        )
        cache.slot_positions = slot_positions
        cache.advance(positions)
        return select(out.logits, logits_index)
