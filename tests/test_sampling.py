"""The sampler: constructed logits with exact expectations, and the distribution proved statistically."""

import math

import pytest
import torch
from conftest import one_layer_llama, tiny_head
from distribution import (SEED, check, chi_square, joint_counts, mutant, noncentrality, power,
                          reference_joint, rejects)

import specdec
from specdec.sampling import SamplingConfig, verify

GREEDY = SamplingConfig()
SAMPLE = SamplingConfig(do_sample=True)
NEG = -1e9


def _logits(*rows):  # rows of per-position argmax ids over a vocab of 5 -> [1, len, 5]
    out = torch.full((1, len(rows), 5), NEG, dtype=torch.float64)
    for i, t in enumerate(rows):
        out[0, i, t] = 0.0
    return out


def test_greedy_perfect_match_takes_all_and_the_bonus():
    emitted, n = verify(torch.tensor([[1, 2, 3]]), None, _logits(1, 2, 3, 4), torch.tensor([3]), GREEDY)
    assert n.tolist() == [3] and emitted[0].tolist() == [1, 2, 3, 4]


def test_greedy_first_position_mismatch_takes_the_targets_token():
    emitted, n = verify(torch.tensor([[0, 2, 3]]), None, _logits(1, 2, 3, 4), torch.tensor([3]), GREEDY)
    assert n.tolist() == [0] and emitted[0, 0].item() == 1


def test_empty_draft_gives_only_the_bonus_token():
    for sampling in (GREEDY, SAMPLE):
        emitted, n = verify(torch.zeros(1, 0, dtype=torch.long), None, _logits(4), torch.tensor([0]), sampling,
                            torch.Generator().manual_seed(0))
        assert n.tolist() == [0] and emitted[0].tolist() == [4]


def test_drafts_past_a_rows_count_are_ignored():
    emitted, n = verify(torch.tensor([[1, 2, 3], [1, 2, 3]]), None, torch.cat([_logits(1, 2, 3, 4)] * 2),
                        torch.tensor([3, 1]), GREEDY)
    assert n.tolist() == [3, 1] and emitted[1, :2].tolist() == [1, 2]


def test_draft_equal_to_target_is_always_accepted_and_zero_residual_gives_no_nan():
    target = torch.log_softmax(torch.randn(64, 3, 7, generator=torch.Generator().manual_seed(0),
                                           dtype=torch.float64), -1)
    draft_probs = target[:, :2].exp()
    gen = torch.Generator().manual_seed(1)
    drafts = torch.multinomial(draft_probs.reshape(-1, 7), 1, generator=gen).reshape(64, 2)
    emitted, n = verify(drafts, draft_probs, target, torch.full((64,), 2), SAMPLE, gen)
    assert n.tolist() == [2] * 64 and torch.equal(emitted[:, :2], drafts)
    # one-hot target and a deterministic proposer that guessed it: residual is exactly zero, still no NaN
    emitted, n = verify(torch.tensor([[3]]), None, _logits(3, 1), torch.tensor([1]), SAMPLE, gen)
    assert n.tolist() == [1] and emitted[0].tolist() == [3, 1]


def test_top_k_one_is_greedy_even_on_ties():
    logits = torch.zeros(1, 2, 5, dtype=torch.float64)  # every token tied
    sampling = SamplingConfig(do_sample=True, top_k=1)
    assert sampling.greedy
    emitted, _ = verify(torch.tensor([[0]]), None, logits, torch.tensor([1]), sampling, torch.Generator())
    assert emitted[0].tolist() == [0, 0]  # argmax picks the first of tied tokens, as greedy does



