"""Tiny random models of every supported architecture, built once per test session."""

from __future__ import annotations

import functools
import os

import torch

if not torch.cuda.is_available():  # Triton kernels run on CPU tensors in Triton's interpreter; set before
    os.environ.setdefault("TRITON_INTERPRET", "1")  # any kernel module is imported (decoration reads it)

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

settings.register_profile("default", deadline=None, max_examples=20,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", deadline=None, max_examples=200,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

VOCAB = 101  # odd on purpose: nothing may assume a multiple of anything
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)

ARCHS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**COMMON, tie_word_embeddings=False)),
    "llama3": lambda: LlamaForCausalLM(LlamaConfig(**COMMON, tie_word_embeddings=False, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    "llama-bias": lambda: LlamaForCausalLM(LlamaConfig(**COMMON, attention_bias=True)),
    "smollm2": lambda: LlamaForCausalLM(LlamaConfig(**{**COMMON, "num_key_value_heads": 1}, tie_word_embeddings=True)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**COMMON, head_dim=16, tie_word_embeddings=False)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**COMMON, tie_word_embeddings=False)),
}
FALLBACK_ARCHS = {
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=512,
                                               bos_token_id=1, eos_token_id=2, pad_token_id=0)),
}


@functools.lru_cache(maxsize=None)
def tiny_model(arch: str, dtype: torch.dtype = torch.float64, seed: int = 0):
    """A random transformers model; the same object for the same arguments (so its native twin is cached)."""
    torch.manual_seed(seed)
    factory = {**ARCHS, **FALLBACK_ARCHS}[arch]
    model = factory().to(dtype).eval()
    # Random init gives near-uniform logits; sharper ones make greedy paths and EOS hits realistic.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    model.generation_config.do_sample = False
    return model


def one_layer_llama(vocab: int, hidden: int, seed: int, scale: float):
    """A float64 one-layer Llama without special tokens; lm_head scaled by `scale` for sharper logits."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         bos_token_id=None, eos_token_id=None, pad_token_id=None)).double().eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model


@functools.lru_cache(maxsize=None)
def toy_tokenizer():
    """101 tokens for the tiny models' 101 ids: <pad> <s> </s> (EOS = 2), the 95 printable ASCII characters,
    '"name"', 'true', 'false'; decoding concatenates them. Encoding writes text a character a token, so
    text a grammar forces (such as '{"name": ') becomes drafts the target may reject (it may write '"name"')."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for piece in [*string.printable[:95], '"name"', "true", "false"]:
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


@functools.lru_cache(maxsize=None)
def perturbed_copy(arch: str, scale: float = 0.02):
    """The target with noise on every weight: a draft that agrees often but not always."""
    import copy

    target = tiny_model(arch)
    draft = copy.deepcopy(target)
    draft.__dict__.pop("_specdec_native", None)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale * p.std())
    return draft


@pytest.fixture(params=sorted(ARCHS))
def arch(request):
    return request.param



def tiny_head(target, kept=None, seed=0):
    """A random draft head (models/head.py) for a tiny target, in its dtype, proposing the ids ``kept``
    (default: all)."""
    from specdec.models.head import DraftHead
    from specdec.models.loading import as_native

    native = as_native(target)
    torch.manual_seed(seed)
    ids = torch.arange(native.vocab_size) if kept is None else torch.tensor(kept)
    head = DraftHead.for_target(native.config, ids)
    with torch.no_grad():  # sharper logits: realistic greedy paths
        head.body.model.embed_tokens.weight.mul_(4.0)
    return head.to(native.dtype).eval()
