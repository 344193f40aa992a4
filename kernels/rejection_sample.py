"""Rejection sampling of k drafts against the target (Leviathan et al. 2023), fused: one program per sequence.

Accept draft x_j while u_j * draft(x_j) < target(x_j); at the first rejection j = n the next token is drawn
from the residual max(0, target_n - draft_n), and after n = num_drafts accepted drafts from the target itself
(the same rule with a zero draft distribution). The residual is never normalised or written out: the token
is argmax_v residual_v / e_v with e_v ~ Exp(1) drawn by the caller (the exponential race picks v with
probability residual_v / sum(residual)), so the kernel reads each distribution once and is bit-identical to
the reference: both do the same IEEE multiplies, subtractions, divisions and first-maximum comparisons.
"""

from __future__ import annotations

import torch

from specdec.kernels.dispatch import triton_available, use_triton


def rejection_sample(draft_tokens, draft_probs, target_probs, num_drafts, uniforms, exponentials):
    """draft_tokens [batch, k] long; draft_probs [batch, k, vocab] float32 or None (one-hot drafts);
    target_probs [batch, k + 1, vocab] float32; num_drafts [batch]; uniforms [batch, k] in [0, 1);
    exponentials [batch, vocab] Exp(1) variates.
    returns emitted [batch, k + 1] (-1 in unused slots) and num_accepted [batch]"""
    if use_triton(target_probs):
        return rejection_sample_triton(draft_tokens, draft_probs, target_probs, num_drafts, uniforms, exponentials)
    return rejection_sample_reference(draft_tokens, draft_probs, target_probs, num_drafts, uniforms, exponentials)


def greedy_accept(draft_tokens, target_scores, num_drafts):
    """draft_tokens [batch, k]; target_scores [batch, k + 1, vocab] (logits: any monotone scores);
    returns emitted [batch, k + 1] (-1 in unused slots) and num_accepted [batch]"""
    if draft_tokens.shape[1] == 0:  # a plain step: the argmax (the reference's answer, in 2 ops instead of 14)
        return target_scores.argmax(dim=-1), num_drafts.new_zeros(num_drafts.shape, dtype=torch.long)
    if use_triton(target_scores) and target_scores.dtype != torch.float64:  # the kernel compares in float32
        return greedy_accept_triton(draft_tokens, target_scores, num_drafts)
    return greedy_accept_reference(draft_tokens, target_scores, num_drafts)


# ------------------------------------------------------------------------------------------- references

def _finish(drafts, last, num_accepted):
    """drafts [batch, k], last [batch] -> accepted drafts, then last, then -1: [batch, k + 1]"""
    k = drafts.shape[1]
    j = torch.arange(k + 1, device=drafts.device)
    emitted = torch.cat((drafts, last[:, None]), dim=1).scatter(1, num_accepted[:, None], last[:, None])
    return torch.where(j <= num_accepted[:, None], emitted, -1)


def greedy_accept_reference(draft_tokens, target_scores, num_drafts):
    k = draft_tokens.shape[1]
    choice = target_scores.argmax(dim=-1)  # [batch, k + 1]; first maximum on ties
    in_row = torch.arange(k, device=choice.device) < num_drafts[:, None]
    num_accepted = ((draft_tokens == choice[:, :k]) & in_row).long().cumprod(dim=1).sum(dim=1)
    return _finish(draft_tokens, choice.gather(1, num_accepted[:, None]).squeeze(1), num_accepted), num_accepted


