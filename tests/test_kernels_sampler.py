"""The fused rejection sampler (Triton, under TRITON_INTERPRET=1 on the CPU) against its reference: exactly."""

import pytest
import torch
from distribution import SEED, bug, check, first_token, noncentrality, power, rejects

from specdec.kernels.dispatch import triton_available
from specdec.kernels.rejection_sample import (greedy_accept_reference, greedy_accept_triton,
                                              rejection_sample_reference, rejection_sample_triton)

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
# on a GPU machine the same tests run the compiled kernels on CUDA (bench/gpu_check.py runs them there)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(batch, k, vocab, one_hot, seed):
    gen = torch.Generator().manual_seed(seed)
    target = torch.softmax(torch.randn(batch, k + 1, vocab, generator=gen) * 3, dim=-1)
    draft = torch.softmax(torch.randn(batch, k, vocab, generator=gen) * 3, dim=-1)
    # drafts: sampled from the draft, and in some rows the target's own argmax (so that some get accepted)
    drafts = torch.multinomial(draft.reshape(-1, vocab), 1, generator=gen).reshape(batch, k) if k else \
        torch.zeros(batch, 0, dtype=torch.long)
    if k:
        drafts[0] = target[0, :k].argmax(-1)
    num_drafts = torch.tensor([k, max(k - 1, 0), 0][:batch] + [k] * max(0, batch - 3))
    uniforms = torch.rand(batch, k, generator=gen)
    exponentials = torch.empty(batch, vocab).exponential_(generator=gen)
    return tuple(None if t is None else t.to(DEVICE)
                 for t in (drafts, None if one_hot else draft, target, num_drafts, uniforms, exponentials))


@pytest.mark.parametrize("vocab", [1000, 32003])
@pytest.mark.parametrize("k", [0, 1, 4])
@pytest.mark.parametrize("one_hot", [False, True])
def test_rejection_sampler_is_bit_identical_to_the_reference(vocab, k, one_hot):
    args = _case(3, k, vocab, one_hot, seed=vocab + k)
    want_tokens, want_n = rejection_sample_reference(*args)
    got_tokens, got_n = rejection_sample_triton(*args)
    assert torch.equal(got_n, want_n) and torch.equal(got_tokens, want_tokens)
    assert ((got_tokens == -1) == (torch.arange(k + 1, device=DEVICE) > got_n[:, None])).all()


@pytest.mark.parametrize("vocab", [1000, 32003])
@pytest.mark.parametrize("k", [0, 3])
def test_greedy_kernel_equals_the_reference(vocab, k):
    drafts, _, target, num_drafts, _, _ = _case(3, k, vocab, True, seed=7)
    logits = target.log()
    logits[1, 0, 5] = logits[1, 0, 17] = logits[1, 0].max() + 1  # a tie: the first maximum must win
    want = greedy_accept_reference(drafts, logits, num_drafts)
    got = greedy_accept_triton(drafts, logits, num_drafts)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert want[0][1, 0] == 5 or k == 0 or num_drafts[1] == 0


def test_the_comparison_catches_a_wrong_residual(monkeypatch):
    """A reference that forgot to subtract the draft (resampling from the target) must disagree."""
    args = _case(4, 2, 1000, False, seed=3)
    tokens, n = rejection_sample_triton(*args)
    drafts, draft, target, num_drafts, uniforms, exponentials = args
    wrong = rejection_sample_reference(drafts, torch.zeros_like(draft), target, num_drafts, uniforms, exponentials)
    assert not (torch.equal(wrong[0], tokens) and torch.equal(wrong[1], n))


# ---------------------------------------------------------------------------------------------------------
# The kernel's distribution, statistically, and bit-identity where a small bias would show. Every row draws
# from the same designed target and draft distributions (3 ids, k = 3), so each draft position a row reaches
# (accepted or recovered there) is one draw from the target: their pooled counts are tested with the
# chi-square of tests/distribution.py (false alarm 1e-5). The distributions were chosen to make a 10% bias
# loud: the first token's closed form gives lambda / draw = 0.0174 for a 10% acceptance bias and 0.0175 for
# a 10% residual bias; 1500 rows reach ~4150 draft positions: lambda ~72, power 0.9998 at 2 degrees of freedom.
# ---------------------------------------------------------------------------------------------------------
TARGET = torch.tensor([0.925, 0.06, 0.015], dtype=torch.float64)
DRAFT = torch.tensor([0.955, 0.0002, 0.0448], dtype=torch.float64)
ROWS, K = 1500, 3
KERNEL_BUGS = ["acceptance +10% (Triton)", "residual max(0, p - 0.9 q) (Triton)",
               "deterministic draft kept in the residual (Triton)"]  # tests/distribution.SAMPLER_BUGS


