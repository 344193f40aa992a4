"""Quantized linear layers for the native models, and ``specdec.quantize`` that puts them in.

A quantized model is a target in its own right: speculation over it is lossless with respect to it (the
same tests hold it to its own plain decoding). How a ``QuantizedLinear`` runs is its runner's business
(kernels/runner.py): the CPU runner streams it through ``cpu_linear.c``'s quantized tiles, every other runner
dequantizes it (``kernels/quantized.py: dequantize``, the reference) and calls torch.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.nn import functional as F

from specdec.kernels import quantized as Q

#: quantize= names -> bits
SCHEMES = {"int8": 8, "int4": 4}
#: activations= names: what a quantized layer multiplies its weight with (kernels/quantized.py)
ACTIVATIONS = ("int8", "float")


class QuantizedLinear(nn.Module):
    """A linear layer whose weight [out, in] is int4 or int8 in groups (kernels/quantized.py). The values,
    float16 scales and zeros are buffers (saved with the model, moved with it; the scales kept as float16 bits
    so that ``model.to(dtype)`` leaves them be); the bias and the activations take the model's dtype.

    activations "int8": each input row is quantized to int8 in blocks of 32 features and multiplied with the
    integer values exactly, as llama.cpp does (``Q.linear_int8_activations``: the layer's definition, which the
    kernel reproduces bit for bit); "float": with the dequantized weight in the activations' float type."""

    def __init__(self, quantized: Q.Quantized, in_features: int, bias: torch.Tensor | None, dtype: torch.dtype,
                 per_channel: bool, activations: str = "int8"):
        super().__init__()
        self.in_features, self.out_features = in_features, quantized.q.shape[0]
        self.bits, self.per_channel, self.activations = quantized.bits, per_channel, activations
        if activations == "int8":  # raises where the groups are not whole blocks of 32 input features
            Q.check_activation_groups(Q.activation_groups(quantized))
        self.register_buffer("qweight", quantized.q)  # uint8 [out, groups * group]
        self.register_buffer("scale_bits", quantized.scale.view(torch.int16))  # float16 bits [out, groups]
        self.register_buffer("zero_bits", quantized.zero.view(torch.int16))  # float16 bits [out, groups]
        self.register_parameter("bias", None if bias is None else nn.Parameter(bias.detach().to(dtype),
                                                                               requires_grad=False))
        self.register_buffer("_dtype", torch.empty(0, dtype=dtype), persistent=False)  # follows model.to(dtype)

    @classmethod
    def from_linear(cls, linear, bits: int, group_size: int | None, zero_point: bool, activations: str = "int8"):
        """linear: an nn.Linear, or a QuantizedLinear (quantized again from its dequantized weight)"""
        weight = linear.weight
        quantized = Q.quantize(weight, bits, group_size, zero_point)
        return cls(quantized, linear.in_features, linear.bias, weight.dtype, group_size is None, activations)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype.dtype

    @property
    def quantized(self) -> Q.Quantized:
        return Q.Quantized(self.qweight, self.scale_bits.view(torch.float16), self.zero_bits.view(torch.float16),
                           self.bits)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight [out, in] in the activations' dtype (made on every read: the reference path)."""
        return Q.dequantize(self.quantized, self.in_features).to(self.dtype)

    @property
    def packed_bytes(self) -> int:
        """Bytes a pass over the packed weight reads (``pack``'s layout)."""
        group = 0 if self.per_channel else self.qweight.shape[1] // self.scale_bits.shape[1]
        return Q.packed_size(self.out_features, self.in_features, self.bits, group, self.activations == "int8")

    def pack(self) -> Q.QuantizedWeight:
        if self.activations == "int8":
            return Q.pack_int8_activations(self.quantized, self.in_features)
        return Q.pack(self.quantized, self.in_features, self.per_channel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reference: x [..., in] -> [..., out] in x's dtype (the bias added in float32, as the kernel)."""
        if self.activations == "float":
            return F.linear(x, self.weight, self.bias)
        y = Q.linear_int8_activations(x, self.quantized, self.in_features)  # float32 [..., out]
        return (y if self.bias is None else y + self.bias.float()).to(x.dtype)

    def extra_repr(self) -> str:
        group = "per channel" if self.per_channel else f"groups of {self.quantized.group_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits}, {group}, "
                f"{self.activations} activations")


