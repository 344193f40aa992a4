"""n-gram prompt lookup on the evaluation prompts, per category, against plain decoding in the same run.

    python bench/ngram.py [--tokens 128] [--repeats 2] [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from specdec.bench.common import chat_ids, compare, machine, median
from tqdm import tqdm

import specdec

PROMPTS = Path(__file__).resolve().parent / "prompts"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    model, tokenizer = specdec.load("smollm2-135m-instruct", dtype=getattr(torch, args.dtype))
    methods = [("plain", None, 1), ("ngram k=4", "ngram", 4), ("ngram auto", "ngram", "auto")]
    print(f"machine: {machine()}\n\n| category | method | tokens/s | vs plain | tokens/target fwd | acceptance | tokens vs plain |")
    print("|---|---|---|---|---|---|---|")
    for file in sorted(PROMPTS.glob("*.json")):
        prompts = [chat_ids(tokenizer, p) for p in json.loads(file.read_text())]
        seconds = {m[0]: [] for m in methods}
        emitted = {m[0]: 0 for m in methods}
        passes = {m[0]: 0 for m in methods}
        proposed = {m[0]: 0 for m in methods}
        accepted = {m[0]: 0 for m in methods}
        checks = {m[0]: set() for m in methods}
        for _ in tqdm(range(args.repeats), desc=file.stem, file=sys.stderr):
            for ids in prompts:
                plain = None
                for name, draft, k in methods:  # alternate methods prompt by prompt
                    out = specdec.generate(model, ids, max_new_tokens=args.tokens, draft_model=draft,
                                           num_draft_tokens=k, return_dict_in_generate=True)
                    s = out.stats
                    seconds[name].append(s.wall_seconds / s.emitted)
                    emitted[name] += s.emitted
                    passes[name] += s.row_passes
                    proposed[name] += s.proposed
                    accepted[name] += s.accepted
                    if plain is None:
                        plain = out.sequences
                    else:
                        checks[name].add(compare(model, plain, out.sequences, f"{file.stem} {name}"))
        base = 1 / median(seconds["plain"])
        for name, *_ in methods:
            tps = 1 / median(seconds[name])
            acc = f"{accepted[name] / proposed[name]:.2f}" if proposed[name] else "-"
            print(f"| {file.stem} | {name} | {tps:.1f} | {tps / base:.2f}x | {emitted[name] / passes[name]:.2f} "
                  f"| {acc} | {'; '.join(sorted(checks[name]))} |")


if __name__ == "__main__":
    main()
