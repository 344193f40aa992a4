"""The sampler: constructed logits with exact expectations, and the distribution proved statistically."""

import math

import pytest
import torch
from conftest import one_layer_llama

import specdec
import specdec.speculative as generate_module
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
# Statistical test: the first three tokens of speculative sampling follow the target's exact joint
# distribution. With max_new_tokens=3 and k=3 the first pass verifies 2 drafts (positions 0 and 1), so
# acceptance after an accepted draft, the residual at position 1 and the bonus after two drafts are all in
# play; later passes see rows with different draft counts (ragged). Bound per outcome:
# |count - N p| <= 6 sqrt(N p (1 - p)) + 5. Over V^3 = 343 outcomes a 6-sigma normal tail (2e-9 each)
# makes a false alarm about 7e-7 per test; the +5 absorbs the discreteness at tiny N p.
# ---------------------------------------------------------------------------------------------------------
TOY_VOCAB, N, NEW = 7, 50_000, 3
PROMPT = [3, 1, 4]


def _toy(seed, scale):
    return one_layer_llama(TOY_VOCAB, hidden=16, seed=seed, scale=scale)


def _exact_distribution(model, sampling):
    """P(t1, t2, t3) by enumeration of the target's processed distributions. -> [V, V, V]"""
    native = specdec.models.loading.as_native(model)
    V, P = TOY_VOCAB, len(PROMPT)
    pairs = torch.cartesian_prod(torch.arange(V), torch.arange(V))  # [V^2, 2]: every (t1, t2)
    ids = torch.cat((torch.tensor(PROMPT).expand(V * V, -1), pairs), dim=1)  # [V^2, P + 2]
    with torch.no_grad():
        logits = native(ids, torch.arange(P + 2).expand(V * V, -1), native.new_cache(V * V, P + 2))
    p = sampling.probs(logits).reshape(V, V, P + 2, V)
    first = p[0, 0, P - 1]  # [V]          P(t1)
    second = p[:, 0, P]  # [V, V]          P(t2 | t1)
    third = p[:, :, P + 1]  # [V, V, V]    P(t3 | t1, t2)
    return first[:, None, None] * second[:, :, None] * third


def _empirical(target, draft, k, knobs, seed=0):
    out = specdec.generate(target, torch.tensor([PROMPT] * N), max_new_tokens=NEW, eos_token_id=[], do_sample=True,
                           draft_model=draft, num_draft_tokens=k, generator=torch.Generator().manual_seed(seed),
                           **knobs)
    new = out[:, len(PROMPT):]
    cells = (new[:, 0] * TOY_VOCAB + new[:, 1]) * TOY_VOCAB + new[:, 2]
    return torch.bincount(cells, minlength=TOY_VOCAB ** 3).reshape([TOY_VOCAB] * 3).double()


def _violations(counts, probs):
    expected = N * probs
    bound = 6 * torch.sqrt(expected * (1 - probs)) + 5
    return int(((counts - expected).abs() > bound).sum()), int(counts[probs == 0].sum())


SETTINGS = [dict(temperature=1.0, top_k=0, top_p=1.0), dict(temperature=0.7, top_k=4, top_p=1.0),
            dict(temperature=1.3, top_k=0, top_p=0.8), dict(temperature=0.9, top_k=5, top_p=0.9)]


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("knobs", SETTINGS, ids=lambda d: "-".join(f"{k}{v}" for k, v in d.items()))
def test_speculative_sampling_matches_the_targets_distribution(k, knobs):
    target, draft = _toy(0, 4.0), _toy(1, 4.0)  # an unrelated draft: plenty of rejections and residuals
    probs = _exact_distribution(target, SamplingConfig(do_sample=True, **knobs))
    assert torch.isclose(probs.sum(), torch.tensor(1.0, dtype=torch.float64))
    counts = _empirical(target, draft, k, knobs)
    bad, impossible = _violations(counts, probs)
    assert impossible == 0, "a token of probability zero appeared"
    assert bad == 0, f"{bad} outcomes outside the bound"


def test_plain_sampling_matches_too():
    probs = _exact_distribution(_toy(0, 4.0), SamplingConfig(do_sample=True, **SETTINGS[3]))
    bad, impossible = _violations(_empirical(_toy(0, 4.0), None, 1, SETTINGS[3]), probs)
    assert bad == 0 and impossible == 0


def test_the_statistical_test_catches_resampling_from_the_target(monkeypatch):
    """The classic bug: on rejection, resample from the target instead of the residual. It must fail."""
    real_verify = generate_module.verify

    def broken(drafts, draft_probs, target_logits, num_drafts, sampling, generator=None):
        target_probs = sampling.probs(target_logits)
        emitted, n = real_verify(drafts, draft_probs, target_logits, num_drafts, sampling, generator)
        at = n[:, None, None].expand(-1, 1, target_probs.shape[-1])
        resampled = torch.multinomial(target_probs.gather(1, at).squeeze(1), 1, generator=generator)
        return emitted.scatter(1, n[:, None], resampled), n

    monkeypatch.setattr(generate_module, "verify", broken)
    target, draft = _toy(0, 4.0), _toy(1, 4.0)
    probs = _exact_distribution(target, SamplingConfig(do_sample=True, **SETTINGS[0]))
    bad, _ = _violations(_empirical(target, draft, 3, SETTINGS[0]), probs)
    assert bad > 0


def test_the_statistical_test_catches_drafts_not_drawn_from_draft_probs(monkeypatch):
    """transformers #32867 / vLLM #40149: the draft samples from one distribution and reports another."""
    import specdec.proposers as proposers

    real_sample = proposers.sample

    def skewed(probs, generator):  # draws from probs**0.5, renormalised, but probs is what gets reported
        flat = probs.sqrt()
        return real_sample(flat / flat.sum(-1, keepdim=True), generator)

    monkeypatch.setattr(proposers, "sample", skewed)
    target, draft = _toy(0, 4.0), _toy(1, 4.0)
    probs = _exact_distribution(target, SamplingConfig(do_sample=True, **SETTINGS[1]))
    bad, _ = _violations(_empirical(target, draft, 3, SETTINGS[1]), probs)
    assert bad > 0


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