@pytest.mark.parametrize("vocab", [10, 300, 49152])
def test_top_p_filter_is_transformers_warper(vocab):
    """Our top-p (a top-256 selection, widened where it does not hold top_p of the mass) keeps the tokens
    transformers' sorting warper keeps: exactly on small vocabularies; over 49152 ids the warper's float32
    sum over the whole tail misplaces a few tokens at the cut, whose mass stays below 1e-4 (measured: 4e-5).
    Flat rows (scale 0.1, top_p 0.999) need most of the vocabulary: the widening path."""
    import math

    from transformers.generation.logits_process import TopPLogitsWarper

    from specdec.sampling import top_p_filter

    torch.manual_seed(vocab)
    for trial in range(40):
        scale, top_p = [0.1, 1.0, 3.0, 10.0][trial % 4], [0.1, 0.5, 0.9, 0.95, 0.999][trial % 5]
        x = torch.randn(1 + trial % 5, vocab) * scale
        if trial % 3 == 0:
            x[:, : vocab // 3] = -math.inf  # after top-k
        ours, theirs = top_p_filter(x, top_p), TopPLogitsWarper(top_p)(None, x.clone())
        differ = ours.isinf() != theirs.isinf()
        if vocab <= 300:
            assert torch.equal(ours, theirs), (trial, scale, top_p)
        else:
            assert (x.softmax(-1) * differ).sum(-1).max() < 1e-4, (trial, scale, top_p)
        assert torch.equal(ours[~ours.isinf()], x[~ours.isinf()])  # kept scores unchanged

# ---------------------------------------------------------------------------------------------------------
# The distribution, proved statistically (tests/distribution.py). N rows of one prompt go through one
# generate() call; the first NEW tokens of every row are counted over their joint outcomes (8^3 = 512 cells:
# the 7 ids and END after an EOS) and compared with transformers' own ancestral sampling, enumerated:
# - a chi-square test over all cells, false alarm 1e-5 per test (cells expected below 5 pooled);
# - the 6-sigma bound per cell (false alarm ~1e-6 over 512 cells), and no impossible outcome.
# With max_new_tokens=3 and k >= 2 the first pass verifies 2 drafts, so acceptance after an accepted draft,
# the residual at position 1 and the bonus after two drafts are all in play; later passes see rows with
# different draft counts (ragged). Power: test_the_aggregate_test_has_power_against_10_percent_biases.
# ---------------------------------------------------------------------------------------------------------
TOY_VOCAB, N, NEW = 7, 50_000, 3
PROMPT = [3, 1, 4]
ALL = dict(temperature=0.9, top_k=5, top_p=0.9)


def _toy(seed, scale=4.0):
    return one_layer_llama(TOY_VOCAB, hidden=16, seed=seed, scale=scale)


class ConstantProposer:
    """A user's deterministic proposer (no draft distribution): always proposes token 2."""

    def propose(self, state, k):
        return torch.full((state.batch_size, k), 2, dtype=torch.long), None


def _draft(kind, target):
    head = lambda: tiny_head(target, kept=[0, 1, 3, 4, 6], seed=3)  # noqa: E731 (ids 2 and 5 never proposed)
    return {"model": lambda: _toy(1), "head": head, "ngram": lambda: "ngram",
            "constant": ConstantProposer, "plain": lambda: None}[kind]()


def _sampled(target, draft, k, knobs, prompts=(PROMPT,), rows=N, eos=None, seed=SEED):
    """Counts [8, 8, 8] of the first NEW tokens for each prompt (rows / len(prompts) rows each, left-padded)."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts]).repeat_interleave(rows // len(prompts), 0)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts]).repeat_interleave(
        rows // len(prompts), 0)
    out = specdec.generate(target, ids, mask, max_new_tokens=NEW, eos_token_id=[] if eos is None else eos,
                           do_sample=True, draft_model=draft, num_draft_tokens=k,
                           generator=torch.Generator().manual_seed(seed), **knobs)
    new = torch.nn.functional.pad(out[:, width:], (0, NEW - (out.shape[1] - width)), value=0)  # (all ended)
    return [joint_counts(group, TOY_VOCAB, eos) for group in new.chunk(len(prompts))]


CASES = [("model", 1, ALL), ("model", 2, dict(temperature=0.7)), ("model", 3, dict(top_k=4)),
         ("model", 4, dict(top_p=0.8)), ("head", 4, dict(temperature=1.3)),
         ("ngram", 3, dict(temperature=1.3)), ("constant", 2, {}), ("constant", 4, ALL), ("plain", 1, ALL)]


@pytest.mark.parametrize("kind, k, knobs", CASES, ids=lambda x: "-".join(f"{a}{b}" for a, b in x.items())
                         if isinstance(x, dict) else str(x))
def test_sampling_has_the_targets_distribution_on_every_path(kind, k, knobs):
    target = _toy(0)
    (counts,) = _sampled(target, _draft(kind, target), k, knobs)
    check(counts, reference_joint(target, PROMPT, NEW, knobs))


def test_ragged_batch_with_eos_inside_the_window_keeps_each_rows_distribution():
    """Two prompts of different lengths (left padding) in one batch, drafts from a model at k = 3, and as EOS
    the id likeliest to end both prompts' rows inside the window (their later tokens are END)."""
    target, prompts, knobs = _toy(0), ([3, 1, 4], [5, 2]), dict(temperature=1.3, top_k=6)
    first = [reference_joint(target, list(p), 1, knobs)[:TOY_VOCAB] for p in prompts]
    eos = int(torch.minimum(*first).argmax())
    counts = _sampled(target, _toy(1), 3, knobs, prompts=prompts, eos=eos)
    for prompt, c in zip(prompts, counts):
        probs = reference_joint(target, list(prompt), NEW, knobs, eos=eos)
        assert probs[eos, TOY_VOCAB, TOY_VOCAB] > 0.05  # rows that end at once: EOS is in play
        check(c, probs)


# Deliberate bugs (tests/distribution.mutant: the module recompiled with one line changed) that the tests
# above must catch. Each named as in the mutation check (bench/mutants.py).
ACCEPT_BIAS = ("accept = (uniforms * p_draft < p_target) & in_row", "accept = (uniforms * p_draft < 1.1 * p_target) & in_row")
RESIDUAL_BIAS = ("residual = torch.clamp(target_n - torch.where(", "residual = torch.clamp(target_n - 0.9 * torch.where(")
ONE_HOT_KEPT = ("draft_n = (torch.arange(target_n.shape[-1], device=x_n.device) == x_n).to(target_n.dtype)",
                "draft_n = torch.zeros_like(target_n)")


def _with_mutant(monkeypatch, old, new):
    import specdec.kernels.rejection_sample as rs

    monkeypatch.setattr(rs, "rejection_sample_reference", mutant(rs, old, new).rejection_sample_reference)


@pytest.mark.parametrize("bug, kind, k, knobs", [(ACCEPT_BIAS, "model", 2, dict(temperature=0.7)),
                                                  (RESIDUAL_BIAS, "model", 2, dict(temperature=0.7)),
                                                  (ONE_HOT_KEPT, "constant", 2, {})],
                         ids=["acceptance-10%", "residual-10%", "one-hot-draft-kept-in-residual"])
def test_the_distribution_test_catches_small_biases(bug, kind, k, knobs, monkeypatch):
    target = _toy(0)
    _with_mutant(monkeypatch, *bug)
    (counts,) = _sampled(target, _draft(kind, target), k, knobs)
    assert rejects(counts, reference_joint(target, PROMPT, NEW, knobs))


def test_the_distribution_test_catches_a_top_p_that_keeps_one_token_fewer(monkeypatch):
    """The reference is transformers' TopPLogitsWarper, not our filter: a nucleus one token short is caught."""
    import specdec.sampling as sampling

    broken = mutant(sampling, "keep[rows[done]].scatter(1, ids[done], above[done] < top_p)",
                    "keep[rows[done]].scatter(1, ids[done], (above[done] < top_p) & "
                    "((above[done] + top[done] < top_p) | (above[done] == 0)))")
    monkeypatch.setattr(sampling, "top_p_filter", broken.top_p_filter)
    target = _toy(0)
    (counts,) = _sampled(target, _toy(1), 2, dict(top_p=0.8))
    assert rejects(counts, reference_joint(target, PROMPT, NEW, dict(top_p=0.8)))


def test_the_distribution_test_catches_resampling_from_the_target(monkeypatch):
    """The classic bug: on rejection, resample from the target instead of the residual."""
    _with_mutant(monkeypatch, "residual = torch.clamp(target_n - torch.where(has_draft, draft_n, 0.0), min=0.0)",
                 "residual = target_n")
    target = _toy(0)
    (counts,) = _sampled(target, _toy(1), 3, {})
    assert rejects(counts, reference_joint(target, PROMPT, NEW, {}))


def test_the_distribution_test_catches_drafts_not_drawn_from_draft_probs(monkeypatch):
    """transformers #32867 / vLLM #40149: the draft samples from one distribution and reports another."""
    import specdec.proposers as proposers

    real_sample = proposers.sample

    def skewed(probs, generator):  # draws from probs**0.5, renormalised, but probs is what gets reported
        flat = probs.sqrt()
        return real_sample(flat / flat.sum(-1, keepdim=True), generator)

    monkeypatch.setattr(proposers, "sample", skewed)
    target = _toy(0)
    (counts,) = _sampled(target, _toy(1), 3, dict(temperature=0.7, top_k=4))
    assert rejects(counts, reference_joint(target, PROMPT, NEW, dict(temperature=0.7, top_k=4)))


def test_the_aggregate_test_has_power_against_10_percent_biases():
    """Power of ``check`` at N rows, from the noncentral chi-square law of its first-token marginal test. The
    first token's distribution under each bug has a closed form (the first draft is accepted or recovered
    from distributions that earlier rounds do not touch). At N = 50,000 (toy target and draft, temperature
    0.7): lambda = 549 / 94 / 4182 for a 10% acceptance bias, a 10% residual bias and a one-hot draft kept
    in the residual, over 6 degrees of freedom: power 1 - 1e-15 / 0.99999 / 1 (a false alarm: 1e-5 a test)."""
    target, draft, knobs = _toy(0), _toy(1), dict(temperature=0.7)
    p = reference_joint(target, PROMPT, 1, knobs)[:TOY_VOCAB]  # [V] the target's first token
    q = reference_joint(draft, PROMPT, 1, knobs)[:TOY_VOCAB]  # [V] the draft's
    d = torch.nn.functional.one_hot(torch.tensor(2), TOY_VOCAB).double()  # the constant proposer's draft

    def first_token(accept, residual):  # P(x) = accept(x) + (1 - sum(accept)) * residual(x) / sum(residual)
        return accept + (1 - accept.sum()) * residual / residual.sum()

    assert torch.allclose(first_token(torch.minimum(q, p), (p - q).clamp(min=0)), p)  # the rule is lossless
    assert torch.allclose(first_token(torch.minimum(d, p), (p - d).clamp(min=0)), p)
    wrong = {"acceptance": first_token(torch.minimum(q, 1.1 * p), (p - q).clamp(min=0)),
             "residual": first_token(torch.minimum(q, p), (p - 0.9 * q).clamp(min=0)),
             "one-hot": first_token(torch.minimum(d, p), p)}
    _, df = chi_square(N * p, p)
    for name, bad in wrong.items():
        lam = noncentrality(p, bad, N)
        assert power(lam, df) > 0.9999, (name, lam, df)


def _recovered_counts(rows: int = 200_000):
    """Every row drafts token 4 with draft probability 1, which the target gives probability 0: always
    rejected, so the emitted token is drawn from the residual max(0, p - q) normalised = p."""
    p = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0], dtype=torch.float64)
    logits = p.log().expand(rows, 2, -1)  # [rows, k + 1, vocab]
    drafts = torch.full((rows, 1), 4)
    draft_probs = torch.nn.functional.one_hot(drafts, 5).double()  # [rows, 1, vocab]
    emitted, n = verify(drafts, draft_probs, logits, torch.ones(rows, dtype=torch.long),
                        SamplingConfig(do_sample=True), torch.Generator().manual_seed(0))
    assert (n == 0).all()
    return torch.bincount(emitted[:, 0], minlength=5).double(), p


