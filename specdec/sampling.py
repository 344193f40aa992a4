"""Logits processing and the acceptance rule: greedy matching and lossless rejection sampling.

The rule itself lives in ``kernels/rejection_sample.py`` (Triton on CUDA, its PyTorch reference elsewhere);
``verify`` draws the random numbers from the caller's torch.Generator and calls it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper

from specdec.kernels.rejection_sample import greedy_accept, rejection_sample
from specdec.validate import integer


MIN_TEMPERATURE = 1e-6  # the smallest positive temperature: a logit gap of 1e-3 becomes 1e3, one-hot already


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen. ``greedy`` covers do_sample=False, temperature=0 and top_k=1."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0

    def __post_init__(self):
        t = self.temperature
        if not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got temperature={t!r}")
        if 0 < t < MIN_TEMPERATURE:
            raise ValueError(f"temperature must be 0 (greedy) or >= {MIN_TEMPERATURE:g}: below, logits / temperature "
                             f"can overflow float32 and every probability turns NaN; got temperature={t!r}")
        integer("top_k", self.top_k, 0)
        p = self.top_p
        if not isinstance(p, (int, float)) or not 0 < p <= 1:  # NaN fails the comparison too
            raise ValueError(f"top_p must lie in (0, 1], got top_p={p!r}")

    @property
    def greedy(self) -> bool:
        # top_k=1 is greedy by definition; taking the argmax keeps it so on ties as well.
        return not self.do_sample or self.temperature == 0 or self.top_k == 1

    def warp(self, logits: torch.Tensor) -> torch.Tensor:
        """Apply temperature, top-k, top-p (transformers' own warpers, in generate()'s order).

        logits [..., vocab] -> processed logits [..., vocab]
        """
        shape = logits.shape
        scores = logits.reshape(-1, shape[-1])
        if self.temperature != 1.0:
            scores = TemperatureLogitsWarper(float(self.temperature))(None, scores)
        if self.top_k > 0:
            scores = TopKLogitsWarper(self.top_k)(None, scores)
        if self.top_p < 1.0:
            scores = top_p_filter(scores, float(self.top_p))
        return scores.reshape(shape)

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [..., vocab] -> probabilities [..., vocab] after the warpers."""
        return torch.softmax(self.warp(logits), dim=-1)


def top_p_filter(scores: torch.Tensor, top_p: float, first: int = 256) -> torch.Tensor:
    """transformers' ``TopPLogitsWarper``: keep the fewest highest-scoring tokens whose probability reaches
    ``top_p`` (at least one), the rest to -inf. scores [rows, vocab] -> [rows, vocab]

    transformers sorts the whole vocabulary for it: over 49152 ids on a 2-core CPU 4.5 ms at 1 row (beside a
    26 ms float32 SmolLM2 step), 12 ms at 5 (a verification pass at k = 4), 170 ms at 64; this: 0.7 / 1.4 /
    23 ms (bench/top_p.py). The kept tokens are the top of the distribution, so a top-``first`` selection
    finds them wherever those hold ``top_p`` of the mass (almost always; rows where they do not look again
    at twice as many, up to the whole vocabulary). A token is kept where the mass above it is < top_p: the
    warper's rule (its ascending cumulative sum > 1 - top_p) summed from the other end, in float64: the two
    differ only on tokens at the cut that the warper's float32 sum over the whole tail misplaces (over 49152
    ids at top_p = 0.999: a few dozen tokens of ~1e-6 each; tests/test_sampling.py bounds their mass)."""
    probs = scores.softmax(dim=-1)  # [rows, vocab]
    keep = torch.zeros_like(scores, dtype=torch.bool)
    rows = torch.arange(len(scores), device=scores.device)  # rows still to decide
    n = min(first, scores.shape[-1])
    while len(rows):
        top, ids = probs[rows].topk(n, dim=-1)  # [r, n] descending
        # equal probabilities in the warper's order, the higher id first (its ascending sort drops the lower
        # ids of a tie at the cut first); bfloat16 logits tie often: topk leaves their order unspecified
        by_id = ids.argsort(dim=-1, descending=True, stable=True)
        top, ids = top.gather(1, by_id), ids.gather(1, by_id)
        by_prob = top.argsort(dim=-1, descending=True, stable=True)
        top, ids = top.gather(1, by_prob), ids.gather(1, by_prob)
        above = top.double().cumsum(dim=-1) - top.double()  # mass of the tokens ranked above each
        done = (above[:, -1] + top[:, -1] >= top_p) | (n == scores.shape[-1])  # the cut lies within the top n
        keep[rows[done]] = keep[rows[done]].scatter(1, ids[done], above[done] < top_p)
        rows, n = rows[~done], min(2 * n, scores.shape[-1])
    return scores.masked_fill(~keep, -math.inf)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """probs [..., vocab] -> token ids [...], by the exponential race the verifier runs too: the id with the
    largest probs / Exp(1) wins with probability probs. 2.4-2.6x cheaper than torch.multinomial over a head's
    8192 kept ids (110 against 286 us a row on a 2-core CPU), which pays torch's exponential_."""
    return (probs / exponentials(probs.shape, generator, probs.dtype, probs.device)).argmax(dim=-1)


