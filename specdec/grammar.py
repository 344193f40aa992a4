"""Structured output: a grammar (JSON schema, any JSON object, a regular expression, EBNF) constrains what a
row may emit, on xgrammar's matchers (the engine chosen by measurement: bench/RESULTS.md, "Structured output").

A row's matcher follows its committed tokens (it is advanced lazily, whenever a mask is asked for, by the
tokens committed since). A speculative round asks for masks along the drafts: the matcher accepts them one by
one, filling a mask at each position, and rolls back to the committed state afterwards, the way the KV cache
rolls back rejected drafts.

The grammar also drafts (``ForcedDrafts``): where it allows exactly one token, that token is known without any
model and always accepted (probability 1 under the constrained target); where it fixes a text but not its
tokens (a BPE vocabulary writes `", "country": "` several ways), the text is tokenized as the tokenizer writes
it and offered as drafts the target verifies like any other. ``SpecStats.forced_offered`` / ``forced`` count
these drafts offered and kept, apart from the draft model's acceptance.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import replace

import torch

FORMS = ("json_schema", "json_object", "regex", "ebnf")
MAX_FORCED = 16  # forced drafts a row offers in one round, at most


def check_grammar(grammar, tokenizer, eos: list[int]) -> dict:
    """``grammar`` as {form: value} with one of FORMS; ValueError naming the argument otherwise."""
    if not isinstance(grammar, dict) or len(grammar) != 1 or next(iter(grammar)) not in FORMS:
        raise ValueError("grammar must be one of {'json_schema': schema (a dict or its JSON text)}, "
                         "{'json_object': True}, {'regex': pattern}, {'ebnf': grammar text}; got "
                         f"grammar={grammar!r}")
    if tokenizer is None:
        raise ValueError("grammar needs the model's tokenizer: pass tokenizer=")
    if not eos:
        raise ValueError("grammar ends a row with an EOS id when the grammar is complete: eos_token_id must "
                         "name one (got none)")
    try:
        import xgrammar  # noqa: F401
    except ImportError:
        raise ImportError('grammar= needs xgrammar: pip install "specdec[grammar]"') from None
    form, value = next(iter(grammar.items()))
    if form == "json_schema" and isinstance(value, dict):
        value = json.dumps(value)
    if form == "json_object" and value is not True:
        raise ValueError(f"grammar json_object takes True, got grammar={grammar!r}")
    if form != "json_object" and not isinstance(value, str):
        raise ValueError(f"grammar {form} must be text, got grammar={grammar!r}")
    return {form: value}


COMPILED_CACHE_BYTES = 256 * 2**20  # compiled grammars a compiler keeps (a server meets many schemas)


@functools.lru_cache(maxsize=8)
def _compiler(tokenizer, vocab_size: int):
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
    return xgr.GrammarCompiler(info, cache_limit_bytes=COMPILED_CACHE_BYTES)


def compile_grammar(grammar: dict, tokenizer, vocab_size: int):
    """The compiled grammar; ValueError naming ``grammar`` for text xgrammar cannot compile."""
    compiler = _compiler(tokenizer, vocab_size)
    form, value = next(iter(grammar.items()))
    try:
        if form == "json_schema":  # fixed separators, no free whitespace: a model cannot pad forever, and
            return compiler.compile_json_schema(value, any_whitespace=False)  # keys and punctuation are forced
        if form == "json_object":  # (a JSON object, written as a schema's are)
            return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
        if form == "regex":
            return compiler.compile_regex(value)
        return compiler.compile_grammar(value)
    except (RuntimeError, ValueError) as err:  # xgrammar's message says where the text is wrong
        why = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", str(err))  # (less its log prefix: time, C++ source)
        raise ValueError(f"grammar {form} does not compile: {why}") from None


def masked(logits: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """logits [..., vocab] with the tokens a mask forbids at -inf; bits [..., words] int32 (GrammarMasks), bit
    t of word w standing for token 32 w + t (xgrammar's layout)."""
    shifts = torch.arange(32, dtype=torch.int32, device=bits.device)
    allowed = ((bits[..., None] >> shifts) & 1).flatten(-2)[..., : logits.shape[-1]]  # [..., vocab]
    return logits.masked_fill(allowed == 0, -torch.inf)


def single_token(bits: torch.Tensor) -> int | None:
    """The one token a mask [words] allows, or None where it allows several (or none)."""
    words = bits.nonzero().flatten()
    if len(words) != 1:
        return None
    word = int(bits[words[0]]) & 0xFFFFFFFF
    return None if word & (word - 1) else int(words[0]) * 32 + word.bit_length() - 1


@functools.lru_cache(maxsize=4096)
def forced_tokens(tokenizer, last: int, text: str) -> tuple[int, ...]:
    """The forced ``text`` as ``tokenizer`` writes it after token ``last``: the tokens of last's text + text
    after the first, where that first one is ``last`` itself. None where the tokenizer would have written
    last otherwise: the text goes on with a word that last began in other pieces than the tokenizer's, as
    when the mask steers a model into an enum value (on SmolLM2's tool-call prompt, drafts of such text were
    kept 29 times of 68 offered, bench/RESULTS.md, and a rejected run costs a longer verification pass). A
    SentencePiece tokenizer, which writes a word's first piece with its space, offers none after a piece
    inside a word either."""
    ids = tokenizer.encode(tokenizer.decode([last]) + text, add_special_tokens=False)
    return tuple(ids[1:]) if ids[:1] == [last] else ()


class RowGrammar:
    """One row's matcher, following the row's committed tokens: a generate() row or an engine request.

    compiled    xgrammar's compiled grammar; eos [n] the ids that end a row (the grammar's stop tokens)
    """

    def __init__(self, compiled, eos: list[int]):
        import xgrammar as xgr

        self.matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=eos)
        self.words = (compiled.tokenizer_info.vocab_size + 31) // 32
        self.consumed = 0  # new tokens the matcher has accepted
        # the mask at the committed state: a round asks for it up to three times (its forced run, the draft's
        # first step, the verification's first position)
        self.committed: torch.Tensor | None = None

    def sync(self, new_tokens: torch.Tensor):
        """The matcher, advanced over the row's new tokens [n] it has not seen (all of them: it keeps count)."""
        if len(new_tokens) == self.consumed:
            return self.matcher
        for token in new_tokens[self.consumed:].tolist():
            if not self.matcher.accept_token(token):
                raise RuntimeError(f"a row committed token {token}, which its grammar forbids")
        self.consumed, self.committed = len(new_tokens), None
        return self.matcher

    def at_committed(self) -> torch.Tensor:
        """The mask [words] at the committed state (the matcher must be there)."""
        if self.committed is None:
            self.committed = self.fill()
        return self.committed

    def fill(self) -> torch.Tensor:
        """The mask [words] at the matcher's state."""
        bits = torch.empty(1, self.words, dtype=torch.int32)
        self.matcher.fill_next_token_bitmask(bits, 0)
        return bits[0]