def _sample_counts(n=200_000):
    from specdec.sampling import sample

    p = torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0])
    ids = sample(p.expand(n, 5), torch.Generator().manual_seed(0))
    return torch.bincount(ids, minlength=5).double(), p.double()


def _beyond_six_sigma(counts, p) -> bool:
    """Some count lies more than 6 standard deviations from its expectation (a false alarm ~2e-9 per cell)."""
    return bool((counts - counts.sum() * p).abs().max() > 6 * (counts.sum() * p * (1 - p)).sqrt().max())


#: both draws are the race argmax weights / e with e ~ Exp(1) (drawn by inversion, -log(u)): the recovered
#: token's over the residual, a sampled draft's (``sample``, 200000 draws of one row) over its probabilities
RACES = pytest.mark.parametrize("counts_of", [_recovered_counts, _sample_counts], ids=["recovered", "draft"])


@RACES
def test_the_race_samples_its_distribution(counts_of):
    counts, p = counts_of()
    assert not _beyond_six_sigma(counts, p)
    assert counts[4] == 0


@RACES
def test_the_race_test_catches_variates_that_are_not_exponential(counts_of, monkeypatch):
    """Uniform variates in the race favour the likeliest token (0.5 -> 0.58 for the residual): the bound fails."""
    import specdec.sampling as sampling

    real = sampling.exponentials
    monkeypatch.setattr(sampling, "exponentials", lambda *a: 1 - torch.exp(-real(*a)))  # Exp(1) -> U(0, 1)
    assert _beyond_six_sigma(*counts_of())


