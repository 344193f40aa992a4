"""What scale-out costs when serving: `specdec serve` as one process, as 2 replicas behind Ray Serve
(``--replicas 2``) and over 2 tensor-parallel ranks (``--tensor-parallel 2``), each started as a user starts it
(a subprocess on a free loopback port), measured with bench/load.py's closed loop of streaming chat clients
(greedy) at each concurrency. On a 2-core CPU the variants share the cores one process had: this measures the
machinery, not a speed-up.

    python bench/serve_scale.py                        # c = 1 and 16, 48 tokens, 40 s a level, 2 rounds
    python bench/serve_scale.py --variants one replicas --concurrency 16 --rounds 3 --json out.json

Reported per (variant, concurrency): completion tokens/s, time to first token and inter-token latency p50,
the median over rounds (variants alternate within a round).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from load import level, percentile, prompts

VARIANTS = {"one": [], "replicas": ["--replicas", "2"], "tensor-parallel": ["--tensor-parallel", "2"]}


def start(variant: str, args) -> tuple[subprocess.Popen, str]:
    """`specdec serve` for ``variant`` on a free loopback port, once GET /health answers 200."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "specdec.cli", "serve", "--model", args.model, "--dtype", args.dtype,
               "--draft", args.draft, "--port", str(port), *VARIANTS[variant]]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url, deadline = f"http://127.0.0.1:{port}", time.time() + 300
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{' '.join(command)} exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"{variant}: the server did not come up in 300 s")
        time.sleep(0.5)


def measure(url: str, args, pool: list[str], concurrency: int) -> dict:
    results, wall = asyncio.run(level(url, args.model, concurrency, args.requests * concurrency,
                                      args.level_seconds, args.max_tokens, pool))
    tokens = sum(r["tokens"] for r in results)
    return {"requests": len(results), "tokens_per_second": tokens / wall,
            "ttft_p50": percentile([r["ttft"] for r in results], 50),
            "itl_p50": percentile([r["itl"] for r in results if r["itl"] is not None], 50)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--draft", default="none", help="the servers' --draft (default none: plain decoding)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--requests", type=int, default=4, help="requests a client at most, per level")
    parser.add_argument("--level-seconds", type=float, default=40.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    pool, rows = prompts(), []
    for round_ in range(args.rounds):
        for variant in args.variants:
            proc, url = start(variant, args)
            try:
                asyncio.run(level(url, args.model, 2, 2, 60, 8, pool))  # warm-up: every replica's first calls
                for c in args.concurrency:
                    row = {"variant": variant, "round": round_, "concurrency": c, **measure(url, args, pool, c)}
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
            finally:
                os.kill(proc.pid, signal.SIGTERM)
                proc.wait(120)
    print("| variant | clients | tokens/s | TTFT p50 s | ITL p50 s |\n|---|---|---|---|---|")
    for variant in args.variants:
        for c in args.concurrency:
            rs = [r for r in rows if r["variant"] == variant and r["concurrency"] == c]
            med = {k: statistics.median(r[k] for r in rs) for k in ("tokens_per_second", "ttft_p50", "itl_p50")}
            print(f"| {variant} | {c} | {med['tokens_per_second']:.1f} | {med['ttft_p50']:.3f} | "
                  f"{med['itl_p50']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
