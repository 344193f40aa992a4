"""The draft cost ratio c of a trained draft or head, timed against its target; the ratio is the cost
model's (``specdec.stats.median_ratio``)."""

from __future__ import annotations

import time

import torch

from specdec.stats import median_ratio, synchronize


def _decode_step(model, context: int, head_of=None):
    """A closure running one decode step of ``model`` (batch 1, ``context`` tokens cached); a draft head
    needs its target (``head_of``) for the token embedding and a feature."""
    cache, device = model.new_cache(1, context + 1), model.device
    ids, positions = torch.ones(1, context, dtype=torch.long, device=device), torch.arange(context, device=device)[None]
    one, position = torch.ones(1, 1, dtype=torch.long, device=device), torch.tensor([[context]], device=device)
    if head_of is None:
        model(ids, positions, cache)
        return lambda: (cache.rollback(context), model(one, position, cache))
    embed = head_of.model.embed_tokens
    features = torch.zeros(1, context, model.config.target_hidden_size, dtype=head_of.dtype, device=device)
    model(embed(ids), features, positions, cache)
    return lambda: (cache.rollback(context), model(embed(one), features[:, :1], position, cache))


@torch.no_grad()
def cost_ratio(draft, target, context: int = 64, repeats: int = 30) -> float:
    """c: one draft decode step over one target decode step (native models, batch 1, ``context`` tokens in
    the cache), medians of ``repeats`` alternating timings so that machine noise hits both alike."""
    from specdec.models.head import DraftHead
    from specdec.models.loading import as_native

    target = as_native(target)
    steps = [_decode_step(draft, context, head_of=target) if isinstance(draft, DraftHead)
             else _decode_step(as_native(draft), context), _decode_step(target, context)]
    times = [[], []]
    for _ in range(repeats):
        for i, step in enumerate(steps):
            synchronize(target.device)
            start = time.perf_counter()
            step()
            synchronize(target.device)
            times[i].append(time.perf_counter() - start)
    return median_ratio(times[0], times[1])
