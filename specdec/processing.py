"""Logits processors under speculation: each position processed with the prefix plain decoding gives it.

Plain decoding processes the logits of step t with the row's prefix at t: its prompt as the caller passed it
(left padding included), then its t new tokens. A speculative round holds several positions of a row at once:
position i of the verification pass follows the pending token and drafts 0..i-1, so it is processed with that
prefix, and so is the draft's own distribution at draft step i. Acceptance then compares the processed
distributions, which is what keeps speculation lossless with respect to the processed target.

transformers' processors see a batch of prefixes of one length: rows whose prefixes are as long go in one call
(plain decoding: every row, one call a step, as in transformers; a speculative round: rows with as many new
tokens). A processor is therefore called on sub-batches, on positions whose drafts may be rejected, and more
than once for the same prefix, so it must be a function of (input_ids, scores) alone. The ones that keep state
across calls or read a row's index in the batch are refused where that would change the output.
"""

from __future__ import annotations

import inspect

import torch
from transformers.generation import logits_process as lp

from specdec.grammar import masked

#: transformers' processors that keep state across calls or need a batch generate() does not make
#: (classifier-free guidance doubles it; Whisper's and Bark's read their model's own layout).
STATEFUL = tuple(getattr(lp, name) for name in (
    "UnbatchedClassifierFreeGuidanceLogitsProcessor", "ClassifierFreeGuidanceLogitsProcessor",
    "WhisperTimeStampLogitsProcessor", "WhisperNoSpeechDetection", "BarkEosPrioritizerLogitsProcessor",
    "AlternatingCodebooksLogitsProcessor", "SynthIDTextWatermarkLogitsProcessor",
    "DiaClassifierFreeGuidanceLogitsProcessor", "DiaEOSDelayPatternLogitsProcessor") if hasattr(lp, name))


class PrefixAllowed:
    """``prefix_allowed_tokens_fn(batch_id, input_ids) -> allowed ids`` as a processor of any sub-batch: it
    knows each row's index in the caller's batch (transformers' PrefixConstrainedLogitsProcessor takes the
    row's place in the call for it, which a sub-batch would change)."""

    def __init__(self, fn, batch_ids: list[int]):
        self.fn, self.batch_ids = fn, batch_ids

    def __call__(self, input_ids, scores):  # [rows, L], [rows, vocab] -> [rows, vocab]
        mask = torch.full_like(scores, -torch.inf)
        for row, (batch_id, prefix) in enumerate(zip(self.batch_ids, input_ids)):
            mask[row, self.fn(batch_id, prefix)] = 0  # (none allowed: every token -inf; transformers raises)
        processed = scores + mask
        # where every allowed token scores -inf, the allowed ones get 0 (transformers' rule)
        return torch.where(processed.amax(dim=-1, keepdim=True).isneginf(), mask, processed)


