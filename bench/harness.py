"""``specdec bench``: specdec against transformers, side by side in one process, with the memory roofline.

Every method runs on the same prompts, the same weights and the same dtype. Runs alternate (each repeat
runs every configuration once, in the same order) so that drift of a shared machine hits all of them
alike; figures are medians over repeats. Every greedy speculative output is checked token for token
against specdec's plain greedy output of the same batch: a departure is counted and printed in red, never
hidden (in reduced precision a departure at a near-tie is reported as such, with its logit gap).

Methods are registered objects (``specdec.bench.methods.METHODS``: hf, hf-assisted, hf-lookup, plain, draft,
auto, head, head-auto, ngram, self, synthetic), and named configurations are presets (``PRESETS``: quick, plain,
speculative, ngram, top-p, draft-quality, structured; ``specdec bench --preset NAME``, flags given beside it win).

Structured output (``constraints``, the ``structured`` preset): the prompts of prompts/structured/, each
asking for JSON of its own schema, and every method run unconstrained ("free"), masked by the schema
("schema") and masked with forced drafts ("forced"). Each greedy constrained output is checked token for token
against plain decoding masked by the schema, and every finished constrained output against its schema: an
invalid one is counted and printed in red, as a departure is.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from specdec.bench import llama_cpp
from specdec.bench.common import (CATEGORIES, NEAR_TIE, bandwidth_gbs, chat_ids, load_prompts, load_structured,
                                   machine, schema_error, timed, weight_bytes)
from specdec.bench.methods import (CONSTRAINTS, EACH, GRAMMAR, METHODS, REFERENCE, Run, Workload, needing,
                                   reference_constraint)
from specdec.bench.methods import SyntheticProposer  # noqa: F401  (imported from here by bench/gpu_check.py)
import specdec

#: what a run without --methods measures: every method but those asked for by name only ("self")
DEFAULT_METHODS = tuple(name for name, m in METHODS.items() if m.default)
#: SpecStats counters of tokens the grammar supplied, each reported as a share of the generated tokens
#: ("<name>_share" in a constrained run's row, a column of the structured table)
GRAMMAR_COUNTERS = ("forced",)


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    model: str = "smollm2-135m-instruct"
    draft: str | None = "smollm2-135m-instruct-draft"
    head: str | None = "smollm2-135m-instruct-head"  # a draft head for the target (transformers has no such thing)
    methods: tuple = DEFAULT_METHODS
    ks: tuple = (1, 2, 3, 4, 5, 6, 7, 8)
    modes: tuple = ("greedy", "sampling")
    batch_sizes: tuple = (1, 4, 16)
    max_new_tokens: int = 128
    repeats: int = 3
    prompts_per_category: int | None = 2  # None: every prompt of each category (constraints: of structured/)
    categories: tuple = CATEGORIES
    # structured output: each method under each of these (methods.CONSTRAINTS) on prompts/structured/
    # instead of the categories' prompts; () : the categories' prompts, unconstrained
    constraints: tuple = ()
    dtype: str = "float32"
    weights: str = "float"  # the target's: "float" (dtype), "gguf" (the file's own blocks), "int8", "int4"
    head_quantize: str | None = None  # the head's: None (float), "int8", "int4"
    activations: str = "int8"  # of quantized layers, target's and head's: "int8" or "float" (models/quantized.py)
    llama_cpp: bool = False  # also time llama.cpp's plain decoding of the same GGUF file (bench/llama_cpp.py)
    synthetic_rates: tuple = (0.0, 0.2, 0.4, 0.6, 0.8, 0.9, 1.0)
    synthetic_k: int = 4
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 0

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"methods={list(self.methods)}: unknown method(s) {unknown}; choose from {list(METHODS)}")
        bad_k = [k for k in (*self.ks, self.synthetic_k) if not (isinstance(k, int) and 1 <= k <= 16)]
        if bad_k or not self.ks:
            raise ValueError(f"ks={list(self.ks)}, synthetic_k={self.synthetic_k}: every k must be an integer in 1..16")
        bad_modes = [m for m in self.modes if m not in ("greedy", "sampling")]
        if bad_modes or not self.modes:
            raise ValueError(f"modes={list(self.modes)}: each must be 'greedy' or 'sampling'")
        if not self.batch_sizes or any(not isinstance(b, int) or b < 1 for b in self.batch_sizes):
            raise ValueError(f"batch_sizes={list(self.batch_sizes)}: each must be an integer >= 1")
        for name in ("max_new_tokens", "repeats", "prompts_per_category"):
            value = getattr(self, name)
            if not (value is None and name == "prompts_per_category") and value < 1:
                raise ValueError(f"{name} must be >= 1, got {name}={value}")
        bad_cat = [c for c in self.categories if c not in CATEGORIES]
        if bad_cat or not self.categories:
            raise ValueError(f"categories={list(self.categories)}: choose from {list(CATEGORIES)}")
        if any(c not in CONSTRAINTS for c in self.constraints) or len(set(self.constraints)) < len(self.constraints):
            raise ValueError(f"constraints={list(self.constraints)}: each at most once, from {list(CONSTRAINTS)}")
        if self.constraints and tuple(self.categories) != CATEGORIES:  # (rather than ignore them)
            raise ValueError(f"categories={list(self.categories)}: constraints run on the structured prompts, "
                             "not on categories")
        if any(not 0.0 <= r <= 1.0 for r in self.synthetic_rates):
            raise ValueError(f"synthetic_rates={list(self.synthetic_rates)}: each must lie in [0, 1]")
        if self.dtype not in ("float32", "bfloat16", "float64"):
            raise ValueError(f"dtype must be float32, bfloat16 or float64, got dtype={self.dtype!r}")
        if self.weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {list(WEIGHTS)}, got weights={self.weights!r}")
        if self.activations not in ("int8", "float"):
            raise ValueError(f"activations must be 'int8' or 'float', got activations={self.activations!r}")
        if self.head_quantize not in (None, "int8", "int4"):
            raise ValueError(f"head_quantize must be None, 'int8' or 'int4', got head_quantize={self.head_quantize!r}")
        for what, given in (("draft", self.draft), ("head", self.head)):
            needs = needing(what, self.methods)
            if needs and given is None:
                raise ValueError(f"methods {needs} need a draft{' head' if what == 'head' else ''}; got {what}=None")

    @property
    def draft_in_use(self) -> str | None:
        """The draft, if some method runs it (a run of plain and n-gram lookup reads none)."""
        return self.draft if needing("draft", self.methods) else None

    @property
    def head_in_use(self) -> str | None:
        return self.head if needing("head", self.methods) else None


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named configuration: the BenchConfig fields it sets (flags given beside it override them)."""

    doc: str  # what it measures, one line
    fields: dict


