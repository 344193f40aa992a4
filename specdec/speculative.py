"""generate(): a drop-in for transformers' ``model.generate()``, plain or speculative.

Plain decoding is the speculative step with k = 0: one loop, one mechanism.
"""

from __future__ import annotations

import contextlib
import math
import time
import weakref
from collections import deque
from dataclasses import dataclass, replace

import torch
from transformers import GenerationConfig

from specdec.grammar import ForcedDrafts, GrammarMasks, RowGrammar, check_grammar, compile_grammar
from specdec.processing import Processing, check_processors
from specdec.processing import builder as processor_builder
from specdec.proposers import DraftModelProposer, HeadProposer, NGramProposer
from specdec.sampling import SamplingConfig, verify
from specdec.state import DecodeState
from specdec.stats import SpecStats, predicted_speedup, synchronize
from specdec.validate import draft_length, integer

MAX_AUTO_DRAFT_TOKENS = 8


@dataclass
class GenerateOutput:
    sequences: torch.Tensor  # [batch, prompt_len + new_tokens]
    stats: SpecStats


def speculative_step(target, cache, proposer, state: DecodeState, num_drafts, generators=None, counted=None):
    """One round: draft, verify all drafts in one target pass, roll back, commit.

    num_drafts [batch] drafts wanted per row (0 = plain step); the proposer sees only the rows that want
               some as active: a row that takes a plain step is padding in the draft's forward (no catch-up
               over its unseen tokens) and its draft cache is left as it is
    generators None: ``verify`` draws from state.generator for the batch; or one generator per row [batch]
               (the engine's: each request's own, with state.sampling holding each request's settings)
    counted    [batch] the rows whose drafts count as the draft model's in the statistics (None: all; rows
               drafting from a grammar do not: specdec/grammar.ForcedDrafts)
    returns emitted [batch, k + 1], num_accepted [batch] (row b emits num_accepted[b] + 1 tokens) and
            num_drafts [batch] as offered (a proposer may offer fewer)
    """
    asked = num_drafts if counted is None else num_drafts * counted
    others = num_drafts.new_zeros(()) if counted is None else (state.active & ~counted).sum()  # grammar-drafting rows
    k, requested, grammar_rows = torch.stack((num_drafts.max(), asked.sum(), others)).tolist()  # one host sync
    state.stats.requested += requested
    passes = state.stats.draft_passes  # (a draft with weights has not run on these rows yet while 0)
    tick = time.perf_counter()
    if k > 0:
        drafting = replace(state, active=state.active & (num_drafts > 0))
        drafts, draft_probs = proposer.propose(drafting, k)  # [batch, k], [batch, k, vocab] or None
        _check_proposal(drafts, draft_probs, state, k)
        # A proposer offers a row fewer than k tokens by padding with -1 (n-gram lookup without a match).
        num_drafts = torch.minimum(num_drafts, (drafts >= 0).long().cumprod(dim=1).sum(dim=1))
        drafts = drafts.clamp(min=0)
    else:
        drafts, draft_probs = state.tokens.new_zeros(state.batch_size, 0), None
    synchronize(state.tokens.device)
    tock = time.perf_counter()
    # One target pass over the pending token and the k drafts: k + 1 positions, one read of the weights.
    input_ids, positions, num_unseen = state.unseen(cache.lengths, drafts, num_drafts)
    logits_index = ((num_unseen - 1).clamp(min=0)[:, None] + torch.arange(k + 1, device=positions.device))
    logits_index = logits_index.clamp(max=positions.shape[1] - 1)  # [batch, k + 1]
    logits = target(input_ids, positions, cache, logits_index=logits_index)  # [batch, k + 1, vocab]
    if state.processing is not None:  # position i after the pending token and drafts 0..i-1
        logits = state.processing.positions(logits, state, drafts)
    emitted, num_accepted = verify(drafts, draft_probs, logits, num_drafts, state.sampling,
                                   state.generator if generators is None else generators)
    # Keep the pending token and the accepted drafts; the recovered/bonus token becomes the new pending one.
    cache.rollback(torch.where(state.active, state.num_tokens + num_accepted, cache.lengths))
    synchronize(state.tokens.device)
    # Prefills are kept out of the timings: the target's first pass, and the draft's first one, which reads the
    # whole prompt (a draft head's comes in the second step: the head drafts from features the first one makes).
    # Timed, a head's prefill over a 40-token prompt read as c = 0.34-0.40 instead of ~0.07 and kept "auto"
    # from drafting at all on some prompts.
    # A round where a grammar gave some rows their drafts is not timed either: its width is not a k the
    # controller chose, and its drafting is not the draft model's (specdec/grammar.ForcedDrafts).
    if state.stats.target_passes > 0 and not (passes == 0 and state.stats.draft_passes > 0) and not grammar_rows:
        state.stats.record_pass(k, target_seconds=time.perf_counter() - tock, draft_seconds=tock - tick)
    return emitted, num_accepted, num_drafts