def rejection_sample_reference(draft_tokens, draft_probs, target_probs, num_drafts, uniforms, exponentials):
    k = draft_tokens.shape[1]
    in_row = torch.arange(k, device=draft_tokens.device) < num_drafts[:, None]  # [batch, k]
    p_target = target_probs[:, :k].gather(-1, draft_tokens[..., None]).squeeze(-1)  # [batch, k]
    p_draft = (torch.ones_like(p_target) if draft_probs is None  # one-hot drafts of a deterministic proposer
               else draft_probs.gather(-1, draft_tokens[..., None]).squeeze(-1))
    accept = (uniforms * p_draft < p_target) & in_row  # accept with probability min(1, p_target / p_draft)
    num_accepted = accept.long().cumprod(dim=1).sum(dim=1)  # [batch]

    at = num_accepted[:, None, None].expand(-1, 1, target_probs.shape[-1])
    target_n = target_probs.gather(1, at).squeeze(1)  # [batch, vocab]
    # past a row's own drafts (the bonus position) the draft distribution is zero: residual = target
    has_draft = (num_accepted < num_drafts)[:, None]
    if k == 0:
        draft_n = torch.zeros_like(target_n)
    elif draft_probs is None:
        x_n = draft_tokens.gather(1, num_accepted.clamp(max=k - 1)[:, None])  # [batch, 1]
        draft_n = (torch.arange(target_n.shape[-1], device=x_n.device) == x_n).to(target_n.dtype)
    else:
        draft_n = draft_probs.gather(1, at.clamp(max=k - 1)).squeeze(1)
    residual = torch.clamp(target_n - torch.where(has_draft, draft_n, 0.0), min=0.0)
    race = residual / exponentials  # [batch, vocab]
    # a zero residual happens only where the draft equals the target, so that rejection was impossible;
    # falling back to the target keeps the race meaningful (and NaN-free) anyway
    fallback = target_n / exponentials
    last = torch.where(race.amax(dim=-1) > 0, race.argmax(dim=-1), fallback.argmax(dim=-1))
    return _finish(draft_tokens, last, num_accepted), num_accepted