def test_exponential_variates_are_finite_and_positive_even_where_float32_uniforms_hit_0():
    """A variate of 0 wins the race outright whatever its token's residual, and +inf can leave no token to
    win. Over 1000 rows of 49152 ids (49 M draws) float32 uniforms hit u = 0 (their 2^-24 grid); the variates
    come from float64 uniforms (clamped >= tiny), so every one is finite and > 0."""
    from specdec.sampling import random_numbers

    _, e = random_numbers((1000, 1), 49152, torch.Generator().manual_seed(0), torch.float32, "cpu")
    assert bool(torch.isfinite(e).all()) and bool((e > 0).all())
    gen = torch.Generator().manual_seed(0)
    torch.rand(1000, 1, generator=gen, dtype=torch.float32)  # (the uniforms for the acceptance tests come first)
    u = torch.rand(1000, 49152, generator=gen, dtype=torch.float64)
    assert torch.equal(e, u.log().neg().float())  # the very draws random_numbers made
    u32 = torch.rand(1000, 49152, generator=torch.Generator().manual_seed(0))
    assert int((u32 == 0).sum()) > 0  # the hazard: float32 uniforms of 0


def test_temperature_too_small_to_divide_by_is_refused():
    """logits / 1e-38 overflows float32 and turns every probability NaN (which would emit token 0 silently)."""
    with pytest.raises(ValueError, match="temperature must be 0 .greedy. or >= 1e-06"):
        SamplingConfig(do_sample=True, temperature=1e-38)
    assert SamplingConfig(do_sample=True, temperature=1e-6).temperature == 1e-6


@pytest.mark.parametrize("top_p", [0.75, 0.8])
def test_top_p_keeps_the_same_tied_tokens_as_transformers(top_p):
    """Ties at the cut (frequent with bfloat16 logits): transformers' ascending sort drops the lower ids of a
    tie first; so does top_p_filter. Four equal logits straddle the cut here."""
    from transformers.generation.logits_process import TopPLogitsWarper

    from specdec.sampling import top_p_filter

    scores = torch.tensor([[3.0, 1.0, 1.0, 1.0, 1.0, 0.0]])
    want = TopPLogitsWarper(top_p)(None, scores.clone()) > -math.inf
    assert torch.equal(top_p_filter(scores, top_p) > -math.inf, want)