def _check_proposal(drafts, draft_probs, state: DecodeState, k: int) -> None:
    want = (state.batch_size, k)
    if not isinstance(drafts, torch.Tensor) or tuple(drafts.shape) != want or drafts.dtype != torch.long:
        raise ValueError(f"draft_model proposed {getattr(drafts, 'dtype', type(drafts).__name__)} "
                         f"{tuple(getattr(drafts, 'shape', ()))}; a Proposer must return a LongTensor {want}")
    if bool(((drafts < -1) | (drafts >= state.vocab_size)).any()):
        raise ValueError(f"draft_model proposed ids outside -1..{state.vocab_size - 1}")
    if draft_probs is not None and tuple(draft_probs.shape) != (*want, state.vocab_size):
        raise ValueError(f"draft_model returned draft_probs of shape {tuple(draft_probs.shape)}, "
                         f"expected {(*want, state.vocab_size)}")


def commit(state: DecodeState, emitted, num_accepted, num_drafts, counted=None):
    """Append each active row's emitted tokens, cut after an EOS; retire finished rows (``generate`` and the
    engine alike). counted [batch]: as in ``speculative_step``.

    returns counts [batch] of tokens appended
    """
    k1 = emitted.shape[1]
    j = torch.arange(k1, device=emitted.device)
    counts = torch.where(state.active, num_accepted + 1, 0)  # [batch]
    is_eos = torch.isin(emitted, state.eos) & (j < counts[:, None])  # [batch, k + 1]
    hit = is_eos.any(dim=1)
    counts = torch.where(hit, is_eos.int().argmax(dim=1) + 1, counts)
    trash = state.tokens.shape[1] - 1
    columns = torch.where(j < counts[:, None], state.num_tokens[:, None] + j, trash)
    state.tokens.scatter_(1, columns, emitted)
    rows = state.active.clone()
    state.num_tokens += counts
    done = hit | (state.num_tokens - state.prompt_lengths >= state.max_new_tokens)
    state.active &= ~done
    # statistics, one host transfer per step
    n = k1 - 1
    drafted = rows if counted is None else rows & counted  # [batch] rows whose drafts are the model's
    summary = [torch.stack(((num_drafts * drafted).sum(), counts.sum(), rows.sum()))]
    if n:  # per draft position i: rows that reached it, rows that kept it
        i = torch.arange(n, device=emitted.device)
        reached = ((num_drafts[:, None] > i) & (num_accepted[:, None] >= i) & drafted[:, None]).sum(0)
        summary += [reached, ((num_accepted[:, None] > i) & drafted[:, None]).sum(0)]
    values = torch.cat(summary).tolist()
    state.stats.record(values[0], values[3:3 + n], values[3 + n:], emitted=values[1], rows=values[2],
                       k=k1 - 1)
    return counts


