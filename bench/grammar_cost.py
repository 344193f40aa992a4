"""What a grammar costs inside generate(): the seconds spent in it (masks filled and applied to the target's
and the draft's logits, grammar drafts found) as a share of the decode's wall time, on the structured-output
prompts (bench/prompts/structured/), SmolLM2 with its GGUF file's Q4_1 blocks and int8 activations, greedy.

    pip install xgrammar && python bench/grammar_cost.py [--max-new-tokens 128] [--repeats 3]

Each figure is the median over repeats of (grammar seconds) / (generate()'s seconds less its prefill), and of
the grammar's seconds per emitted token beside a plain step's.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from specdec.bench.common import chat_ids, load_structured, machine

import specdec
import specdec.grammar as grammar
import specdec.processing as processing
from specdec.models.gguf import keep_blocks
from specdec.models.loading import source_path

MODEL, HEAD = "smollm2-135m-instruct", "smollm2-135m-instruct-head"


class Clock:
    """Seconds spent in the functions it wraps."""

    def __init__(self):
        self.seconds = 0.0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
        return timed


def measure(model, tokenizer, ids, schema, draft, max_new_tokens: int) -> tuple[float, float, int, float]:
    """One constrained generation: (grammar seconds, decode seconds, new tokens, prefill seconds)."""
    clock = Clock()
    saved = grammar.GrammarMasks.allowed, grammar.GrammarMasks.forced, processing.masked
    grammar.GrammarMasks.allowed, grammar.GrammarMasks.forced = clock.wrap(saved[0]), clock.wrap(saved[1])
    processing.masked = clock.wrap(saved[2])
    try:
        kw = dict(draft_model=draft, num_draft_tokens=3) if draft is not None else {}
        start = time.perf_counter()
        out = specdec.generate(model, ids, max_new_tokens=max_new_tokens, grammar={"json_schema": schema},
                               tokenizer=tokenizer, return_dict_in_generate=True, **kw)
        wall = time.perf_counter() - start
    finally:
        grammar.GrammarMasks.allowed, grammar.GrammarMasks.forced, processing.masked = saved
    start = time.perf_counter()  # the prefill alone (one new token), to leave out of the decode's time
    specdec.generate(model, ids, max_new_tokens=1)
    prefill = time.perf_counter() - start
    return clock.seconds, wall - prefill, out.sequences.shape[1] - ids.shape[1], prefill


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    model, tokenizer = specdec.load(MODEL)
    keep_blocks(model, source_path(MODEL), "int8")
    head, _ = specdec.load(HEAD, quantize="int8")
    print(machine())
    print("| schema | draft | new tokens | grammar ms/token | decode ms/token | grammar share |")
    print("|---|---|---|---|---|---|")
    with torch.inference_mode():
        for item in load_structured():
            ids = chat_ids(tokenizer, item["prompt"])
            for name, draft in (("plain", None), ("head k=3", head)):
                runs = [measure(model, tokenizer, ids, item["schema"], draft, args.max_new_tokens)
                        for _ in range(args.repeats)]
                n = runs[0][2]
                mask = statistics.median(r[0] / r[2] for r in runs) * 1e3
                step = statistics.median(r[1] / r[2] for r in runs) * 1e3
                share = statistics.median(r[0] / r[1] for r in runs)
                print(f"| {item['name']} | {name} | {n} | {mask:.2f} | {step:.2f} | {share:.1%} |", flush=True)


if __name__ == "__main__":
    main()
