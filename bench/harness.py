"""``specdec bench``: specdec against transformers, side by side in one process, with the memory roofline.

Every method runs on the same prompts, the same weights and the same dtype. Runs alternate (each repeat
runs every configuration once, in the same order) so that drift of a shared machine hits all of them
alike; figures are medians over repeats. Every greedy speculative output is checked token for token
against specdec's plain greedy output of the same batch: a departure is counted and printed in red, never
hidden (in reduced precision a departure at a near-tie is reported as such, with its logit gap).

Methods
    hf           transformers ``generate``, plain
    hf-assisted  transformers assisted generation with the same draft (``assistant_model=``; batch 1 only:
                 transformers refuses larger batches)
    hf-lookup    transformers prompt lookup (``prompt_lookup_num_tokens=``; batch 1 only)
    plain        specdec, plain decoding
    draft        specdec with the draft model, once per k in ``ks``
    auto         specdec with the draft model, ``num_draft_tokens="auto"``
    head         specdec with the draft head (``head``: feature-conditioned, models/head.py), once per k in ``ks``
    head-auto    specdec with the draft head, ``num_draft_tokens="auto"``
    ngram        specdec with n-gram prompt lookup, ``num_draft_tokens="auto"``
    synthetic    specdec with a proposer whose drafts the target accepts with a chosen probability (greedy
                 only): the system's own overhead and the break-even acceptance rate, whatever the draft
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
from specdec.bench.common import bandwidth_gbs, machine, weight_bytes
import specdec

METHODS = ("hf", "hf-assisted", "hf-lookup", "plain", "draft", "auto", "head", "head-auto", "ngram", "self",
           "synthetic")
#: what a run without --methods measures: every method but "self" (self-speculation, asked for by name)
DEFAULT_METHODS = tuple(m for m in METHODS if m != "self")
CATEGORIES = ("chat", "explanation", "code", "rewriting", "math")
PROMPT_DIR = Path(__file__).parent / "prompts"
HF_BATCH_ONE = ("hf-assisted", "hf-lookup")  # transformers refuses batch > 1 for these (#29769, #32165)
LOOKUP_TOKENS = 10  # transformers' documented example value for prompt_lookup_num_tokens


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
    prompts_per_category: int = 2
    categories: tuple = CATEGORIES
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
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {name}={getattr(self, name)}")
        bad_cat = [c for c in self.categories if c not in CATEGORIES]
        if bad_cat or not self.categories:
            raise ValueError(f"categories={list(self.categories)}: choose from {list(CATEGORIES)}")
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
        needs_draft = DRAFT_METHODS & set(self.methods)
        if needs_draft and self.draft is None:
            raise ValueError(f"methods {sorted(needs_draft)} need a draft; got draft=None")
        needs_head = HEAD_METHODS & set(self.methods)
        if needs_head and self.head is None:
            raise ValueError(f"methods {sorted(needs_head)} need a draft head; got head=None")

    @property
    def draft_in_use(self) -> str | None:
        """The draft, if some method runs it (a run of plain and n-gram lookup reads none)."""
        return self.draft if DRAFT_METHODS & set(self.methods) else None

    @property
    def head_in_use(self) -> str | None:
        return self.head if HEAD_METHODS & set(self.methods) else None


DRAFT_METHODS = frozenset({"hf-assisted", "draft", "auto"})  # the methods that run ``draft``
HEAD_METHODS = frozenset({"head", "head-auto"})  # and ``head``


#: finishes in under 5 minutes on a 2-core CPU with SmolLM2-135M (measured: see bench/RESULTS.md)
QUICK = dict(ks=(1, 3, 5), modes=("greedy",), batch_sizes=(1, 4), max_new_tokens=48, repeats=1,
             prompts_per_category=1, synthetic_rates=(0.0, 0.5, 0.9), categories=("chat", "code", "rewriting"))


@dataclasses.dataclass(frozen=True)
class Run:
    method: str
    mode: str
    batch: int
    k: int | str | None = None  # drafts per step ("auto"), None for methods without
    rate: float | None = None  # synthetic acceptance rate

    @property
    def name(self) -> str:
        k = "" if self.k is None else f" k={self.k}"
        rate = "" if self.rate is None else f" rate={self.rate:g}"
        return f"{self.method}{k}{rate}"


def plan(config: BenchConfig) -> list[Run]:
    """Every configuration the benchmark runs, grouped by (mode, batch), in the order each repeat runs them.
    specdec plain runs first in each group: its greedy output is the reference every other run is checked
    against (and the synthetic proposer's oracle), so it runs even when not asked for."""
    runs = []
    for mode in config.modes:
        for batch in config.batch_sizes:
            group = []
            for method in config.methods:
                if method in HF_BATCH_ONE and batch > 1:
                    continue
                if method == "synthetic":
                    if mode == "greedy":  # acceptance of "the target's own token" is defined for greedy only
                        group += [Run(method, mode, batch, config.synthetic_k, r) for r in config.synthetic_rates]
                elif method in ("draft", "head", "self"):
                    group += [Run(method, mode, batch, k) for k in config.ks]
                elif method in ("auto", "head-auto", "ngram"):
                    group.append(Run(method, mode, batch, "auto"))
                elif method == "hf-lookup":
                    group.append(Run(method, mode, batch, LOOKUP_TOKENS))
                elif method != "plain":
                    group.append(Run(method, mode, batch))
            needs_plain = "plain" in config.methods or (mode == "greedy" and group)
            runs += ([Run("plain", mode, batch)] if needs_plain else []) + group
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


# ---------------------------------------------------------------------------------------------- synthetic

class SyntheticProposer:
    """Proposes the target's own greedy continuation (known from a plain run), each token kept with
    probability ``rate`` and otherwise replaced by a wrong one, so greedy verification accepts position i
    with probability ``rate`` given that positions < i were accepted. Costs nothing to run: what it
    measures is the system's own overhead."""

    def __init__(self, reference: list[torch.Tensor], rate: float, generator: torch.Generator):
        # per row the plain greedy output, unpadded (prompt + new tokens), padded here with -1: [batch, L]
        self.reference = torch.nn.utils.rnn.pad_sequence(list(reference), batch_first=True, padding_value=-1)
        self.rate, self.generator = rate, generator

    def propose(self, state, k: int):
        device = state.num_tokens.device
        reference = self.reference = self.reference.to(device)  # a copy on the first step only
        where = state.num_tokens[:, None] + torch.arange(k, device=device)  # [batch, k] next positions
        drafts = reference.gather(1, where.clamp(max=reference.shape[1] - 1))
        drafts = torch.where(where < reference.shape[1], drafts, -1)  # past the reference: fewer drafts
        wrong = (torch.rand(drafts.shape, generator=self.generator) >= self.rate).to(device)
        return torch.where(wrong & (drafts >= 0), (drafts + 1) % state.vocab_size, drafts), None


# ---------------------------------------------------------------------------------------------- running

@dataclasses.dataclass
class Workload:
    """One generate() call: a left-padded batch of prompts."""

    input_ids: torch.Tensor  # [batch, prompt_len]
    attention_mask: torch.Tensor  # [batch, prompt_len]


def workloads(prompts: list[list[int]], batch: int, pad: int) -> list[Workload]:
    """Batch 1: one call per prompt. Batch B: calls of B prompts (cycled so that every call is full)."""
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


def new_tokens(sequences: torch.Tensor, prompt_len: int, eos: set[int]) -> list[torch.Tensor]:
    """Per row, the generated tokens through the first EOS (transformers pads after it)."""
    rows = []
    for row in sequences[:, prompt_len:]:
        ids = row.tolist()
        n = next((i + 1 for i, t in enumerate(ids) if t in eos), len(ids))
        rows.append(row[:n])
    return rows


def check_rows(native, reference: list[torch.Tensor], candidate: list[torch.Tensor], label: str) -> str:
    """'exact', 'N near-tie flip(s) ...' or 'MISMATCH xN' (also printed in red on stderr, never hidden)."""
    from specdec.bench.common import NEAR_TIE

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


class Bench:
    def __init__(self, config: BenchConfig, target, draft, prompts: list[list[int]], progress: bool = True,
                 head=None, peer=None):
        from specdec.models.loading import as_native

        self.config, self.target, self.draft, self.head = config, target, draft, head
        if head is None and {"head", "head-auto"} & set(config.methods):
            raise ValueError(f"methods {sorted({'head', 'head-auto'} & set(config.methods))} need a draft head; "
                             f"got head=None")
        self.native = with_weights(as_native(target), config)
        self.native_draft = as_native(draft, "draft") if draft is not None else None
        gen = target.generation_config
        self.pad = gen.pad_token_id if gen.pad_token_id is not None else 0
        eos = gen.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.prompts, self.progress = prompts, progress
        self.peer = peer  # None, or a function timing a peer's plain decoding, called between the repeats

    def _sampling(self, run: Run) -> dict:
        if run.mode == "greedy":
            return dict(do_sample=False)
        return dict(do_sample=True, temperature=self.config.temperature, top_p=self.config.top_p, top_k=0)

    def call(self, run: Run, work: Workload, reference: list[torch.Tensor] | None, seed: int):
        """One timed generate() call -> (generated per row, seconds, SpecStats or None)."""
        cfg = self.config
        prompt_len = work.input_ids.shape[1]
        sampling = self._sampling(run)
        if run.method.startswith("hf"):
            extra = {}
            if run.method == "hf-assisted":
                extra = dict(assistant_model=self.draft)
            elif run.method == "hf-lookup":
                extra = dict(prompt_lookup_num_tokens=run.k)
            if run.mode == "sampling":
                torch.manual_seed(seed)  # transformers samples from the global generator
            start = time.perf_counter()
            with torch.inference_mode():
                out = self.target.generate(input_ids=work.input_ids, attention_mask=work.attention_mask,
                                           max_new_tokens=cfg.max_new_tokens, pad_token_id=self.pad, **sampling,
                                           **({} if run.mode == "sampling" else dict(temperature=None, top_p=None,
                                                                                    top_k=None)), **extra)
            seconds = time.perf_counter() - start
            return new_tokens(out, prompt_len, self.eos), seconds, None
        draft = {"plain": None, "draft": self.native_draft, "auto": self.native_draft, "head": self.head,
                 "head-auto": self.head, "ngram": "ngram", "self": "self"}.get(run.method)
        if run.method == "synthetic":
            draft = SyntheticProposer(reference, run.rate, torch.Generator().manual_seed(seed))
        start = time.perf_counter()
        out = specdec.generate(self.native, work.input_ids, work.attention_mask, draft_model=draft,
                                    num_draft_tokens=run.k if run.k is not None else 4,
                                    max_new_tokens=cfg.max_new_tokens, pad_token_id=self.pad,
                                    generator=torch.Generator().manual_seed(seed), return_dict_in_generate=True,
                                    **sampling)
        seconds = time.perf_counter() - start
        return new_tokens(out.sequences, prompt_len, self.eos), seconds, out.stats

    def run(self) -> dict:
        from tqdm.auto import tqdm

        from specdec.stats import SpecStats

        cfg = self.config
        runs = plan(cfg)
        works = {b: workloads(self.prompts, b, self.pad) for b in cfg.batch_sizes}
        tokens = {r: [] for r in runs}
        seconds = {r: [] for r in runs}
        stats = {r: SpecStats() for r in runs}
        checks = {r: [] for r in runs}
        # warm-up: first calls pay one-time costs (weight packing, allocator growth) that no run should carry
        warm = works[cfg.batch_sizes[0]][0]
        specdec.generate(self.native, warm.input_ids[:1], warm.attention_mask[:1], max_new_tokens=2)
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
                    reference = None
                    for run in group:
                        got, secs, st = self.call(run, work, reference, seed)
                        tokens[run].append(sum(len(g) for g in got))
                        seconds[run].append(secs)
                        if st is not None:
                            stats[run].merge(st)
                        if mode == "greedy":
                            if run.method == "plain":
                                reference = unpadded(work, got)
                            else:
                                checks[run].append(check_rows(self.native, reference, unpadded(work, got),
                                                              f"{run.name} batch={batch}"))
                        bar.update(1)
        bar.close()
        report = self._report(runs, tokens, seconds, stats, checks)
        if self.peer is not None:
            report["llama_cpp"] = llama_cpp.summary(peer + [self.peer()])
        return report

    def _report(self, runs, tokens, seconds, stats, checks) -> dict:
        cfg = self.config
        bandwidth = bandwidth_gbs() * 1e9
        target_bytes = weight_bytes(self.native)
        draft_bytes = weight_bytes(self.native_draft) if self.native_draft is not None else 0
        # a head also reads a row of the target's embedding per token: nothing beside its own weights
        head_bytes = weight_bytes(self.head) if self.head is not None else 0
        drafted = {"draft": draft_bytes, "auto": draft_bytes, "head": head_bytes, "head-auto": head_bytes}
        if "self" in cfg.methods:  # the target's own layers quantized (models/quantized.py: self_draft)
            from specdec.models.quantized import self_draft

            drafted["self"] = weight_bytes(self_draft(self.native))
        rows = []
        for run in tokens:
            n = len(tokens[run]) // cfg.repeats
            tok = [sum(tokens[run][i * n:(i + 1) * n]) for i in range(cfg.repeats)]
            sec = [sum(seconds[run][i * n:(i + 1) * n]) for i in range(cfg.repeats)]
            s = stats[run] if stats[run].row_passes else None
            row = {"method": run.method, "mode": run.mode, "batch": run.batch, "k": run.k, "rate": run.rate,
                   "tokens_per_s": median_rate(tok, sec), "tokens": tok[0], "seconds": sec}
            if s is not None:
                row.update(tokens_per_target_forward=s.tokens_per_target_forward,
                           acceptance_rate=s.acceptance_rate if s.proposed else None,
                           per_position_acceptance=s.per_position_acceptance, mean_k=s.mean_k,
                           cost_ratio=s.cost_ratio, predicted_speedup=s.predicted_speedup,
                           steps_by_k={str(k): v for k, v in s.steps_by_k.items()})
                uses_draft = run.method in drafted
                row.update(roofline(row["tokens_per_s"], s.tokens_per_target_forward, run.batch, target_bytes,
                                    drafted.get(run.method, 0), s.mean_k if uses_draft else 0, bandwidth))
            elif run.method == "hf":
                row.update(tokens_per_target_forward=1.0,
                           **roofline(row["tokens_per_s"], 1.0, run.batch, target_bytes, 0, 0, bandwidth))
            found = checks[run]
            if found:
                bad = [c for c in found if c.startswith("MISMATCH")]
                row["check"] = f"MISMATCH in {len(bad)} of {len(found)} calls" if bad else (
                    "exact" if all(c == "exact" for c in found) else "; ".join(sorted(set(found))))
                row["mismatches"] = len(bad)
            rows.append(row)

        def base(method, mode, batch):
            return next((r["tokens_per_s"] for r in rows if r["method"] == method and r["mode"] == mode
                         and r["batch"] == batch), None)

        for row in rows:
            for label, method, batch in (("vs_plain", "plain", row["batch"]), ("vs_hf", "hf", row["batch"]),
                                         ("vs_hf_assisted", "hf-assisted", row["batch"])):
                ref = base(method, row["mode"], batch)
                row[label] = row["tokens_per_s"] / ref if ref else None
        plain_stats = {(run.mode, run.batch): stats[run] for run in tokens if run.method == "plain"}
        for row, run in zip(rows, tokens):
            s, plain = stats[run], plain_stats.get((run.mode, run.batch))
            budget = s.round_budget(plain.round_seconds) if run.method != "plain" and plain is not None else None
            if budget is not None:
                row["round_budget"] = budget
        synthetic = {}
        for mode_batch in {(r["mode"], r["batch"]) for r in rows if r["method"] == "synthetic"}:
            pts = [(r["rate"], r["vs_plain"]) for r in rows if r["method"] == "synthetic"
                   and (r["mode"], r["batch"]) == mode_batch and r["vs_plain"]]
            synthetic[f"batch={mode_batch[1]}"] = {
                "k": cfg.synthetic_k, "rates": [p[0] for p in pts], "speedups": [p[1] for p in pts],
                "break_even_rate": break_even([p[0] for p in pts], [p[1] for p in pts])}
        return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine(),
                "config": dataclasses.asdict(self.config), "bandwidth_gbs": bandwidth / 1e9,
                "target_weight_bytes": target_bytes, "draft_weight_bytes": draft_bytes, "runs": rows,
                "synthetic": synthetic, "mismatches": sum(r.get("mismatches", 0) for r in rows)}