class DraftLength:
    """Picks k each step: fixed, or "auto" — the k in 0..8 with the most expected tokens per second,

        (1 + f (E(alpha, k) - 1)) / (k * c + v(k)),   E = (1 - alpha^(k+1)) / (1 - alpha)

    with alpha this call's acceptance rate, f the share of asked-for drafts the proposer offered (n-gram
    lookup finds no match for some rows), c a draft step and v(k) a verification pass of k + 1 tokens, both
    in units of a plain target step and both measured by this controller (the engine keeps one per
    batch-size class, generate() one per target, draft, batch size and mode, across calls). v(k) is
    Leviathan et al.'s "1" made honest: on a CPU a 9-row pass costs 1.4-1.9 plain steps (bench/RESULTS.md),
    and a draft that pays at v = 1 can lose at the real v. Unmeasured k take v linear in k through the
    nearest measured one.
    The target's costs are the least of the last WINDOW timed passes of each k: another process on the
    machine (a server's own clients, on a 2-core box) only ever adds time, and one plain step timed in such a
    burst read 62 ms against 45-49 ms in quiet, made every verification look 1.3x cheaper than it was, and
    kept 16 rows drafting at 0.66x plain (bench/RESULTS.md, "Serving"). A draft step's cost stays the
    controller's mean: the first drafting pass after plain ones includes the draft's catch-up over every
    token it skipped, and a window of such passes alone (all a run of reprobes leaves) would read c several
    times too high and never let drafting back.
    Schedule: two probing steps, the first untimed (a prefill: the target's, or a head's, which follows the
    target's plain first step) with k = PROBE / batch rounded up, so that each probe yields about PROBE
    acceptance samples whatever the batch (at batch 16 a k = 4 probe costs ~3.5 plain steps, a k = 1 probe
    ~1.5, and both say as much about alpha); PLAIN_SAMPLES plain steps (the unit; a later generation of the
    same controller has it already); then the argmax, k = 0 included — but k = 0 only where Wilson's upper
    bound on alpha says so too — with one plain step after every REFRESH drafting steps (~1% of a
    generation's time at 2 tokens per forward): a cheaper unit counts from the next refresh on, a dearer one
    (more rows, a busier machine) once it fills the window, and until then the unit reads low, which makes
    drafting look dearer, not cheaper: the cautious direction.
    After `reprobe` plain steps in a row one step with k = 1, since a plain step measures nothing and the
    text may change; each reprobe that leads back to plain doubles the wait (16, 32, 64, ... up to
    MAX_REPROBE), so a draft that does not pay costs less and less of a long generation while a text that
    turns repetitive is still noticed within 256 steps.
    batch_size: the rows it decides for (the engine passes its batch-size class, a power of two).
    """

    REPROBE = 16
    MAX_REPROBE = 256
    PROBE = 4
    WINDOW = 8  # recent timed target passes per k that the costs are read from
    PLAIN_SAMPLES = 3
    REFRESH = 32

    def __init__(self, num_draft_tokens, batch_size: int = 1):
        self.auto = num_draft_tokens == "auto"
        self.k = MAX_AUTO_DRAFT_TOKENS if self.auto else num_draft_tokens
        self.probe = -(-self.PROBE // max(batch_size, 1))
        self.plain_steps = 0
        self.reprobe = self.REPROBE
        self.reprobing = False  # the last step was a reprobe
        self.passes: dict[int, deque] = {}  # k -> seconds of the last WINDOW timed passes verifying k drafts
        self.drafting_steps = 0  # drafting steps since the last plain one
        self.draft_seconds, self.draft_steps = 0.0, 0  # every timed draft step this controller has seen
        self.begin()

    def begin(self) -> None:
        """A new generation with stats of its own: its acceptance is its own, and so is the reprobe schedule
        (another text), while the timings carry over (generate() keeps "auto"'s controller across calls)."""
        self._seen: dict[int, tuple[int, float]] = {}  # what the stats held at the last step: k -> (passes, seconds)
        self._seen_draft = (0, 0.0)  # and (timed draft steps, their seconds)
        self.plain_steps, self.reprobe, self.reprobing = 0, self.REPROBE, False

    def _observe(self, stats: SpecStats) -> None:
        """Take what ``stats`` timed since the last step into the windows (stats only grow: the engine keeps
        one per controller, generate() one per call)."""
        for k, n in stats.passes_by_k.items():
            seen, seconds = self._seen.get(k, (0, 0.0))
            if n > seen:
                each = (stats.pass_seconds_by_k[k] - seconds) / (n - seen)
                self.passes.setdefault(k, deque(maxlen=self.WINDOW)).extend([each] * (n - seen))
                self._seen[k] = (n, stats.pass_seconds_by_k[k])
        seen, seconds = self._seen_draft
        self.draft_steps += stats.timed_draft_passes - seen
        self.draft_seconds += stats.draft_seconds - seconds
        self._seen_draft = (stats.timed_draft_passes, stats.draft_seconds)

    def next(self, stats: SpecStats) -> int:
        if not self.auto:
            return self.k
        self._observe(stats)
        if not stats.timed_draft_passes:  # (every call probes: starting at the argmax of a prior alpha instead
            return self.probe             # drafted less and lost 4% in a 64-token sampled A/B)
        if len(self.passes.get(0, ())) < self.PLAIN_SAMPLES or self.drafting_steps >= self.REFRESH:
            self.drafting_steps = 0
            return 0  # time the unit
        plain = min(self.passes[0])
        # alpha is E's per-token rate: accepted drafts over drafts *reached* (all predecessors accepted).
        # accepted / proposed would count the drafts after a rejection as failures too and underrate alpha
        # the more, the longer the probes (a = 0.26 probed at k = 4 reads as 0.09). Jeffreys prior (half a
        # pseudo-draft each way): two rejections already say "alpha is small" (enough to pick a smaller k;
        # stopping altogether takes more evidence, below).
        reached = sum(stats.reached_at)
        alpha = (stats.accepted + 0.5) / (reached + 1)
        # the share of asked-for drafts the proposer had to offer: 1 for a draft model, the match rate for
        # n-gram lookup (a row without a match gains nothing, yet the pass still grows with the rows that do)
        fill = min(1.0, (stats.proposed + 1) / (stats.requested + 1)) if stats.requested else 1.0
        draft = self.draft_seconds / self.draft_steps / plain
        measured = sorted(k for k in self.passes if k > 0)

        def verify_cost(k: int) -> float:
            if k == 0:
                return 1.0
            near = min(measured, key=lambda m: abs(m - k))
            return 1.0 + (min(self.passes[near]) / plain - 1.0) * k / near

        def best_k(alpha: float) -> int:
            return max(range(self.k + 1),
                       key=lambda k: predicted_speedup(alpha, k, draft, verify_cost(k), fill))

        k = best_k(alpha)
        if k == 0:
            # Stop drafting only when an optimistic alpha (Wilson's upper bound, one standard deviation) agrees:
            # a few rejections are weak evidence, and the first drafts of an answer are its hardest (three
            # rejected k = 4 probes once sent a draft that keeps 0.56 of its tokens to plain decoding for a
            # whole 128-token answer). A useless draft pays ~6 more k = 1 steps for it (alpha 0 is certain
            # after ~9 rejections), well under 1% of such an answer.
            k = best_k(_wilson_upper(stats.accepted, reached))
        if self.reprobing:  # the reprobe's verdict: back to plain waits twice as long next time
            self.reprobe = min(self.reprobe * 2, self.MAX_REPROBE) if k == 0 else self.REPROBE
            self.reprobing = False
        self.plain_steps = self.plain_steps + 1 if k == 0 else 0
        if self.plain_steps > self.reprobe:
            self.plain_steps, self.reprobing, k = 0, True, 1
        self.drafting_steps = self.drafting_steps + 1 if k > 0 else 0
        return k


#: "auto"'s controllers, kept across generate() calls: target -> (drafts by name ("ngram"), drafts by object)
#: -> {(batch size, greedy): DraftLength}. Weak keys: a controller goes with its target or its draft.
_CONTROLLERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _draft_length(target, draft_model, num_draft_tokens, batch_size: int, greedy: bool) -> DraftLength:
    """A fixed k's DraftLength, or "auto"'s controller for this target, draft, batch size and mode, kept
    across calls as the engine keeps its own: the timings carry over (the unit, each k's verification pass,
    the draft step), so a call does not spend three plain steps re-timing the unit (+4% over 64 sampled
    tokens, bench/RESULTS.md); each call's acceptance is its own, probes included. Not for concurrent calls
    on one model (neither is the model)."""
    if num_draft_tokens != "auto" or draft_model is None:
        return DraftLength(num_draft_tokens, batch_size=batch_size)
    try:
        named, objects = _CONTROLLERS.setdefault(target, ({}, weakref.WeakKeyDictionary()))
        per_draft = (named if isinstance(draft_model, str) else objects).setdefault(draft_model, {})
    except TypeError:  # a proposer or target that takes no weak reference: a controller for this call only
        return DraftLength(num_draft_tokens, batch_size=batch_size)
    length = per_draft.get((batch_size, greedy))
    if length is None:
        length = per_draft[(batch_size, greedy)] = DraftLength(num_draft_tokens, batch_size=batch_size)
    length.begin()
    return length


def _wilson_upper(successes: int, trials: int, z: float = 1.0) -> float:
    """Wilson's score interval's upper end for a proportion (z standard deviations): sound at a few trials,
    where the normal interval around successes / trials collapses to a point at 0 or 1."""
    if trials == 0:
        return 1.0
    p, z2 = successes / trials, z * z
    spread = z * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials))
    return (p + z2 / (2 * trials) + spread) / (1 + z2 / trials)