def quantize(model: nn.Module, scheme: str = "int8", group_size: int | None = ..., zero_point: bool = False,
             output_layer: bool = True, activations: str = "int8") -> nn.Module:
    """Replace the linear layers of a native model (``LlamaModel`` or ``DraftHead``) by quantized ones, in
    place; returns the model. scheme: "int8" or "int4". group_size: input features per scale; left out:
    one scale per output channel for int8, groups of 32 for int4; None: per output channel. zero_point:
    asymmetric groups (a float16 zero per group) instead of symmetric ones. output_layer=False keeps the
    output layer (for a tied model, the embedding's matrix) in float. The embedding is read a row per token,
    not per step: it stays in float. activations: "int8" (blocks of 32 features quantized per row and multiplied
    in integers, as llama.cpp does: group_size must then be None or a multiple of 32) or "float" (the dequantized
    weight times the float activations).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"quantize: scheme must be one of {sorted(SCHEMES)}, got {scheme!r}")
    if activations not in ACTIVATIONS:
        raise ValueError(f"quantize: activations must be one of {ACTIVATIONS}, got {activations!r}")
    bits = SCHEMES[scheme]
    if group_size is ...:
        group_size = None if bits == 8 else 32
    from specdec.models.llama import LlamaModel

    if not any(isinstance(m, LlamaModel) for m in model.modules()):
        raise ValueError(f"quantize: needs a native specdec model (LlamaModel or DraftHead), got "
                         f"{type(model).__name__}")
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if type(child) is nn.Linear and (output_layer or name != "lm_head")]
    for _, _, linear in targets:  # validated before any layer changes: a refused call leaves the model as it was
        Q.check_group_size(bits, group_size, linear.in_features, activations == "int8")
    with torch.no_grad():  # every layer quantized before any is replaced, for the same reason
        layers = [QuantizedLinear.from_linear(linear, bits, group_size, zero_point, activations)
                  for *_, linear in targets]
    for (parent, name, _), layer in zip(targets, layers):
        setattr(parent, name, layer)
    return model


#: draft_model names of self-speculation -> (scheme, group sizes to try, the first that divides every layer)
SELF_DRAFTS = {"self": ("int4", (32, None)), "self-int8": ("int8", (None,))}
_self_drafts = weakref.WeakKeyDictionary()  # target -> (name, the weights' key, its draft)


def self_draft(target, name: str = "self"):
    """A draft for any native target with no training: the target's own layers quantized ("self": int4 in
    groups of 32, symmetric; "self-int8": int8 per channel), sharing its embedding and norms (the same module
    objects), with a cache of its own; int8 activations (where a layer's width is not a multiple of 32, "self"
    takes one group per output channel). Made once per target and scheme; remade when a target weight changes.
    A target already quantized on the same grid would agree with it trivially and cost as much: the draft
    pays where the target reads more bytes than it (a float or int8 target under "self")."""
    from specdec.kernels.runner import runner_for, stored_weight, weight_key
    from specdec.models.llama import LlamaModel, RMSNorm

    scheme, groups = SELF_DRAFTS[name]
    linears = [(n, m) for n, m in target.named_modules() if isinstance(m, (nn.Linear, QuantizedLinear))]
    key = (name, tuple(weight_key(stored_weight(m)) for _, m in linears))
    cached = _self_drafts.get(target)
    if cached is not None and cached[:2] == key:
        return cached[2]
    group = next(g for g in groups if g is None or all(m.in_features % g == 0 for _, m in linears))
    with torch.device("meta"):
        draft = LlamaModel(target.config)
    for name_, module in target.named_modules():  # shared: the embedding and the norms (small, float)
        if isinstance(module, (nn.Embedding, RMSNorm)):
            replace_module(draft, name_, module)
    with torch.no_grad():
        for name_, module in linears:
            replace_module(draft, name_, QuantizedLinear.from_linear(module, SCHEMES[scheme], group, False))
    draft.inv_freq, draft.rope_scaling = target.inv_freq, target.rope_scaling
    draft.generation_config, draft.runner = target.generation_config, runner_for(target.device)
    _self_drafts[target] = (*key, draft)
    return draft.eval()



def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted path ``name`` of ``model``."""
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)