# ---------------------------------------------------------------------------------------------- output

def _llama_cpp(config: BenchConfig) -> dict:
    from specdec.models.loading import _source

    source = _source(config.model)
    if source.suffix != ".gguf":
        return {"skipped": f"model={config.model!r} is not a .gguf file"}
    return llama_cpp.measure(source, config.max_new_tokens, torch.get_num_threads())


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


def table(report: dict) -> str:
    """The terminal table: one line per run; mismatches in red."""
    head = ("| method | mode | batch | k | tokens/s | vs plain | vs hf | vs hf-assisted | tok/fwd | accept | c "
            "| predicted | round = verify + draft + rest | GB/s | roofline | ceiling | output |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def f(x, spec=".2f", suffix=""):
        return "-" if x is None else f"{x:{spec}}{suffix}"

    for r in report["runs"]:
        k = "-" if r["k"] is None else str(r["k"])
        if r["rate"] is not None:
            k += f" @{r['rate']:g}"
        budget = r.get("round_budget")
        budget = "-" if budget is None else (f"{budget['round']:.2f} = {budget['verify']:.2f} + {budget['draft']:.2f} "
                                             f"+ {budget['rest']:.2f}")
        check = r.get("check", "")
        if check.startswith("MISMATCH"):
            check = f"\x1b[31m{check}\x1b[0m"
        lines.append(
            f"| {r['method']} | {r['mode']} | {r['batch']} | {k} | {r['tokens_per_s']:.1f} | {f(r['vs_plain'], '.2f', 'x')} "
            f"| {f(r['vs_hf'], '.2f', 'x')} | {f(r['vs_hf_assisted'], '.2f', 'x')} "
            f"| {f(r.get('tokens_per_target_forward'))} | {f(r.get('acceptance_rate'))} | {f(r.get('cost_ratio'), '.3f')} "
            f"| {f(r.get('predicted_speedup'))} | {budget} "
            f"| {f(r.get('weight_bytes_per_s') and r['weight_bytes_per_s'] / 1e9, '.1f')} "
            f"| {f(r.get('bandwidth_fraction') and 100 * r['bandwidth_fraction'], '.0f', '%')} "
            f"| {f(r.get('ceiling_tokens_per_s'), '.0f')} | {check} |")
    return "\n".join(lines)


def plots(report: dict, folder: Path) -> list[Path]:
    """PNGs: tokens/s vs k per method; per-position acceptance; speedup vs batch size (break-even line);
    synthetic speedup vs acceptance rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    runs, written = report["runs"], []
    modes = sorted({r["mode"] for r in runs})

    def save(fig, name):
        path = folder / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    fig, axes = plt.subplots(1, len(modes), figsize=(6.5 * len(modes), 4.5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        batch = min(r["batch"] for r in runs)
        sel = [r for r in runs if r["mode"] == mode and r["batch"] == batch]
        lines = ["hf", "hf-assisted", "hf-lookup", "plain", "auto", "head-auto", "ngram"]
        for method in ("draft", "head", "self"):
            points = sorted((r for r in sel if r["method"] == method), key=lambda r: r["k"])
            if points:
                ax.plot([r["k"] for r in points], [r["tokens_per_s"] for r in points], "o-", label=f"specdec {method}")
        for r in sel:
            if r["method"] in lines:
                ax.axhline(r["tokens_per_s"], ls="--" if r["method"].startswith("hf") else ":",
                           color=f"C{2 + lines.index(r['method'])}",
                           label=f"{'specdec ' if not r['method'].startswith('hf') else 'transformers '}{r['method']}")
        ax.set(xlabel="draft tokens per step k", ylabel="tokens/s", title=f"{mode}, batch {batch}")
        ax.legend(fontsize=7)
    save(fig, "tokens_per_s_vs_k.png")

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for r in runs:
        if r["method"] in ("draft", "auto", "head", "head-auto", "ngram", "self") \
                and r["batch"] == min(x["batch"] for x in runs) and r.get("per_position_acceptance") \
                and (r["method"] not in ("draft", "head", "self") or r["k"] == max(
                    x["k"] for x in runs if x["method"] == r["method"])):
            acc = r["per_position_acceptance"]
            ax.plot(range(1, len(acc) + 1), acc, "o-", label=f"{r['method']} k={r['k']} ({r['mode']})")
    ax.set(xlabel="draft position i", ylabel="P(accepted | all before accepted)", ylim=(0, 1.02),
           title="per-position acceptance")
    ax.legend(fontsize=7)
    save(fig, "per_position_acceptance.png")

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for mode in modes:
        for method in ("draft", "auto", "head", "head-auto", "ngram", "self", "synthetic"):
            best = {}
            for r in runs:
                if r["method"] == method and r["mode"] == mode and r["vs_plain"]:
                    if method == "synthetic" and r["rate"] != max(x["rate"] for x in runs if x["method"] == method):
                        continue
                    best[r["batch"]] = max(best.get(r["batch"], 0), r["vs_plain"])
            if best:
                label = f"{method} ({mode})" + (" best k" if method in ("draft", "head", "self") else "")
                if method == "synthetic":
                    label = f"synthetic rate {max(x['rate'] for x in runs if x['method'] == method):g} ({mode})"
                ax.plot(sorted(best), [best[b] for b in sorted(best)], "o-", label=label)
    ax.axhline(1.0, color="red", lw=1, label="break-even (plain decoding)")
    ax.set(xscale="log", xlabel="batch size", ylabel="speedup over specdec plain", title="speculation vs batch size")
    ax.legend(fontsize=7)
    save(fig, "speedup_vs_batch.png")

    if report.get("synthetic"):
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for name, curve in sorted(report["synthetic"].items()):
            ax.plot(curve["rates"], curve["speedups"], "o-", label=f"{name}, k={curve['k']}")
        ax.axhline(1.0, color="red", lw=1, label="break-even")
        ax.set(xlabel="acceptance rate per position", ylabel="speedup over plain", title="synthetic acceptance")
        ax.legend(fontsize=7)
        save(fig, "synthetic_acceptance.png")
    return written


# ---------------------------------------------------------------------------------------------- entry point

def load_prompts(categories, per_category: int) -> dict[str, list[str]]:
    return {c: json.loads((PROMPT_DIR / f"{c}.json").read_text())[:per_category] for c in categories}


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
    from specdec.models.loading import _source

    if config.weights == "gguf":
        source = _source(config.model)
        if source.suffix != ".gguf":
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
    prompts = load_prompts(config.categories, config.prompts_per_category)
    from specdec.bench.common import chat_ids

    ids = [chat_ids(tokenizer, p)[0].tolist() for texts in prompts.values() for p in texts]
    peer = functools.partial(_llama_cpp, config) if config.llama_cpp else None
    report = Bench(config, target, draft, ids, progress, head=head, peer=peer).run()
    report["prompts"] = prompts
    if torch.cuda.is_available():  # GPU mode: the same questions at a realistic size (bench/large_model.py)
        from specdec.bench.large_model import report as large_model_report

        # eager, then with the target's layers replayed as CUDA graphs (launch-bound eager: bench/RESULTS.md)
        report["gpu"] = large_model_report("cuda", progress=progress)
        report["gpu_graphs"] = large_model_report("cuda", progress=progress, cuda_graphs=True)
        report["mismatches"] += report["gpu"]["mismatches"] + report["gpu_graphs"]["mismatches"]
    print(table(report))
    if "llama_cpp" in report:
        print(peer_line(report))
    if report["mismatches"]:
        print(f"\x1b[31m{report['mismatches']} greedy call(s) departed from plain greedy output\x1b[0m",
              file=sys.stderr)
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=2))
    if plot_dir is not None:
        report["plots"] = [str(p) for p in plots(report, plot_dir)]
    return report
