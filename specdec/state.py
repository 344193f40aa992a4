"""DecodeState: the token history of one generate() call, shared by the loop and the proposers."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from specdec.sampling import SamplingConfig
from specdec.stats import SpecStats


@dataclass
class DecodeState:
    tokens: torch.Tensor  # [batch, capacity + 1] compact history per row: prompt, then output; last column = trash
    num_tokens: torch.Tensor  # [batch] tokens held per row; the last one is *pending*: not yet in the target's cache
    prompt_lengths: torch.Tensor  # [batch]
    active: torch.Tensor  # [batch] bool: row still generating
    sampling: SamplingConfig  # or, in the engine, one per row (a tuple with greedy and probs as well)
    generator: torch.Generator | None  # draws the drafts, and verify's numbers unless speculative_step has one per row
    vocab_size: int  # the target's; proposers return distributions over it
    max_len: int  # positions a cache must be able to hold
    eos: torch.Tensor  # [n_eos] ids that end a row (may be empty)
    max_new_tokens: int
    stats: SpecStats = field(default_factory=SpecStats)
    scratch: dict = field(default_factory=dict)  # per-call state of proposers (draft KV caches)
    # the target's KV cache; for proposers that read the target's last hidden states (``needs_features``) it
    # keeps them too (``target_cache.features_at``)
    target_cache: object = None
    # the logits processors (specdec/processing.Processing): position i of a round is processed with the row's
    # tokens and drafts 0..i-1, the target's logits and the draft's alike; None: none
    processing: object = None

    def process(self, logits, drafted: list):
        """A draft's logits [batch, vocab] after the drafted tokens (a list of j [batch] tensors, j = 0: nothing
        yet), processed as the target's at that position; unchanged without processors."""
        if self.processing is None:
            return logits
        return self.processing(logits, self, torch.stack(drafted, dim=1) if drafted else None)

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    def unseen(self, cached, extra=None, num_extra=None):
        """The tokens a model has not seen yet, then optional extra tokens, as one right-padded ragged batch.

        cached     [batch]     tokens of each row already in that model's cache
        extra      [batch, k]  tokens to append after them (the drafts, for the target); num_extra [batch] count
        returns input_ids [batch, W], positions [batch, W] (-1 = padding) and num_unseen [batch]
        """
        num_unseen = torch.where(self.active, self.num_tokens - cached, 0)  # [batch]
        total = num_unseen if extra is None else num_unseen + torch.where(self.active, num_extra, 0)
        width = max(int(total.max()), 1)
        j = torch.arange(width, device=self.tokens.device)  # [W]
        from_history = self.tokens.gather(1, (cached[:, None] + j).clamp(max=self.tokens.shape[1] - 1))
        input_ids = from_history
        if extra is not None and extra.shape[1] > 0:
            from_extra = extra.gather(1, (j - num_unseen[:, None]).clamp(0, extra.shape[1] - 1))
            input_ids = torch.where(j < num_unseen[:, None], from_history, from_extra)
        positions = torch.where(j < total[:, None], cached[:, None] + j, -1)
        return input_ids.masked_fill(positions < 0, 0), positions, num_unseen

    def fit_vocab(self, logits):
        """Bring a draft's logits [..., draft_vocab] to the target's vocabulary [..., vocab].

        Sizes that differ only by padding rows of the embedding (151936 vs 152064) meet here: ids past the
        draft's vocabulary get -inf (never proposed), ids past the target's are dropped (never verifiable).
        """
        extra = self.vocab_size - logits.shape[-1]
        if extra <= 0:
            return logits[..., : self.vocab_size]
        return torch.nn.functional.pad(logits, (0, extra), value=float("-inf"))
