"""Logits processing and the acceptance rule: greedy matching and lossless rejection sampling.

Both are pure functions of their tensors; randomness comes only from the caller's torch.Generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper


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
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got top_k={self.top_k!r}")
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
            scores = TopPLogitsWarper(float(self.top_p))(None, scores)
        return scores.reshape(shape)

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [..., vocab] -> probabilities [..., vocab] after the warpers."""
        return torch.softmax(self.warp(logits), dim=-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """probs [..., vocab] -> token ids [...]"""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])


def verify(drafts, draft_probs, target_logits, num_drafts, sampling: SamplingConfig, generator=None):
    """Decide how many drafts each row keeps and which token follows them.

    drafts         [batch, k]            proposed token ids
    draft_probs    [batch, k, vocab]     the distribution each draft was sampled from; None = deterministic
                                         proposer (one-hot); ignored when greedy
    target_logits  [batch, k + 1, vocab] target logits after the pending token and after each draft
    num_drafts     [batch]               drafts that count in each row (<= k; the rest are padding)
    returns emitted [batch, k + 1] (accepted drafts, then the recovered or bonus token; the tail is junk)
            and num_accepted [batch] (row b emits num_accepted[b] + 1 tokens)
    """
    k = drafts.shape[1]
    in_row = torch.arange(k, device=drafts.device) < num_drafts[:, None]  # [batch, k]
    if sampling.greedy:
        choice = target_logits.argmax(dim=-1)  # [batch, k + 1]
        match = (drafts == choice[:, :k]) & in_row
        num_accepted = match.long().cumprod(dim=1).sum(dim=1)
        return choice, num_accepted

    target_probs = sampling.probs(target_logits)  # [batch, k + 1, vocab]
    if draft_probs is None:
        draft_probs = torch.nn.functional.one_hot(drafts, target_probs.shape[-1]).to(target_probs.dtype)
    # Position k (and any position past a row's own drafts) gets a zero draft distribution, so that the
    # residual there is the target itself: the bonus token is the residual case, not a special case.
    draft_probs = torch.cat((draft_probs * in_row[..., None], torch.zeros_like(target_probs[:, :1])), dim=1)
    p_draft = draft_probs[:, :k].gather(-1, drafts[..., None]).squeeze(-1)  # [batch, k]
    p_target = target_probs[:, :k].gather(-1, drafts[..., None]).squeeze(-1)
    u = torch.rand(p_draft.shape, generator=generator, device=p_draft.device, dtype=p_draft.dtype)
    # Accept with probability min(1, p_target / p_draft), written without the division.
    accept = (u * p_draft < p_target) & in_row
    num_accepted = accept.long().cumprod(dim=1).sum(dim=1)  # [batch]

    at = num_accepted[:, None, None].expand(-1, 1, target_probs.shape[-1])
    residual = (target_probs.gather(1, at) - draft_probs.gather(1, at)).clamp(min=0).squeeze(1)  # [batch, vocab]
    total = residual.sum(dim=-1, keepdim=True)
    # A zero residual happens only where the draft equals the target and so was accepted surely; fall back
    # to the target there, which keeps multinomial away from an all-zero row (no NaN).
    residual = torch.where(total > 0, residual, target_probs.gather(1, at).squeeze(1))
    last = sample(residual, generator)  # [batch]
    emitted = torch.cat((drafts, last[:, None]), dim=1).scatter(1, num_accepted[:, None], last[:, None])
    return emitted, num_accepted