PRESETS: dict[str, Preset] = {
    # finishes in under 5 minutes on a 2-core CPU with SmolLM2-135M (measured: see bench/RESULTS.md)
    "quick": Preset("a small run of every default method: under 5 minutes on a 2-core CPU",
                    dict(ks=(1, 3, 5), modes=("greedy",), batch_sizes=(1, 4), max_new_tokens=48, repeats=1,
                         prompts_per_category=1, synthetic_rates=(0.0, 0.5, 0.9),
                         categories=("chat", "code", "rewriting"))),
    "plain": Preset("plain decoding, transformers' generate() against specdec's, greedy, batch 1, against the "
                    "memory roofline (--dtype bfloat16 for the other dtype)",
                    dict(methods=("hf", "plain"), modes=("greedy",), batch_sizes=(1,), max_new_tokens=128,
                         prompts_per_category=1)),
    "speculative": Preset("the system's own cost: drafts always accepted (synthetic rate 1: k + 1 tokens per "
                          "target forward) and never (rate 0: the overhead floor), and the draft model at every k, "
                          "each round split into verification pass + drafting + the rest in plain steps",
                          dict(methods=("plain", "draft", "auto", "synthetic"), modes=("greedy",), batch_sizes=(1,),
                               max_new_tokens=64, prompts_per_category=1, synthetic_rates=(0.0, 1.0))),
    "ngram": Preset("n-gram prompt lookup against plain decoding on every prompt (--categories for one category)",
                    dict(methods=("plain", "ngram"), modes=("greedy",), batch_sizes=(1,), max_new_tokens=128,
                         repeats=2, prompts_per_category=None)),
    "top-p": Preset("sampled decoding (temperature 0.7, top_p 0.9) against transformers, whose top-p warper sorts "
                    "the whole vocabulary, at batch 1, 4 and 16",
                    dict(methods=("hf", "plain"), modes=("sampling",), batch_sizes=(1, 4, 16))),
    "draft-quality": Preset("the draft head's acceptance per draft position and tokens per target forward at "
                            "k = 1..4, greedy (no timing noise in these figures) on every prompt",
                            dict(methods=("plain", "head"), ks=(1, 2, 3, 4), modes=("greedy",), batch_sizes=(1,),
                                 max_new_tokens=128, repeats=1, prompts_per_category=None)),
    # 12 runs x 4 prompts (218-331 prompt tokens, answers of 40-128 tokens) x 3 repeats = 144 calls of at most
    # 128 new tokens: ~3 minutes on a 2-core CPU with SmolLM2-135M's Q4_1 blocks (bench/RESULTS.md)
    "structured": Preset("structured output: plain, the draft head (k = 3 and auto) and n-gram lookup on JSON-schema "
                         "prompts, each unconstrained, masked by the schema, and masked with grammar drafts; tokens/s, "
                         "tokens per target forward, grammar-draft share, every finished output validated against "
                         "its schema",
                         dict(methods=("plain", "head", "head-auto", "ngram"), ks=(3,), modes=("greedy",),
                              batch_sizes=(1,), max_new_tokens=128, repeats=3, prompts_per_category=None,
                              constraints=CONSTRAINTS)),
}


def configure(preset: str | None = None, **fields) -> BenchConfig:
    """The BenchConfig of a preset (None: the defaults) with ``fields`` set over it."""
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"preset={preset!r} is not a preset; choose from {list(PRESETS)}")
    return BenchConfig(**{**(PRESETS[preset].fields if preset is not None else {}), **fields})


#: the columns "vs X": a run's tokens/s over method X's in the same mode and batch
BASELINES = (("vs_plain", REFERENCE), ("vs_hf", "hf"), ("vs_hf_assisted", "hf-assisted"))


def plan(config: BenchConfig) -> list[Run]:
    """Every configuration the benchmark runs, grouped by (mode, batch) and then constraint, in the order each
    repeat runs them. specdec plain runs first in each constraint's group: its greedy output is the reference
    every other run of the group is checked against (and the synthetic proposer's oracle), so it runs even when
    not asked for; "forced" runs are checked against plain "schema" (``reference_constraint``)."""
    runs = []
    constraints = config.constraints or (None,)
    for mode in config.modes:
        for batch in config.batch_sizes:
            groups = {c: [run for name in config.methods for run in METHODS[name].runs(config, mode, batch, c)
                          if run != Run(REFERENCE, mode, batch, constraint=reference_constraint(c))]
                      for c in constraints}
            for c in sorted({*constraints, *map(reference_constraint, constraints)},
                            key=lambda c: CONSTRAINTS.index(c) if c is not None else -1):
                if reference_constraint(c) != c:  # ("forced": plain under it is in its group, checked)
                    runs += groups[c]
                    continue
                needs_reference = (REFERENCE in config.methods and c in groups) or (mode == "greedy" and any(
                    group for x, group in groups.items() if reference_constraint(x) == c))
                runs += ([Run(REFERENCE, mode, batch, constraint=c)] if needs_reference else []) + groups.get(c, [])
    return runs


