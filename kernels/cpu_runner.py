"""The CPU runner: specdec's C kernels (``cpu_linear.c``, ``cpu_attention.c``, ``cpu_layers.c``) where they
run, torch's ops (``TorchRunner``) for everything they do not take: float64, autograd, shapes the attention
kernel refuses, a machine where the kernels cannot be built.

Linear layers read a packed copy of their weight, made on first use and remade whenever the weight changes
(its version counter moves): a second copy of the weight in memory. float32 and bfloat16 on an AVX-512 CPU:
specdec's kernel, which streams the weights at memory speed for decode and keeps a verification pass of
8 rows near the cost of one row (all of SmolLM2-135M's linear weights, 2-core AVX-512 VM: float32 25 ms at
1 row and 31 at 8, where MKL takes 28 and 59; bfloat16 14 and 19, where oneDNN takes 26 and 40). bfloat16
without the kernel: oneDNN's prepacked layout.
"""

from __future__ import annotations

import contextlib
import functools
import weakref

import torch

from specdec.kernels import cpu_attention, cpu_head, cpu_layers, cpu_linear
from specdec.kernels.quantized import QuantizedWeight
from specdec.kernels.runner import TorchRunner, norm_operands, weight_key

KERNEL_WEIGHTS = (cpu_linear.PackedWeight, QuantizedWeight)  # what cpu_linear.linear takes


@functools.cache
def _onednn_bf16() -> bool:
    mkldnn = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(mkldnn, "_reorder_linear_weight")
            and bool(mkldnn._is_mkldnn_bf16_supported()))


