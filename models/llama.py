"""A compact Llama-family decoder (Llama incl. llama3 RoPE, Mistral, Qwen2, SmolLM2) that owns its KV cache.

One forward serves prefill, plain decode and verification: it takes a ragged batch of new tokens
with their positions, writes their keys and values into the cache at slot == position, and returns
logits. Padding tokens carry position -1: they write to the cache's trash slot and are never attended.

Parameter names follow transformers' ``LlamaForCausalLM`` except that q/k/v and gate/up are fused into
one matrix each (``fuse_state_dict`` maps a transformers state dict onto them).
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from specdec.cache import KVCache, KVPool, select
from specdec.kernels import cpu_attention, cpu_layers, cpu_linear
from specdec.kernels.dispatch import use_triton
from specdec.kernels.verify_attention import attention_span_and_mask, verify_attention

#: model_type of a transformers config -> whether q/k/v projections carry a bias (o_proj never does there)
ARCHITECTURES = {"llama": None, "mistral": False, "qwen2": True}


def _qkv_bias(config: PretrainedConfig) -> bool:
    fixed = ARCHITECTURES[config.model_type]
    return bool(getattr(config, "attention_bias", False)) if fixed is None else fixed


@functools.cache
def _onednn_bf16() -> bool:
    mkldnn = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(mkldnn, "_reorder_linear_weight")
            and bool(mkldnn._is_mkldnn_bf16_supported()))


class Linear(nn.Linear):
    """nn.Linear whose inference on the CPU reads a packed copy of its weight, made on first use and remade
    whenever the weight changes (its version counter moves); a second copy of the weight in memory.

    float32 and bfloat16 on an AVX-512 CPU: specdec's kernel (``kernels/cpu_linear.c``), which streams the
    weights at memory speed for decode and keeps a verification pass of 8 rows near the cost of one row
    (all of SmolLM2-135M's linear weights, 2-core AVX-512 VM: float32 25 ms at 1 row and 31 at 8, where MKL
    takes 28 and 59; bfloat16 14 and 19, where oneDNN takes 26 and 40). bfloat16 elsewhere: oneDNN's
    prepacked layout. Anything else (float64, training, other devices, mixed dtypes): nn.Linear.
    """

    _packed = None  # the weight [out, in] in the kernel's (or oneDNN's) layout
    _packed_key = None  # _weight_key of the weight it was made from
    _packed_from = None  # that weight's storage (not a parameter), held: its address cannot be reused meanwhile

    def forward(self, x, norm: RMSNorm | None = None, gated: bool = False, residual=None):
        """``residual + self(norm(x))``, or of SiLU(gate) * up if gated (x holds gate then up); on the fast
        CPU path all in one kernel call, because each torch op around it costs 5-80 us at decode size."""
        packed = self.packed() if x.dtype == self.weight.dtype else None
        if type(packed) is cpu_linear.PackedWeight and (residual is None or residual.dtype == x.dtype):
            return cpu_linear.linear(x, packed, self.bias, norm=None if norm is None else norm.weight,
                                     eps=0.0 if norm is None else norm.eps, gated=gated, residual=residual)
        x = cpu_linear.fused_input(x, None if norm is None else norm.weight, 0.0 if norm is None else norm.eps,
                                   gated)
        if isinstance(packed, torch.Tensor):
            y = torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")
        else:
            y = super().forward(x)
        return y if residual is None else residual + y

    def packed(self):
        """The weight in specdec's kernel layout (a PackedWeight) or oneDNN's (a tensor), made on first use and
        remade whenever the weight changed; None for torch's own path (another device, training, float64)."""
        w = self._parameters["weight"]  # (not self.weight: nn.Module's attribute lookup is ~5x slower, ~1 us)
        if w.device.type != "cpu" or torch.is_grad_enabled():
            return None
        key = _weight_key(w)
        if self._packed_key != key:  # first use, or the weight changed: (re)pack, once
            self._packed, self._packed_key, self._packed_from = _pack(w), key, w.detach()
        return self._packed


def _pack(w):
    """w [out, in] on the CPU -> specdec's packed layout, oneDNN's (bfloat16 without the kernel), or None"""
    if w.dtype in cpu_linear.DTYPES and cpu_linear.available():
        return cpu_linear.pack(w)
    if w.dtype == torch.bfloat16 and _onednn_bf16():
        return torch.ops.mkldnn._reorder_linear_weight(w, 1)
    return None


