"""Cost of top-p over a 49152-id vocabulary: transformers' sorting warper against ``sampling.top_p_filter``.

    python bench/top_p.py [--rows 1 5 16 64] [--repeats 20]

Rows are what a sampled step warps: 1 for a plain step at batch 1, k + 1 for a verification pass, times the
batch. Logits are SmolLM2-135M's own (its answer to a prompt, one position per row), so the mass sits where
a real model puts it; temperature 0.7 and top_p 0.9 as in the benchmark's sampling mode. Alternating, median
of ``--repeats`` timings each.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers.generation.logits_process import TopPLogitsWarper

import specdec
from specdec.sampling import top_p_filter


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 5, 16, 64])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--top-p", type=float, default=0.9)
    args = parser.parse_args(argv)
    model, tokenizer = specdec.load("smollm2-135m-instruct")
    chat = [{"role": "user", "content": "Tell me about the sea."}]
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = ids["input_ids"]
    seq = specdec.generate(model, ids, max_new_tokens=max(args.rows), do_sample=False)[0]
    with torch.inference_mode():
        n = len(seq)
        logits = model(seq[None], torch.arange(n)[None], model.new_cache(1, n))[0, -max(args.rows):] / 0.7
    print(f"top_p = {args.top_p}, vocabulary {logits.shape[-1]}, median of {args.repeats} (ms)")
    print("| rows | transformers (sort) | specdec (top-256 selection) | ratio |")
    print("|---|---|---|---|")
    for rows in args.rows:
        x = logits[:rows].contiguous()
        assert (TopPLogitsWarper(args.top_p)(None, x.clone()).isinf() == top_p_filter(x, args.top_p).isinf()).all()
        times = {"hf": [], "ours": []}
        for _ in range(args.repeats):
            for name, f in (("hf", lambda: TopPLogitsWarper(args.top_p)(None, x.clone())),
                            ("ours", lambda: top_p_filter(x, args.top_p))):
                start = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - start)
        hf, ours = (statistics.median(times[k]) * 1e3 for k in ("hf", "ours"))
        print(f"| {rows} | {hf:.2f} | {ours:.2f} | {hf / ours:.1f}x |")


if __name__ == "__main__":
    main()