# ---------------------------------------------------------------------------------------------- arithmetic

def roofline(tokens_per_s: float, tokens_per_forward: float, batch: int, target_bytes: int, draft_bytes: int,
             mean_k: float, bandwidth: float) -> dict:
    """Bytes of weights read per second, the fraction of the machine's bandwidth that is, and the ceiling.

    One target forward serves ``batch`` rows and emits ``tokens_per_forward`` tokens per row, and reads the
    target's weights once plus the draft's ``mean_k`` times (one draft step per proposed token), so
    ceiling tokens/s = bandwidth x tokens_per_forward x batch / (target bytes + k x draft bytes).
    bandwidth in bytes/s."""
    per_forward = target_bytes + mean_k * draft_bytes
    forwards_per_s = tokens_per_s / (tokens_per_forward * batch)
    return {"weight_bytes_per_s": forwards_per_s * per_forward,
            "bandwidth_fraction": forwards_per_s * per_forward / bandwidth,
            "ceiling_tokens_per_s": bandwidth * tokens_per_forward * batch / per_forward}


def median_rate(tokens: list[int], seconds: list[float]) -> float:
    """Median over repeats of tokens / seconds (each repeat's totals)."""
    return statistics.median(t / s for t, s in zip(tokens, seconds))


def break_even(rates: list[float], speedups: list[float]) -> float | None:
    """The acceptance rate where speedup crosses 1.0 (linear interpolation); None if it never does."""
    points = sorted(zip(rates, speedups))
    if points and points[0][1] >= 1.0:
        return points[0][0]
    for (r0, s0), (r1, s1) in zip(points, points[1:]):
        if s0 < 1.0 <= s1:
            return r0 + (1.0 - s0) * (r1 - r0) / (s1 - s0)
    return None


# ---------------------------------------------------------------------------------------------- running

def workloads(prompts: list[list[int]], batch: int, pad: int, schemas: list[dict] | None = None) -> list[Workload]:
    """Batch 1: one call per prompt. Batch B: calls of B prompts (cycled so that every call is full); with
    ``schemas`` (one per prompt), B copies of one prompt a call, as a call takes one grammar."""
    if schemas is not None:
        return [Workload(torch.tensor([p] * batch), torch.ones(batch, len(p), dtype=torch.long), schema)
                for p, schema in zip(prompts, schemas)]
    count = max(1, math.ceil(len(prompts) / batch))
    cycled = [prompts[i % len(prompts)] for i in range(count * batch)]
    out = []
    for start in range(0, len(cycled), batch):
        group = cycled[start:start + batch]
        width = max(map(len, group))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in group])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group])
        out.append(Workload(ids, mask))
    return out


def check_rows(native, reference: list[torch.Tensor], candidate: list[torch.Tensor], label: str) -> str:
    """'exact', 'N near-tie flip(s) ...' or 'MISMATCH xN' (also printed in red on stderr, never hidden)."""
    from specdec.checks import departures

    found, lengths = [], 0
    for ref, got in zip(reference, candidate):
        row = departures(native, ref[None], got[None])
        found += row
        lengths += not row and len(ref) != len(got)  # same tokens, one stopped early: wrong all the same
    real = [d for d in found if abs(d.gap) > NEAR_TIE]
    if real or lengths:
        print(f"\x1b[31mMISMATCH\x1b[0m {label}: {real}{f' and {lengths} length difference(s)' if lengths else ''}",
              file=sys.stderr)
        return f"MISMATCH x{len(real) + lengths}"
    if found:
        return f"{len(found)} near-tie flip(s), gap <= {max(abs(d.gap) for d in found):.3f}"
    return "exact"


def unpadded(work: Workload, generated: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.cat([ids[mask.bool()], gen]) for ids, mask, gen in zip(work.input_ids, work.attention_mask,
                                                                         generated)]


def schema_checks(tokenizer, work: Workload, generated: list[torch.Tensor], eos: set[int]) -> list[str | None]:
    """Per row: None for a finished answer that is JSON of the workload's schema, why not for one that is
    not, "unfinished" for a row that reached max_new_tokens before its EOS."""
    out = []
    for row in generated:
        if not len(row) or int(row[-1]) not in eos:
            out.append("unfinished")
        else:
            out.append(schema_error(tokenizer.decode(row[:-1].tolist(), skip_special_tokens=True), work.schema))
    return out


