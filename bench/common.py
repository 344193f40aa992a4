"""Shared pieces of the benchmarks: the evaluation prompts (and the structured-output ones, each with its JSON
schema), timing, machine description, memory bandwidth, weight bytes, the near-tie bound of output checks, the
check of a JSON output against its schema."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from specdec.stats import median_ratio, synchronize

PROMPT_DIR = Path(__file__).resolve().parent / "prompts"  # the evaluation prompts: one JSON list per category
CATEGORIES = ("chat", "explanation", "code", "rewriting", "math")


def load_prompts(categories=CATEGORIES, per_category: int | None = None) -> dict[str, list[str]]:
    """The evaluation prompts of each category, the first ``per_category`` of each (None: all)."""
    return {c: json.loads((PROMPT_DIR / f"{c}.json").read_text())[:per_category] for c in categories}


def load_structured(count: int | None = None) -> list[dict]:
    """The structured-output prompts (prompts/structured/NAME.json, by name), the first ``count`` (None: all):
    each a dict of name, schema (a JSON schema) and prompt (the user message, the schema's JSON text in place
    of ``{schema}``, so that the model is asked for what the grammar allows)."""
    out = []
    for path in sorted((PROMPT_DIR / "structured").glob("*.json"))[:count]:
        item = json.loads(path.read_text())
        out.append({"name": path.stem, "schema": item["schema"],
                    "prompt": item["prompt"].replace("{schema}", json.dumps(item["schema"]))})
    return out


def schema_error(text: str, schema: dict) -> str | None:
    """Why ``text`` is not a JSON value of ``schema`` (None: it is). With jsonschema installed, full
    validation; without it, JSON that parses to an object holding the schema's required keys."""
    try:
        value = json.loads(text)
    except ValueError as err:
        return f"not JSON: {err}"
    try:
        import jsonschema
    except ImportError:
        missing = [key for key in schema.get("required", ()) if not isinstance(value, dict) or key not in value]
        return f"missing required key(s) {missing}" if missing else None
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError as err:
        return f"not of the schema: {err.message}"
    return None


def timed(fn, device="cpu"):
    """fn() -> (what it returns, its wall seconds), the device synchronized before and after (CUDA work is
    asynchronous: a timer read before it finishes counts only the launches)."""
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


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
    times = [timed(lambda: dst.copy_(src), device)[1] for _ in range(repeats)]
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
            times[t].append(timed(lambda: model(ids, pos, cache), device)[1])
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


def chat_ids(tokenizer, prompt):
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)["input_ids"]


NEAR_TIE = 0.5  # logit gap under which a bfloat16 departure counts as a near-tie flip (tests/test_real_model.py)
