"""Shared pieces of the benchmarks: machine description, memory bandwidth, the default model, prompts."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time

import torch

from specdec.stats import median_ratio, synchronize

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a hash table works and when it is a poor choice.",
    "Write a Python function that merges two sorted lists, with a docstring.",
    "Rewrite in plain English: The aforementioned party shall indemnify the other party against all losses.",
]


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def bandwidth_gbs(megabytes: int = 1024, repeats: int = 5, device="cpu") -> float:
    """Copy bandwidth, counted as bytes read + bytes written, median of repeats (after one warm-up copy)."""
    src = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * 4 / statistics.median(times) / 1e9


@torch.inference_mode()
def verification_cost(model, ks, context: int, repeats: int, device="cpu") -> dict[int, float]:
    """Median seconds of a pass over k + 1 new tokens / median seconds of a one-token pass, at ``context``
    cached tokens; the T values alternate so that drift hits all alike."""
    cache = model.new_cache(1, context + max(ks) + 2)
    model(torch.arange(1, context + 1, device=device)[None] % model.vocab_size,
          torch.arange(context, device=device)[None], cache)
    times = {t: [] for t in [1, *[k + 1 for k in ks]]}
    for _ in range(repeats):
        for t in times:
            ids = torch.full((1, t), 7, device=device)
            pos = torch.arange(context, context + t, device=device)[None]
            synchronize(device)
            start = time.perf_counter()
            model(ids, pos, cache)
            synchronize(device)
            times[t].append(time.perf_counter() - start)
            cache.rollback(context)
    return {t - 1: median_ratio(ts, times[1]) for t, ts in times.items() if t > 1}


def weight_bytes(model) -> int:
    """Bytes of weights one decode step reads: every parameter once, a quantized layer's packed values, scales
    and zeros; an embedding only where the output layer reads it too (tied), as a step looks up just one row."""
    seen, total = set(), 0
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            continue
        total += getattr(module, "packed_bytes", 0)  # a quantized layer (models/quantized.py): what its kernel reads
        for t in module.parameters(recurse=False):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def load_pair(dtype):
    """specdec's native model and transformers' model over the same float32 weights, cast to ``dtype``."""
    from transformers import AutoModelForCausalLM

    import specdec
    from specdec.models.loading import REGISTRY, converted_gguf

    model, tokenizer = specdec.load("smollm2-135m-instruct", dtype=dtype)
    hf = AutoModelForCausalLM.from_pretrained(converted_gguf(REGISTRY["smollm2-135m-instruct"]()),
                                              dtype=dtype).eval()
    return model, hf, tokenizer


def chat_ids(tokenizer, prompt):
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)["input_ids"]


def median(xs):
    return statistics.median(xs)


NEAR_TIE = 0.5  # logit gap under which a bfloat16 departure counts as a near-tie flip (tests/test_real_model.py)


def compare(model, reference, candidate, label: str) -> str:
    """'exact', 'N near-tie flips' or a red MISMATCH line (printed to stderr), never hidden."""
    from specdec.checks import departures

    found = departures(model, reference, candidate)
    if not found:
        return "exact"
    real = [d for d in found if abs(d.gap) > NEAR_TIE]
    if real:
        print(f"\x1b[31mMISMATCH\x1b[0m {label}: {real}", file=sys.stderr)
        return f"MISMATCH x{len(real)}"
    return f"{len(found)} near-tie flip(s), gap <= {max(abs(d.gap) for d in found):.3f}"
