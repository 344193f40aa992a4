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
        drafting = state.active.clone()  # [batch] rows whose processors still allow a token
        for _ in range(k):
            logits = self.model(input_ids, positions, cache, logits_index=last)[:, 0]  # [batch, draft_vocab]
            logits = state.process(state.fit_vocab(logits), drafts)  # [batch, vocab]
            token, p, drafting = draw(state, logits, drafting)
            if p is not None:
                probs.append(p)
            drafts.append(token)
            input_ids, positions = token.clamp(min=0)[:, None], cache.next_positions(state.active.long(), 1)
            last = torch.zeros_like(last)
        state.stats.draft_passes += k
        return torch.stack(drafts, dim=1), (torch.stack(probs, dim=1) if probs else None)


def draw(state: DecodeState, logits, drafting):
    """One draft step's tokens from logits [batch, vocab] over the target's vocabulary, processed: the argmax,
    or a sample from the sampling settings' distribution, which is returned as draft_probs [batch, vocab] (None
    when greedy). drafting [batch]: rows still drafting; a row whose processors leave no token possible stops
    (its draft is -1 from there on: no distribution to draw from). returns token, draft_probs, drafting."""
    if state.sampling.greedy:
        token, p = logits.argmax(dim=-1), None
    else:
        p = state.sampling.probs(logits)
        token = sample(p, state.generator)
    if state.processing is None:  # (every row has a token to draw)
        return token, p, drafting
    drafting = drafting & ~logits.isneginf().all(dim=-1)
    return token.masked_fill(~drafting, -1), (None if p is None else p.nan_to_num(0.0)), drafting