class CpuRunner(TorchRunner):
    #: run the decoder layers in one C call where every layer is on the kernels' path (kernels/cpu_layers.py):
    #: a float32 SmolLM2 step spends ~3.8 ms in the ~150 Python calls of the loop. False: the loop in Python
    #: over the same kernels (the same bits; bench/step_profile.py times the pieces that way)
    one_call = True

    def __init__(self):
        super().__init__("cpu")
        self.reset()

    def reset(self) -> None:
        # nn.Linear module -> (key of its weight, the packed copy, the weight's storage); weak: a replaced module's
        # copies go with it
        self._packs = weakref.WeakKeyDictionary()
        self._addresses = None  # (table, the packed weights it was made from, the key of the rest)
        self._trusted = None  # inside steady(): False until the table was checked once, then True
        self._rope = None  # (key, cos, sin): a draft head's RoPE table (head_drafts)
        self._vocab_ids = None  # the key of the head's ids last checked against the target's embedding

    @contextlib.contextmanager
    def steady(self):
        # checking the table against 30 layers' modules costs ~0.7 ms a forward (SmolLM2, int8 activations: 8%
        # of a decode step); inside the span it is checked once
        outer, self._trusted = self._trusted, False
        try:
            yield
        finally:
            self._trusted = outer

    def linear(self, layer, x, norm=None, gated: bool = False, residual=None):
        # called once per linear layer per step from the Python loop (~121 times for SmolLM2): one C call
        # with the norm, the gate and the residual fused, because each torch op around it costs 5-80 us there
        packed = self.packed(layer, x.dtype)
        weight, eps, parts = norm_operands(norm)
        if (type(packed) in KERNEL_WEIGHTS and (residual is None or residual.dtype == x.dtype)
                and (parts == 1 or x.shape[-1] % (2 * parts) == 0)):
            return cpu_linear.linear(x, packed, layer.bias, norm=weight, eps=eps, gated=gated, residual=residual,
                                     norm_parts=parts)
        if type(packed) is not torch.Tensor:
            return super().linear(layer, x, norm, gated, residual)
        x = cpu_linear.fused_input(x, weight, eps, gated, parts)
        y = torch.ops.mkldnn._linear_pointwise(x, packed, layer.bias, "none", [], "")
        return y if residual is None else residual + y

    def packed(self, layer, dtype: torch.dtype):
        """layer's weight in specdec's kernel layout (a PackedWeight or QuantizedWeight) or oneDNN's (a tensor)
        for activations of ``dtype``, made on first use and remade whenever the weight changed; None for
        torch's own path (autograd, float64, another dtype than the weight's, not on the CPU)."""
        if torch.is_grad_enabled() or dtype not in cpu_linear.DTYPES:
            return None
        return self._packed(layer, dtype)

    def _packed(self, layer, dtype: torch.dtype):
        """``packed`` once grad mode and the dtype are known to fit (per layer per step: kept to the few
        attribute reads that say whether the copy is current)."""
        buffers = layer._buffers
        w = buffers.get("qweight")
        quantized = w is not None
        if not quantized:
            w = layer._parameters["weight"]
        if w.device.type != "cpu" or (buffers["_dtype"].dtype if quantized else w.dtype) != dtype:
            return None
        key = weight_key(w)
        if quantized:
            key += weight_key(buffers["scale_bits"]) + weight_key(buffers["zero_bits"])
        entry = self._packs.get(layer)
        if entry is None or entry[0] != key:  # first use, or the weight changed: (re)pack, once
            # the weight's storage is held with its copy: a new weight cannot reuse its address meanwhile
            copy = (layer.pack() if cpu_linear.available() else None) if quantized else _pack(w)
            entry = self._packs[layer] = (key, copy, w.detach())
        return entry[1]

    def attention(self, attn, qkv, step, cache):
        if not step.fused:
            return super().attention(attn, qkv, step, cache)
        batch, T, _ = qkv.shape
        k_pool, v_pool, block_table = cache.pools(attn.layer_idx)
        out = cpu_attention.rope_write_attend(qkv, step.cos, step.sin, step.positions, k_pool, v_pool, block_table,
                                              attn.num_heads, attn.num_kv_heads)  # [batch, T, heads, head_dim]
        return out.view(batch, T, -1)

    def prepare(self, step, cache, x) -> None:
        if not step.fused:  # the fused kernel writes the cache and masks by position itself
            super().prepare(step, cache, x)

    def layers(self, model, x, step, cache):
        attn = model.model.layers[0].self_attn
        # the kernels have no backward: training keeps the torch ops
        step.fused = (not torch.is_grad_enabled()
                      and cpu_attention.usable(x, attn.head_dim, attn.num_heads // attn.num_kv_heads))
        if not step.fused:
            return super().layers(model, x, step, cache)
        one_call = self.one_call and x.dtype == model.dtype and x.shape[-1] == model.config.hidden_size
        addresses = self.layer_addresses(model) if one_call else None
        if addresses is None:  # the same kernels, called from Python layer by layer
            return super().layers(model, x, step, cache)
        bits, group_size, act8 = self._addresses[3]
        return cpu_layers.decoder_layers(x, addresses, model.model.norm.eps, step.cos, step.sin, step.positions,
                                         cache, attn.num_heads, attn.num_kv_heads, attn.head_dim,
                                         model.config.intermediate_size, bits=bits, group_size=group_size, act8=act8)

    def head_drafts(self, head, embed, input_ids, features, positions, last, ready, cache, steps: int):
        """A draft head's greedy drafts [batch, steps] in one C call (kernels/cpu_head.py), equal to its Python
        loop's (specdec/proposers.py: HeadProposer, which says what the arguments are); the head's cache
        advanced as that loop's first step does. None where the call cannot take this head (the caller runs
        the loop): off the one-call path, float64, a body of another dtype than the head's norms, a bias on fc
        or the output layer, norms of other eps."""
        body, dtype = head.body, head.dtype
        attn, norms = body.model.layers[0].self_attn, (head.embed_norm, head.feature_norm, body.model.norm)
        weight = embed.weight  # [vocab, hidden] the target's
        if (not self.one_call or torch.is_grad_enabled() or dtype not in cpu_linear.DTYPES or body.dtype != dtype
                or weight.dtype not in cpu_linear.DTYPES or weight.device.type != "cpu"
                or head.fc.bias is not None or body.lm_head.bias is not None or len({n.eps for n in norms}) != 1
                or not cpu_attention.usable(head.embed_norm.weight, attn.head_dim,
                                            attn.num_heads // attn.num_kv_heads)):
            return None
        addresses = self.layer_addresses(body)
        fc, lm_head = self._packed(head.fc, dtype), self._packed(body.lm_head, dtype)
        if addresses is None or type(fc) not in KERNEL_WEIGHTS or type(lm_head) not in KERNEL_WEIGHTS:
            return None
        self._check_vocab_ids(head.vocab_ids, len(weight))
        lengths = torch.maximum(cache.lengths, positions.amax(dim=1) + 1)  # after the first step, as it advances them
        next_positions = torch.where(ready, lengths, -1)  # [batch] each drafting row's second step
        last_positions = torch.where(ready, next_positions + steps - 2, -1)  # [batch] each drafting row's last step
        span = cache.check_room(torch.cat((positions, last_positions[:, None]), 1))  # every step's
        inputs = torch.cat((embed(input_ids).to(dtype), features.to(dtype)), -1)  # [batch, T, 2 hidden]
        input_norm, eps, _ = norm_operands((head.embed_norm, head.feature_norm))  # [2 hidden], as head.forward's
        bits, group_size, act8 = self._addresses[3]
        layers = dict(addresses=addresses, eps=body.model.norm.eps, cache=cache, num_heads=attn.num_heads,
                      num_kv_heads=attn.num_kv_heads, head_dim=attn.head_dim, inner=body.config.intermediate_size,
                      bits=bits, group_size=group_size, act8=act8)
        drafts = cpu_head.head_drafts(inputs, positions, last, next_positions, steps, embed.weight, head.vocab_ids,
                                      self._rope_table(body, span, dtype), fc, input_norm, lm_head,
                                      body.model.norm.weight, eps, layers)
        cache.advance(positions)
        return drafts

    def _check_vocab_ids(self, vocab_ids, vocab: int) -> None:
        """C reads the embedding row of every id it drafts: the head's ids must lie in 0..vocab-1 (checked once
        per head and embedding, and again whenever the ids change)."""
        key = (weight_key(vocab_ids), vocab)
        if self._vocab_ids != key:
            if len(vocab_ids) and (int(vocab_ids.min()) < 0 or int(vocab_ids.max()) >= vocab):
                raise ValueError(f"draft head proposes ids outside the target's embedding of {vocab} rows")
            self._vocab_ids = key

    def _rope_table(self, model, length: int, dtype: torch.dtype):
        """(cos, sin) [n >= length, head_dim] of ``model.rope`` at positions 0..n-1, kept for the next call."""
        key = (weight_key(model.inv_freq), model.rope_scaling, dtype)
        if self._rope is None or self._rope[0] != key or self._rope[1].shape[0] < length:
            cos, sin = model.rope(torch.arange(max(256, 1 << (length - 1).bit_length()))[None], dtype)
            self._rope = (key, cos[0, :, 0], sin[0, :, 0])
        return self._rope[1:]

    def layer_addresses(self, model) -> torch.Tensor | None:
        """int64 [layers, 8] for kernels/cpu_layers.py, or None where some weight is not on the kernels' path.
        Checked on every forward (a changed weight is repacked, as ``linear`` does; a replaced module,
        parameter or eps is seen), or once inside ``steady()``; rebuilt only when something changed: for
        SmolLM2 ~0.6 ms to check against 1.9 to rebuild."""
        dtype = model.dtype
        if torch.is_grad_enabled() or dtype not in cpu_linear.DTYPES:
            return None
        if self._trusted and self._addresses is not None:
            return self._addresses[0]
        operands = []  # per layer the modules C reads (through _modules: a module attribute costs ~1 us)
        for layer in model.model.layers:
            attn, mlp, mods = layer._modules["self_attn"]._modules, layer._modules["mlp"]._modules, layer._modules
            operands.append((attn["qkv_proj"], attn["o_proj"], mlp["gate_up_proj"], mlp["down_proj"],
                             mods["input_layernorm"], mods["post_attention_layernorm"]))
        packed, extras = [], []
        for qkv, o, gate_up, down, norm1, norm2 in operands:
            packed += (self._packed(qkv, dtype), self._packed(o, dtype), self._packed(gate_up, dtype),
                       self._packed(down, dtype))
            extras += (qkv._parameters["bias"], o._parameters["bias"], norm1._parameters["weight"],
                       norm2._parameters["weight"])
        key = [None if t is None else (t.data_ptr(), t.dtype, t.shape, t.is_contiguous()) for t in extras]
        key += [norm.eps for *_, norm1, norm2 in operands for norm in (norm1, norm2)] + [model.model.norm.eps]
        cached = self._addresses
        if cached is None or key != cached[2] or any(a is not b for a, b in zip(packed, cached[1])):
            table, weight_format = _address_table(model, packed, extras, key[len(extras):])
            self._addresses = cached = (table, packed, key, weight_format)
        if self._trusted is False:  # checked once inside steady(): trusted for the rest of it
            self._trusted = True
        return cached[0]


def _address_table(model, packed, extras, eps) -> tuple[torch.Tensor | None, tuple[int, int, bool]]:
    """The table for these packed weights and biases / norm weights (4 each per layer), or None where C could
    not take them: C trusts every dtype and shape, so anything unexpected takes the Python loop. With it, the
    weights' format (bits, group_size, act8) that every one of them has: (0, 0, False) for float weights."""
    attn, hidden, inner = model.model.layers[0].self_attn, model.config.hidden_size, model.config.intermediate_size
    heads, layers = attn.num_heads * attn.head_dim, len(model.model.layers)
    shapes = [(heads + 2 * attn.num_kv_heads * attn.head_dim, hidden), (hidden, heads), (2 * inner, hidden),
              (hidden, inner)]  # [out, in] of q/k/v, o, gate/up, down, as cpu_layers.c computes them
    sizes = [shapes[0][0], hidden, hidden, hidden]  # of the q/k/v bias, the o bias, the two norms
    formats = {(type(p), getattr(p, "bits", 0), getattr(p, "group_size", 0), getattr(p, "act8", False))
               for p in packed}
    if (len(formats) != 1 or next(iter(formats))[0] not in KERNEL_WEIGHTS
            or any(type(p) is cpu_linear.PackedWeight and p.dtype != model.dtype for p in packed)
            or any(t is not None and (t.dtype != model.dtype or not t.is_contiguous() or t.shape != (n,))
                   for t, n in zip(extras, sizes * layers))
            or any(t is None for t in extras[2::4] + extras[3::4]) or len(set(eps)) != 1
            or [(p.out_features, p.in_features) for p in packed] != shapes * layers):
        return None, (0, 0, False)
    rows = []
    for i in range(layers):
        qkv, o, gate_up, down = (p.data.data_ptr() for p in packed[4 * i: 4 * i + 4])
        qkv_bias, o_bias, norm1, norm2 = (0 if t is None else t.data_ptr() for t in extras[4 * i: 4 * i + 4])
        rows.append([qkv, qkv_bias, norm1, o, o_bias, norm2, gate_up, down])  # cpu_layers.c's order
    return torch.tensor(rows, dtype=torch.int64), next(iter(formats))[1:]


def _pack(w):
    """w [out, in] on the CPU -> specdec's packed layout, oneDNN's (bfloat16 without the kernel), or None"""
    if w.dtype in cpu_linear.DTYPES and cpu_linear.available():
        return cpu_linear.pack(w)
    if w.dtype == torch.bfloat16 and _onednn_bf16():
        return torch.ops.mkldnn._reorder_linear_weight(w, 1)
    return None

