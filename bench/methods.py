"""The methods ``specdec bench`` times, registered by name: what each needs and how it runs one workload.

A method is a ``Method``: its name on the command line (``--methods``), a line saying what it measures, what it
needs loaded (the draft model or the draft head), how many drafts per step it runs (one run per k in ``ks``,
``"auto"``, a fixed number, or none), and ``generate``: one timed call over one workload. The harness plans,
runs and reports through these objects only; a new method is one more entry in ``METHODS``.

Structured output: a run may carry a constraint (``CONSTRAINTS``), and a workload the JSON schema of its
prompt; specdec's methods then generate under ``grammar=`` (specdec/grammar.py), transformers' only without.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

import specdec
from specdec.bench.common import timed

EACH = "each"  # Method.k: one run per k in BenchConfig.ks
REFERENCE = "plain"  # the method whose greedy output every other run is checked against; it runs in every group
LOOKUP_TOKENS = 10  # transformers' documented example value for prompt_lookup_num_tokens
#: what a structured-output run is held to (BenchConfig.constraints): "free" generates unconstrained (the same
#: prompts and max_new_tokens: the speed a grammar is measured against), "schema" masks every position to the
#: prompt's JSON schema (forced_drafts=False), "forced" masks and offers the tokens the schema forces as drafts
CONSTRAINTS = ("free", "schema", "forced")
GRAMMAR = ("schema", "forced")  # the constraints that pass grammar= to generate()


def reference_constraint(constraint: str | None) -> str | None:
    """The constraint of the plain run a run's greedy output must equal: plain decoding masked by the schema
    for both grammar constraints (forced drafts are drafts: they must change nothing)."""
    return "schema" if constraint in GRAMMAR else constraint


@dataclasses.dataclass(frozen=True)
class Run:
    method: str
    mode: str
    batch: int
    k: int | str | None = None  # drafts per step ("auto"), None for methods without
    rate: float | None = None  # synthetic acceptance rate
    constraint: str | None = None  # one of CONSTRAINTS on the structured prompts; None: the categories' prompts

    @property
    def name(self) -> str:
        k = "" if self.k is None else f" k={self.k}"
        rate = "" if self.rate is None else f" rate={self.rate:g}"
        constraint = "" if self.constraint is None else f" {self.constraint}"
        return f"{self.method}{k}{rate}{constraint}"


@dataclasses.dataclass
class Workload:
    """One generate() call: a left-padded batch of prompts."""

    input_ids: torch.Tensor  # [batch, prompt_len]
    attention_mask: torch.Tensor  # [batch, prompt_len]
    schema: dict | None = None  # the JSON schema every row's answer must follow (structured prompts)


def new_tokens(sequences: torch.Tensor, prompt_len: int, eos: set[int]) -> list[torch.Tensor]:
    """Per row, the generated tokens through the first EOS (transformers pads after it).
    sequences [batch, prompt_len + new] -> [batch] of [new_b]"""
    rows = []
    for row in sequences[:, prompt_len:]:
        ids = row.tolist()
        n = next((i + 1 for i, t in enumerate(ids) if t in eos), len(ids))
        rows.append(row[:n])
    return rows


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


# ---------------------------------------------------------------------------------------------- methods

@dataclasses.dataclass(frozen=True)
class Method:
    """One way of decoding that the harness times. ``bench`` below is the running ``harness.Bench``: its
    models (target, draft, native, native_draft, head), pad and EOS ids, and sampling settings per mode."""

    name: str
    doc: str  # what it measures, one line
    needs: str | None = None  # "draft" (BenchConfig.draft) or "head" (BenchConfig.head), loaded only if needed
    k: int | str | None = None  # drafts per step: EACH (one run per k in ks), "auto", a fixed k; None: none
    drafts: bool = True  # False: plain decoding, one token per target forward
    default: bool = True  # measured by a run that names no methods
    batch_one: bool = False  # transformers refuses batch > 1 for it (#29769, #32165)
    library = ""  # whose generate() runs it
    grammar = False  # whether it runs under a grammar (the GRAMMAR constraints)

    def runs(self, config, mode: str, batch: int, constraint: str | None = None) -> list[Run]:
        """The runs of one (mode, batch, constraint) group."""
        if (self.batch_one and batch > 1) or (constraint in GRAMMAR and not self.grammar):
            return []
        return [Run(self.name, mode, batch, k, constraint=constraint)
                for k in (config.ks if self.k == EACH else (self.k,))]

    def generate(self, bench, run: Run, work: Workload, reference, seed: int):
        """One timed call -> (generated tokens per row, seconds, SpecStats or None). reference: per row the
        plain greedy output of this workload (prompt + new tokens), None outside greedy mode."""
        raise NotImplementedError

    def draft_weights(self, bench):
        """The module whose weights one draft step reads (for the roofline), or None."""
        return None


@dataclasses.dataclass(frozen=True)
class Transformers(Method):
    options: Callable = lambda bench, run: {}  # (bench, run) -> extra keyword arguments of generate()
    library = "transformers"

    def generate(self, bench, run, work, reference, seed):
        sampling = bench.sampling(run)
        if run.mode == "sampling":
            torch.manual_seed(seed)  # transformers samples from the global generator
        else:
            sampling.update(temperature=None, top_p=None, top_k=None)  # not the generation config's

        def call():
            with torch.inference_mode():
                return bench.target.generate(input_ids=work.input_ids, attention_mask=work.attention_mask,
                                             max_new_tokens=bench.config.max_new_tokens, pad_token_id=bench.pad,
                                             **sampling, **self.options(bench, run))

        out, seconds = timed(call, bench.target.device)
        return new_tokens(out, work.input_ids.shape[1], bench.eos), seconds, None


@dataclasses.dataclass(frozen=True)
class Specdec(Method):
    proposer: Callable = lambda bench, run, reference, seed: None  # -> generate()'s draft_model
    reads: Callable = lambda bench: None  # -> the module one draft step reads
    library = "specdec"
    grammar = True

    def generate(self, bench, run, work, reference, seed):
        draft = self.proposer(bench, run, reference, seed)
        grammar = {} if run.constraint not in GRAMMAR else dict(
            grammar={"json_schema": work.schema}, tokenizer=bench.tokenizer, forced_drafts=run.constraint == "forced")
        out, seconds = timed(lambda: specdec.generate(
            bench.native, work.input_ids, work.attention_mask, draft_model=draft,
            num_draft_tokens=run.k if run.k is not None else 4, max_new_tokens=bench.config.max_new_tokens,
            pad_token_id=bench.pad, generator=torch.Generator().manual_seed(seed), return_dict_in_generate=True,
            **grammar, **bench.sampling(run)), bench.native.device)
        return new_tokens(out.sequences, work.input_ids.shape[1], bench.eos), seconds, out.stats

    def draft_weights(self, bench):
        return self.reads(bench)


@dataclasses.dataclass(frozen=True)
class Synthetic(Specdec):
    """Greedy only (acceptance of "the target's own token" is defined for greedy decoding), one run per rate
    in ``synthetic_rates`` at ``synthetic_k``."""

    def runs(self, config, mode, batch, constraint=None):
        if mode != "greedy":
            return []
        return [Run(self.name, mode, batch, config.synthetic_k, rate, constraint) for rate in config.synthetic_rates]


def _self_draft(bench):
    from specdec.models.quantized import self_draft

    return self_draft(bench.native)


def _draft_model(bench, *_):
    return bench.native_draft


def _head(bench, *_):
    return bench.head


METHODS: dict[str, Method] = {m.name: m for m in (
    Transformers("hf", "transformers generate, plain", drafts=False),
    Transformers("hf-assisted", "transformers assisted generation with the same draft (assistant_model=; batch 1 "
                 "only: transformers refuses larger batches)", needs="draft", batch_one=True,
                 options=lambda bench, run: dict(assistant_model=bench.draft)),
    Transformers("hf-lookup", "transformers prompt lookup (prompt_lookup_num_tokens=; batch 1 only)",
                 k=LOOKUP_TOKENS, batch_one=True, options=lambda bench, run: dict(prompt_lookup_num_tokens=run.k)),
    Specdec(REFERENCE, "specdec, plain decoding", drafts=False),
    Specdec("draft", "specdec with the draft model, once per k in ks", needs="draft", k=EACH,
            proposer=_draft_model, reads=_draft_model),
    Specdec("auto", 'specdec with the draft model, num_draft_tokens="auto"', needs="draft", k="auto",
            proposer=_draft_model, reads=_draft_model),
    Specdec("head", "specdec with the draft head (feature-conditioned, models/head.py), once per k in ks",
            needs="head", k=EACH, proposer=_head, reads=_head),
    Specdec("head-auto", 'specdec with the draft head, num_draft_tokens="auto"', needs="head", k="auto",
            proposer=_head, reads=_head),
    Specdec("ngram", 'specdec with n-gram prompt lookup, num_draft_tokens="auto"', k="auto",
            proposer=lambda *_: "ngram"),
    Specdec("self", "specdec drafting with the target's own layers quantized (models/quantized.py), once per k in "
            "ks; asked for by name only", k=EACH, default=False, proposer=lambda *_: "self", reads=_self_draft),
    Synthetic("synthetic", "specdec with a proposer whose drafts the target accepts with a chosen probability "
              "(greedy only): the system's own overhead and the break-even acceptance rate, whatever the draft",
              proposer=lambda bench, run, reference, seed: SyntheticProposer(
                  reference, run.rate, torch.Generator().manual_seed(seed))),
)}


def needing(what: str, names) -> list[str]:
    """Those of the method ``names`` that need ``what`` ("draft" or "head")."""
    return sorted(n for n in names if METHODS[n].needs == what)