# ------------------------------------------------------------------------------------------- Triton

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _race(probs_row, draft_row, has_draft, one_hot_token, exp_row, vocab,
              HAS_DRAFT_PROBS: tl.constexpr, BLOCK_V: tl.constexpr):
        """argmax_v max(0, target_v - draft_v) / e_v over the vocabulary, in tiles; and the same for the
        target alone (the fallback). Returns (best residual score, its id, best target score, its id)."""
        best_r = tl.full((), -1.0, tl.float32)
        best_r_id = tl.full((), 0, tl.int64)
        best_t = tl.full((), -1.0, tl.float32)
        best_t_id = tl.full((), 0, tl.int64)
        for start in range(0, vocab, BLOCK_V):
            v = start + tl.arange(0, BLOCK_V)
            valid = v < vocab
            t = tl.load(probs_row + v, mask=valid, other=0.0)
            # (the masks are built from comparisons: the interpreter refuses a block & scalar mask)
            if HAS_DRAFT_PROBS:
                d = tl.load(draft_row + v, mask=v < tl.where(has_draft, vocab, 0), other=0.0)
            else:
                d = tl.where(v == tl.where(has_draft, one_hot_token, -1), 1.0, 0.0)
            e = tl.load(exp_row + v, mask=valid, other=1.0)
            # div_rn: IEEE round-to-nearest division, as torch and numpy divide (a plain `/` compiles to an
            # approximate division on NVIDIA GPUs, which could break bit-identity at near-ties)
            r = tl.where(valid, tl.math.div_rn(tl.maximum(t - d, 0.0), e), -1.0)
            s = tl.where(valid, tl.math.div_rn(t, e), -1.0)
            r_max = tl.max(r, axis=0)
            r_id = start + tl.argmax(r, axis=0)  # first maximum within the tile
            s_max = tl.max(s, axis=0)
            s_id = start + tl.argmax(s, axis=0)
            take_r = r_max > best_r  # strictly greater: the earliest tile keeps ties, as torch.argmax does
            best_r_id = tl.where(take_r, r_id, best_r_id)
            best_r = tl.where(take_r, r_max, best_r)
            take_s = s_max > best_t
            best_t_id = tl.where(take_s, s_id, best_t_id)
            best_t = tl.where(take_s, s_max, best_t)
        return best_r, best_r_id, best_t, best_t_id

    @triton.jit
    def _rejection_kernel(
        drafts_ptr,  # [batch, k] int64
        draft_probs_ptr,  # [batch, k, vocab] float32 (unused without HAS_DRAFT_PROBS)
        target_probs_ptr,  # [batch, k + 1, vocab] float32
        num_drafts_ptr,  # [batch] int64
        uniforms_ptr,  # [batch, k] float32
        exp_ptr,  # [batch, vocab] float32
        out_ptr,  # [batch, k + 1] int64
        accepted_ptr,  # [batch] int64
        k, vocab,
        HAS_DRAFT_PROBS: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)  # offsets like (b * (k + 1) + j) * vocab pass 2^31 at large batches
        nd = tl.load(num_drafts_ptr + b)
        n = tl.full((), 0, tl.int64)
        going = nd > 0
        for j in range(0, k):  # acceptance: a scalar walk over at most k drafts
            x = tl.load(drafts_ptr + b * k + j)
            p_t = tl.load(target_probs_ptr + (b * (k + 1) + j) * vocab + x)
            if HAS_DRAFT_PROBS:
                p_d = tl.load(draft_probs_ptr + (b * k + j) * vocab + x)
            else:
                p_d = 1.0
            u = tl.load(uniforms_ptr + b * k + j)
            ok = going & (j < nd) & (u * p_d < p_t)
            n = tl.where(ok, n + 1, n)
            going = ok
        has_draft = n < nd
        x_n = tl.load(drafts_ptr + b * k + tl.minimum(n, k - 1), mask=n < k, other=0)
        best_r, r_id, best_t, t_id = _race(
            target_probs_ptr + (b * (k + 1) + n) * vocab, draft_probs_ptr + (b * k + tl.minimum(n, k - 1)) * vocab,
            has_draft, x_n, exp_ptr + b * vocab, vocab, HAS_DRAFT_PROBS, BLOCK_V)
        last = tl.where(best_r > 0, r_id, t_id)
        for j in range(0, k + 1):
            jj = tl.zeros((), tl.int64) + j  # a tensor, so that it can mask a load
            x = tl.load(drafts_ptr + b * k + jj, mask=jj < k, other=0)
            token = tl.where(jj < n, x, tl.where(jj == n, last, -1))
            tl.store(out_ptr + b * (k + 1) + jj, token)
        tl.store(accepted_ptr + b, n)

    @triton.jit
    def _greedy_kernel(
        drafts_ptr,  # [batch, k] int64
        scores_ptr,  # [batch, k + 1, vocab]
        num_drafts_ptr,  # [batch] int64
        out_ptr,  # [batch, k + 1] int64
        accepted_ptr,  # [batch] int64
        k, vocab,
        BLOCK_V: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        nd = tl.load(num_drafts_ptr + b)
        n = tl.full((), 0, tl.int64)
        going = True
        for j in range(0, k + 1):
            row = scores_ptr + (b * (k + 1) + j) * vocab
            best = tl.full((), float("-inf"), tl.float32)
            best_id = tl.full((), 0, tl.int64)
            for start in range(0, vocab, BLOCK_V):
                v = start + tl.arange(0, BLOCK_V)
                s = tl.load(row + v, mask=v < vocab, other=float("-inf")).to(tl.float32)
                m = tl.max(s, axis=0)
                take = m > best
                best_id = tl.where(take, start + tl.argmax(s, axis=0), best_id)
                best = tl.where(take, m, best)
            jj = tl.zeros((), tl.int64) + j  # a tensor, so that it can mask a load
            x = tl.load(drafts_ptr + b * k + jj, mask=jj < k, other=-1)
            # while still matching, position j emits the target's choice; the first mismatch ends the row
            tl.store(out_ptr + b * (k + 1) + j, tl.where(going, best_id, -1))
            ok = going & (jj < nd) & (x == best_id)
            n = tl.where(ok, n + 1, n)
            going = ok
        tl.store(accepted_ptr + b, n)


def _launch_args(draft_tokens, num_drafts):
    batch, k = draft_tokens.shape
    emitted = torch.empty(batch, k + 1, dtype=torch.long, device=draft_tokens.device)
    accepted = torch.empty(batch, dtype=torch.long, device=draft_tokens.device)
    return batch, k, emitted, accepted, draft_tokens.long().contiguous(), num_drafts.long().contiguous()


def rejection_sample_triton(draft_tokens, draft_probs, target_probs, num_drafts, uniforms, exponentials):
    batch, k, emitted, accepted, drafts, nd = _launch_args(draft_tokens, num_drafts)
    vocab = target_probs.shape[-1]
    target_probs = target_probs.float().contiguous()
    has = draft_probs is not None
    draft_probs = draft_probs.float().contiguous() if has else target_probs  # a valid pointer, never read
    _rejection_kernel[(batch,)](drafts, draft_probs, target_probs, nd, uniforms.float().contiguous(),
                                exponentials.float().contiguous(), emitted, accepted, k, vocab,
                                HAS_DRAFT_PROBS=has, BLOCK_V=1024)
    return emitted, accepted


def greedy_accept_triton(draft_tokens, target_scores, num_drafts):
    batch, k, emitted, accepted, drafts, nd = _launch_args(draft_tokens, num_drafts)
    _greedy_kernel[(batch,)](drafts, target_scores.contiguous(), nd, emitted, accepted, k,
                             target_scores.shape[-1], BLOCK_V=1024)
    return emitted, accepted
