"""Checks on outputs: where a speculative output first departs from plain decoding, and how near a tie
the target's choice was there. In float64 there is no departure; in bfloat16 a verification pass over
k + 1 rows rounds differently from a one-row plain step, and a near-tie can flip."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specdec.models.loading import as_native


@dataclass(frozen=True)
class Departure:
    row: int
    position: int  # index into the sequence where the two outputs first differ
    expected: int  # token of the reference (plain decoding)
    got: int  # token of the candidate (speculative decoding)
    gap: float  # target logit of `expected` minus that of `got`, recomputed over the common prefix


def departures(model, reference, candidate, attention_mask=None) -> list[Departure]:
    """reference, candidate [batch, L] (same prompts) -> one Departure per row where they differ."""
    native = as_native(model)
    found = []
    for row in range(reference.shape[0]):
        a, b = reference[row], candidate[row]
        differ = (a[: len(b)] != b[: len(a)]).nonzero()
        if not len(differ):
            continue
        pos = int(differ[0])
        keep = torch.ones(pos, dtype=torch.bool)  # drop the prompt's padding
        if attention_mask is not None:
            keep[: attention_mask.shape[1]] = attention_mask[row].bool()
        prefix = a[:pos][keep]
        with torch.inference_mode():
            logits = native(prefix[None], torch.arange(len(prefix))[None], native.new_cache(1, len(prefix)))[0, -1]
        found.append(Departure(row, pos, int(a[pos]), int(b[pos]), float(logits[a[pos]] - logits[b[pos]])))
    return found
