"""Engine: continuous batching of speculative decoding over a paged KV pool.

Requests join and leave between steps. Each step runs ``speculative_step`` and ``commit`` — the very
functions generate() runs — over the sequences it schedules: the proposer drafts for all of them at once
and the target verifies all of them in one forward over a ragged batch, so one read of the target's weights
serves every running request and every accepted draft. Batching and speculation multiply: batching
amortizes a weight read across requests, speculation across the tokens of one request.

Memory is a pool of fixed-size blocks per model (``KVPool``), shared by all sequences; a sequence holds the
blocks that cover its cached positions plus this step's drafts, and gives back the ones past its accepted
length after every step. Admission waits for free blocks; when the pool runs dry mid-generation the youngest
sequence is preempted (its blocks freed, its tokens kept) and recomputed from its prompt and output when
it is readmitted. Its greedy output is unchanged, and so are a seeded sampled request's tokens with no draft,
a deterministic proposer (n-gram) or a greedily drafting model at a fixed k (tests/test_engine.py). Two
cases keep only the distribution: drafts sampled by a draft model or head come from the engine's own
generator, and a draft head cannot draft in the step that rebuilds a readmitted sequence (it has no features
yet), so that step is plain where it would have drafted and the request's later random draws shift.

Scheduling: a step is either a prefill step (the newly admitted or readmitted sequences, with their first
drafts) or a decode step (every running sequence). Mixing them would pad every decode row to the longest
prompt: a 500-token prompt beside 31 one-token rows costs 32 x 500 positions of compute instead of 500 + 31.
"""

from __future__ import annotations

import copy
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from specdec.cache import PagedKVCache
from specdec.grammar import MAX_FORCED, ForcedDrafts, GrammarMasks, RowGrammar, check_grammar, compile_grammar
from specdec.processing import OpenAIPenalties, Processing
from specdec.proposers import DraftModelProposer, HeadProposer
from specdec.sampling import SamplingConfig
from specdec.speculative import DraftLength, commit, make_proposer, token_ids, needs_features, speculative_step
from specdec.state import DecodeState
from specdec.stats import SpecStats
from specdec import validate
from specdec.validate import draft_length, integer

GREEDY = SamplingConfig()


@dataclass(frozen=True)
class RequestParams:
    """Per-request generation settings. temperature 0 (the default) is greedy decoding."""

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    seed: int | None = None  # seeds this request's own generator (None: a fresh random seed)
    # OpenAI's penalties, -2..2, on the logits before sampling: minus frequency_penalty times the times a token
    # occurs in the output so far, minus presence_penalty if it occurs at all (specdec/processing.py)
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict | None = None  # {token id: -100..100} added to its logit
    # structured output, as generate()'s grammar= ({"json_schema": ...}, {"json_object": True}, {"regex": ...},
    # {"ebnf": ...}); needs an Engine with a tokenizer
    grammar: dict | None = None

    def __post_init__(self):
        integer("max_new_tokens", self.max_new_tokens)
        validate.seed("seed", self.seed)
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not -2 <= value <= 2:
                raise ValueError(f"{name} must be a number in [-2, 2], got {name}={value!r}")
        bias = self.logit_bias or {}
        if not isinstance(bias, dict) or any(
                isinstance(t, bool) or not isinstance(t, int) or isinstance(b, bool)
                or not isinstance(b, (int, float)) or not -100 <= b <= 100 for t, b in bias.items()):
            raise ValueError(f"logit_bias must map token ids to numbers in [-100, 100], got logit_bias={bias!r}")
        # SamplingConfig validates temperature, top_k and top_p and names the offending one
        SamplingConfig(True, self.temperature, self.top_k, self.top_p)

    @property
    def sampling(self) -> SamplingConfig:
        if self.temperature == 0:
            return GREEDY
        return SamplingConfig(True, float(self.temperature), self.top_k, float(self.top_p))

    @property
    def processed(self) -> bool:
        """Whether the logits are processed before sampling (penalties, a bias)."""
        return bool(self.frequency_penalty or self.presence_penalty or self.logit_bias)


@dataclass
class RequestOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int]  # emitted this step (accepted drafts + recovered/bonus token, cut at EOS)
    finished: bool
    finish_reason: str | None  # "stop" (an EOS id), "length" (max_new_tokens), None while running
    num_prompt_tokens: int
    num_output_tokens: int  # emitted so far, this step's included


