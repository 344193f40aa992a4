"""The sampler: constructed logits with exact expectations, and the distribution proved statistically."""

import math

import pytest
import torch
from conftest import one_layer_llama, tiny_head
from distribution import (SAMPLER_BUGS, SEED, bug, check, chi_square, first_token, joint_counts, noncentrality,
                          power, reference_joint, rejects)

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
# The distribution, proved statistically (tests/distribution.py). N rows of one prompt go through one
# generate() call with max_new_tokens = max(3, k + 1), so that the first pass verifies all k drafts
# (acceptance at every draft position, the residual there and the bonus after k drafts are in play; later
# passes see rows with different draft counts). The new tokens of every row are counted over their joint
# outcomes (the 7 ids and END after an EOS) and compared with transformers' own ancestral sampling,
# enumerated: ``check`` runs a chi-square test over the joint and over each token's marginal, false alarm
# 1e-5 a test (at most 6e-5 for a check of five tokens), plus a 6-sigma bound per cell. Its power against
# a 10% acceptance bias, a 10% residual bias and a deterministic draft kept in the residual:
# test_the_distribution_test_has_power_against_10_percent_biases.
# ---------------------------------------------------------------------------------------------------------
TOY_VOCAB, N = 7, 50_000
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


def _new(k):
    return max(3, k + 1)