def _weight_key(w):
    """What a packed copy was made from: pointer, shape, dtype and version (an inference tensor has no version
    counter: an in-place change inside inference mode goes unseen). Linear also holds the weight it packed,
    so a new weight cannot reuse the old one's address while its key is current."""
    return (w.data_ptr(), w.shape, w.dtype, None if w.is_inference() else w._version)


@dataclass
class Step:
    """What every layer needs to know about this forward's tokens."""

    cos: torch.Tensor  # [batch, T, 1, head_dim]
    sin: torch.Tensor  # [batch, T, 1, head_dim], sign-folded: -sin on the first half, +sin on the second
    slots: torch.Tensor | None  # [batch, T] cache slot of each new token (padding: the trash slot); torch path
    context_lens: torch.Tensor  # [batch] cached tokens before the new ones
    query_lens: torch.Tensor  # [batch] new tokens per row (the rest of T is padding)
    span: int  # slots 0..span-1 hold every key any row attends to
    mask: torch.Tensor | None  # [batch, 1, T, span] for the reference path (made once, used by every layer)
    row_ok: torch.Tensor | None  # [batch, T, 1, 1] bool: real (not padding) queries, for the reference path
    positions: torch.Tensor  # [batch, T] (-1: padding)
    cpu_kernel: bool  # RoPE, cache write and attention in one C call (kernels/cpu_attention.py)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):  # [batch, T, dim]
        # Normalise in float32 and scale in the model's dtype, as transformers does: in bfloat16 the
        # order of the two roundings decides near-ties, and greedy equivalence rests on them.
        # (transformers does this even for float64 models; the same ops keep the two within 1e-10 there.)
        # The model itself hands its norms to the next linear layer (Linear.forward), which fuses them.
        return cpu_linear.fused_input(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, config: PretrainedConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        out_bias = bool(getattr(config, "attention_bias", False)) and config.model_type == "llama"
        hidden = config.hidden_size
        self.split = (self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim,
                      self.num_kv_heads * self.head_dim)
        # q, k and v in one matrix: one matmul call instead of three (SmolLM2: 90 fewer calls per token)
        self.qkv_proj = Linear(hidden, sum(self.split), bias=_qkv_bias(config))
        self.o_proj = Linear(self.num_heads * self.head_dim, hidden, bias=out_bias)

    def forward(self, x, norm: RMSNorm, step: "Step", cache: KVCache):
        """x + attention(norm(x)); x [batch, T, hidden]"""
        batch, T, _ = x.shape
        qkv = self.qkv_proj(x, norm=norm)  # [batch, T, (q + k + v heads) * head_dim]
        k_pool, v_pool, block_table = cache.pools(self.layer_idx)
        if step.cpu_kernel:
            out = cpu_attention.rope_write_attend(qkv, step.cos, step.sin, step.positions, k_pool, v_pool,
                                                  block_table, self.num_heads, self.num_kv_heads)
            return self.o_proj(out.view(batch, T, -1), residual=x)
        heads = qkv.view(batch, T, -1, self.head_dim)  # [batch, T, q + k + v heads, head_dim]
        # q and k heads are adjacent: one rotation for both (4 ops per layer instead of 14)
        qk = _rotate(heads[:, :, : self.num_heads + self.num_kv_heads], step.cos, step.sin)
        q, k = qk.split((self.num_heads, self.num_kv_heads), dim=2)
        v = heads[:, :, self.num_heads + self.num_kv_heads:]
        cache.write(self.layer_idx, step.slots, k, v)
        # one call on every device: the Triton kernel for CUDA tensors, its PyTorch reference (SDPA) otherwise;
        # the per-row cache is the paged pool's special case of one block per sequence (block table None)
        out = verify_attention(q, k_pool, v_pool, block_table, step.context_lens, step.query_lens,
                               span=step.span, mask=step.mask, row_ok=step.row_ok)  # [batch, T, heads, head_dim]
        return self.o_proj(out.reshape(batch, T, -1), residual=x)


def _rotate(x, cos, sin):
    """RoPE: x * cos + rotate_half(x) * sin, where rotate_half(x) = (-x2, x1). The sign lives in ``sin``
    (made once per forward), so rotate_half is a flip of the two halves: bitwise the same numbers.

    x [batch, T, heads, head_dim]; cos, sin [batch, T, 1, head_dim]
    """
    flipped = x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)  # (x2, x1)
    return x * cos + flipped * sin