@dataclass
class StepInfo:
    """The figures of the last step, for metrics."""

    num_rows: int
    k: int
    prefill: bool
    emitted: list[int]  # [rows] tokens emitted per row
    seconds: float


@dataclass
class _Sequence:
    request_id: str
    arrival: int  # admission order: the youngest has the largest
    tokens: list[int]  # prompt, then output; the last one is pending (not yet in the target's cache)
    prompt_len: int
    params: RequestParams
    sampling: SamplingConfig
    generator: torch.Generator | None
    blocks: list[int] = field(default_factory=list)  # target block table
    draft_blocks: list[int] = field(default_factory=list)
    cached: int = 0  # positions in the target's cache
    draft_cached: int = 0
    preemptions: int = 0
    grammar: RowGrammar | None = None  # its matcher, following its output

    @property
    def num_output(self) -> int:
        return len(self.tokens) - self.prompt_len


class _RowSampling(tuple):
    """One SamplingConfig per row [batch]: ``verify`` takes it as its per-row ``sampling``, and the draft
    proposers read it as ``state.sampling`` (``greedy``, ``probs``)."""

    @property
    def greedy(self) -> bool:
        return all(c.greedy for c in self)

    def probs(self, logits):
        """logits [batch, vocab] -> probabilities [batch, vocab]; a greedy row gets the one-hot argmax."""
        rows = [torch.nn.functional.one_hot(row.argmax(), row.shape[-1]).to(row.dtype) if c.greedy else c.probs(row)
                for c, row in zip(self, logits)]
        return torch.stack(rows)


