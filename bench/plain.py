"""Plain decoding: transformers' generate() against specdec's, side by side, against the memory roofline.

    python bench/plain.py [--tokens 128] [--repeats 5] [--dtypes float32 bfloat16] [--json out.json]

Greedy, batch 1, exactly --tokens new tokens (no EOS stop), runs alternating between the two libraries
so that drift hits both alike; medians over prompts x repeats.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from specdec.bench.common import (
    PROMPTS,
    bandwidth_gbs,
    chat_ids,
    compare,
    load_pair,
    machine,
    median,
    weight_bytes,
)
from tqdm import tqdm

import specdec


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    bandwidth = bandwidth_gbs()
    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        model, hf, tokenizer = load_pair(dtype)
        nbytes = weight_bytes(model)
        times = {"transformers": [], "specdec": []}
        checks = set()
        prompts = [chat_ids(tokenizer, p) for p in PROMPTS[: args.prompts]]
        for ids in prompts:  # warm-up
            hf.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
            specdec.generate(model, ids, max_new_tokens=4, eos_token_id=[])
        for _ in tqdm(range(args.repeats), desc=f"plain {dtype_name}", file=sys.stderr):
            for ids in prompts:
                start = time.perf_counter()
                want = hf.generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)
                times["transformers"].append(time.perf_counter() - start)
                start = time.perf_counter()
                got = specdec.generate(model, ids, max_new_tokens=args.tokens, eos_token_id=[])
                times["specdec"].append(time.perf_counter() - start)
                checks.add(compare(model, want, got, f"specdec vs transformers {dtype_name}"))
        for name, ts in times.items():
            tps = args.tokens / median(ts)
            rows.append({"library": name, "dtype": dtype_name, "tokens_per_s": tps, "weight_bytes": nbytes,
                         "weight_gbs": tps * nbytes / 1e9, "roofline_fraction": tps * nbytes / 1e9 / bandwidth,
                         "roofline_tokens_per_s": bandwidth * 1e9 / nbytes,
                         "same_tokens_as_transformers": "; ".join(sorted(checks)) if name == "specdec" else ""})
    base = {r["dtype"]: r["tokens_per_s"] for r in rows if r["library"] == "transformers"}
    spec32 = next((r["tokens_per_s"] for r in rows if r["library"] == "specdec" and r["dtype"] == "float32"), None)
    print(f"\nmachine: {machine()}\nmeasured copy bandwidth: {bandwidth:.1f} GB/s\n")
    print("| library | dtype | tokens/s | vs transformers | vs specdec fp32 | weights GB/s | roofline | ceiling tok/s "
          "| tokens vs transformers |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        vs32 = f"{r['tokens_per_s'] / spec32:.2f}x" if spec32 and r["library"] == "specdec" else ""
        print(f"| {r['library']} | {r['dtype']} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / base[r['dtype']]:.2f}x "
              f"| {vs32} | {r['weight_gbs']:.1f} | {100 * r['roofline_fraction']:.0f}% | {r['roofline_tokens_per_s']:.0f} "
              f"| {r['same_tokens_as_transformers']} |")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "bandwidth_gbs": bandwidth, "rows": rows,
                                         "args": vars(args) | {"json": str(args.json)}}, indent=2))


if __name__ == "__main__":
    main()
