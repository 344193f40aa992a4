"""A draft head's greedy drafts in one C call on the CPU (``cpu_head.c``): the same kernel calls as the head's
Python loop (specdec/proposers.py: HeadProposer), without its ~100 torch ops a step."""

from __future__ import annotations

import torch

from specdec.kernels.cpu import HeadArgs, library
from specdec.kernels.cpu_attention import raise_failure
from specdec.kernels.cpu_layers import layers_args
from specdec.kernels.cpu_linear import linear_args


def head_drafts(inputs, positions, last, next_positions, steps: int, embedding, vocab_ids, rope, fc, input_norm,
                lm_head, final_norm, eps: float, layers: dict):
    """The greedy drafts [batch, steps] (target ids) of a draft head.

    inputs [batch, T, 2 hidden] in the head's dtype: each unseen token's embedding, then its predecessor's
    feature (written over by the later steps' rows); positions [batch, T] (-1: padding); last [batch]: the
    token each row drafts from; next_positions [batch]: the position of each row's second step (-1: the row
    does not draft); embedding [vocab, hidden] the target's (float32 or bfloat16); vocab_ids [kept]; what C
    cannot see is the caller's to guarantee (HeadProposer's, which checks the head against its target once):
    last in 0..T-1, vocab_ids in 0..vocab-1, every position within the RoPE table and the cache (a position
    past either is refused, but only after the steps before it ran). rope (cos, sin) [n, head_dim] of the
    head's dtype, position p's at row p; fc [hidden, 2 hidden] and lm_head [kept, hidden] packed weights
    (kernels/cpu_runner.py: packed) with their norms: input_norm [2 hidden] (the token's norm, then the
    feature's), final_norm [hidden], all of one eps; layers: decoder_layers' keyword arguments but x, cos, sin
    and positions (cpu_layers.py). The cache receives every step's keys and values, not its features."""
    batch, T, width = inputs.shape
    dtype, hidden = inputs.dtype, width // 2
    cos_table, sin_table = rope
    kept = vocab_ids.shape[0]
    if ((fc.out_features, fc.in_features) != (hidden, width) or (lm_head.out_features, lm_head.in_features)
            != (kept, hidden) or embedding.dim() != 2 or embedding.shape[1] != hidden
            or embedding.dtype not in (torch.float32, torch.bfloat16) or input_norm.shape != (width,)
            or final_norm.shape != (hidden,) or {input_norm.dtype, final_norm.dtype, cos_table.dtype} != {dtype}
            or cos_table.shape != sin_table.shape or cos_table.dim() != 2 or hidden % 2 or steps < 1):
        raise ValueError(f"head_drafts: shapes that do not fit inputs [{batch}, {T}, {width}] of {dtype}: fc "
                         f"[{fc.out_features}, {fc.in_features}], lm_head [{lm_head.out_features}, "
                         f"{lm_head.in_features}], embedding {tuple(embedding.shape)} {embedding.dtype}, norms "
                         f"{tuple(input_norm.shape)} / {tuple(final_norm.shape)}, rope {tuple(cos_table.shape)}, "
                         f"steps={steps}")
    if positions.shape != (batch, T) or last.shape != (batch,) or next_positions.shape != (batch,):
        raise ValueError(f"head_drafts: positions {tuple(positions.shape)}, last {tuple(last.shape)} and "
                         f"next_positions {tuple(next_positions.shape)} for {batch} rows of {T} tokens")
    x = torch.empty(batch, T, hidden, dtype=dtype)  # [rows, hidden]: the residual stream
    cos = torch.empty(batch, T, 1, cos_table.shape[1], dtype=dtype)  # [rows, head_dim]: each step's angles
    sin = torch.empty_like(cos)
    positions = positions.contiguous().long()
    body = layers_args(x, cos=cos, sin=sin, positions=positions, **layers)
    inputs, embedding, vocab_ids, last = (t.contiguous() for t in (inputs, embedding, vocab_ids.long(), last.long()))
    next_positions = next_positions.contiguous().long()
    cos_table, sin_table = cos_table.contiguous(), sin_table.contiguous()
    features = torch.empty(batch, hidden, dtype=dtype)
    logits = torch.empty(batch, kept, dtype=dtype)
    step_positions = torch.empty(batch, dtype=torch.long)
    drafts = torch.empty(batch, steps, dtype=torch.long)
    args = HeadArgs(positions=positions.data_ptr(), last=last.data_ptr(), next=next_positions.data_ptr(),
                    batch=batch, T=T, steps=steps, embedding=embedding.data_ptr(),
                    embedding_bf16=embedding.dtype == torch.bfloat16, vocab_ids=vocab_ids.data_ptr(),
                    cos_table=cos_table.data_ptr(), sin_table=sin_table.data_ptr(), rope_len=cos_table.shape[0],
                    fc=linear_args(fc, dtype, norm=input_norm.data_ptr(), eps=eps, norm_parts=2),
                    lm_head=linear_args(lm_head, dtype, norm=final_norm.data_ptr(), eps=eps),
                    layers=body, input=inputs.data_ptr(), cos=cos.data_ptr(), sin=sin.data_ptr(),
                    features=features.data_ptr(), logits=logits.data_ptr(), step_positions=step_positions.data_ptr(),
                    drafts=drafts.data_ptr())
    failed = library().specdec_head_drafts(args)
    raise_failure("head_drafts", failed, layers["cache"].pools(0)[0], batch, T)
    return drafts
