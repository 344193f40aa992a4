"""The fused rejection sampler (Triton, under TRITON_INTERPRET=1 on the CPU) against its reference: exactly."""

import pytest
import torch

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