class GrammarMasks:
    """The grammars of a batch's rows: the tokens each position of a row may take.

    rows        [batch] each row's RowGrammar, or None for a row without a grammar
    tokenizer   the model's: text the grammar forces is tokenized with it into drafts (``forced``)
    """

    def __init__(self, rows: list[RowGrammar | None], vocab_size: int, eos: list[int], tokenizer=None):
        self.rows, self.words = rows, (vocab_size + 31) // 32
        self.tokenizer = tokenizer
        # a grammar left with no token it allows (a pattern nothing matches; a character the vocabulary cannot
        # write) ends its row with an EOS id: the row stops there, the others go on
        self.eos_bits = torch.zeros(self.words, dtype=torch.int64)
        for token in eos:
            self.eos_bits[token // 32] |= 1 << (token % 32)
        self.eos_bits = self.eos_bits.to(torch.int32)  # (bit 31 wraps to the sign, as in xgrammar's words)

    def allowed(self, state, drafts: torch.Tensor | None, start: int, stop: int) -> torch.Tensor:
        """Positions start..stop-1 of every active row, position i after the row's tokens and drafts[:, :i]:
        returns their masks, bits [batch, stop - start, words] int32 (``masked`` applies them). A position
        after a draft the grammar forbids (the target rejects that draft) allows everything: it is never used."""
        n = stop - start
        bits = torch.full((state.batch_size, n, self.words), -1, dtype=torch.int32)
        flat = bits.view(-1, self.words)  # [batch * n, words]: xgrammar fills a row of a 2-d mask
        rows = drafts.tolist() if drafts is not None else [[]] * state.batch_size
        for b, matcher in self._synced(state):
            row, taken = self.rows[b], 0
            for i in range(stop):
                if matcher.is_terminated():  # (after an EOS draft: the row ends there)
                    break
                if i >= start and taken:
                    matcher.fill_next_token_bitmask(flat, b * n + i - start)
                elif i >= start:
                    flat[b * n + i - start] = row.at_committed()
                if i == stop - 1 or i >= len(rows[b]) or not matcher.accept_token(max(rows[b][i], 0)):
                    break
                taken += 1
            matcher.rollback(taken)
        bits[(bits == 0).all(dim=-1)] = self.eos_bits  # (a dead end: see __init__)
        return bits.to(state.tokens.device)

    def forced(self, state, limit: int) -> list[list[int]]:
        """Each active row's drafts from its grammar, up to ``limit``: the run of tokens it forces (the only
        one it allows, each), then the text it forces from there, tokenized as the tokenizer writes it, as far
        as the grammar accepts those tokens (several tokenizations of a text are allowed, so these are
        drafts to verify)."""
        runs = [[] for _ in range(state.batch_size)]
        lasts = state.tokens.gather(1, (state.num_tokens - 1).clamp(min=0)[:, None]).flatten().tolist()  # [batch]
        for b, matcher in self._synced(state):
            run = []
            while len(run) < limit and not matcher.is_terminated():
                token = single_token(self.rows[b].fill() if run else self.rows[b].at_committed())
                if token is None or not matcher.accept_token(token):
                    break
                run.append(token)
            last = run[-1] if run else lasts[b]
            if len(run) < limit and not matcher.is_terminated() and self.tokenizer is not None:
                text = matcher.find_jump_forward_string()
                for token in (forced_tokens(self.tokenizer, last, text) if text else ())[: limit - len(run)]:
                    if not matcher.accept_token(token):
                        break
                    run.append(token)
            matcher.rollback(len(run))
            runs[b] = run
        return runs

    def _synced(self, state) -> list:
        """(b, matcher) of every active row with a grammar, its matcher advanced over the tokens committed since
        it last saw the row (the rows' lengths read in one transfer)."""
        starts, stops, active = state.prompt_lengths.tolist(), state.num_tokens.tolist(), state.active.tolist()
        return [(b, self.rows[b].sync(state.tokens[b, starts[b]:stops[b]])) for b in range(state.batch_size)
                if active[b] and self.rows[b] is not None]


class ForcedDrafts:
    """A proposer: each row's drafts from its grammar (``GrammarMasks.forced``, found by ``prepare`` before
    the round) where it has some; the other rows' from ``inner`` (another proposer, or None: no drafts).
    ``settle`` counts, after the round, the grammar's drafts the target kept (``SpecStats.forced``).

    A row with grammar drafts takes them alone. Handing a draft head the grammar's tokens as its first steps,
    to draft on from there in the same round, was measured slower on SmolLM2's structured prompts (2-core AMD
    EPYC, 2026-12-07, decode tokens/s a prompt: 122-194 against 125-243 without; bench/RESULTS.md): feeding
    the head a token costs a head step, more than the drafts after them bring."""

    def __init__(self, inner, grammar: GrammarMasks):
        self.inner, self.grammar, self.runs, self.k = inner, grammar, [], 0
        self.model = getattr(inner, "model", None)  # (the runner's steady() and the engine look for it)
        self.needs_features = bool(getattr(inner, "needs_features", False))

    def prepare(self, state, num_drafts: torch.Tensor, limits: torch.Tensor, k: int):
        """Find this round's grammar drafts, row b's up to limits[b]; k: the drafts inner makes a row. Returns
        the drafts each row takes [batch] (its grammar's where it has some, else num_drafts[b]) and counted
        [batch]: the rows drafting with inner, whose acceptance is the draft model's (``speculative_step``)."""
        runs = self.grammar.forced(state, MAX_FORCED)
        self.runs = [run[: max(limit, 0)] for run, limit in zip(runs, limits.tolist())]
        self.k = k
        lengths = torch.tensor([len(r) for r in self.runs], device=num_drafts.device)
        return torch.where(lengths > 0, lengths, num_drafts), lengths == 0

    def propose(self, state, k: int):
        forced = torch.tensor([len(r) > 0 for r in self.runs], device=state.tokens.device) & state.active
        drafts = torch.full((state.batch_size, k), -1, dtype=torch.long, device=state.tokens.device)
        probs = None
        others = state.active & ~forced
        if self.inner is not None and self.k > 0 and bool(others.any()):  # (k: the longest run; inner's is less)
            inner, inner_probs = self.inner.propose(replace(state, active=others), min(k, self.k))
            drafts[:, : inner.shape[1]] = inner.masked_fill(forced[:, None], -1)
            if inner_probs is not None:
                probs = inner_probs.new_zeros(state.batch_size, k, state.vocab_size)
                probs[:, : inner.shape[1]] = inner_probs
        for b in forced.nonzero().flatten().tolist():
            run = self.runs[b] = self.runs[b][:k]
            drafts[b, : len(run)] = torch.tensor(run)
            state.stats.forced_offered += len(run)
            if probs is not None:  # one-hot: a fixed draft's distribution (padding positions: unused)
                probs[b] = 0
                probs[b, torch.arange(len(run)), torch.tensor(run)] = 1
        return drafts, probs

    def settle(self, state, num_accepted: torch.Tensor) -> None:
        """After the round: count the grammar's drafts kept, num_accepted [batch] as ``verify`` gives it."""
        kept = [min(len(run), n) for run, n in zip(self.runs, num_accepted.tolist())]
        state.stats.forced += sum(kept)