def _designed(rows, one_hot, seed=SEED):
    """rows of the designed distributions: drafts sampled from DRAFT (one-hot: always id 1, no draft_probs)."""
    gen = torch.Generator().manual_seed(seed)
    k, vocab = (1, 3) if one_hot else (K, 3)
    target = TARGET.float().expand(rows, k + 1, vocab).contiguous()
    draft = DRAFT.float().expand(rows, k, vocab).contiguous()
    drafts = (torch.ones(rows, k, dtype=torch.long) if one_hot else
              torch.multinomial(DRAFT.expand(rows * k, -1), 1, replacement=True, generator=gen).reshape(rows, k))
    uniforms = torch.rand(rows, k, generator=gen)
    exponentials = torch.empty(rows, vocab).exponential_(generator=gen)
    return tuple(None if t is None else t.to(DEVICE) for t in
                 (drafts, None if one_hot else draft, target, torch.full((rows,), k), uniforms, exponentials))


def _draft_position_counts(sampler, one_hot):
    """Counts [3] of the tokens at the draft positions each row reached (position j < k with j <= accepted)."""
    args = _designed(ROWS, one_hot)
    emitted, n = (t.cpu() for t in sampler(*args))
    k = args[0].shape[1]
    reached = torch.arange(k) <= n[:, None]  # [rows, k]
    return torch.bincount(emitted[:, :k][reached], minlength=3).double()


def _kernel_mutant(name):
    import specdec.kernels.rejection_sample as rs

    return bug(name, rs).rejection_sample_triton


@pytest.mark.parametrize("one_hot", [False, True], ids=["draft-probs", "one-hot"])
def test_the_kernel_samples_the_targets_distribution(one_hot):
    check(_draft_position_counts(rejection_sample_triton, one_hot), TARGET)


def test_the_kernel_statistics_have_power_against_10_percent_biases():
    p, q, d = TARGET, DRAFT, torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    reached = sum(float(torch.minimum(p, q).sum()) ** j for j in range(K))  # draft positions a row reaches
    for bad, draws in ((first_token(torch.minimum(q, 1.1 * p), (p - q).clamp(min=0)), ROWS * reached),
                       (first_token(torch.minimum(q, p), (p - 0.9 * q).clamp(min=0)), ROWS * reached),
                       (first_token(torch.minimum(d, p), p), ROWS)):  # one-hot: one draft position a row
        assert power(noncentrality(p, bad, int(draws)), 2) > 0.999


@pytest.mark.parametrize("name", KERNEL_BUGS)
def test_the_kernel_statistics_catch_small_biases(name):
    counts = _draft_position_counts(_kernel_mutant(name), one_hot=name.startswith("deterministic"))
    assert rejects(counts, TARGET)


def _boundary_rows(per_bug=24):
    """Rows where a 10% acceptance or residual bias changes what is emitted: random candidates (6 ids, k = 2,
    draft distributions and one-hot drafts alike), kept where the reference with the bug disagrees with it."""
    import specdec.kernels.rejection_sample as rs

    chosen = []
    for one_hot in (False, True):
        args = _case(20_000, 2, 6, one_hot, seed=11)
        want = rejection_sample_reference(*args)[0]
        for name in KERNEL_BUGS:
            got = bug(name.replace("(Triton)", "(reference)"), rs).rejection_sample_reference(*args)[0]
            rows = (got != want).any(dim=1).nonzero().squeeze(1)[:per_bug]
            if len(rows):
                chosen.append(tuple(None if t is None else t[rows] for t in args))
    return chosen


@pytest.mark.parametrize("name", [None, *KERNEL_BUGS])
def test_the_kernel_is_bit_identical_at_the_acceptance_and_residual_boundaries(name):
    """On rows at the boundary a biased kernel departs from the reference (its companions: the bugs)."""
    kernel = rejection_sample_triton if name is None else _kernel_mutant(name)
    same = [torch.equal(kernel(*args)[0], rejection_sample_reference(*args)[0]) for args in _boundary_rows()]
    assert all(same) if name is None else not all(same)