class MLP(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        hidden, inner = config.hidden_size, config.intermediate_size
        self.gate_up_proj = Linear(hidden, 2 * inner, bias=False)  # gate and up: one matmul call
        self.down_proj = Linear(inner, hidden, bias=False)

    def forward(self, x, norm: RMSNorm):
        """x + down(SiLU(gate) * up) of norm(x)"""
        return self.down_proj(self.gate_up_proj(x, norm=norm), gated=True, residual=x)


class DecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, step: "Step", cache):
        # each norm and residual add is fused into the linear layer next to it (Linear.forward)
        x = self.self_attn(x, self.input_layernorm, step, cache)
        return self.mlp(x, self.post_attention_layernorm)


class Body(nn.Module):
    """transformers' ``model.model``: embeddings, layers, final norm."""

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}


def fuse_state_dict(state: dict, num_layers: int) -> dict:
    """transformers' names -> the native model's: concatenate q/k/v and gate/up of every layer."""
    state = dict(state)
    for i in range(num_layers):
        for fused, parts in FUSED.items():
            for kind in ("weight", "bias"):
                names = [f"model.layers.{i}.{part}.{kind}" for part in parts]
                if names[0] in state:
                    state[f"model.layers.{i}.{fused}.{kind}"] = torch.cat([state.pop(n) for n in names])
    return state