class _Unset:
    """The default of generate()'s generation settings: the argument was left out, so the model's
    generation_config decides (and where that leaves it None, transformers' global default). One instance,
    ``_UNSET``; an explicit ``None`` is a value of its own, as in transformers."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "<from generation_config>"

    def __reduce__(self):
        return _Unset, ()


_UNSET = _Unset()


def generate(model, input_ids, attention_mask=None, *, draft_model=None, num_draft_tokens=4,
             max_new_tokens=_UNSET, max_length=_UNSET, do_sample=_UNSET, temperature=_UNSET, top_k=_UNSET,
             top_p=_UNSET, min_p=_UNSET, eos_token_id=_UNSET, pad_token_id=_UNSET, repetition_penalty=_UNSET,
             no_repeat_ngram_size=_UNSET, bad_words_ids=_UNSET, suppress_tokens=_UNSET, min_length=_UNSET,
             min_new_tokens=_UNSET, logits_processor=None, prefix_allowed_tokens_fn=None, grammar=None,
             tokenizer=None, forced_drafts=True, generator=None, streamer=None, return_dict_in_generate=False,
             feature_hook=None):
    """Generate like transformers' ``model.generate()``; with ``draft_model``, speculatively and losslessly.

    input_ids       [batch, prompt_len] LongTensor; left padding allowed with attention_mask [batch, prompt_len].
                    Without attention_mask, as in transformers: where pad_token_id is set, is not an EOS id and
                    occurs in input_ids, those positions are masked out; otherwise every token counts
    generator       torch.Generator for sampling. With a fixed k, the same seed gives the same tokens. With
                    num_draft_tokens="auto" it does not: k follows measured timings, and each k draws its own
                    random numbers, so seeded runs agree in distribution only (pass an integer k to reproduce)
    draft_model     None (plain) | causal LM (native or transformers) | "ngram" | "self" or "self-int8" (the
                    target's own layers quantized to int4 / int8: models/quantized.py) | a draft head (``DraftHead``,
                    e.g. ``specdec.load("smollm2-135m-instruct-head")``) | a Proposer. A draft model must be on
                    the target's device (ValueError otherwise) but may have another dtype: a bfloat16 draft
                    for a float32 target is fine, both distributions are compared in float32.
    feature_hook    specdec's own, not transformers': None, or a function that generate() calls once, when
                    every row is done, with the target's features [batch, prompt_len + max_new_tokens, hidden]
                    (each position's last-layer output before the final norm: what a draft head reads), slot
                    == position: row b's prompt without its padding, then its new tokens. Every position but
                    each row's last token holds its feature (the target never reads that token); the rest is
                    stale. A native target only. It changes nothing that generate() returns
    logits_processor, prefix_allowed_tokens_fn, repetition_penalty, no_repeat_ngram_size, bad_words_ids,
    suppress_tokens, min_length, min_new_tokens, min_p
                    as in transformers, in its order (specdec/processing.py): every position of a speculative round
                    is processed with the prefix plain decoding gives it, the draft's distribution too, and
                    acceptance compares the processed distributions. A processor must be a function of
                    (input_ids, scores) alone: it is called on sub-batches of rows with prefixes of one length,
                    on drafts that may be rejected, and more than once for a prefix. Ones that keep state across
                    calls (classifier-free guidance, Whisper's, Bark's, SynthID's) are refused
    grammar         structured output (specdec/grammar.py, on xgrammar): {"json_schema": schema (dict or JSON
                    text)}, {"json_object": True}, {"regex": pattern} or {"ebnf": grammar}; needs ``tokenizer``
                    and an EOS id (a row ends with it once the grammar is complete). Every position, the
                    draft's too, is masked to the tokens the grammar allows after its prefix; with
                    ``forced_drafts`` (the default) a row's grammar drafts: the tokens it forces (always
                    kept), then the text it forces, tokenized, which the target verifies (stats.forced_offered,
                    stats.forced: offered and kept)
    returns         [batch, prompt_len + new_tokens] as transformers lays it out (finished rows padded with
                    pad_token_id), or GenerateOutput(sequences, stats) with return_dict_in_generate=True

    Generation settings follow transformers' rule. An argument LEFT OUT takes the model's generation_config,
    and where that is None too, transformers' global default (max_length 20, do_sample False, temperature
    1.0, top_k 50, top_p 1.0). An explicit ``None`` means what it means to transformers, whatever the
    generation_config says:

    eos_token_id    None (or []): no EOS, every row runs to the length limit (never stops early)
    pad_token_id    None: finished rows are padded with the first EOS id (the generation_config's pad id is
                    ignored), and no attention mask is inferred from padding
    max_new_tokens  None: the length comes from max_length (the argument, else the generation_config's; it
                    counts the prompt's padded width), or where neither sets one, 20 new tokens (within the
                    model's max_position_embeddings), even where the generation_config sets max_new_tokens
    max_length      prompt_len + new tokens, used only where max_new_tokens is None (max_new_tokens wins, as in
                    transformers). None while max_new_tokens is None too: ValueError (transformers fails on it
                    with a TypeError)
    do_sample       None: greedy (transformers tests it for truth)
    temperature     None: 1.0 (no temperature)
    top_k           None (or 0): no top-k filter, even where the generation_config sets one
    top_p           None: 1.0 (no top-p filter)

    One difference, where transformers fails: eos_token_id=[] with pad_token_id=None raises IndexError there;
    here it generates (without an EOS no row finishes early, so no pad id is needed).
    """
    from specdec.models.loading import as_native  # models imports specdec: import at call time

    target = as_native(model, "model")
    eos, pad_token_id, input_ids, attention_mask, sampling, max_new_tokens = _settings(
        target, input_ids, attention_mask, eos_token_id, pad_token_id, do_sample, temperature, top_k, top_p, min_p,
        max_new_tokens, max_length)
    build = _processing(target.generation_config, input_ids, attention_mask.to(target.device), eos, dict(
        repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
        bad_words_ids=bad_words_ids, suppress_tokens=suppress_tokens, min_length=min_length,
        min_new_tokens=min_new_tokens), logits_processor, prefix_allowed_tokens_fn)
    masks = None
    if grammar is not None:
        compiled = compile_grammar(check_grammar(grammar, tokenizer, eos), tokenizer, target.vocab_size)
        masks = GrammarMasks([RowGrammar(compiled, eos) for _ in range(input_ids.shape[0])], target.vocab_size,
                             eos, tokenizer)
    draft_length(num_draft_tokens)
    proposer = make_proposer(draft_model, target)
    if masks is not None and forced_drafts:
        proposer = ForcedDrafts(proposer, masks)
    _check_feature_hook(feature_hook, target)
    if streamer is not None and input_ids.shape[0] != 1:
        raise ValueError(f"streamer needs batch size 1, got input_ids of shape {tuple(input_ids.shape)}")
    device = target.device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)

    batch, prompt_len = input_ids.shape
    prompt_lengths = attention_mask.sum(dim=1)  # [batch]
    # Compact each row (drop padding, keep order): slot == position in every cache.
    order = torch.sort(attention_mask, dim=1, descending=True, stable=True).indices
    capacity = prompt_len + max_new_tokens
    tokens = torch.zeros(batch, capacity + 1, dtype=torch.long, device=device)
    tokens[:, :prompt_len] = input_ids.gather(1, order)
    length = _draft_length(target, draft_model, num_draft_tokens, batch, sampling.greedy)
    state = DecodeState(
        tokens=tokens, num_tokens=prompt_lengths.clone(), prompt_lengths=prompt_lengths,
        active=torch.ones(batch, dtype=torch.bool, device=device), sampling=sampling, generator=generator,
        vocab_size=target.vocab_size, max_len=capacity + min(length.k, max_new_tokens) + 1,
        eos=torch.tensor(eos, dtype=torch.long, device=device), max_new_tokens=max_new_tokens,
        processing=Processing(input_ids, build, masks) if build or masks else None,
    )
    if streamer is not None:
        streamer.put(input_ids.cpu())
    start = time.perf_counter()
    _decode(target, proposer, state, length, streamer, feature_hook)
    if streamer is not None:
        streamer.end()
    state.stats.wall_seconds = time.perf_counter() - start

    generated = state.num_tokens - prompt_lengths  # [batch]
    j = torch.arange(int(generated.max()), device=device)
    new = state.tokens.gather(1, (prompt_lengths[:, None] + j).clamp(max=capacity))
    new = torch.where(j < generated[:, None], new, pad_token_id)
    sequences = torch.cat((input_ids, new), dim=1)
    return GenerateOutput(sequences, state.stats) if return_dict_in_generate else sequences


def _settings(target, input_ids, attention_mask, eos_token_id, pad_token_id, do_sample, temperature, top_k, top_p,
              min_p, max_new_tokens, max_length):
    """generate()'s settings, each resolved here, once: left out -> generation_config -> transformers' global
    default; an explicit None stays None and means what it means to transformers. Returns the EOS ids, the pad
    id, the checked input_ids and attention_mask, the SamplingConfig and max_new_tokens."""
    config = target.generation_config
    eos = token_ids("eos_token_id", _setting(config, "eos_token_id", eos_token_id))
    pad_token_id = _setting(config, "pad_token_id", pad_token_id)
    if pad_token_id is not None:
        ids = token_ids("pad_token_id", pad_token_id)
        if len(ids) != 1:
            raise ValueError(f"pad_token_id must be one token id >= 0 (or None), got pad_token_id={pad_token_id!r}")
        pad_token_id = ids[0]
    if pad_token_id is None:  # transformers: the first EOS id (none without an EOS: then no row ends early)
        pad_token_id = eos[0] if eos else None
    # transformers infers a mask from padding only where the pad id is not an EOS id
    input_ids, attention_mask = _check_inputs(
        input_ids, attention_mask, target, pad_token_id if pad_token_id is not None and pad_token_id not in eos
        else None)
    sampling = _sampling_config(config, do_sample, temperature, top_k, top_p, min_p)
    max_new_tokens = _max_new_tokens(config, max_new_tokens, max_length, input_ids.shape[1],
                                     getattr(getattr(target, "config", None), "max_position_embeddings", None))
    if pad_token_id is None:
        pad_token_id = 0  # (never written: every row runs to max_new_tokens)
    return eos, pad_token_id, input_ids, attention_mask, sampling, max_new_tokens


def _decode(target, proposer, state: DecodeState, length, streamer, feature_hook) -> None:
    """Speculative steps (plain ones without a proposer) until every row is done, into ``state``."""
    batch, prompt_lengths = state.tokens.shape[0], state.prompt_lengths
    with torch.inference_mode(), contextlib.ExitStack() as steady:
        for model in (target, getattr(proposer, "model", None)):  # native models' runners: weights stay put
            for runner in {id(m.runner): m.runner for m in _modules(model) if hasattr(m, "runner")}.values():
                steady.enter_context(runner.steady())
        head = needs_features(proposer)
        # (only then the keyword: a transformers-fallback target's cache has no features)
        features = {"features": True} if head or feature_hook is not None else {}
        cache = state.target_cache = target.new_cache(batch, state.max_len, **features)
        drafter = proposer.inner if isinstance(proposer, ForcedDrafts) else proposer
        while bool(state.active.any()):
            k = length.next(state.stats) if drafter is not None else 0
            if hasattr(target, "runner"):  # (a tensor-parallel target's ranks take rank 0's k)
                k = target.runner.agree(k)
            if head and state.stats.target_passes == 0:
                k = 0  # a draft head drafts from the target's features, which the prefill makes
            remaining = state.max_new_tokens - (state.num_tokens - prompt_lengths)
            num_drafts = torch.where(state.active, (remaining - 1).clamp(min=0, max=k), 0)  # [batch]
            counted = None
            if drafter is not proposer:  # the grammar's drafts ride along, as many as fit
                num_drafts, counted = proposer.prepare(state, num_drafts, torch.where(state.active, remaining - 1, 0),
                                                       k)
            emitted, num_accepted, num_drafts = speculative_step(target, cache, proposer, state, num_drafts,
                                                                 counted=counted)
            if counted is not None:
                proposer.settle(state, num_accepted)
            counts = commit(state, emitted, num_accepted, num_drafts, counted)
            if streamer is not None:
                streamer.put(emitted[0, : int(counts[0])].cpu())
        if feature_hook is not None:
            feature_hook(cache.features[:, :state.tokens.shape[1] - 1])


def _modules(model) -> list:
    return list(model.modules()) if isinstance(model, torch.nn.Module) else []


def _check_feature_hook(feature_hook, target) -> None:
    from specdec.models.llama import LlamaModel

    if feature_hook is not None and not callable(feature_hook):
        raise ValueError(f"feature_hook must be a function of the features, got feature_hook={feature_hook!r}")
    if feature_hook is not None and not isinstance(target, LlamaModel):
        raise ValueError("feature_hook reads the target's hidden states, which only a native model target "
                         f"provides; the target runs through {type(target).__name__}")


def _check_inputs(input_ids, attention_mask, target, infer_from_pad=None):
    """infer_from_pad: a pad id whose occurrences count as padding when no attention_mask is given
    (transformers' inference), or None"""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError("input_ids must be a LongTensor [batch, prompt_len], got "
                         f"{type(input_ids).__name__} {getattr(input_ids, 'shape', '')} "
                         f"{getattr(input_ids, 'dtype', '')}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids is empty: shape {tuple(input_ids.shape)}; a prompt needs at least one token")
    inferred = attention_mask is None and infer_from_pad is not None
    if attention_mask is None:
        attention_mask = (input_ids != infer_from_pad).long() if inferred else torch.ones_like(input_ids)
    attention_mask = torch.as_tensor(attention_mask, device=input_ids.device)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != "
                         f"input_ids shape {tuple(input_ids.shape)}")
    if bool(((attention_mask != 0) & (attention_mask != 1)).any()):
        raise ValueError("attention_mask must hold only 0 and 1")
    attention_mask = attention_mask.long()
    if bool((attention_mask.sum(dim=1) == 0).any()):
        if inferred:
            raise ValueError(f"input_ids: a row holds only pad_token_id={infer_from_pad}, which counts as padding "
                             "without an attention_mask (as in transformers): pass attention_mask")
        raise ValueError("attention_mask: a row has no token (empty prompt)")
    real = input_ids[attention_mask.bool()]
    bad = real[(real < 0) | (real >= target.vocab_size)]
    if bad.numel():
        raise ValueError(f"input_ids holds id {int(bad[0])} outside the vocabulary 0..{target.vocab_size - 1}")
    return input_ids, attention_mask


