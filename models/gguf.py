"""A GGUF file's Q4_0, Q4_1 and Q8_0 tensors kept in their own block formats (``load`` of a .gguf with no
``dtype``): each becomes a ``QuantizedLinear`` read at its own size instead of a float copy.

The three formats are ``kernels/quantized.py``'s format with groups of 32, exactly: per block a float16
scale d (and for Q4_1 a float16 minimum m) and 32 values, dequantized by ggml as Q4_0 d (q - 8), Q4_1 d q + m,
Q8_0 d q (q signed). As (scale, zero, unsigned q): Q4_0 (d, -8 d, q), Q4_1 (d, m, q), Q8_0 (d, -128 d,
q + 128); q scale is exact in float32 and the zero added with one rounding, as ggml rounds, so the float
model ``load(..., dtype=torch.float32)`` reads (transformers' dequantization) is these layers' reference
bit for bit, and with float32 activations the CPU kernel's output equals the float model's.

Block layouts (ggml-common.h): Q4_0 = d, 16 bytes of nibbles; Q4_1 = d, m, 16 bytes; Q8_0 = d, 32 int8.
Nibble j of a block is value j (low) and value j + 16 (high).
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings

import torch

from specdec.kernels.quantized import Quantized
from specdec.models.quantized import QuantizedLinear, replace_module

BLOCK = 32
FORMATS = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}  # bytes per block of 32 values


def read_blocks(raw: torch.Tensor, kind: str) -> Quantized:
    """raw uint8 [out, blocks * FORMATS[kind]]: a GGUF tensor's bytes, one output row each -> its Quantized form."""
    rows = raw.shape[0]
    raw = raw.reshape(rows, -1, FORMATS[kind])
    scale = raw[..., 0:2].contiguous().view(torch.float16)[..., 0]  # [out, blocks]
    if kind == "Q8_0":
        q = (raw[..., 2:].contiguous().view(torch.int8).to(torch.int16) + 128).to(torch.uint8)
        return Quantized(q.reshape(rows, -1), scale, -128 * scale, 8)
    nibbles = raw[..., 4:] if kind == "Q4_1" else raw[..., 2:]  # [out, blocks, 16]
    q = torch.cat([nibbles & 15, nibbles >> 4], dim=-1)  # [out, blocks, 32]: values 0-15, then 16-31
    zero = raw[..., 2:4].contiguous().view(torch.float16)[..., 0] if kind == "Q4_1" else -8 * scale
    return Quantized(q.reshape(rows, -1), scale, zero, 4)


def gguf_blocks(path) -> tuple[str, dict[str, str], dict[str, torch.Tensor]]:
    """(architecture, every tensor's type name, the raw bytes [out, bytes] of those of a FORMATS type) of a
    GGUF file. gguf's reader takes ~4.5 s on a 2-core CPU to parse SmolLM2's 49152-token vocabulary, so the
    blocks are cached beside the converted checkpoint's folder (``converted_gguf``; not inside it, where a
    float load would read them) on first use: ~0.2 s after."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from specdec.models.loading import converted_gguf

    folder = converted_gguf(path)
    cached = folder.with_name(folder.name + "-blocks.safetensors")
    if not cached.exists():
        from gguf import GGUFReader

        reader = GGUFReader(path)
        field = reader.fields.get("general.architecture")
        arch = bytes(field.parts[field.data[0]]).decode() if field is not None else "?"
        kinds = {t.name: t.tensor_type.name for t in reader.tensors}
        raw = {t.name: torch.from_numpy(t.data.copy()).view(torch.uint8).reshape(int(t.data.shape[0]), -1)
               for t in reader.tensors if kinds[t.name] in FORMATS}
        handle, tmp = tempfile.mkstemp(dir=cached.parent, prefix=cached.name, suffix=".tmp")
        os.close(handle)
        try:
            save_file(raw, tmp, metadata={"architecture": arch, "types": json.dumps(kinds)})
            os.replace(tmp, cached)  # atomic: a half-written file is never taken for a whole one
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    with safe_open(cached, "pt") as f:
        meta = f.metadata()
        raw = {name: f.get_tensor(name) for name in f.keys()}
    return meta["architecture"], json.loads(meta["types"]), raw


def _unpermute(quantized: Quantized, heads: int) -> Quantized:
    """llama.cpp stores Llama's q and k projections with the rows of each head interleaved for its RoPE;
    transformers undoes it on load (a row permutation), and so must the quantized rows."""
    def rows(t):
        return t.reshape(heads, t.shape[0] // heads // 2, 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)
    return Quantized(rows(quantized.q), rows(quantized.scale), rows(quantized.zero), quantized.bits)


def _cat(parts: list[Quantized]) -> Quantized:
    return Quantized(*(torch.cat([getattr(p, f) for p in parts]) for f in ("q", "scale", "zero")), parts[0].bits)


def keep_blocks(native, path, activations: str = "int8") -> None:
    """Replace ``native``'s linear layers by the GGUF file's blocks where every part of a layer is Q4_0, Q4_1
    or Q8_0 of one width (q/k/v and gate/up are fused: their parts must agree); the rest stay float, with a
    warning naming them. Only the "llama" architecture (SmolLM2, Llama, Mistral files) is mapped. activations:
    the layers' (models/quantized.py: QuantizedLinear)."""
    arch, kinds, raw = gguf_blocks(path)
    if arch != "llama":
        warnings.warn(f"specdec: GGUF architecture {arch!r} is dequantized to float (blocks kept for 'llama' only)",
                      stacklevel=3)
        return
    config, skipped = native.config, []
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    plan = {"lm_head": ["output.weight" if "output.weight" in kinds else "token_embd.weight"]}
    for i in range(config.num_hidden_layers):
        blk = f"blk.{i}."
        plan[f"model.layers.{i}.self_attn.qkv_proj"] = [blk + n + ".weight" for n in ("attn_q", "attn_k", "attn_v")]
        plan[f"model.layers.{i}.self_attn.o_proj"] = [blk + "attn_output.weight"]
        plan[f"model.layers.{i}.mlp.gate_up_proj"] = [blk + "ffn_gate.weight", blk + "ffn_up.weight"]
        plan[f"model.layers.{i}.mlp.down_proj"] = [blk + "ffn_down.weight"]
    for module_name, names in plan.items():
        types = {kinds[n] for n in names}
        if len(types) != 1 or not types <= FORMATS.keys():
            skipped.append(f"{module_name} ({'/'.join(sorted(types))})")
            continue
        parts = [read_blocks(raw[n], kinds[n]) for n in names]
        if module_name.endswith("qkv_proj"):
            parts[:2] = [_unpermute(parts[0], heads), _unpermute(parts[1], kv_heads)]
        linear, whole = native.get_submodule(module_name), _cat(parts)
        if whole.q.shape != (linear.out_features, linear.in_features):
            skipped.append(f"{module_name} (blocks of shape {tuple(whole.q.shape)}, the layer's "
                           f"{(linear.out_features, linear.in_features)})")
            continue
        if not (whole.scale.isfinite().all() and whole.zero.isfinite().all()):  # -128 d overflows float16 past d = 512
            skipped.append(f"{module_name} (a scale or zero beyond float16)")
            continue
        replace_module(native, module_name,
                       QuantizedLinear(whole, linear.in_features, linear.bias, native.dtype, False, activations))
    if skipped:
        warnings.warn(f"specdec: kept in float (not blocks of {sorted(FORMATS)} that fit): {', '.join(skipped)}",
                      stacklevel=3)