class Processing:
    """The target's logits processors and grammar of one generate() call, applied at any position of any row.

    prompt_ids  [batch, P] the prompt as the caller passed it (left padding included): what a processor sees
                before a row's new tokens
    build       rows -> the processors for those rows of the batch, in the order they run (the ones that read a
                row's batch index or padding are made for the rows at hand); None: no processors
    grammar     specdec/grammar.GrammarMasks, applied after the processors (before the sampling warpers); or None
    """

    def __init__(self, prompt_ids: torch.Tensor, build, grammar=None):
        self.prompt_ids, self.build, self.grammar = prompt_ids, build, grammar

    def __call__(self, scores: torch.Tensor, state, extra: torch.Tensor | None = None) -> torch.Tensor:
        """scores [batch, vocab] after each row's tokens (``state``: prompt, new tokens through the pending one)
        and then extra [batch, j] (the drafts before this position) -> processed scores [batch, vocab].
        Inactive rows come back as they were."""
        out = scores if self.build is None else self._processed(scores, state, extra)
        if self.grammar is not None:
            j = 0 if extra is None else extra.shape[1]
            out = masked(out, self.grammar.allowed(state, extra, j, j + 1)[:, 0])
        return out

    def positions(self, logits: torch.Tensor, state, drafts: torch.Tensor) -> torch.Tensor:
        """logits [batch, k + 1, vocab] of a verification pass: position i after drafts [batch, :i]."""
        if self.build is not None:
            logits = torch.stack([self._processed(logits[:, i], state, drafts[:, :i])
                                  for i in range(logits.shape[1])], dim=1)
        if self.grammar is not None:
            logits = masked(logits, self.grammar.allowed(state, drafts, 0, logits.shape[1]))
        return logits

    def _processed(self, scores, state, extra):
        """The processors alone (see __call__)."""
        j = 0 if extra is None else extra.shape[1]
        new = state.num_tokens - state.prompt_lengths + j  # [batch] new tokens in each row's prefix
        out = scores.clone()
        live = state.active.nonzero().flatten()  # [rows]
        lengths = new[live].tolist()
        for n in sorted(set(lengths)):
            rows = live[[i for i, m in enumerate(lengths) if m == n]]  # [g]
            ids = self._prefixes(rows, n, state, extra)  # [g, P + n]
            processed = scores[rows]  # (a copy: a processor may write into it)
            for processor in self.build(rows.tolist()):
                processed = processor(ids, processed)
            out[rows] = processed.to(out.dtype)
        return out

    def _prefixes(self, rows, n: int, state, extra) -> torch.Tensor:
        """The rows' prefixes with n new tokens each: prompt_ids, then state's new tokens, then extra.
        rows [g] -> input_ids [g, P + n]"""
        prompt = self.prompt_ids[rows]  # [g, P]
        m = torch.arange(n, device=prompt.device)  # [n]
        have = (state.num_tokens - state.prompt_lengths)[rows, None]  # [g, 1] new tokens in the history
        history = state.tokens[rows].gather(1, (state.prompt_lengths[rows, None] + m).clamp(
            max=state.tokens.shape[1] - 1))
        new = history
        if extra is not None and extra.shape[1] > 0:  # (-1: a row that stopped drafting; its result is unused)
            drafted = extra[rows].gather(1, (m - have).clamp(0, extra.shape[1] - 1)).clamp(min=0)
            new = torch.where(m < have, history, drafted)
        return torch.cat((prompt, new), dim=1)