class Bench:
    """prompts: token ids per prompt; with config.constraints, schemas holds each prompt's JSON schema and
    tokenizer is the target's (the grammar's vocabulary, and the decoding of answers to validate them)."""

    def __init__(self, config: BenchConfig, target, draft, prompts: list[list[int]], progress: bool = True,
                 head=None, peer=None, tokenizer=None, schemas: list[dict] | None = None):
        from specdec.models.loading import as_native

        self.config, self.target, self.draft, self.head = config, target, draft, head
        if head is None and needing("head", config.methods):
            raise ValueError(f"methods {needing('head', config.methods)} need a draft head; got head=None")
        if config.constraints and (tokenizer is None or schemas is None or len(schemas) != len(prompts)):
            raise ValueError(f"constraints={list(config.constraints)} need the tokenizer and one JSON schema per "
                             f"prompt; got tokenizer={tokenizer!r}, {len(schemas or ())} schema(s) for "
                             f"{len(prompts)} prompt(s)")
        self.tokenizer, self.schemas = tokenizer, schemas if config.constraints else None
        self.native = with_weights(as_native(target), config)
        self.native_draft = as_native(draft, "draft") if draft is not None else None
        gen = target.generation_config
        self.pad = gen.pad_token_id if gen.pad_token_id is not None else 0
        eos = gen.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.prompts, self.progress = prompts, progress
        self.peer = peer  # None, or a function timing a peer's plain decoding, called between the repeats

    def sampling(self, run: Run) -> dict:
        """generate()'s sampling arguments in the run's mode (a new dict)."""
        if run.mode == "greedy":
            return dict(do_sample=False)
        return dict(do_sample=True, temperature=self.config.temperature, top_p=self.config.top_p, top_k=0)

    def call(self, run: Run, work: Workload, reference: list[torch.Tensor] | None, seed: int):
        """One timed generate() call -> (generated per row, seconds, SpecStats or None)."""
        return METHODS[run.method].generate(self, run, work, reference, seed)

    def run(self) -> dict:
        from tqdm.auto import tqdm

        from specdec.stats import SpecStats

        cfg = self.config
        runs = plan(cfg)
        works = {b: workloads(self.prompts, b, self.pad, self.schemas) for b in cfg.batch_sizes}
        tokens = {r: [] for r in runs}
        seconds = {r: [] for r in runs}
        stats = {r: SpecStats() for r in runs}
        checks = {r: [] for r in runs}
        lengths = {r: [] for r in runs}  # the first repeat's generated tokens per row
        schema = {r: [] for r in runs}  # per finished row with a schema: None (valid) or why not
        # structured runs stop at different lengths, so their rates leave out the prefill: a plain call of one
        # new token over the same workload, timed beside them in each repeat (seconds per run, as ``seconds``)
        prefill = {r: [] for r in runs} if cfg.constraints else None
        # warm-up: first calls pay one-time costs (weight packing, allocator growth; with a grammar, the
        # compiler's vocabulary tables and each schema's compilation) that no run should carry
        warm = works[cfg.batch_sizes[0]][0]
        specdec.generate(self.native, warm.input_ids[:1], warm.attention_mask[:1], max_new_tokens=2)
        for work in works[cfg.batch_sizes[0]] if set(cfg.constraints) & set(GRAMMAR) else ():
            specdec.generate(self.native, work.input_ids[:1], work.attention_mask[:1], max_new_tokens=2,
                             grammar={"json_schema": work.schema}, tokenizer=self.tokenizer)
        total = cfg.repeats * sum(len(works[r.batch]) for r in runs)
        bar = tqdm(total=total, desc="bench", unit="call", disable=not self.progress, file=sys.stderr)
        peer = []  # the peer's figures, alternating with the repeats: a shared machine drifts within minutes
        for repeat in range(cfg.repeats):
            if self.peer is not None:
                peer.append(self.peer())
            for mode, batch in dict.fromkeys((r.mode, r.batch) for r in runs):
                group = [r for r in runs if r.mode == mode and r.batch == batch]
                for w, work in enumerate(works[batch]):
                    seed = cfg.seed + 1000 * repeat + w
                    references = {}  # constraint -> plain's greedy output under it
                    if prefill is not None:
                        _, first = timed(lambda: specdec.generate(self.native, work.input_ids, work.attention_mask,
                                                                  max_new_tokens=1), self.native.device)
                        for run in group:
                            prefill[run].append(first)
                    for run in group:
                        against = reference_constraint(run.constraint)
                        got, secs, st = self.call(run, work, references.get(against), seed)
                        tokens[run].append(sum(len(g) for g in got))
                        seconds[run].append(secs)
                        if repeat == 0:
                            lengths[run] += [len(g) for g in got]
                        if st is not None:
                            stats[run].merge(st)
                        if work.schema is not None:
                            schema[run] += self._schema_checks(run, work, got)
                        if mode == "greedy":
                            if run.method == REFERENCE and run.constraint == against:
                                references[against] = unpadded(work, got)
                            else:
                                checks[run].append(check_rows(self.native, references[against],
                                                              unpadded(work, got), f"{run.name} batch={batch}"))
                        bar.update(1)
        bar.close()
        report = self._report(runs, tokens, seconds, stats, checks, lengths, schema, prefill)
        if self.peer is not None:
            report["llama_cpp"] = llama_cpp.summary(peer + [self.peer()])
        return report

    def _schema_checks(self, run: Run, work: Workload, got: list[torch.Tensor]) -> list[str | None]:
        """``schema_checks`` of one call; a constrained run's invalid answer is also printed in red on stderr
        (an unconstrained one is the model's own, and counted only)."""
        found = schema_checks(self.tokenizer, work, got, self.eos)
        if run.constraint in GRAMMAR:
            for row, why in zip(got, found):
                if why not in (None, "unfinished"):
                    print(f"\x1b[31mINVALID\x1b[0m {run.name} batch={run.batch}: {why}; output "
                          f"{self.tokenizer.decode(row.tolist())!r}", file=sys.stderr)
        return found

    def _report(self, runs, tokens, seconds, stats, checks, lengths=None, schema=None, prefill=None) -> dict:
        runs = list(tokens)  # (each once)
        bandwidth = bandwidth_gbs() * 1e9
        target_bytes = weight_bytes(self.native)
        drafted = {}  # method -> bytes of weights one draft step reads (a head: its own; the embedding row is noise)
        for name in dict.fromkeys(run.method for run in runs):
            module = METHODS[name].draft_weights(self)
            drafted[name] = weight_bytes(module) if module is not None else 0
        rows = [self._row(run, tokens[run], seconds[run], stats[run], checks[run], target_bytes,
                          drafted[run.method], bandwidth) for run in runs]
        for row, run in zip(rows, runs):
            if lengths is not None:
                row.update(lengths=lengths[run], mean_length=statistics.mean(lengths[run]) if lengths[run] else 0.0)
            if prefill is not None and prefill[run]:  # tokens after the first over the time after the prefill
                row["decode_tokens_per_s"] = statistics.median(  # (a call's first token per row: the prefill's)
                    (t - run.batch) / max(s - p, 1e-9) for t, s, p in zip(tokens[run], seconds[run], prefill[run]))
            if run.constraint is not None and schema is not None:
                found = schema[run]
                row.update(finished=sum(why != "unfinished" for why in found), valid=found.count(None),
                           invalid=sum(why not in (None, "unfinished") for why in found))

        def base(method, mode, batch, constraint):  # the run of the same mode, batch and constraint
            return next((r["tokens_per_s"] for r in rows if r["method"] == method and r["mode"] == mode
                         and r["batch"] == batch and r.get("constraint") == constraint), None)

        for row in rows:
            for label, method in BASELINES:
                ref = base(method, row["mode"], row["batch"], reference_constraint(row.get("constraint")))
                row[label] = row["tokens_per_s"] / ref if ref else None
            if row.get("constraint") is not None:  # against the same method and k, unconstrained, decode alone
                rate = "decode_tokens_per_s" if "decode_tokens_per_s" in row else "tokens_per_s"
                free = next((r[rate] for r in rows if r.get("constraint") == "free" and all(
                    r[f] == row[f] for f in ("method", "mode", "batch", "k", "rate"))), None)
                row["vs_free"] = row[rate] / free if free else None
        plain_stats = {(run.mode, run.batch, run.constraint): stats[run] for run in runs if run.method == REFERENCE}
        for row, run in zip(rows, runs):
            plain = plain_stats.get((run.mode, run.batch, reference_constraint(run.constraint)))
            budget = stats[run].round_budget(plain.round_seconds) if plain is not None and plain is not stats[run] \
                else None
            if budget is not None:
                row["round_budget"] = budget
        synthetic = {}  # the runs at a chosen acceptance rate: speedup against it, per batch size (and constraint)
        for batch, constraint in sorted({(r["batch"], r.get("constraint") or "") for r in rows
                                         if r["rate"] is not None}):
            pts = [(r["rate"], r["vs_plain"]) for r in rows if r["rate"] is not None and r["batch"] == batch
                   and (r.get("constraint") or "") == constraint and r["vs_plain"]]
            synthetic[f"batch={batch}" + (f" {constraint}" if constraint else "")] = {
                "k": self.config.synthetic_k, "rates": [p[0] for p in pts], "speedups": [p[1] for p in pts],
                "break_even_rate": break_even([p[0] for p in pts], [p[1] for p in pts])}
        return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine(),
                "config": dataclasses.asdict(self.config), "bandwidth_gbs": bandwidth / 1e9,
                "target_weight_bytes": target_bytes,
                "draft_weight_bytes": weight_bytes(self.native_draft) if self.native_draft is not None else 0,
                "runs": rows, "synthetic": synthetic, "mismatches": sum(r.get("mismatches", 0) for r in rows),
                "invalid": sum(r.get("invalid", 0) for r in rows if r.get("constraint") in GRAMMAR)}

    def _row(self, run: Run, tokens, seconds, stats, checks, target_bytes, draft_bytes, bandwidth) -> dict:
        """One run's figures: medians over repeats of its calls' totals, its statistics, roofline and check."""
        repeats = self.config.repeats
        n = len(tokens) // repeats
        tok = [sum(tokens[i * n:(i + 1) * n]) for i in range(repeats)]
        sec = [sum(seconds[i * n:(i + 1) * n]) for i in range(repeats)]
        row = {"method": run.method, "mode": run.mode, "batch": run.batch, "k": run.k, "rate": run.rate,
               "tokens_per_s": median_rate(tok, sec), "tokens": tok[0], "seconds": sec}
        if run.constraint is not None:
            row["constraint"] = run.constraint
        if run.constraint in GRAMMAR:  # each counter and its share of the generated tokens
            for name in GRAMMAR_COUNTERS:
                row[name] = getattr(stats, name)
                row[f"{name}_share"] = row[name] / stats.emitted if stats.emitted else None
        if stats.row_passes:  # specdec's methods
            row.update(tokens_per_target_forward=stats.tokens_per_target_forward,
                       acceptance_rate=stats.acceptance_rate if stats.proposed else None,
                       per_position_acceptance=stats.per_position_acceptance, mean_k=stats.mean_k,
                       cost_ratio=stats.cost_ratio, predicted_speedup=stats.predicted_speedup,
                       steps_by_k={str(k): v for k, v in stats.steps_by_k.items()})
            row.update(roofline(row["tokens_per_s"], stats.tokens_per_target_forward, run.batch, target_bytes,
                                draft_bytes, stats.mean_k, bandwidth))
        elif not METHODS[run.method].drafts:  # transformers' plain decoding: one token per forward
            row.update(tokens_per_target_forward=1.0,
                       **roofline(row["tokens_per_s"], 1.0, run.batch, target_bytes, 0, 0, bandwidth))
        if checks:
            bad = [c for c in checks if c.startswith("MISMATCH")]
            row["check"] = f"MISMATCH in {len(bad)} of {len(checks)} calls" if bad else (
                "exact" if all(c == "exact" for c in checks) else "; ".join(sorted(set(checks))))
            row["mismatches"] = len(bad)
        return row