class Engine:
    """Continuous batching with speculative decoding.

    target            native model (or a transformers Llama-family model, converted)
    draft             None (plain) | "ngram" | a causal LM sharing the tokenizer | a Proposer
    num_draft_tokens  k >= 1 or "auto": a DraftLength controller per batch-size class (1, 2, 4, ... rows),
                      since what a verification pass costs, and so the k that pays, depends on the batch
    max_num_seqs      sequences running at once
    kv_blocks         blocks in the target's pool (and the draft's); default max_num_seqs * 32
    block_size        positions per block
    max_model_len     prompt + max_new_tokens limit (an integer >= 1); default the target's max_position_embeddings
    seed              seeds the generator that samples a draft model's or head's drafts (None: a random seed);
                      each request's own ``seed`` decides its tokens, this one only which drafts are offered
    tokenizer         the model's, for requests with a ``grammar`` (compiled with it; the text a grammar
                      forces is tokenized with it into drafts: specdec/grammar.ForcedDrafts)

    ``add_request`` queues a request, ``step`` runs one step and returns what each scheduled request emitted,
    ``abort`` drops a request and frees its blocks. Not thread-safe: drive it from one thread.
    """

    def __init__(self, target, draft=None, num_draft_tokens=4, max_num_seqs: int = 32, kv_blocks: int | None = None,
                 block_size: int = 16, *, max_model_len: int | None = None, eos_token_id=None,
                 seed: int | None = None, tokenizer=None):
        from specdec.models.loading import as_native

        self.target = as_native(target, "target")
        if not hasattr(self.target, "new_pool"):
            raise ValueError(f"target: the engine needs a native model (Llama family) for its paged cache, got "
                             f"{type(self.target).__name__}")
        draft_length(num_draft_tokens)
        sizes = {"max_num_seqs": max_num_seqs, "block_size": block_size}
        if max_model_len is not None:  # (None: the target's own context)
            sizes["max_model_len"] = max_model_len
        for name, value in sizes.items():
            integer(name, value)
        kv_blocks = integer("kv_blocks", max_num_seqs * 32 if kv_blocks is None else kv_blocks)
        self.proposer = make_proposer(draft, self.target)
        # a draft model and a draft head get a paged pool of their own
        draft_model = self.proposer.model if isinstance(self.proposer, (DraftModelProposer, HeadProposer)) else None
        if draft_model is not None and not hasattr(draft_model, "new_pool"):
            raise ValueError(f"draft: the engine needs a native draft model for its paged cache, got "
                             f"{type(draft_model).__name__}")
        self.num_draft_tokens = num_draft_tokens if self.proposer is not None else 0
        self.max_num_seqs = max_num_seqs
        config = self.target.config
        self.max_model_len = max_model_len or getattr(config, "max_position_embeddings", None) or 2048
        gen = self.target.generation_config
        eos = token_ids("eos_token_id", eos_token_id if eos_token_id is not None
                         else getattr(gen, "eos_token_id", None))
        self.eos_token_ids = eos
        # its own copy: a fast tokenizer's Rust object refuses (or is changed by) calls from two threads at once,
        # and a server's request threads use the one it was given
        self.tokenizer = copy.deepcopy(tokenizer)
        device = self.target.device
        self._eos = torch.tensor(eos, dtype=torch.long, device=device)
        with torch.inference_mode():
            # a draft head reads the target's features: the target's pool keeps them beside keys and values
            self.pool = self.target.new_pool(kv_blocks, block_size,
                                             features=needs_features(self.proposer))
            self.draft_pool = draft_model.new_pool(kv_blocks, block_size) if draft_model is not None else None
        # drafts are sampled with the engine's generator; each request's own generator decides its tokens
        self._draft_generator = torch.Generator(device=device)
        if seed is None:
            self._draft_generator.seed()
        else:
            self._draft_generator.manual_seed(validate.seed("seed", seed))
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._ids: dict[str, _Sequence] = {}
        self._arrivals = 0
        self._control: dict[int, tuple[DraftLength, SpecStats]] = {}  # batch-size class -> controller, its stats
        self._prefill_stats = SpecStats()
        self._last_k = DraftLength.PROBE if num_draft_tokens == "auto" else self.num_draft_tokens
        self.last_step: StepInfo | None = None
        self.num_preemptions = 0

    # ------------------------------------------------------------------------------------------ requests

    def check_request(self, prompt_ids, params: RequestParams | None = None) -> tuple[list[int], RequestParams]:
        """Validate a request without touching the engine (safe from any thread); returns (ids, params)."""
        return self._checked(prompt_ids, params)[:2]

    def _checked(self, prompt_ids, params: RequestParams | None):
        """check_request's work: (ids, params, the compiled grammar or None)."""
        if params is None:
            params = RequestParams()
        if not isinstance(params, RequestParams):
            raise ValueError(f"params must be a RequestParams, got {type(params).__name__}")  # noqa: TRY004
        if isinstance(prompt_ids, torch.Tensor):
            if prompt_ids.dim() != 1:
                raise ValueError(f"prompt_ids must be 1-D, got shape {tuple(prompt_ids.shape)}")
            prompt_ids = prompt_ids.tolist()
        if not isinstance(prompt_ids, (list, tuple)) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt_ids):
            raise ValueError("prompt_ids must be a list of token ids")
        if not prompt_ids:
            raise ValueError("prompt_ids is empty; a prompt needs at least one token")
        vocab = self.target.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt_ids holds id {bad[0]} outside the vocabulary 0..{vocab - 1}")
        total = len(prompt_ids) + params.max_new_tokens
        if total > self.max_model_len:
            raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) = "
                             f"{total} exceeds the context of {self.max_model_len} tokens")
        need = self.pool.blocks_for(total)
        if need > self.pool.num_blocks:
            raise ValueError(f"prompt + max_new_tokens = {total} tokens need {need} KV blocks; the pool has "
                             f"{self.pool.num_blocks} (block_size {self.pool.block_size})")
        bad = [t for t in params.logit_bias or {} if not 0 <= t < vocab]
        if bad:
            raise validate.ArgumentError("logit_bias", f"logit_bias holds id {bad[0]} outside the vocabulary "
                                                       f"0..{vocab - 1}")
        return list(prompt_ids), params, self.compiled_grammar(params)

    def compiled_grammar(self, params: RequestParams):
        """The request's compiled grammar (None without one); ArgumentError naming ``grammar`` if it is wrong."""
        if params.grammar is None:
            return None
        try:
            grammar = check_grammar(params.grammar, self.tokenizer, self.eos_token_ids)
            return compile_grammar(grammar, self.tokenizer, self.target.vocab_size)  # (xgrammar caches it)
        except ValueError as err:
            raise validate.ArgumentError("grammar", str(err)) from None

    def add_request(self, prompt_ids, params: RequestParams | None = None, request_id: str | None = None) -> str:
        """Queue a request; it joins the running batch at a step boundary. Returns its id."""
        prompt_ids, params, compiled = self._checked(prompt_ids, params)
        if request_id is None:
            request_id = f"req-{self._arrivals}"
        if not isinstance(request_id, str) or request_id in self._ids:
            raise ValueError(f"request_id must be a new string, got request_id={request_id!r}")
        sampling = params.sampling
        generator = None
        if not sampling.greedy:
            generator = torch.Generator(device=self.target.device)
            if params.seed is None:
                generator.seed()
            else:
                generator.manual_seed(params.seed)
        seq = _Sequence(request_id, self._arrivals, list(prompt_ids), len(prompt_ids), params, sampling, generator)
        if compiled is not None:
            seq.grammar = RowGrammar(compiled, self.eos_token_ids)
        self._arrivals += 1
        self._ids[request_id] = seq
        self._waiting.append(seq)
        return request_id

    def abort(self, request_id: str) -> bool:
        """Drop a request, waiting or running, and free its blocks now. False if it is unknown or finished."""
        seq = self._ids.pop(request_id, None)
        if seq is None:
            return False
        if seq in self._running:
            self._running.remove(seq)
        else:
            self._waiting.remove(seq)
        self._free(seq)
        return True

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running)

    def __contains__(self, request_id: str) -> bool:
        """Whether the request is waiting or running."""
        return request_id in self._ids

    @property
    def draft_seed(self) -> int:
        """The seed of the generator that samples drafts (``seed``, or the random one drawn for None)."""
        return self._draft_generator.initial_seed()

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def stats(self) -> SpecStats:
        """All steps so far, in generate()'s vocabulary (a new object on every call)."""
        total = SpecStats()
        for stats in [self._prefill_stats] + [s for _, s in self._control.values()]:
            total.merge(stats)
        return total

    # ------------------------------------------------------------------------------------------ the step

    def step(self) -> list[RequestOutput]:
        """Admit what fits, run one step (prefill or decode), and report what each scheduled request emitted."""
        self._admit()
        if not self._running:
            self.last_step = None
            return []
        prefill = [s for s in self._running if s.cached == 0]
        seqs = prefill or list(self._running)
        if self.proposer is None:
            k, control = 0, None
        elif prefill:
            # a draft head drafts from the target's features, which this very pass makes: nothing to draft yet
            k, control = (0 if needs_features(self.proposer) else self._last_k), None
        else:
            control = self._controller(len(seqs))
            # (a tensor-parallel target's ranks take rank 0's: "auto" decides from timings, which differ)
            k = self._last_k = self.target.runner.agree(control[0].next(control[1]))
        k = self._fit_k(seqs, k)
        seqs = self._reserve(seqs, k)
        if not seqs:  # everything scheduled was preempted for the older sequences
            self.last_step = None
            return []
        start = time.perf_counter()
        device = self.target.device
        remaining = [s.params.max_new_tokens - s.num_output for s in seqs]
        room = self._grammar_room(seqs, remaining)  # [batch] grammar drafts each row may take
        state = self._state(seqs, max(k, *room), control[1] if control is not None else self._prefill_stats)
        num_drafts = (torch.tensor(remaining, device=device) - 1).clamp(min=0, max=k)  # [batch] as generate() asks
        proposer, counted = self.proposer, None
        if any(room):  # the grammars' drafts, as many as the pool holds (blocks given now, trimmed after)
            proposer = ForcedDrafts(self.proposer, state.processing.grammar)
            num_drafts, counted = proposer.prepare(state, num_drafts, torch.tensor(room, device=device), k)
            for s, drafts in zip(seqs, num_drafts.tolist()):
                s.blocks += self.pool.allocate(max(self.pool.blocks_for(len(s.tokens) + drafts) - len(s.blocks), 0))
        cache = state.target_cache = PagedKVCache(self.pool, [s.blocks for s in seqs], [s.cached for s in seqs])
        draft_cache = None
        if self.draft_pool is not None:
            draft_cache = PagedKVCache(self.draft_pool, [s.draft_blocks for s in seqs], [s.draft_cached for s in seqs])
            state.scratch[self.proposer] = draft_cache
        with torch.inference_mode():
            emitted, num_accepted, num_drafts = speculative_step(self.target, cache, proposer, state, num_drafts,
                                                                 generators=[s.generator for s in seqs],
                                                                 counted=counted)
            if counted is not None:
                proposer.settle(state, num_accepted)
            counts = commit(state, emitted, num_accepted, num_drafts, counted)
        outputs, counts = self._outputs(seqs, emitted, counts, state, draft_cache)
        self.last_step = StepInfo(len(seqs), k, prefill=bool(prefill), emitted=counts,
                                  seconds=time.perf_counter() - start)
        return outputs

    def _state(self, seqs: list[_Sequence], drafts: int, stats: SpecStats) -> DecodeState:
        """The step's DecodeState over ``seqs``, each row with room for ``drafts`` drafts and the bonus token."""
        device = self.target.device
        n = [len(s.tokens) for s in seqs]
        tokens = torch.zeros(len(seqs), max(n) + drafts + 2, dtype=torch.long)  # [batch, capacity + 1]
        for i, s in enumerate(seqs):
            tokens[i, : n[i]] = torch.tensor(s.tokens)
        return DecodeState(
            tokens=tokens.to(device), num_tokens=torch.tensor(n, device=device),
            prompt_lengths=torch.tensor([s.prompt_len for s in seqs], device=device),
            active=torch.ones(len(seqs), dtype=torch.bool, device=device),
            sampling=_RowSampling([s.sampling for s in seqs]), generator=self._draft_generator,
            vocab_size=self.target.vocab_size, max_len=tokens.shape[1], eos=self._eos,
            max_new_tokens=torch.tensor([s.params.max_new_tokens for s in seqs], device=device), stats=stats,
            processing=self._processing(seqs))

    def _grammar_room(self, seqs: list[_Sequence], remaining: list[int]) -> list[int]:
        """The grammar drafts each row may take this step: up to MAX_FORCED and remaining - 1, as many as its
        blocks and the pool's free ones hold (the free ones shared out in order); 0 for rows without a grammar."""
        free, size, room = self.pool.num_free, self.pool.block_size, []
        for s, left in zip(seqs, remaining):
            want = min(MAX_FORCED, left - 1) if s.grammar is not None else 0
            take = min(max(self.pool.blocks_for(len(s.tokens) + want) - len(s.blocks), 0), free)
            free -= take
            room.append(max(min(want, (len(s.blocks) + take) * size - len(s.tokens)), 0))
        return room

    def _processing(self, seqs: list[_Sequence]) -> Processing | None:
        """The step's logits processing: each request's penalties and bias over its output so far (the
        processors see a row's new tokens alone: an empty prompt), its grammar; None where no request has any."""
        grammars = [s.grammar for s in seqs]
        masks = GrammarMasks(grammars, self.target.vocab_size, self.eos_token_ids, self.tokenizer) if any(
            grammars) else None
        params = [s.params for s in seqs]
        build = None
        if any(p.processed for p in params):
            device = self.target.device
            frequency = torch.tensor([float(p.frequency_penalty) for p in params], device=device)
            presence = torch.tensor([float(p.presence_penalty) for p in params], device=device)
            bias = torch.zeros(len(seqs), self.target.vocab_size, device=device)  # [batch, vocab]
            entries = [(row, token, value) for row, p in enumerate(params) for token, value in
                       (p.logit_bias or {}).items()]
            if entries:
                rows, tokens, values = zip(*entries)
                bias[torch.tensor(rows), torch.tensor(tokens)] = torch.tensor(values, dtype=bias.dtype)

            def build(rows: list[int]) -> list:
                return [OpenAIPenalties(frequency[rows], presence[rows], bias[rows])]
        if build is None and masks is None:
            return None
        return Processing(torch.zeros(len(seqs), 0, dtype=torch.long, device=self.target.device), build, masks)

    def _outputs(self, seqs, emitted, counts, state, draft_cache) -> tuple[list[RequestOutput], list[int]]:
        """What each sequence emitted this step into its tokens and its request's output; finished ones leave
        and free their blocks. emitted [batch, k + 1], counts [batch]: the tokens each row keeps."""
        counts, lengths, active = counts.tolist(), state.target_cache.lengths.tolist(), state.active.tolist()
        draft_lengths = draft_cache.lengths.tolist() if draft_cache is not None else [0] * len(seqs)
        emitted = emitted.tolist()
        outputs = []
        for i, s in enumerate(seqs):
            new = emitted[i][: counts[i]]
            s.tokens.extend(new)
            # the draft's cache past the target's holds drafts that may be rejected: drop them now
            s.cached, s.draft_cached = lengths[i], min(draft_lengths[i], lengths[i])
            finished = not active[i]
            reason = None
            if finished:
                reason = "stop" if new and new[-1] in self.eos_token_ids else "length"
                self._ids.pop(s.request_id, None)
                self._running.remove(s)
                self._free(s)
            else:
                self._trim(s)
            outputs.append(RequestOutput(s.request_id, new, finished, reason, s.prompt_len, s.num_output))
        return outputs, counts

    def _controller(self, rows: int):
        size = 1 << (rows - 1).bit_length()  # 1, 2, 4, 8, ...: a verification pass costs more with more rows
        if size not in self._control:
            self._control[size] = (DraftLength(self.num_draft_tokens, batch_size=size), SpecStats())
        return self._control[size]

    def _admit(self) -> None:
        """FIFO: the oldest waiting request joins if a slot is free and its prompt fits with one block of
        headroom per running sequence (the watermark that keeps a fresh admission from forcing a preemption)."""
        free = self.pool.num_free
        while self._waiting and len(self._running) < self.max_num_seqs:
            seq = self._waiting[0]
            need = self.pool.blocks_for(len(seq.tokens) + max(self._last_k, 1))
            if self._running and free - need < len(self._running):
                break
            free -= need
            self._running.append(self._waiting.popleft())

    def _fit_k(self, seqs: list[_Sequence], k: int) -> int:
        """No more drafts than any row can use (remaining - 1), and no more than the draft pool holds for
        the oldest row alone: the draft model writes k - 1 positions past every row, so a k that overflows
        the whole pool would preempt even the oldest sequence, step after step (found by hypothesis: one
        prompt token, max_new_tokens 1, k 3, a 2-block pool of 1-position blocks)."""
        if k == 0:
            return 0
        k = min(k, max(s.params.max_new_tokens - s.num_output for s in seqs) - 1)
        if self.draft_pool is not None:
            oldest = min(seqs, key=lambda s: s.arrival)
            k = min(k, self.draft_pool.num_blocks * self.draft_pool.block_size - len(oldest.tokens) + 1)
        return max(k, 0)

    def _reserve(self, seqs: list[_Sequence], k: int) -> list[_Sequence]:
        """Give each scheduled sequence the blocks this step writes, oldest first; when the pool is dry,
        preempt the youngest running sequence. Returns the sequences still scheduled."""
        scheduled = sorted(seqs, key=lambda s: s.arrival)
        for seq in list(scheduled):
            if seq not in scheduled:  # preempted for an older one
                continue
            remaining = seq.params.max_new_tokens - seq.num_output
            # target: the pending token and this row's drafts; draft model: pending + k - 1 drafts for every row
            want = self.pool.blocks_for(len(seq.tokens) + min(k, remaining - 1)) - len(seq.blocks)
            want_draft = 0
            if self.draft_pool is not None and k > 0:
                want_draft = self.draft_pool.blocks_for(len(seq.tokens) + k - 1) - len(seq.draft_blocks)
            while self.pool.num_free < want or (self.draft_pool is not None and self.draft_pool.num_free < want_draft):
                victim = max(self._running, key=lambda s: s.arrival)
                self._preempt(victim)
                if victim in scheduled:
                    scheduled.remove(victim)
                if victim is seq:
                    break
            if seq in scheduled:
                seq.blocks += self.pool.allocate(max(want, 0))
                if want_draft > 0:
                    seq.draft_blocks += self.draft_pool.allocate(want_draft)
        order = {id(s): i for i, s in enumerate(seqs)}
        return sorted(scheduled, key=lambda s: order[id(s)])

    def _preempt(self, seq: _Sequence) -> None:
        """Free the sequence's blocks and queue it first: readmitted, it is recomputed from its tokens."""
        self._running.remove(seq)
        self._free(seq)
        seq.preemptions += 1
        self.num_preemptions += 1
        self._waiting.appendleft(seq)

    def _free(self, seq: _Sequence) -> None:
        self.pool.release(seq.blocks)
        if self.draft_pool is not None:
            self.draft_pool.release(seq.draft_blocks)
        seq.blocks, seq.draft_blocks, seq.cached, seq.draft_cached = [], [], 0, 0

    def _trim(self, seq: _Sequence) -> None:
        """Rollback gives back the blocks past the accepted length."""
        keep = self.pool.blocks_for(seq.cached)
        self.pool.release(seq.blocks[keep:])
        del seq.blocks[keep:]
        if self.draft_pool is not None:
            keep = self.draft_pool.blocks_for(seq.draft_cached)
            self.draft_pool.release(seq.draft_blocks[keep:])
            del seq.draft_blocks[keep:]
