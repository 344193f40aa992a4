"""How often draft heads agree with the target on the evaluation prompts (``bench/prompts/``), per category.

    python bench/draft_quality.py --heads smollm2-135m-instruct-head path/to/another-head [--tokens 128]

The target answers every evaluation prompt greedily (as ``specdec distill`` makes held-out answers), then
each head drafts from every answer position exactly as ``HeadProposer`` does (``evaluate_head``): first-draft
agreement and expected tokens per target forward at k = 1..4 given the target's own prefix. No timing: these
figures are deterministic, so two heads compare without machine noise (speed is ``specdec bench``'s job).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
from pathlib import Path

import torch

import specdec
from specdec.distill import HEAD, DistillConfig, evaluate_head, feature_records, make_chunks

PROMPTS = Path(__file__).resolve().parent / "prompts"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", nargs="+", required=True, help="registered names or head folders")
    parser.add_argument("--tokens", type=int, default=128, help="answer length (new tokens)")
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args(argv)
    target, tokenizer = specdec.load("smollm2-135m-instruct")
    heads = {name: specdec.load(name)[0] for name in args.heads}
    config = DistillConfig(**{**HEAD, "max_new_tokens": args.tokens})
    figures = {name: {} for name in heads}
    every = []
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        for file in sorted(PROMPTS.glob("*.json")):
            records = make_chunks(json.loads(file.read_text()), Path(tmp) / file.stem, config.gen_batch, file.stem,
                                  functools.partial(feature_records, target, tokenizer, config, 0.0))
            every += records
            for name, head in heads.items():
                figures[name][file.stem] = evaluate_head(head, target, records, max_k=4)
        for name, head in heads.items():
            figures[name]["all"] = evaluate_head(head, target, every, max_k=4)
    print(f"\n{args.tokens}-token greedy answers of the target to bench/prompts/; per head and category: first-draft "
          "agreement, expected tokens per target forward at k = 1 / 2 / 3 / 4\n", file=sys.stderr)
    print("| category | " + " | ".join(heads) + " |")
    print("|---|" + "---|" * len(heads))
    for category in figures[args.heads[0]]:
        cells = []
        for name in heads:
            f = figures[name][category]
            per_k = " / ".join(f"{f['tokens_per_target_forward'][k]:.2f}" for k in range(1, 5))
            cells.append(f"{f['first_draft_agreement']:.3f} ({per_k})")
        positions = figures[args.heads[0]][category]["answer_tokens"]
        print(f"| {category} ({positions} positions) | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"tokens": args.tokens, "figures": figures}, indent=1))


if __name__ == "__main__":
    main()