# ---------------------------------------------------------------------------------------------- output

def _gguf(config: BenchConfig) -> Path | None:
    """The model's .gguf file, which llama.cpp runs (None: the model is not one)."""
    from specdec.models.loading import source_path

    source = source_path(config.model)
    return source if source.suffix == ".gguf" else None


def _llama_cpp(config: BenchConfig) -> dict:
    if (source := _gguf(config)) is None:
        return {"skipped": f"model={config.model!r} is not a .gguf file"}
    return llama_cpp.measure(source, config.max_new_tokens, torch.get_num_threads())


def _llama_cpp_lookup(config: BenchConfig, tokenizer, prompts: dict) -> dict:
    """llama.cpp's prompt lookup over the same chat-formatted prompts, as many new tokens, k drafts at most."""
    if (source := _gguf(config)) is None:
        return {"skipped": f"model={config.model!r} is not a .gguf file"}
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           tokenize=False) for group in prompts.values() for p in group]
    return llama_cpp.lookup(source, texts, config.max_new_tokens, torch.get_num_threads(), max(config.ks))


def lookup_line(report: dict) -> str:
    """llama.cpp's prompt lookup beside specdec's n-gram drafts (batch 1, greedy or the first mode)."""
    peer = report["llama_cpp_lookup"]
    if "skipped" in peer:
        return f"llama.cpp prompt lookup: skipped ({peer['skipped']})"
    ngram = [r for r in report["runs"] if r["method"] == "ngram" and r["batch"] == 1]
    ratio = "".join(f"; specdec ngram k = {r['k']} {r['tokens_per_s']:.1f} tok/s = "
                    f"{r['tokens_per_s'] / peer['tokens_per_s']:.2f}x" for r in ngram)
    acceptance = "-" if peer["acceptance"] is None else f"{peer['acceptance']:.2f}"
    return (f"llama.cpp prompt lookup (`{peer['command']}`, each prompt to its end or the token limit, prompt "
            f"encoding left out, where specdec's figures include the prefill): {peer['tokens_per_s']:.1f} tok/s, "
            f"{peer['tokens']} tokens, acceptance {acceptance}{ratio}")