def _setting(config, name, value):
    """A generation setting as transformers resolves it: the argument where given (an explicit None included),
    else the generation_config's, else transformers' global default (None for the token ids)."""
    if value is not _UNSET:
        return value
    found = getattr(config, name, None)
    return GLOBAL_DEFAULTS.get(name) if found is None else found


def _sampling_config(config, do_sample, temperature, top_k, top_p, min_p):
    for name, default in UNSUPPORTED.items():
        value = getattr(config, name, None)
        if value not in (None, default):
            raise ValueError(f"generation_config.{name}={value!r} is not supported by specdec yet; set it to "
                             f"{default!r} (or None) to generate with the remaining settings")
    do_sample, temperature, top_k, top_p, min_p = (_setting(config, name, value) for name, value in (
        ("do_sample", do_sample), ("temperature", temperature), ("top_k", top_k), ("top_p", top_p),
        ("min_p", min_p)))
    # an explicit None: transformers skips that warper (and samples only where do_sample is true)
    sampling = SamplingConfig(bool(do_sample), 1.0 if temperature is None else temperature,
                              0 if top_k is None else top_k, 1.0 if top_p is None else top_p,
                              0.0 if min_p is None else min_p)
    # as transformers: the sampling knobs are validated always, but inert in greedy mode
    return sampling if sampling.do_sample else replace(sampling, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)