class OpenAIPenalties:
    """OpenAI's frequency_penalty, presence_penalty and logit_bias for some rows: scores - frequency * count -
    presence * (count > 0) + bias, count [rows, vocab] how often each token occurs in input_ids (the engine
    passes a row's output alone, as OpenAI counts).

    frequency, presence [rows]; bias [rows, vocab]
    """

    def __init__(self, frequency: torch.Tensor, presence: torch.Tensor, bias: torch.Tensor):
        self.frequency, self.presence, self.bias = frequency[:, None], presence[:, None], bias

    def __call__(self, input_ids, scores):  # [rows, L], [rows, vocab] -> [rows, vocab]
        counts = torch.zeros_like(scores).scatter_add_(1, input_ids, torch.ones_like(input_ids, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0) + self.bias.to(scores.dtype)


def check_processors(processors, batch: int) -> list:
    """A user's ``logits_processor`` (transformers' LogitsProcessorList, or any sequence of callables) as a
    list; ValueError naming the one that cannot run under speculation."""
    if processors is None:
        return []
    if callable(processors) and not isinstance(processors, (list, tuple)):
        processors = [processors]
    processors = list(processors)
    for p in processors:
        if not callable(p):
            raise ValueError(f"logits_processor must hold callables (input_ids, scores) -> scores, got {p!r}")
        if isinstance(p, STATEFUL):
            raise ValueError(f"logits_processor {type(p).__name__} keeps state across calls or needs a batch "
                             "generate() does not make; specdec calls each processor once per position of a "
                             "speculative round, so it cannot run here")
        if isinstance(p, lp.PrefixConstrainedLogitsProcessor) and batch > 1:
            raise ValueError("logits_processor PrefixConstrainedLogitsProcessor reads a row's place in its call, "
                             "which sub-batches change: pass prefix_allowed_tokens_fn= instead")
        if isinstance(p, lp.RepetitionPenaltyLogitsProcessor) and isinstance(p.prompt_ignore_length, torch.Tensor):
            raise ValueError("logits_processor RepetitionPenaltyLogitsProcessor with a per-row prompt_ignore_length "
                             "reads a row's place in its call: pass repetition_penalty= instead")
    return processors


class ForRows:
    """A processor made for the rows at hand (it reads their batch indices or padding): make(rows) -> it."""

    def __init__(self, make):
        self.make = make


_REPETITION_KEEPS_PADDING = "prompt_ignore_length" in inspect.signature(
    lp.RepetitionPenaltyLogitsProcessor.__init__).parameters


def builder(settings: dict, custom: list, attention_mask: torch.Tensor, eos: list[int]):
    """rows -> the processors for those rows, as transformers' generate() builds them from ``settings``
    (repetition_penalty, no_repeat_ngram_size, bad_words_ids, min_length, min_new_tokens,
    prefix_allowed_tokens_fn, suppress_tokens, already resolved) in its order, a ``custom`` processor of the same
    type in the place of the built one and the others after them; None where nothing is to be done."""
    prompt_width = attention_mask.shape[1]
    padding = (attention_mask != 0).int().argmax(dim=1)  # [batch] left padding of each row
    device = attention_mask.device
    fixed = []  # (type, a processor for any rows, or rows -> processor)
    penalty = settings["repetition_penalty"]
    if penalty is not None and penalty != 1.0:
        kind = lp.RepetitionPenaltyLogitsProcessor
        if _REPETITION_KEEPS_PADDING:
            fixed.append((kind, ForRows(lambda rows: kind(float(penalty), prompt_ignore_length=padding[rows]))))
        else:
            fixed.append((kind, kind(float(penalty))))
    if settings["no_repeat_ngram_size"]:
        fixed.append((lp.NoRepeatNGramLogitsProcessor, lp.NoRepeatNGramLogitsProcessor(
            settings["no_repeat_ngram_size"])))
    if settings["bad_words_ids"] is not None:
        fixed.append((lp.NoBadWordsLogitsProcessor, lp.NoBadWordsLogitsProcessor(settings["bad_words_ids"],
                                                                                 eos or None)))
    if settings["min_length"] and eos:
        fixed.append((lp.MinLengthLogitsProcessor, lp.MinLengthLogitsProcessor(settings["min_length"], eos,
                                                                               device=device)))
    if settings["min_new_tokens"] and eos:
        fixed.append((lp.MinNewTokensLengthLogitsProcessor, lp.MinNewTokensLengthLogitsProcessor(
            prompt_width, settings["min_new_tokens"], eos, device=device)))
    fn = settings["prefix_allowed_tokens_fn"]
    if fn is not None:
        fixed.append((lp.PrefixConstrainedLogitsProcessor, ForRows(lambda rows: PrefixAllowed(fn, rows))))
    if settings["suppress_tokens"] is not None:
        fixed.append((lp.SuppressTokensLogitsProcessor, lp.SuppressTokensLogitsProcessor(
            settings["suppress_tokens"], device=device)))
    if not fixed and not custom:
        return None
    # transformers' merge: a custom processor of a built one's type takes its place; the other customs follow
    replaced = {type(c): c for c in custom}
    order = [replaced.get(kind, made) for kind, made in fixed] + [c for c in custom
                                                                  if type(c) not in {k for k, _ in fixed}]

    def build(rows: list[int]) -> list:
        return [p.make(rows) if isinstance(p, ForRows) else p for p in order]

    return build