def _rope_frequencies(config: PretrainedConfig, head_dim: int):
    """inv_freq [head_dim / 2] and the cos/sin scale, exactly as transformers computes them."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":  # llama3, yarn, linear, ...: transformers' own initialisers
        return ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    base = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)), 1.0


GRAPH_MAX_TOKENS = 16  # new tokens per row up to which a forward's layers replay a CUDA graph
_STEP_TENSORS = ("cos", "sin", "slots", "context_lens", "query_lens", "positions")


def cuda_capture(run):
    """run() to warm up (Triton compiles, the allocator and cuBLAS settle), then capture it in a CUDA graph;
    returns the graph's replay. Warm-up and capture share one side stream, as torch's recipe asks: on an
    H200 a capture on a stream of its own failed at 32 rows (a per-stream resource first made mid-capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        run()
    torch.cuda.current_stream().wait_stream(side)
    return graph.replay


class LayerGraphs:
    """The decoder layers of one model over one contiguous KV cache, captured as a CUDA graph per shape
    (rows, new tokens) and replayed: a Llama-3-8B-shaped decode step is ~15 kernel launches per layer x 32
    layers from Python, which holds eager plain decode on an H200 at 18% of the HBM roofline at batch 1, 46%
    replayed (bench/RESULTS.md). A replay reads the step's tensors from static copies and the cache's fixed
    tensors, so a graph is valid for as long as its cache lives (it is kept in ``cache.graphs``).

    capture(run) -> replay: ``cuda_capture`` on a GPU; the CPU tests pass one that replays by calling run
    again, which checks everything but the capture itself (bench/gpu_check.py checks that on a GPU).
    """

    def __init__(self, layers, cache: KVCache, capture=cuda_capture):
        # the cache holds this object (cache.graphs): a weak reference back, so that no cycle keeps the cache's
        # memory and the graphs' alive past the generate() call that made them, until the cyclic GC runs
        self.layers, self.cache, self.capture = layers, weakref.ref(cache), capture
        self.max_len = cache.max_len
        self.graphs = {}  # (rows, new tokens) -> (static x, static step, replay, static output)

    def __call__(self, x, step: Step):
        """x [batch, T, hidden] -> the layers' output, as ``for layer in layers: x = layer(x, step, cache)``"""
        rows, T = x.shape[:2]
        # A pass narrower than a graph already made rides in it, up to twice its width: the last rounds of a
        # generation ask fewer drafts (k + 1, k, ..., 1 new tokens), and each capture costs ~3 eager passes
        # (on the H200 at k = 4, up to five captures per 64-token call against plain's one). The extra queries
        # are padding; the bound keeps a one-token step from paying for nine columns at 64 rows.
        wider = [t for r, t in self.graphs if r == rows and T <= t <= 2 * T]
        if wider:
            static_x, static, replay, out = self.graphs[rows, min(wider)]
            self._fill(static_x, static, x, step)
            replay()
            return out[:, :T].clone()
        static_x = torch.empty_like(x)
        static = Step(**{name: torch.empty_like(getattr(step, name)) for name in _STEP_TENSORS},
                      span=self.max_len + 1, mask=None, row_ok=None, cpu_kernel=False)
        # span: the whole cache, a bound that holds for every replay (attention stops at each row's own
        # length; the kernel's splits over the rest of the cache find nothing to do)
        self._fill(static_x, static, x, step)
        out = torch.empty_like(x)

        def run():
            y, cache = static_x, self.cache()
            for layer in self.layers:
                y = layer(y, static, cache)
            out.copy_(y)

        self.graphs[rows, T] = (static_x, static, self.capture(run), out)
        return out.clone()  # the capture ran the layers on this step's inputs (the warm-up did)

    def _fill(self, static_x, static: Step, x, step: Step) -> None:
        """Copy this pass's inputs into a graph's static tensors; columns past its T are padding (position -1,
        written to the cache's trash slot, masked in attention, their outputs never read)."""
        T = x.shape[1]
        static_x[:, :T].copy_(x)
        static_x[:, T:].zero_()
        for name in ("cos", "sin", "positions", "slots"):
            getattr(static, name)[:, :T].copy_(getattr(step, name))
        static.cos[:, T:].zero_()
        static.sin[:, T:].zero_()
        static.positions[:, T:] = -1
        static.slots[:, T:] = self.max_len  # the trash slot (KVCache.slots of position -1)
        static.context_lens.copy_(step.context_lens)
        static.query_lens.copy_(step.query_lens)


class LlamaModel(nn.Module):
    """Native Llama-family causal LM. Build with ``LlamaModel(config)`` from a transformers config."""

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        if config.model_type not in ARCHITECTURES:
            raise ValueError(
                f"config.model_type={config.model_type!r} has no native implementation "
                f"(supported: {sorted(ARCHITECTURES)})"
            )
        self.config = config
        self.model = Body(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        with torch.device("cpu"):  # real numbers even while the weights are built on the meta device
            inv_freq, scaling = _rope_frequencies(config, self.model.layers[0].self_attn.head_dim)
        # RoPE angles stay in float32 for every model dtype, as in transformers (float64 models included).
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.rope_scaling = float(scaling)
        self.generation_config = None  # set by the loaders

    #: run the decoder layers in one C call where every layer is on the CPU kernels' path (kernels/cpu_layers.py):
    #: a float32 SmolLM2 step spends ~3.8 ms in the ~150 Python calls of the loop. Off: the loop in Python over
    #: the same kernels (the same bits; bench/step_profile.py times the pieces that way)
    layers_in_one_call = True
    #: how decode and verification passes (up to GRAPH_MAX_TOKENS new tokens a row, contiguous cache) capture
    #: their layers as graphs to replay (LayerGraphs); None: no graphs. ``use_cuda_graphs()`` sets cuda_capture
    graph_capture = None
    _addresses = None  # (table, the packed weights it was made from, the key of their biases, norms and eps: as
    #                      many entries per layer as packed weights, so a changed layer count changes the key)

    def _layer_addresses(self) -> torch.Tensor | None:
        """int64 [layers, 8] for kernels/cpu_layers.py, or None where some weight is not on the kernels' path.
        Checked on every forward (a changed weight is repacked, as Linear.forward does; a replaced module,
        parameter or eps is seen), rebuilt only when something changed: for SmolLM2 ~0.3 ms to check against
        1.9 to rebuild."""
        operands = []  # per layer the modules C reads (through _modules: a module attribute costs ~1 us)
        for layer in self.model.layers:
            attn, mlp, mods = layer._modules["self_attn"]._modules, layer._modules["mlp"]._modules, layer._modules
            operands.append((attn["qkv_proj"], attn["o_proj"], mlp["gate_up_proj"], mlp["down_proj"],
                             mods["input_layernorm"], mods["post_attention_layernorm"]))
        packed, extras = [], []
        for qkv, o, gate_up, down, norm1, norm2 in operands:
            packed += (qkv.packed(), o.packed(), gate_up.packed(), down.packed())
            extras += (qkv._parameters["bias"], o._parameters["bias"], norm1._parameters["weight"],
                       norm2._parameters["weight"])
        key = [None if t is None else (t.data_ptr(), t.dtype, t.shape, t.is_contiguous()) for t in extras]
        key += [norm.eps for *_, norm1, norm2 in operands for norm in (norm1, norm2)] + [self.model.norm.eps]
        cached = self._addresses
        if cached is None or key != cached[2] or any(a is not b for a, b in zip(packed, cached[1])):
            self._addresses = cached = (self._address_table(packed, extras, key[len(extras):]), packed, key)
        return cached[0]

    def _address_table(self, packed, extras, eps) -> torch.Tensor | None:
        """The table for these packed weights and biases / norm weights (4 each per layer), or None where C
        could not take them: C trusts every dtype and shape, so anything unexpected takes the Python loop."""
        attn, hidden, inner = self.model.layers[0].self_attn, self.config.hidden_size, self.config.intermediate_size
        heads = attn.num_heads * attn.head_dim
        shapes = [(heads + 2 * attn.num_kv_heads * attn.head_dim, hidden), (hidden, heads), (2 * inner, hidden),
                  (hidden, inner)]  # [out, in] of q/k/v, o, gate/up, down, as cpu_layers.c computes them
        sizes = [shapes[0][0], hidden, hidden, hidden]  # of the q/k/v bias, the o bias, the two norms
        if (any(type(p) is not cpu_linear.PackedWeight or p.dtype != self.dtype for p in packed)
                or any(t is not None and (t.dtype != self.dtype or not t.is_contiguous() or t.shape != (n,))
                       for t, n in zip(extras, sizes * len(self.model.layers)))
                or any(t is None for t in extras[2::4] + extras[3::4]) or len(set(eps)) != 1
                or [(p.out_features, p.in_features) for p in packed] != shapes * len(self.model.layers)):
            return None
        rows = []
        for i in range(len(self.model.layers)):
            qkv, o, gate_up, down = (p.data.data_ptr() for p in packed[4 * i: 4 * i + 4])
            qkv_bias, o_bias, norm1, norm2 = (0 if t is None else t.data_ptr() for t in extras[4 * i: 4 * i + 4])
            rows.append([qkv, qkv_bias, norm1, o, o_bias, norm2, gate_up, down])  # cpu_layers.c's order
        return torch.tensor(rows, dtype=torch.int64)

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def use_cuda_graphs(self, enabled: bool = True) -> None:
        """Replay the layers of decode and verification passes as CUDA graphs (``LayerGraphs``): one capture
        per (rows, new tokens) shape per generate() call, then one launch instead of ~15 per layer."""
        if enabled and self.device.type != "cuda":
            raise ValueError(f"use_cuda_graphs needs the model on a CUDA device, it is on {self.device}")
        self.graph_capture = cuda_capture if enabled else None

    def new_cache(self, batch_size: int, max_len: int, features: bool = False) -> KVCache:
        """features: the cache also keeps each position's last hidden state (for a draft head)"""
        attn = self.model.layers[0].self_attn
        return KVCache(
            num_layers=len(self.model.layers), batch_size=batch_size, num_kv_heads=attn.num_kv_heads,
            head_dim=attn.head_dim, max_len=max_len, dtype=self.dtype, device=self.device,
            features=self.config.hidden_size if features else 0,
        )

    def new_pool(self, num_blocks: int, block_size: int, features: bool = False) -> KVPool:
        """A paged pool for the engine: ``num_blocks`` blocks of ``block_size`` positions, shared by sequences."""
        attn = self.model.layers[0].self_attn
        return KVPool(
            num_layers=len(self.model.layers), num_blocks=num_blocks, block_size=block_size,
            num_kv_heads=attn.num_kv_heads, head_dim=attn.head_dim, dtype=self.dtype, device=self.device,
            features=self.config.hidden_size if features else 0,
        )

    def forward(self, input_ids, positions, cache: KVCache, logits_index=None, *, inputs_embeds=None):
        """Run new tokens through the model and append them to the cache.

        input_ids     [batch, T]  new tokens (any padding has position -1)
        positions     [batch, T]  position of each new token == its cache slot: row b's tokens continue its
                                  cache (lengths[b], lengths[b] + 1, ...), right-padded with -1
        cache         KVCache     holds slots 0..position-1 of each row; its lengths advance here
                                  (or a PagedKVCache: the same through a block table per row). A cache made
                                  with ``features=True`` also receives the last layer's output (before the
                                  final norm) of every new token: what a draft head reads (models/head.py)
        logits_index  [batch, n]  optional: only these of the T new tokens get logits
        inputs_embeds [batch, T, hidden]  optional: the layers' input instead of the embedding of input_ids
                                  (a draft head feeds its fused token + feature vectors)
        returns       [batch, T or n, vocab] logits in float32 (float64 for float64 models)
        """
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # [batch, T, hidden]
        span = cache.check_room(positions)  # keys attended: slots 0..span-1 (the forward's one host sync)
        angles = positions.clamp(min=0).float()[..., None] * self.inv_freq  # [batch, T, head_dim / 2]
        cos = (angles.cos() * self.rope_scaling).to(x.dtype)
        sin = (angles.sin() * self.rope_scaling).to(x.dtype)
        cos = torch.cat((cos, cos), dim=-1)[:, :, None]  # [batch, T, 1, head_dim]
        sin = torch.cat((-sin, sin), dim=-1)[:, :, None]  # the sign of rotate_half lives here, see _rotate
        # The cache is compact (slot == position): the query at position p sees slots 0..p, and stale entries
        # past a row's length — rolled-back drafts, other rows' tails — are never seen.
        context_lens = positions[:, 0].clamp(min=0)  # [batch] each row's new tokens follow its cache
        # generate() feeds every row right-padded and contiguous from its cache length; anything else would
        # attend to the wrong keys, so it is refused rather than computed
        expected = context_lens[:, None] + torch.arange(positions.shape[1], device=x.device)
        torch._assert_async(((positions < 0) | (positions == expected)).all(),
                            "positions must continue each row's cache, right-padded with -1")
        query_lens = (positions >= 0).sum(dim=1)
        mask = row_ok = None  # the kernels build their own
        attn = self.model.layers[0].self_attn
        # the kernel has no backward: training keeps the torch ops
        cpu_kernel = (not torch.is_grad_enabled()
                      and cpu_attention.usable(x, attn.head_dim, attn.num_heads // attn.num_kv_heads))
        if not use_triton(x) and not cpu_kernel:
            span, mask, row_ok = attention_span_and_mask(context_lens, query_lens, positions.shape[1], span)
        step = Step(cos=cos, sin=sin, slots=None if cpu_kernel else cache.slots(positions), context_lens=context_lens,
                    query_lens=query_lens, span=span, mask=mask, row_ok=row_ok, positions=positions,
                    cpu_kernel=cpu_kernel)
        one_call = (cpu_kernel and self.layers_in_one_call and x.dtype == self.dtype
                    and x.shape[-1] == self.config.hidden_size)
        addresses = self._layer_addresses() if one_call else None
        if addresses is not None:  # the same kernels, without Python between them
            x = cpu_layers.decoder_layers(x, addresses, self.model.norm.eps, cos, sin, positions, cache,
                                          attn.num_heads, attn.num_kv_heads, attn.head_dim,
                                          self.config.intermediate_size)
        elif (self.graph_capture is not None and type(cache) is KVCache and x.shape[1] <= GRAPH_MAX_TOKENS
              and span > x.shape[1] and not step.cpu_kernel and not torch.is_grad_enabled()):
            # (span > T: some row continues a cache. A first pass, a short prompt's prefill, runs once: no graph)
            graphs = cache.graphs.get(self)
            if graphs is None:
                graphs = cache.graphs[self] = LayerGraphs(self.model.layers, cache, self.graph_capture)
            x = graphs(x, step)
        else:
            for layer in self.model.layers:
                x = layer(x, step, cache)
        cache.advance(positions)
        if cache.features is not None:
            cache.write_features(positions, x)
        if logits_index is not None:  # the vocabulary projection only where logits are wanted
            x = x.gather(1, logits_index[..., None].expand(-1, -1, x.shape[-1]))
        return select(self.lm_head(x, norm=self.model.norm))
