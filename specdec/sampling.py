"""Logits processing and the acceptance rule: greedy matching and lossless rejection sampling.

The rule itself lives in ``kernels/rejection_sample.py`` (Triton on CUDA, its PyTorch reference elsewhere);
``verify`` warps the target's logits, draws the random numbers from the caller's torch.Generator (one for the
batch, or one per row) and calls it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers.generation.logits_process import MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper

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
    min_p: float = 0.0  # 0 = no min-p filter

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
        m = self.min_p
        if not isinstance(m, (int, float)) or not 0 <= m <= 1:
            raise ValueError(f"min_p must lie in [0, 1], got min_p={m!r}")

    @property
    def greedy(self) -> bool:
        # top_k=1 is greedy by definition; taking the argmax keeps it so on ties as well.
        return not self.do_sample or self.temperature == 0 or self.top_k == 1

    def warp(self, logits: torch.Tensor) -> torch.Tensor:
        """Apply temperature, top-k, top-p, min-p (transformers' own warpers, in generate()'s order).

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
        if self.min_p > 0:
            scores = MinPLogitsWarper(float(self.min_p))(None, scores)
        return scores.reshape(shape)

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [..., vocab] -> probabilities [..., vocab] after the warpers."""
        return torch.softmax(self.warp(logits), dim=-1)


def top_p_filter(scores: torch.Tensor, top_p: float, first: int = 256) -> torch.Tensor:
    """transformers' ``TopPLogitsWarper``: keep the fewest highest-scoring tokens whose probability reaches
    ``top_p`` (at least one), the rest to -inf. scores [rows, vocab] -> [rows, vocab]

    transformers sorts the whole vocabulary for it: over 49152 ids on a 2-core CPU 4.5 ms at 1 row (beside a
    26 ms float32 SmolLM2 step), 12 ms at 5 (a verification pass at k = 4), 170 ms at 64; this: 0.7 / 1.4 /
    23 ms (each timed alone on SmolLM2's own logits at temperature 0.7, top_p 0.9, median of 20; end to end,
    sampled decoding against transformers: ``specdec bench --preset top-p``). The kept tokens are the top of
    the distribution, so a top-``first`` selection finds them wherever those hold ``top_p`` of the mass
    (almost always; rows where they do not look again at twice as many, up to the whole vocabulary). A token is kept where the mass above it is < top_p: the
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


def verify(drafts, draft_probs, target_logits, num_drafts, sampling, generator=None):
    """Decide how many drafts each row keeps and which token follows them.

    drafts         [batch, k]            proposed token ids
    draft_probs    [batch, k, vocab]     the distribution each draft was sampled from; None = deterministic
                                         proposer (one-hot); ignored in greedy rows
    target_logits  [batch, k + 1, vocab] target logits after the pending token and after each draft
    num_drafts     [batch]               drafts that count in each row (<= k; the rest are padding)
    sampling       a SamplingConfig for every row, or a sequence of one per row [batch]
    generator      a torch.Generator (or None: torch's global one) drawing every sampled row's numbers in one
                   call, or a sequence of one per row [batch]: each row then draws ``random_numbers`` for its own
                   num_drafts only, exactly what ``verify`` of that row alone draws, so a seeded row samples the
                   same tokens whatever else is in the batch (the engine: each request's own generator)
    returns emitted [batch, k + 1] (accepted drafts, then the recovered or bonus token, then -1)
            and num_accepted [batch] (row b emits num_accepted[b] + 1 tokens)

    Greedy rows take the argmax rule; sampled rows are warped in one call per distinct setting and accepted
    by one rejection-sampling call. Every row alike (generate()): one ``greedy_accept`` call, or one warp and
    one ``rejection_sample`` call over the whole batch, with no row gathered or scattered.
    """
    batch = drafts.shape[0]
    configs = [sampling] * batch if isinstance(sampling, SamplingConfig) else _per_row("sampling", sampling, batch)
    if not (generator is None or isinstance(generator, torch.Generator)):
        generator = _per_row("generator", generator, batch)
    sampled = [i for i, c in enumerate(configs) if not c.greedy]
    if not sampled:
        return greedy_accept(drafts, target_logits, num_drafts)
    every = len(sampled) == batch
    rows = slice(None) if every else torch.tensor(sampled, device=drafts.device)  # the sampled rows
    target_probs = _warp(target_logits[rows], [configs[i] for i in sampled])  # [sampled, k + 1, vocab]
    uniforms, exponentials = _draws(generator, sampled, num_drafts[rows], drafts.shape[1], target_probs)
    kept = rejection_sample(drafts[rows], None if draft_probs is None else draft_probs[rows], target_probs,
                            num_drafts[rows], uniforms, exponentials)
    if every:
        return kept
    # the greedy rows by the argmax rule, all rows in one call (cheap); the sampled rows' results replaced
    emitted, num_accepted = greedy_accept(drafts, target_logits, num_drafts)  # [batch, k + 1], [batch]
    emitted[rows], num_accepted[rows] = kept
    return emitted, num_accepted


def _per_row(name: str, values, batch: int) -> list:
    """``values`` as a list of one per row; a ValueError naming ``name`` if there are not ``batch`` of them."""
    values = list(values)
    if len(values) != batch:
        raise ValueError(f"{name} must be one value for the batch or one per row ({batch}), got {len(values)}")
    return values


def _warp(logits: torch.Tensor, configs: list[SamplingConfig]) -> torch.Tensor:
    """logits [rows, k + 1, vocab], configs [rows] -> target_probs [rows, k + 1, vocab], one call per setting."""
    groups: dict[SamplingConfig, list[int]] = {}
    for j, config in enumerate(configs):
        groups.setdefault(config, []).append(j)
    if len(groups) == 1:
        return configs[0].probs(logits)
    probs = torch.empty_like(logits)
    for config, members in groups.items():
        at = torch.tensor(members, device=logits.device)
        probs[at] = config.probs(logits[at])
    return probs


def _draws(generator, sampled: list[int], num_drafts: torch.Tensor, k: int, target_probs: torch.Tensor):
    """The sampled rows' random numbers: uniforms [sampled, k] and exponentials [sampled, vocab] (see
    ``verify``'s generator: one, or a list of one per row of the batch). num_drafts [sampled]."""
    vocab, dtype, device = target_probs.shape[-1], target_probs.dtype, target_probs.device
    if not isinstance(generator, list):  # one generator (or torch's global one) for the batch
        return random_numbers((len(sampled), k), vocab, generator, dtype, device)
    uniforms = torch.zeros(len(sampled), k, device=device, dtype=dtype)  # past a row's drafts: unused
    exponentials = torch.empty(len(sampled), vocab, device=device, dtype=dtype)
    for j, (i, n) in enumerate(zip(sampled, num_drafts.tolist())):
        u, e = random_numbers((1, n), vocab, generator[i], dtype, device)
        uniforms[j, :n], exponentials[j] = u[0], e[0]
    return uniforms, exponentials


def random_numbers(shape, vocab: int, generator, dtype, device):
    """What rejection sampling draws, in this order: uniforms [batch, k] for the acceptance tests, then
    exponentials [batch, vocab], Exp(1) variates for the race that draws the recovered/bonus token (never
    exactly 0: 0/0 is NaN; never +inf: a race no token can win). shape = (batch, k). ``verify`` with a generator
    per row draws each row's numbers with this too, shape (1, its num_drafts), so a seeded request draws the
    same numbers alone or in a batch."""
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