def _sampled(target, draft, k, knobs, new, prompts=(PROMPT,), rows=N, eos=None, seed=SEED):
    """Counts [8] * new of the first ``new`` tokens for each prompt (rows / len(prompts) rows each,
    left-padded). top_k is passed explicitly (0 unless set), as the reference reads it: left out, generate()
    would take transformers' default of 50."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts]).repeat_interleave(rows // len(prompts), 0)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts]).repeat_interleave(
        rows // len(prompts), 0)
    out = specdec.generate(target, ids, mask, max_new_tokens=new, eos_token_id=[] if eos is None else eos,
                           do_sample=True, draft_model=draft, num_draft_tokens=k,
                           generator=torch.Generator().manual_seed(seed), **{"top_k": 0, **knobs})
    tokens = torch.nn.functional.pad(out[:, width:], (0, new - (out.shape[1] - width)), value=0)  # (all ended)
    return [joint_counts(group, TOY_VOCAB, eos) for group in tokens.chunk(len(prompts))]


CASES = [("model", 1, ALL), ("model", 2, dict(temperature=0.7)), ("model", 3, dict(top_k=4)),
         ("model", 4, dict(top_p=0.8)), ("head", 4, dict(temperature=1.3)), ("ngram", 3, dict(temperature=1.3)),
         ("constant", 2, {}), ("constant", 4, ALL), ("plain", 1, ALL)]


@pytest.mark.parametrize("kind, k, knobs", CASES, ids=lambda x: "-".join(f"{a}{b}" for a, b in x.items())
                         if isinstance(x, dict) else str(x))
def test_sampling_has_the_targets_distribution_on_every_path(kind, k, knobs):
    """Draft models, a head (drafting over 5 of the 7 ids), n-gram lookup, a deterministic proposer and plain
    sampling, k = 1..4, each warper alone and together. False alarm <= 6e-5 a case; power as stated above."""
    target = _toy(0)
    (counts,) = _sampled(target, _draft(kind, target), k, knobs, _new(k))
    check(counts, reference_joint(target, PROMPT, _new(k), knobs))


def test_ragged_batch_with_eos_inside_the_window_keeps_each_rows_distribution():
    """Two prompts of different lengths (left padding) in one batch, drafts from a model at k = 3, and as EOS
    the id likeliest to end both prompts' rows inside the window (their later tokens are END). Two checks of
    four tokens: false alarm <= 1e-4."""
    target, prompts, knobs = _toy(0), ([3, 1, 4], [5, 2]), dict(temperature=1.3, top_k=6)
    first = [reference_joint(target, list(p), 1, knobs)[:TOY_VOCAB] for p in prompts]
    eos = int(torch.minimum(*first).argmax())
    counts = _sampled(target, _toy(1), 3, knobs, _new(3), prompts=prompts, eos=eos)
    for prompt, c in zip(prompts, counts):
        probs = reference_joint(target, list(prompt), _new(3), knobs, eos=eos)
        assert probs[eos].sum() > 0.05  # rows that end at once: EOS is in play
        check(c, probs)


# The companions: each deliberate bug of tests/distribution.SAMPLER_BUGS, placed in-process, must fail the
# tests above (tests/mutation_check.py places them in a copy of the files and runs the suite, at 3 seeds).
BUG_CASES = {"acceptance +10% (reference)": ("model", 2, dict(temperature=0.7)),
             "residual max(0, p - 0.9 q) (reference)": ("model", 2, dict(temperature=0.7)),
             "deterministic draft kept in the residual (reference)": ("constant", 2, {}),
             "resample from the target on rejection": ("model", 3, {}),
             "top-p keeps one token fewer than the nucleus": ("model", 2, dict(top_p=0.8)),
             "draft tokens not drawn from draft_probs": ("model", 3, dict(temperature=0.7, top_k=4))}


def _place(name, monkeypatch):
    """Put SAMPLER_BUGS[name] where the code under test calls it."""
    import specdec.kernels.rejection_sample as rs
    import specdec.proposers as proposers
    import specdec.sampling as sampling

    path = SAMPLER_BUGS[name][0]
    if path == "kernels/rejection_sample.py":
        monkeypatch.setattr(rs, "rejection_sample_reference", bug(name, rs).rejection_sample_reference)
    elif path == "specdec/sampling.py":
        monkeypatch.setattr(sampling, "top_p_filter", bug(name, sampling).top_p_filter)
    else:
        monkeypatch.setattr(proposers, "DraftModelProposer", bug(name, proposers).DraftModelProposer)
        monkeypatch.setattr(generate_module, "DraftModelProposer", proposers.DraftModelProposer)


@pytest.mark.parametrize("name", list(BUG_CASES))
def test_the_distribution_test_catches_small_biases(name, monkeypatch):
    kind, k, knobs = BUG_CASES[name]
    _place(name, monkeypatch)
    target = _toy(0)
    (counts,) = _sampled(target, _draft(kind, target), k, knobs, _new(k))
    assert rejects(counts, reference_joint(target, PROMPT, _new(k), knobs))


def test_the_distribution_test_has_power_against_10_percent_biases():
    """Power of ``check`` at N rows, from the noncentral chi-square law of its first-token marginal test (a
    lower bound: ``check`` fails when any of its tests does). The first token's distribution under each bug
    has a closed form (the first draft is kept or recovered from distributions no earlier round touches),
    in the settings of the companions above: at N = 50,000, toy target and draft, lambda = 549 for a 10%
    acceptance bias and 94 for a 10% residual bias (temperature 0.7), 4725 for a deterministic draft kept in
    the residual (temperature 1), over 6 degrees of freedom: power > 0.9999 each at a false alarm of 1e-5."""
    target, draft = _toy(0), _toy(1)
    p7, q7 = (reference_joint(m, PROMPT, 1, dict(temperature=0.7))[:TOY_VOCAB] for m in (target, draft))
    p1 = reference_joint(target, PROMPT, 1, {})[:TOY_VOCAB]
    d = torch.nn.functional.one_hot(torch.tensor(2), TOY_VOCAB).double()  # the constant proposer's draft
    assert torch.allclose(first_token(torch.minimum(q7, p7), (p7 - q7).clamp(min=0)), p7)  # the rule is lossless
    assert torch.allclose(first_token(torch.minimum(d, p1), (p1 - d).clamp(min=0)), p1)
    cases = {"acceptance": (p7, first_token(torch.minimum(q7, 1.1 * p7), (p7 - q7).clamp(min=0))),
             "residual": (p7, first_token(torch.minimum(q7, p7), (p7 - 0.9 * q7).clamp(min=0))),
             "one-hot": (p1, first_token(torch.minimum(d, p1), p1))}
    for name, (p, wrong) in cases.items():
        _, df = chi_square(N * p, p)
        lam = noncentrality(p, wrong, N)
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