def _processing(config, input_ids, attention_mask, eos, settings: dict, logits_processor, prefix_allowed_tokens_fn):
    """The logits processors' settings resolved (left out -> generation_config; an explicit None: none) and
    checked, naming the argument; returns rows -> processors (specdec/processing.py) or None."""
    settings = {name: _setting(config, name, value) for name, value in settings.items()}
    penalty = settings["repetition_penalty"]
    if penalty is not None and (isinstance(penalty, bool) or not isinstance(penalty, (int, float))
                                or not math.isfinite(penalty) or penalty <= 0):
        raise ValueError(f"repetition_penalty must be a finite number > 0, got repetition_penalty={penalty!r}")
    for name in ("no_repeat_ngram_size", "min_length", "min_new_tokens"):
        if settings[name] is not None:
            integer(name, settings[name], 0)
    for name in ("bad_words_ids", "suppress_tokens"):
        settings[name] = _id_lists(name, settings[name], nested=name == "bad_words_ids")
    if prefix_allowed_tokens_fn is not None and not callable(prefix_allowed_tokens_fn):
        raise ValueError("prefix_allowed_tokens_fn must be a function (batch_id, input_ids) -> allowed ids, got "
                         f"prefix_allowed_tokens_fn={prefix_allowed_tokens_fn!r}")
    settings["prefix_allowed_tokens_fn"] = prefix_allowed_tokens_fn
    custom = check_processors(logits_processor, input_ids.shape[0])
    return processor_builder(settings, custom, attention_mask, eos)


