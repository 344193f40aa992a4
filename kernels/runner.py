"""Runners: how a native model executes, chosen once when the model is built, loaded or moved.

``models/llama.py`` says what a Llama layer computes; its runner says how. The model asks its runner for the
three things that have faster implementations than a chain of torch ops:

    runner.linear(layer, x, norm=, gated=, residual=)   residual + layer(prologue(x)), one call where it can
    runner.attention(attn, qkv, step, cache)             RoPE, the KV cache write and attention of one layer
    runner.layers(model, x, step, cache)                 every decoder layer (the loop, or one call for all)

and a runner keeps what its kernels need beside the model's parameters (packed weights, C's address
tables, CUDA graphs), remade when a parameter changes in place or is replaced.

    TorchRunner  torch ops on any device and dtype, training included: the reference the others are tested against
    CpuRunner    specdec's C kernels (kernels/cpu_runner.py): AVX-512, float32 and bfloat16
    CudaRunner   Triton attention and, when asked, the layers replayed as CUDA graphs (kernels/cuda_runner.py)

The next backends plug in here: a quantized weight is another representation of a ``Linear``'s weight that
``linear`` packs and dispatches on; a tensor-parallel shard is a runner whose ``linear`` follows a
row-parallel layer with its all-reduce. The model's forward does not change for either.
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F

from specdec.kernels import cpu_linear
from specdec.kernels.dispatch import use_triton
from specdec.kernels.verify_attention import attention_span_and_mask, verify_attention


class TorchRunner:
    """torch ops: every device, every dtype, autograd. The reference of every kernel a runner calls instead."""

    def __init__(self, device: str):
        self.device = device  # the device type this runner serves ("cpu", "cuda", "meta", ...)

    def __deepcopy__(self, memo):
        """A copied model gets a runner of the same kind and settings without kernel state (packed weights,
        address tables, graphs): those belong to the original's tensors."""
        new = copy.copy(self)
        new.reset()
        return new

    def reset(self) -> None:
        """Drop kernel state; it is remade on the next forward."""

    def agree(self, value: int) -> int:
        """A decision every process running this model must share (a round's k, which "auto" takes from
        timings): this process's; a tensor-parallel shard's is rank 0's (specdec/parallel.py)."""
        return value

    @contextlib.contextmanager
    def steady(self):
        """A span in which the model's weights do not change (one ``generate()`` call): a runner may check its
        kernel state against them on the span's first forward only, instead of on every forward."""
        yield

    def linear(self, layer, x, norm=None, gated: bool = False, residual=None):
        """``residual + layer(norm(x))``, or of SiLU(gate) * up if gated (x holds gate then up).
        layer: an nn.Linear; norm: an RMSNorm module, a tuple of them (each normalises its equal slice of x's
        features: a draft head's token and feature halves) or None; x [..., in] -> [..., out]"""
        weight, eps, parts = norm_operands(norm)
        x = cpu_linear.fused_input(x, weight, eps, gated, parts)
        y = layer(x)  # nn.Linear: F.linear; QuantizedLinear: its reference (models/quantized.py)
        return y if residual is None else residual + y

    def head_drafts(self, head, embed, input_ids, features, positions, last, ready, cache, steps: int):
        """A draft head's greedy drafts [batch, steps] in one call, where a runner has one (CpuRunner); None:
        the caller runs the head step by step."""
        return None

    def attention(self, attn, qkv, step, cache):
        """qkv [batch, T, (heads + 2 kv_heads) * head_dim] -> [batch, T, heads * head_dim]; the rotated keys and
        values land in ``cache`` at step.slots."""
        batch, T, _ = qkv.shape
        heads = qkv.view(batch, T, -1, attn.head_dim)  # [batch, T, q + k + v heads, head_dim]
        # q and k heads are adjacent: one rotation for both (4 ops per layer instead of 14)
        qk = rotate(heads[:, :, : attn.num_heads + attn.num_kv_heads], step.cos, step.sin)
        q, k = qk.split((attn.num_heads, attn.num_kv_heads), dim=2)
        v = heads[:, :, attn.num_heads + attn.num_kv_heads:]
        cache.write(attn.layer_idx, step.slots, k, v)
        k_pool, v_pool, block_table = cache.pools(attn.layer_idx)
        # one call on every device: the Triton kernel for CUDA tensors, its PyTorch reference (SDPA) otherwise;
        # the per-row cache is the paged pool's special case of one block per sequence (block table None)
        out = verify_attention(q, k_pool, v_pool, block_table, step.context_lens, step.query_lens,
                               span=step.span, mask=step.mask, row_ok=step.row_ok)  # [batch, T, heads, head_dim]
        return out.reshape(batch, T, -1)

    def layers(self, model, x, step, cache):
        """x [batch, T, hidden] -> the last decoder layer's output: ``for layer in layers: x = layer(x, ...)``"""
        self.prepare(step, cache, x)
        for layer in model.model.layers:
            x = layer(x, step, cache)
        return x

    def prepare(self, step, cache, x) -> None:
        """What ``attention`` needs beyond the model's Step, made once per forward instead of once per layer:
        each new token's cache slot, and the reference's mask (the Triton kernel builds its own)."""
        step.slots = cache.slots(step.positions)
        if not use_triton(x):
            step.span, step.mask, step.row_ok = attention_span_and_mask(step.context_lens, step.query_lens,
                                                                        step.positions.shape[1], step.span)


def norm_operands(norm) -> tuple:
    """A linear layer's ``norm`` (an RMSNorm, a tuple of them over equal slices of the features, or None) as
    the kernels take it: (weight [in] or None, eps, norm_parts)."""
    if norm is None:
        return None, 0.0, 1
    if not isinstance(norm, tuple):
        return norm.weight, norm.eps, 1
    if len({n.eps for n in norm}) != 1:
        raise ValueError(f"norms over slices of one input need one eps, got {[n.eps for n in norm]}")
    return torch.cat([n.weight for n in norm]), norm[0].eps, len(norm)


def rotate(x, cos, sin):
    """RoPE: x * cos + rotate_half(x) * sin, where rotate_half(x) = (-x2, x1). The sign lives in ``sin``
    (made once per forward), so rotate_half is a flip of the two halves: bitwise the same numbers.

    x [batch, T, heads, head_dim]; cos, sin [batch, T, 1, head_dim]
    """
    flipped = x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)  # (x2, x1)
    return x * cos + flipped * sin


def stored_weight(layer) -> torch.Tensor:
    """The tensor a linear layer keeps its weight in: a quantized layer's values (models/quantized.py:
    QuantizedLinear, buffer "qweight"), else its weight parameter. Read through _buffers / _parameters:
    nn.Module's attribute lookup is ~5x slower, ~1 us, and this runs per layer per step."""
    w = layer._buffers.get("qweight")
    return layer._parameters["weight"] if w is None else w


def weight_key(w: torch.Tensor) -> tuple:
    """What a copy made from ``w`` depends on: pointer, shape, dtype and version (an inference tensor has no
    version counter: an in-place change inside inference mode goes unseen)."""
    return (w.data_ptr(), w.shape, w.dtype, None if w.is_inference() else w._version)


def runner_for(device: torch.device | str) -> TorchRunner:
    """A new runner for a model whose weights are on ``device``."""
    kind = torch.device(device).type
    if kind == "cpu":
        from specdec.kernels.cpu_runner import CpuRunner

        return CpuRunner()
    if kind == "cuda":
        from specdec.kernels.cuda_runner import CudaRunner

        return CudaRunner()
    return TorchRunner(kind)
