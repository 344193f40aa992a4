"""Speculative decoding on SmolLM2-135M-Instruct: the cost of verifying k + 1 tokens, the target as its own
draft (acceptance 1: tokens per target forward must be k + 1), and a random small draft (acceptance ~0:
the overhead floor).

    python bench/speculative.py [--tokens 64] [--repeats 3] [--cost-runs 3] [--dtypes float32 bfloat16]
                                [--json out.json]

The verification cost is measured --cost-runs times (each a median of 15 passes per k); the table gives the
median of the runs and the k = 7 figure of each run, since single runs on a noisy machine differ by ~0.1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from specdec.bench.common import PROMPTS, chat_ids, compare, machine, median, verification_cost
from tqdm import tqdm

import specdec

KS = range(1, 9)


def random_draft(target):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=target.config.vocab_size, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    return LlamaForCausalLM(config).to(target.dtype).eval()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--ks", nargs="+", default=[*map(str, KS), "auto"], help="k values to run, or 'auto'")
    parser.add_argument("--cost-runs", type=int, default=3, help="verification-cost measurements, median taken")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    report = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}, "runs": []}
    for dtype_name in args.dtypes:
        model, tokenizer = specdec.load("smollm2-135m-instruct", dtype=getattr(torch, dtype_name))
        cost_runs = [verification_cost(model, KS, context=200, repeats=15) for _ in range(args.cost_runs)]
        cost = {k: median([run[k] for run in cost_runs]) for k in KS}
        print(f"\n## {dtype_name}\n\nverification pass of k + 1 tokens / plain step (context 200, median of 15; "
              f"median of {args.cost_runs} runs, k = 7 in each: {', '.join(f'{run[7]:.2f}' for run in cost_runs)}):")
        print("| k | " + " | ".join(str(k) for k in KS) + " |\n|---|" + "---|" * len(KS))
        print("| cost | " + " | ".join(f"{cost[k]:.2f}" for k in KS) + " |")
        ids = chat_ids(tokenizer, PROMPTS[0])
        drafts = {"self": model, "random": random_draft(model)}
        ks = [k if k == "auto" else int(k) for k in args.ks]
        configs = [("plain", None, 0)] + [(name, d, k) for name, d in drafts.items() for k in ks]
        specdec.generate(model, ids, max_new_tokens=4, eos_token_id=[])  # warm-up
        seconds = {c[:1] + (c[2],): [] for c in configs}
        stats, checks = {}, {}
        plain = None
        for _ in tqdm(range(args.repeats), desc=f"speculative {dtype_name}", file=sys.stderr):
            for name, draft, k in configs:  # alternate every configuration each repeat
                out = specdec.generate(model, ids, max_new_tokens=args.tokens, eos_token_id=[], draft_model=draft,
                                       num_draft_tokens=k or 1, return_dict_in_generate=True)
                seconds[(name, k)].append(out.stats.wall_seconds)
                stats[(name, k)] = out.stats
                if name == "plain":
                    plain = out.sequences
                else:
                    checks[(name, k)] = compare(model, plain, out.sequences, f"{dtype_name} {name} k={k}")
        base = args.tokens / median(seconds[("plain", 0)])
        print("\n| draft | k | tokens/s | vs plain | tokens/target fwd | acceptance | c | predicted | tokens vs plain |")
        print("|---|---|---|---|---|---|---|---|---|")
        for (name, k), ts in seconds.items():
            s, tps = stats[(name, k)], args.tokens / median(ts)
            c = "-" if s.cost_ratio is None else f"{s.cost_ratio:.2f}"
            pred = "-" if s.predicted_speedup is None else f"{s.predicted_speedup:.2f}"
            acc = "-" if not s.proposed else f"{s.acceptance_rate:.2f}"
            print(f"| {name} | {k} | {tps:.1f} | {tps / base:.2f}x | {s.tokens_per_target_forward:.2f} | {acc} | {c} "
                  f"| {pred} | {checks.get((name, k), '')} |")
            report["runs"].append({"dtype": dtype_name, "draft": name, "k": k, "tokens_per_s": tps,
                                   "speedup_vs_plain": tps / base, "tokens_vs_plain": checks.get((name, k), ""),
                                   "stats": s.to_dict()})
        report["runs"].append({"dtype": dtype_name, "verification_cost": cost, "verification_cost_runs": cost_runs})
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
