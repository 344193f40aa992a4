"""Proposers: whatever offers draft tokens. One small interface, ``propose(state, k)``."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from specdec.sampling import sample
from specdec.state import DecodeState


@runtime_checkable
class Proposer(Protocol):
    def propose(self, state: DecodeState, k: int):
        """Offer k tokens after each row's last token.

        returns draft_tokens [batch, k] and draft_probs [batch, k, vocab] — the distributions the tokens
        were sampled from, over the target's vocabulary — or None for a deterministic proposer.
        Per-call state (a draft's KV cache) lives in ``state.scratch``, so a failed call leaves nothing behind.
        """


class DraftModelProposer:
    """A small causal LM sharing the target's tokenizer, drafting autoregressively on its own KV cache."""

    def __init__(self, model):
        self.model = model

    def propose(self, state: DecodeState, k: int):
        cache = state.scratch.get(self)
        if cache is None:
            cache = state.scratch[self] = self.model.new_cache(state.batch_size, state.max_len)
        # Everything before the pending token is verified; the draft's cache past that point holds drafts
        # that may have been rejected, and the pending token itself may differ from what the draft guessed.
        cache.rollback(torch.minimum(cache.lengths, state.num_tokens - 1))
        # Catch up on what the draft has not seen: the pending token, plus the last draft after a round
        # where all k were accepted (it was proposed but never fed), plus the whole prompt on the first call.
        input_ids, positions, num_new = state.unseen(cache.lengths)
        # A target with a padded vocabulary may emit ids the draft has no embedding for (untrained padding
        # rows; real models practically never do): the draft reads id 0 there. Only its guesses suffer.
        input_ids = input_ids.masked_fill(input_ids >= self.model.vocab_size, 0)
        last = (num_new - 1).clamp(min=0)[:, None]  # [batch, 1]
        drafts, probs = [], []
        for _ in range(k):
            logits = self.model(input_ids, positions, cache, logits_index=last)[:, 0]  # [batch, draft_vocab]
            logits = state.fit_vocab(logits)  # [batch, vocab]
            if state.sampling.greedy:
                token = logits.argmax(dim=-1)
            else:
                p = state.sampling.probs(logits)
                token = sample(p, state.generator)
                probs.append(p)
            drafts.append(token)
            input_ids, positions = token[:, None], cache.next_positions(state.active.long(), 1)
            last = torch.zeros_like(last)
        state.stats.draft_passes += k
        return torch.stack(drafts, dim=1), (torch.stack(probs, dim=1) if probs else None)