def verify(drafts, draft_probs, target_logits, num_drafts, sampling: SamplingConfig, generator=None):
    """Decide how many drafts each row keeps and which token follows them.

    drafts         [batch, k]            proposed token ids
    draft_probs    [batch, k, vocab]     the distribution each draft was sampled from; None = deterministic
                                         proposer (one-hot); ignored when greedy
    target_logits  [batch, k + 1, vocab] target logits after the pending token and after each draft
    num_drafts     [batch]               drafts that count in each row (<= k; the rest are padding)
    returns emitted [batch, k + 1] (accepted drafts, then the recovered or bonus token, then -1)
            and num_accepted [batch] (row b emits num_accepted[b] + 1 tokens)
    """
    if sampling.greedy:
        return greedy_accept(drafts, target_logits, num_drafts)
    target_probs = sampling.probs(target_logits)  # [batch, k + 1, vocab]
    uniforms, exponentials = random_numbers(drafts.shape, target_probs.shape[-1], generator, target_probs.dtype,
                                            drafts.device)
    return rejection_sample(drafts, draft_probs, target_probs, num_drafts, uniforms, exponentials)


def random_numbers(shape, vocab: int, generator, dtype, device):
    """What rejection sampling draws, in this order: uniforms [batch, k] for the acceptance tests, then
    exponentials [batch, vocab], Exp(1) variates for the race that draws the recovered/bonus token (never
    exactly 0: 0/0 is NaN; never +inf: a race no token can win). shape = (batch, k). The engine draws each
    request's numbers with this too, so a seeded request draws the same numbers alone or in a batch."""
    uniforms = torch.rand(shape, generator=generator, device=device, dtype=dtype)
    return uniforms, exponentials((shape[0], vocab), generator, dtype, device)


def exponentials(shape, generator, dtype, device) -> torch.Tensor:
    """Exp(1) variates [shape] for an exponential race, by inversion, -log(u), from float64 uniforms: on the
    CPU 2-3x cheaper than torch's exponential_, which every sampled row would pay at every step. float32
    uniforms would not do: they lie on a 2^-24 grid, so the race's winner (the smallest variates, ~1 / vocab)
    ties with 0.14% of 49152-id rows (the lower id wins), and u = 0 (0.3% of rows) makes a variate 0, which
    wins outright, or +inf, which can leave no token to win. float64: a 2^-53 grid, and u >= tiny keeps every
    variate finite and > 0."""
    u = torch.rand(shape, generator=generator, device=device, dtype=torch.float64)
    return u.clamp_(min=torch.finfo(torch.float64).tiny).log_().neg_().to(dtype)