def peer_line(report: dict) -> str:
    """llama.cpp's plain decoding of the same file beside specdec's plain (batch 1, greedy or the first mode)."""
    peer = report["llama_cpp"]
    if "skipped" in peer:
        return f"llama.cpp: skipped ({peer['skipped']})"
    plain = [r for r in report["runs"] if r["method"] == "plain" and r["batch"] == 1]
    ratio = f"; specdec plain {plain[0]['tokens_per_s']:.1f} tok/s = " \
            f"{plain[0]['tokens_per_s'] / peer['tokens_per_s']:.2f}x" if plain else ""
    return (f"llama.cpp ({peer['type']}, build {peer['build']}, `{peer['command']}`): plain "
            f"{peer['tokens_per_s']:.1f} tok/s (between the repeats: {', '.join(f'{x:.1f}' for x in peer['runs'])})"
            f"{ratio}")


def _cell(x, spec=".2f", suffix=""):
    """A table cell: ``x`` formatted, or "-" for None."""
    return "-" if x is None else f"{x:{spec}}{suffix}"


def _check_cell(row: dict) -> str:
    """A run's output check, a mismatch in red."""
    check = row.get("check", "")
    return f"\x1b[31m{check}\x1b[0m" if check.startswith("MISMATCH") else check


def table(report: dict) -> str:
    """The terminal table: one line per run; mismatches in red."""
    head = ("| method | mode | batch | k | tokens/s | vs plain | vs hf | vs hf-assisted | tok/fwd | accept | c "
            "| predicted | round = verify + draft + rest | GB/s | roofline | ceiling | output |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    for r in report["runs"]:
        k = "-" if r["k"] is None else str(r["k"])
        if r["rate"] is not None:
            k += f" @{r['rate']:g}"
        budget = r.get("round_budget")
        budget = "-" if budget is None else (f"{budget['round']:.2f} = {budget['verify']:.2f} + {budget['draft']:.2f} "
                                             f"+ {budget['rest']:.2f}")
        check = _check_cell(r)
        lines.append(
            f"| {r['method']} | {r['mode']} | {r['batch']} | {k} | {r['tokens_per_s']:.1f} | {_cell(r['vs_plain'], '.2f', 'x')} "
            f"| {_cell(r['vs_hf'], '.2f', 'x')} | {_cell(r['vs_hf_assisted'], '.2f', 'x')} "
            f"| {_cell(r.get('tokens_per_target_forward'))} | {_cell(r.get('acceptance_rate'))} | {_cell(r.get('cost_ratio'), '.3f')} "
            f"| {_cell(r.get('predicted_speedup'))} | {budget} "
            f"| {_cell(r.get('weight_bytes_per_s') and r['weight_bytes_per_s'] / 1e9, '.1f')} "
            f"| {_cell(r.get('bandwidth_fraction') and 100 * r['bandwidth_fraction'], '.0f', '%')} "
            f"| {_cell(r.get('ceiling_tokens_per_s'), '.0f')} | {check} |")
    return "\n".join(lines)


def structured_table(report: dict) -> str:
    """The terminal table of a structured-output run: per method, k and constraint, its speed (tokens/s over
    whole calls; decode tokens/s: the prefill left out, since runs stop at different lengths) against the same
    run unconstrained ("vs free", decode rates) and against plain decoding masked by the schema ("vs plain"; unconstrained
    runs: against plain unconstrained), the grammar's tokens (GRAMMAR_COUNTERS) as shares of the generated
    ones, the generated lengths (unconstrained runs may stop earlier, at their own EOS), and the answers that
    are JSON of their schema among the finished ones; invalid constrained answers and mismatches in red."""
    shares = [f"{name} share" for name in GRAMMAR_COUNTERS]
    head = (f"| method | mode | batch | k | constraint | tokens/s | decode tokens/s | vs free | vs plain | tok/fwd "
            f"| {' | '.join(shares)} | new tokens, mean (min-max) | valid JSON / finished | output |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    for r in report["runs"]:
        lengths = r.get("lengths") or [0]
        valid = f"{r['valid']} / {r['finished']}" if "valid" in r else "-"
        if r.get("invalid") and r.get("constraint") in GRAMMAR:
            valid = f"\x1b[31m{valid} ({r['invalid']} INVALID)\x1b[0m"
        check = _check_cell(r)
        lines.append(
            f"| {r['method']} | {r['mode']} | {r['batch']} | {'-' if r['k'] is None else r['k']} "
            f"| {r.get('constraint', '-')} | {r['tokens_per_s']:.1f} | {_cell(r.get('decode_tokens_per_s'), '.1f')} "
            f"| {_cell(r.get('vs_free'), '.2f', 'x')} "
            f"| {_cell(r['vs_plain'], '.2f', 'x')} | {_cell(r.get('tokens_per_target_forward'))} "
            + "".join(f"| {_cell(r.get(f'{name}_share'), '.3f')} " for name in GRAMMAR_COUNTERS)
            + f"| {r.get('mean_length', 0):.1f} ({min(lengths)}-{max(lengths)}) | {valid} | {check} |")
    return "\n".join(lines)


def plots(report: dict, folder: Path) -> list[Path]:
    """PNGs: tokens/s vs k per method; per-position acceptance; speedup vs batch size (break-even line);
    synthetic speedup vs acceptance rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    # a structured run's constrained rows would stack on its unconstrained ones: these plots show the latter
    report = {**report, "runs": [r for r in report["runs"] if r.get("constraint") in (None, "free")]}
    runs, written = report["runs"], []
    modes = sorted({r["mode"] for r in runs})
    figures = [("tokens_per_s_vs_k.png", (1, len(modes)), (6.5 * len(modes), 4.5), _tokens_vs_k),
               ("per_position_acceptance.png", (1, 1), (6.5, 4.5), _per_position),
               ("speedup_vs_batch.png", (1, 1), (6.5, 4.5), _speedup_vs_batch)]
    if report.get("synthetic"):
        figures.append(("synthetic_acceptance.png", (1, 1), (6.5, 4.5), _synthetic))
    for name, grid, size, draw in figures:
        fig, axes = plt.subplots(*grid, figsize=size, squeeze=False)
        draw(list(axes[0]), report, modes)
        fig.tight_layout()
        fig.savefig(folder / name, dpi=110)
        plt.close(fig)
        written.append(folder / name)
    return written


def _tokens_vs_k(axes, report, modes):
    """Per mode at the smallest batch: the methods run once per k as curves, the others as lines."""
    runs = report["runs"]
    batch = min(r["batch"] for r in runs)
    for ax, mode in zip(axes, modes):
        for i, (name, method) in enumerate(METHODS.items()):
            points = sorted((r for r in runs if r["method"] == name and r["mode"] == mode and r["batch"] == batch
                             and r["rate"] is None), key=lambda r: r["k"])
            if points and method.k == EACH:
                ax.plot([r["k"] for r in points], [r["tokens_per_s"] for r in points], "o-",
                        label=f"{method.library} {name}")
            elif points:
                ax.axhline(points[0]["tokens_per_s"], ls="--" if method.library == "transformers" else ":",
                           color=f"C{i % 10}", label=f"{method.library} {name}")
        ax.set(xlabel="draft tokens per step k", ylabel="tokens/s", title=f"{mode}, batch {batch}")
        ax.legend(fontsize=7)


def _per_position(axes, report, modes):
    """At the smallest batch, every drafting run's (a method run once per k: its largest k)."""
    runs, (ax,) = report["runs"], axes
    batch = min(r["batch"] for r in runs)
    for r in runs:
        sweep = METHODS[r["method"]].k == EACH
        if r["rate"] is None and r["batch"] == batch and r.get("per_position_acceptance") and (
                not sweep or r["k"] == max(x["k"] for x in runs if x["method"] == r["method"])):
            acc = r["per_position_acceptance"]
            ax.plot(range(1, len(acc) + 1), acc, "o-", label=f"{r['method']} k={r['k']} ({r['mode']})")
    ax.set(xlabel="draft position i", ylabel="P(accepted | all before accepted)", ylim=(0, 1.02),
           title="per-position acceptance")
    ax.legend(fontsize=7)


def _speedup_vs_batch(axes, report, modes):
    """specdec's drafting methods over specdec plain, per batch size: the best k, the highest synthetic rate."""
    runs, (ax,) = report["runs"], axes
    for mode in modes:
        for name, method in METHODS.items():
            if method.library != "specdec" or not method.drafts:
                continue
            rates = [r["rate"] for r in runs if r["method"] == name and r["rate"] is not None]
            top = max(rates, default=None)
            best = {}
            for r in runs:
                if r["method"] == name and r["mode"] == mode and r["vs_plain"] and r["rate"] == top:
                    best[r["batch"]] = max(best.get(r["batch"], 0), r["vs_plain"])
            if best:
                label = f"{name} ({mode})" + (" best k" if method.k == EACH else "")
                if top is not None:
                    label = f"{name} rate {top:g} ({mode})"
                ax.plot(sorted(best), [best[b] for b in sorted(best)], "o-", label=label)
    ax.axhline(1.0, color="red", lw=1, label="break-even (plain decoding)")
    ax.set(xscale="log", xlabel="batch size", ylabel="speedup over specdec plain", title="speculation vs batch size")
    ax.legend(fontsize=7)


def _synthetic(axes, report, modes):
    (ax,) = axes
    for name, curve in sorted(report["synthetic"].items()):
        ax.plot(curve["rates"], curve["speedups"], "o-", label=f"{name}, k={curve['k']}")
    ax.axhline(1.0, color="red", lw=1, label="break-even")
    ax.set(xlabel="acceptance rate per position", ylabel="speedup over plain", title="synthetic acceptance")
    ax.legend(fontsize=7)


# ---------------------------------------------------------------------------------------------- entry point

def check_outputs(json_path: Path | None, plot_dir: Path | None) -> None:
    """Refuse unwritable output paths before any model is loaded, by writing there (permission bits say
    little: root passes every check, and a folder like /proc refuses new files whatever they say). An
    existing JSON file is opened for appending, not truncated; a probe file is removed again."""
    import tempfile

    if json_path is not None:
        existed = json_path.exists()
        try:
            with open(json_path, "a"):
                pass
        except OSError as err:
            raise ValueError(f"--json {str(json_path)!r}: cannot write there ({err.strerror})") from None
        if not existed:
            json_path.unlink()
    if plot_dir is not None:
        try:
            plot_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=plot_dir):
                pass
        except OSError as err:
            raise ValueError(f"--plot {str(plot_dir)!r}: cannot create or write that folder ({err.strerror})") from None


def check_draft_vocab(model: str, draft: str | None, head: str | None = None) -> None:
    """A draft with another vocabulary, or a head made for another target, is refused from the configs
    alone, before weights are read."""
    from types import SimpleNamespace

    from transformers import AutoConfig

    from specdec.models.loading import checkpoint_folder
    from specdec.speculative import check_vocab

    if draft is None and head is None:
        return
    target = AutoConfig.from_pretrained(checkpoint_folder(model, "--model"))
    if draft is not None:
        config = AutoConfig.from_pretrained(checkpoint_folder(draft, "--draft"))
        try:
            check_vocab(*(SimpleNamespace(vocab_size=c.vocab_size, config=c) for c in (config, target)))
        except ValueError as err:
            raise ValueError(f"--draft {draft!r}: {err}") from None
    if head is not None:
        config = AutoConfig.from_pretrained(checkpoint_folder(head, "--head"))
        if getattr(config, "target_hidden_size", None) != target.hidden_size:
            raise ValueError(f"--head {head!r} is not a draft head for a target of hidden size {target.hidden_size} "
                             f"(its target_hidden_size: {getattr(config, 'target_hidden_size', None)})")


def load_models(config: BenchConfig):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from specdec.models.loading import checkpoint_folder, load_draft

    dtype = getattr(torch, config.dtype)
    folder = checkpoint_folder(config.model)
    target = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    draft = head = None
    if config.draft_in_use is not None:
        draft = AutoModelForCausalLM.from_pretrained(checkpoint_folder(config.draft), dtype=dtype).eval()
    if config.head_in_use is not None:
        head = load_draft(config.head, dtype)
        if config.head_quantize is not None:
            head = specdec.quantize(head, config.head_quantize, activations=config.activations)
    return target, draft, head, tokenizer


#: what the target's weights can be: the float copy in --dtype, or quantized (kernels/quantized.py)
WEIGHTS = ("float", "gguf", "int8", "int4")


def with_weights(native, config: BenchConfig):
    """The native target with config.weights: "gguf" keeps the model file's own blocks (models/gguf.py), "int8"
    and "int4" quantize the float weights (per channel; groups of 32, symmetric). The transformers methods keep
    the float model: they are the float baseline."""
    from specdec.models.gguf import keep_blocks

    if config.weights == "gguf":
        if (source := _gguf(config)) is None:
            raise ValueError(f"weights='gguf' needs a .gguf model, got model={config.model!r}")
        keep_blocks(native, source, config.activations)
    elif config.weights in ("int8", "int4"):
        specdec.quantize(native, config.weights, activations=config.activations)
    return native


def main(config: BenchConfig, json_path: Path | None = None, plot_dir: Path | None = None,
         progress: bool = True) -> dict:
    check_outputs(json_path, plot_dir)
    check_draft_vocab(config.model, config.draft_in_use, config.head_in_use)
    target, draft, head, tokenizer = load_models(config)
    schemas = None
    if config.constraints:  # the structured prompts, each with its schema, in place of the categories'
        structured = load_structured(config.prompts_per_category)
        prompts = {"structured": [item["prompt"] for item in structured]}
        schemas = [item["schema"] for item in structured]
    else:
        prompts = load_prompts(config.categories, config.prompts_per_category)
    ids = [chat_ids(tokenizer, p)[0].tolist() for texts in prompts.values() for p in texts]
    peer = functools.partial(_llama_cpp, config) if config.llama_cpp else None
    report = Bench(config, target, draft, ids, progress, head=head, peer=peer, tokenizer=tokenizer,
                   schemas=schemas).run()
    report["prompts"] = prompts
    if config.llama_cpp and "ngram" in config.methods and not config.constraints:
        report["llama_cpp_lookup"] = _llama_cpp_lookup(config, tokenizer, prompts)
    if schemas is not None:
        report["schemas"] = {item["name"]: item["schema"] for item in structured}
    if torch.cuda.is_available():  # GPU mode: the same questions at a realistic size (bench/large_model.py)
        from specdec.bench.large_model import report as large_model_report

        # eager, then with the target's layers replayed as CUDA graphs (launch-bound eager: bench/RESULTS.md)
        report["gpu"] = large_model_report("cuda", progress=progress)
        report["gpu_graphs"] = large_model_report("cuda", progress=progress, cuda_graphs=True)
        report["mismatches"] += report["gpu"]["mismatches"] + report["gpu_graphs"]["mismatches"]
    print(structured_table(report) if config.constraints else table(report))
    if "llama_cpp" in report:
        print(peer_line(report))
    if "llama_cpp_lookup" in report:
        print(lookup_line(report))
    if report["mismatches"]:
        print(f"\x1b[31m{report['mismatches']} greedy call(s) departed from plain greedy output\x1b[0m",
              file=sys.stderr)
    if report["invalid"]:
        print(f"\x1b[31m{report['invalid']} constrained answer(s) are not JSON of their schema\x1b[0m",
              file=sys.stderr)
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=2))
    if plot_dir is not None:
        report["plots"] = [str(p) for p in plots(report, plot_dir)]
    return report