def _id_lists(name, value, nested: bool):
    """bad_words_ids (lists of ids) or suppress_tokens (ids) as lists of ints >= 0; None stays None."""
    if value is None:
        return None
    try:
        lists = [list(x) for x in value] if nested else [list(value)]
        ok = all(lists) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for x in lists for i in x)
    except TypeError:
        ok = False
    if not ok:
        what = "a list of non-empty lists of token ids >= 0" if nested else "a list of token ids >= 0"
        raise ValueError(f"{name} must be {what}, got {name}={value!r}")
    return lists if nested else lists[0]


#: transformers' global defaults (``GenerationConfig._get_default_generation_params()``), which fill what a
#: model's generation_config leaves None; read from the installed transformers where it has them.
GLOBAL_DEFAULTS = {"max_length": 20, "do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0}
try:
    GLOBAL_DEFAULTS.update({k: v for k, v in GenerationConfig._get_default_generation_params().items()
                            if k in GLOBAL_DEFAULTS})
except AttributeError:  # an older transformers: its GenerationConfig() holds the defaults itself
    pass

#: generation_config fields that change what transformers generates and that specdec does not implement,
#: with their neutral values: a model that sets one is refused rather than silently generating otherwise.
UNSUPPORTED = {"begin_suppress_tokens": None, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
               "num_beams": 1, "forced_bos_token_id": None, "forced_eos_token_id": None, "sequence_bias": None,
               "encoder_repetition_penalty": 1.0, "length_penalty": 1.0, "top_h": None}


def _max_new_tokens(config, max_new_tokens, max_length, prompt_len, max_positions=None):
    """New tokens per row, by transformers' rule: max_new_tokens (the argument, else the generation_config's)
    wins; where it is None, max_length counts the prompt (the argument, else the generation_config's; where
    both leave it None, 20 new tokens, capped at max_position_embeddings)."""
    if max_length is not _UNSET and max_length is not None and (
            not isinstance(max_length, int) or isinstance(max_length, bool)):
        raise ValueError(f"max_length must be an integer, got max_length={max_length!r}")
    if max_new_tokens is _UNSET:
        max_new_tokens = getattr(config, "max_new_tokens", None)
    if max_new_tokens is None:
        if max_length is None:
            raise ValueError("max_length=None with max_new_tokens None sets no length limit (transformers fails on "
                             "it with a TypeError): leave max_length out or pass max_length or max_new_tokens")
        name = "max_length"
        if max_length is _UNSET:
            max_length, name = getattr(config, "max_length", None), "generation_config.max_length"
        if max_length is None:  # transformers' default: 20 new tokens, within the model's positions
            max_length = prompt_len + GLOBAL_DEFAULTS["max_length"]
            if max_positions is not None:
                max_length, name = min(max_length, max_positions), "max_position_embeddings"
        max_new_tokens = max_length - prompt_len
        if max_new_tokens < 1:
            raise ValueError(f"{name}={max_length} leaves no room after a prompt of {prompt_len} tokens; "
                             "pass max_new_tokens")
    integer("max_new_tokens", max_new_tokens)
    return max_new_tokens


def token_ids(name, value) -> list[int]:
    """An id setting (``eos_token_id``, ``pad_token_id``: an int, a list, a tensor or None) -> a list of ids;
    ValueError naming the setting for anything that is not ids >= 0. Shared with the engine."""
    if value is None:
        return []
    values = [value] if isinstance(value, int) else list(torch.as_tensor(value).flatten().tolist())
    if any((not isinstance(v, int)) or v < 0 for v in values):
        raise ValueError(f"{name} must be token ids >= 0, got {name}={value!r}")
    return values


def needs_features(proposer) -> bool:
    """Whether a proposer drafts from the target's last hidden states (a draft head): its target's cache must
    keep them, and it cannot draft in the pass that prefills the target, which makes the first of them."""
    return bool(getattr(proposer, "needs_features", False))


def make_proposer(draft_model, target):
    """What ``generate`` and the engine draft with: None (plain), a Proposer, or the proposer behind a name
    ("ngram", "self", "self-int8"), a draft head or a draft model (validated against the target)."""
    from specdec.models.head import DraftHead
    from specdec.models.llama import LlamaModel
    from specdec.models.loading import as_native
    from specdec.models.quantized import SELF_DRAFTS, self_draft

    if draft_model is None:
        return None
    if isinstance(draft_model, str):
        if draft_model == "ngram":
            return NGramProposer()
        if draft_model in SELF_DRAFTS:
            if not isinstance(target, LlamaModel):
                raise ValueError(f"draft_model={draft_model!r} quantizes a native model's own layers; the target "
                                 f"runs through {type(target).__name__}")
            return DraftModelProposer(self_draft(target, draft_model))
        raise ValueError(f"draft_model={draft_model!r} is not a known proposer (known: 'ngram', "
                         f"{', '.join(map(repr, SELF_DRAFTS))})")
    if hasattr(draft_model, "propose"):  # any Proposer, whatever else it is
        return draft_model
    if isinstance(draft_model, DraftHead):
        if not isinstance(target, LlamaModel):
            raise ValueError("a draft head reads the target's hidden states, which only a native model target "
                             f"provides; the target runs through {type(target).__name__}")
        return HeadProposer(draft_model, target)
    draft = as_native(draft_model, "draft_model")
    check_vocab(draft, target)
    if draft.device != target.device:
        raise ValueError(f"draft_model is on {draft.device} but the target is on {target.device}: move one of them")
    return DraftModelProposer(draft)


def check_vocab(draft, target) -> None:
    """Sizes may differ only by alignment padding of the embedding (e.g. 151936 vs 152064: both are the
    same tokenizer padded to a multiple of 64/128), and then the special ids must agree too (GPT-2's 50257
    against GPT-NeoX's 50304 looks like padding, but their EOS ids differ); anything else is another
    tokenizer."""
    draft_vocab, target_vocab = draft.vocab_size, target.vocab_size
    small, large = sorted((draft_vocab, target_vocab))
    if small == large:
        return
    padded = large % 64 == 0 and large - small < 1024 and small > 1024
    special = [(getattr(draft.config, n, None), getattr(target.config, n, None))
               for n in ("bos_token_id", "eos_token_id")]
    if padded and all(a == b for a, b in special):
        return
    raise ValueError(f"draft_model vocabulary size {draft_vocab} does not match the target's {target_vocab}"
                     + (f" (bos/eos ids differ: {special})" if padded else ""))