class NGramProposer:
    """Prompt lookup: find the most recent earlier occurrence of each row's last n tokens (n from
    ``max_ngram`` down to ``min_ngram``, longest first) in its prompt + output, and propose the tokens that
    followed it. No match: no proposal (that row takes a plain step). Never proposes past an EOS.
    Deterministic, so ``draft_probs`` is None: one-hot distributions keep sampling lossless."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not (isinstance(min_ngram, int) and isinstance(max_ngram, int) and 1 <= min_ngram <= max_ngram):
            raise ValueError(f"n-gram sizes need 1 <= min_ngram <= max_ngram, got {min_ngram=}, {max_ngram=}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, state: DecodeState, k: int):
        tokens, known = state.tokens[:, :-1], state.num_tokens[:, None]  # [batch, L], [batch, 1]
        length = tokens.shape[1]
        start = torch.full_like(known, -1)  # [batch, 1] where the proposed continuation starts
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            if length <= n:
                continue
            suffix = tokens.gather(1, (known - n + torch.arange(n, device=tokens.device)).clamp(min=0))  # [batch, n]
            i = torch.arange(length - n + 1, device=tokens.device)  # window starts
            # an earlier occurrence (not the suffix itself) whose next token is already known: i + n < known
            hit = (tokens.unfold(1, n, 1) == suffix[:, None]).all(dim=-1) & (i + n < known) & (known > n)
            latest = torch.where(hit, i, -1).amax(dim=1, keepdim=True)
            start = torch.where((start < 0) & (latest >= 0), latest + n, start)
        where = start + torch.arange(k, device=tokens.device)  # [batch, k]
        drafts = tokens.gather(1, where.clamp(0, length - 1))
        valid = (start >= 0) & (where < known)
        is_eos = torch.isin(drafts, state.eos) & valid
        valid &= (is_eos.long().cumsum(dim=1) - is_eos.long()) == 0  # keep an EOS, drop what follows it
        return torch.where(valid, drafts, -1), None


class HeadProposer:
    """A feature-conditioned draft head (``models/head.py``), drafting from the target's own last hidden states,
    which the target keeps in its cache (``state.target_cache.features``; generate() and the engine make
    such a cache when a proposer ``needs_features``).

    Head position p reads token p and the feature of position p - 1: the target's for verified positions, the
    head's own prediction while drafting. So the head's cache is kept only up to where it was fed the
    target's features; the positions it drafted on its own features are recomputed next round from the
    target's: one head pass over the accepted tokens (for SmolLM2 a head step, catch-up included, costs
    0.05-0.10 of a target step: bench/RESULTS.md). Greedy drafting without processors runs all k steps in one
    call where the runner has one (the CPU runner's C kernels: kernels/cpu_head.c), with the same drafts.
    """

    needs_features = True

    def __init__(self, head, target):
        target_hidden = target.config.hidden_size
        if head.config.target_hidden_size != target_hidden:
            raise ValueError(f"draft head reads features of size {head.config.target_hidden_size}, the target's "
                             f"are {target_hidden}")
        if int(head.vocab_ids.max()) >= target.vocab_size:
            raise ValueError(f"draft head proposes ids up to {int(head.vocab_ids.max())}, outside the target's "
                             f"vocabulary of {target.vocab_size}")
        if head.device != target.device:
            raise ValueError(f"draft head is on {head.device} but the target is on {target.device}: move one")
        self.head, self.embed = head, target.model.embed_tokens
        self.model = head  # what the engine gives a paged cache of its own, as for a draft model

    def propose(self, state: DecodeState, k: int):
        target = state.target_cache
        if getattr(target, "features", None) is None:
            raise ValueError("a draft head needs the target's cache with features (state.target_cache made with "
                             "features=True): generate() and the Engine make one for a proposer with needs_features")
        cache = state.scratch.get(self)
        if cache is None:
            cache = state.scratch[self] = self.head.new_cache(state.batch_size, state.max_len)
        # A row can be drafted for once the target has run over everything before its pending token: then
        # the feature of each token's predecessor is known (not so before a row's prefill).
        ready = state.active & (target.lengths == state.num_tokens - 1)  # [batch]
        if not bool(ready.any()):
            return torch.full((state.batch_size, k), -1, dtype=torch.long, device=state.tokens.device), None
        cache.rollback(torch.minimum(cache.lengths, state.num_tokens))  # (the engine hands in a trimmed one)
        input_ids, positions, num_new = state.unseen(cache.lengths)  # [batch, W]: through the pending token
        positions = positions.masked_fill(~ready[:, None], -1)
        features = target.features_at(positions - 1).masked_fill((positions < 1)[..., None], 0)  # position 0: none
        last = (num_new - 1).clamp(min=0)[:, None]  # [batch, 1]
        drafts = probs = None
        if state.processing is None and state.sampling.greedy:  # _steps in one call, where the runner has one
            drafts = self.head.body.runner.head_drafts(self.head, self.embed, input_ids, features, positions,
                                                       last[:, 0], ready, cache, k)
        if drafts is None:
            drafts, probs = self._steps(state, cache, input_ids, features, positions, last, ready, k)
        # keep what the target's features made; the positions drafted on the head's own are redone next round
        # (a row that did not draft keeps its cache as it was: all of it came from the target's features)
        cache.rollback(torch.where(ready, torch.minimum(cache.lengths, state.num_tokens), cache.lengths))
        state.stats.draft_passes += k
        return drafts.masked_fill(~ready[:, None], -1), probs

    def _steps(self, state, cache, input_ids, features, positions, last, ready, k: int):
        """k head steps from Python: drafts [batch, k] and their distributions [batch, k, vocab] (None when
        greedy). The first step runs the unseen tokens input_ids [batch, W] at positions [batch, W] (features
        [batch, W, hidden]: their predecessors'), drafting from each row's token ``last`` [batch, 1]."""
        drafts, probs = [], []
        drafting = ready.clone()
        for _ in range(k):
            logits = self.head(self.embed(input_ids), features, positions, cache, logits_index=last)[:, 0]
            if state.processing is not None:  # processors read the whole vocabulary: the ids never kept at -inf
                full = logits.new_full((state.batch_size, state.vocab_size), -torch.inf)
                full[:, self.head.vocab_ids] = logits
                logits = state.process(full, drafts)  # [batch, vocab]
                token, p, drafting = draw(state, logits, drafting)
                if p is not None:
                    probs.append(p)
            elif state.sampling.greedy:  # (vocab_ids ascend: the first maximum is the one a full argmax finds)
                token = self.head.vocab_ids[logits.argmax(dim=-1)]
            else:
                # temperature, top-k and top-p over the kept ids alone: the ids never proposed would have
                # probability 0 anyway, and sorting 8192 logits instead of 49152 is most of a draft step
                kept = state.sampling.probs(logits)  # [batch, kept]
                token = self.head.vocab_ids[sample(kept, state.generator)]
                p = kept.new_zeros(state.batch_size, state.vocab_size)
                p[:, self.head.vocab_ids] = kept  # [batch, vocab]
                probs.append(p)
            drafts.append(token)
            # the next position reads the head's own prediction of this one's feature
            features = cache.features_at(positions.gather(1, last))  # [batch, 1, hidden]
            input_ids, positions = token.clamp(min=0)[:, None], cache.next_positions(ready.long(), 1)
            last = torch.zeros_like(last)
        return torch.stack(drafts, dim=1), (torch.stack(probs, dim=1) if probs else None)
