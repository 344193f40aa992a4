"""A compact Llama-family decoder (Llama incl. llama3 RoPE, Mistral, Qwen2, SmolLM2) that owns its KV cache.

One forward serves prefill, plain decode and verification: it takes a ragged batch of new tokens
with their positions, writes their keys and values into the cache at slot == position, and returns
logits. Padding tokens carry position -1: they write to the cache's trash slot and are never attended.

Parameter names follow transformers' ``LlamaForCausalLM`` except that q/k/v and gate/up are fused into
one matrix each (``fuse_state_dict`` maps a transformers state dict onto them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from specdec.cache import KVCache, KVPool, select
from specdec.kernels import cpu_linear
from specdec.kernels.cuda_runner import CudaRunner, cuda_capture
from specdec.kernels.runner import TorchRunner, runner_for

#: model_type of a transformers config -> whether q/k/v projections carry a bias (o_proj never does there)
ARCHITECTURES = {"llama": None, "mistral": False, "qwen2": True}


def _qkv_bias(config: PretrainedConfig) -> bool:
    fixed = ARCHITECTURES[config.model_type]
    return bool(getattr(config, "attention_bias", False)) if fixed is None else fixed


@dataclass
class Step:
    """What every layer needs to know about this forward's tokens; the runner fills in the rest."""

    runner: TorchRunner  # how the layers execute (kernels/runner.py)
    cos: torch.Tensor  # [batch, T, 1, head_dim]
    sin: torch.Tensor  # [batch, T, 1, head_dim], sign-folded: -sin on the first half, +sin on the second
    positions: torch.Tensor  # [batch, T] (-1: padding)
    context_lens: torch.Tensor  # [batch] cached tokens before the new ones
    query_lens: torch.Tensor  # [batch] new tokens per row (the rest of T is padding)
    span: int  # slots 0..span-1 hold every key any row attends to
    slots: torch.Tensor | None = None  # [batch, T] cache slot of each new token (padding: the trash slot)
    mask: torch.Tensor | None = None  # [batch, 1, T, span] for the reference attention (made once per forward)
    row_ok: torch.Tensor | None = None  # [batch, T, 1, 1] bool: real (not padding) queries, for the reference
    fused: bool = False  # RoPE, cache write and attention in one kernel call (the CPU runner's)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):  # [batch, T, dim]
        # Normalise in float32 and scale in the model's dtype, as transformers does: in bfloat16 the
        # order of the two roundings decides near-ties, and greedy equivalence rests on them.
        # (transformers does this even for float64 models; the same ops keep the two within 1e-10 there.)
        # The layers hand each norm to the linear layer after it (runner.linear), which fuses them.
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
        self.qkv_proj = nn.Linear(hidden, sum(self.split), bias=_qkv_bias(config))
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=out_bias)

    def forward(self, x, norm: RMSNorm, step: Step, cache: KVCache):
        """x + attention(norm(x)); x [batch, T, hidden]"""
        run = step.runner
        qkv = run.linear(self.qkv_proj, x, norm=norm)  # [batch, T, (q + k + v heads) * head_dim]
        out = run.attention(self, qkv, step, cache)  # [batch, T, heads * head_dim]; RoPE, cache write
        return run.linear(self.o_proj, out, residual=x)


class MLP(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        hidden, inner = config.hidden_size, config.intermediate_size
        self.gate_up_proj = nn.Linear(hidden, 2 * inner, bias=False)  # gate and up: one matmul call
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x, norm: RMSNorm, step: Step):
        """x + down(SiLU(gate) * up) of norm(x)"""
        run = step.runner
        gate_up = run.linear(self.gate_up_proj, x, norm=norm)  # [batch, T, 2 * inner]
        return run.linear(self.down_proj, gate_up, gated=True, residual=x)


class DecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, step: Step, cache):
        # each norm and residual add is fused into the linear layer next to it (runner.linear)
        x = self.self_attn(x, self.input_layernorm, step, cache)
        return self.mlp(x, self.post_attention_layernorm, step)


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
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        with torch.device("cpu"):  # real numbers even while the weights are built on the meta device
            inv_freq, scaling = _rope_frequencies(config, self.model.layers[0].self_attn.head_dim)
        # RoPE angles stay in float32 for every model dtype, as in transformers (float64 models included).
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.rope_scaling = float(scaling)
        self.generation_config = None  # set by the loaders
        self.runner = runner_for(self.device)  # how the layers execute here (kernels/runner.py)
        self.register_load_state_dict_post_hook(_follow_weights)  # loaders assign weights in place of meta ones

    def _apply(self, fn, *args, **kwargs):
        """``to()``, ``cuda()``, ``float()``, ...: a model moved to another device gets that device's runner (a
        new one: kernel state such as packed weights stays with the old weights)."""
        super()._apply(fn, *args, **kwargs)
        self.runner.reset()  # copies made from the weights before the move
        _follow_weights(self)
        return self

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def dtype(self) -> torch.dtype:  # (of the embedding: a quantized output layer's weight is not a tensor)
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def use_cuda_graphs(self, enabled: bool = True) -> None:
        """Replay the layers of decode and verification passes as CUDA graphs (kernels/cuda_runner.py): one
        capture per (rows, new tokens) shape per generate() call, then one launch instead of ~15 per layer."""
        if enabled and self.device.type != "cuda":
            raise ValueError(f"use_cuda_graphs needs the model on a CUDA device, it is on {self.device}")
        self.runner = CudaRunner(capture=cuda_capture) if enabled else runner_for(self.device)

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
        step = self._step(positions, cache, x.dtype)
        x = step.runner.layers(self, x, step, cache)  # for layer in self.model.layers: x = layer(x, step, cache)
        cache.advance(positions)
        if cache.features is not None:
            cache.write_features(positions, x)
        if logits_index is not None:  # the vocabulary projection only where logits are wanted
            x = x.gather(1, logits_index[..., None].expand(-1, -1, x.shape[-1]))
        return select(step.runner.linear(self.lm_head, x, norm=self.model.norm))

    def rope(self, positions, dtype: torch.dtype):
        """RoPE's cos and sin [batch, T, 1, head_dim] in ``dtype`` at positions [batch, T] (-1: as 0). Each
        element is computed on its own: a table over many positions holds the same bits as one step's."""
        angles = positions.clamp(min=0).float()[..., None] * self.inv_freq  # [batch, T, head_dim / 2]
        cos = (angles.cos() * self.rope_scaling).to(dtype)
        sin = (angles.sin() * self.rope_scaling).to(dtype)
        cos = torch.cat((cos, cos), dim=-1)[:, :, None]  # [batch, T, 1, head_dim]
        sin = torch.cat((-sin, sin), dim=-1)[:, :, None]  # the sign of rotate_half lives here (runner.rotate)
        return cos, sin

    def _step(self, positions, cache: KVCache, dtype: torch.dtype) -> Step:
        """The RoPE angles and lengths of this forward's new tokens (positions [batch, T], -1: padding)."""
        _follow_weights(self)  # (a parameter replaced by hand on another device: ~0.2 us to see that it was not)
        span = cache.check_room(positions)  # keys attended: slots 0..span-1 (the forward's one host sync)
        cos, sin = self.rope(positions, dtype)
        # The cache is compact (slot == position): the query at position p sees slots 0..p, and stale entries
        # past a row's length — rolled-back drafts, other rows' tails — are never seen.
        context_lens = positions[:, 0].clamp(min=0)  # [batch] each row's new tokens follow its cache
        # generate() feeds every row right-padded and contiguous from its cache length; anything else would
        # attend to the wrong keys, so it is refused rather than computed
        expected = context_lens[:, None] + torch.arange(positions.shape[1], device=positions.device)
        torch._assert_async(((positions < 0) | (positions == expected)).all(),
                            "positions must continue each row's cache, right-padded with -1")
        return Step(runner=self.runner, cos=cos, sin=sin, positions=positions, context_lens=context_lens,
                    query_lens=(positions >= 0).sum(dim=1), span=span)


def _follow_weights(model: LlamaModel, _loaded=None) -> None:
    """Give ``model`` its device's runner where the weights moved to another device type."""
    if model.runner.device != model.device.type:
        model.runner = runner_for(model.device)
