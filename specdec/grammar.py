"""Structured output: a grammar (JSON schema, any JSON, a regular expression, EBNF) constrains what a row may
emit, on xgrammar's matchers (the engine chosen by measurement: bench/RESULTS.md, "Structured output").

A row's matcher follows its committed tokens (it is advanced lazily, whenever a mask is asked for, by the
tokens committed since). A speculative round asks for masks along the drafts: the matcher accepts them one by
one, filling a mask at each position, and rolls back to the committed state afterwards, the way the KV cache
rolls back rejected drafts. Where the grammar allows exactly one token it is known without any model: a
**forced draft**, offered to the target (probability 1 under the constrained target, so always accepted) and
counted in the statistics (``SpecStats.forced``).
"""

from __future__ import annotations

import functools
import json
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
    if form != "json_object" and not isinstance(value, str):
        raise ValueError(f"grammar {form} must be text, got grammar={grammar!r}")
    return {form: value}


@functools.lru_cache(maxsize=8)
def _compiler(tokenizer, vocab_size: int):
    import xgrammar as xgr

    return xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size))


def compile_grammar(grammar: dict, tokenizer, vocab_size: int):
    """The compiled grammar; ValueError naming ``grammar`` for text xgrammar cannot compile."""
    compiler = _compiler(tokenizer, vocab_size)
    form, value = next(iter(grammar.items()))
    try:
        if form == "json_schema":  # fixed separators, no free whitespace: a model cannot pad forever, and
            return compiler.compile_json_schema(value, any_whitespace=False)  # keys and punctuation are forced
        if form == "json_object":
            return compiler.compile_builtin_json_grammar()
        if form == "regex":
            return compiler.compile_regex(value)
        return compiler.compile_grammar(value)
    except (RuntimeError, ValueError) as err:  # xgrammar's message says where the text is wrong
        raise ValueError(f"grammar {form} does not compile: {err}") from None


class GrammarMasks:
    """One matcher per row of a generate() call: the tokens each position of a row may take.

    compiled    xgrammar's compiled grammar; eos [n] the ids that end a row (the grammar's stop tokens)
    """

    def __init__(self, compiled, batch: int, vocab_size: int, eos: list[int]):
        import xgrammar as xgr

        self.matchers = [xgr.GrammarMatcher(compiled, override_stop_tokens=eos) for _ in range(batch)]
        self.consumed = [0] * batch  # new tokens each matcher has accepted
        # each row's mask at its committed state: a round asks for it up to three times (its forced run, the
        # draft's first step, the verification's first position)
        self.committed: list[torch.Tensor | None] = [None] * batch
        self.vocab_size = vocab_size
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)  # [1, ceil(vocab / 32)] int32
        self.bits = torch.arange(32, dtype=torch.int32)

    def allowed(self, state, drafts: torch.Tensor | None, start: int, stop: int) -> torch.Tensor:
        """Positions start..stop-1 of every active row, position i after the row's tokens and drafts[:, :i]:
        returns allowed [batch, stop - start, vocab] bool. A position after a draft the grammar forbids (the
        target rejects that draft) allows everything: it is never used."""
        batch = state.batch_size
        out = torch.ones(batch, stop - start, self.vocab_size, dtype=torch.bool)
        rows = drafts.tolist() if drafts is not None else [[]] * batch
        for b in state.active.nonzero().flatten().tolist():
            matcher = self._synced(b, state)
            taken = 0
            for i in range(stop):
                if i >= start and not matcher.is_terminated():  # (after an EOS draft: the row ends there)
                    out[b, i - start] = self._mask(matcher) if taken else self._committed(b, matcher)
                if i == stop - 1 or i >= len(rows[b]) or not matcher.accept_token(max(rows[b][i], 0)):
                    break
                taken += 1
            matcher.rollback(taken)
        return out.to(state.tokens.device)

    def forced(self, state, limit: int) -> list[list[int]]:
        """Each active row's run of forced tokens (the grammar allows exactly one), up to ``limit``."""
        runs = [[] for _ in range(state.batch_size)]
        for b in state.active.nonzero().flatten().tolist():
            matcher = self._synced(b, state)
            while len(runs[b]) < limit and not matcher.is_terminated():
                ids = (self._mask(matcher) if runs[b] else self._committed(b, matcher)).nonzero().flatten()
                if len(ids) != 1 or not matcher.accept_token(int(ids[0])):
                    break
                runs[b].append(int(ids[0]))
            matcher.rollback(len(runs[b]))
        return runs

    def _synced(self, b: int, state):
        """Row b's matcher, advanced over the tokens committed since it last saw the row."""
        matcher = self.matchers[b]
        start, have = int(state.prompt_lengths[b]), int(state.num_tokens[b] - state.prompt_lengths[b])
        if have == self.consumed[b]:
            return matcher
        for token in state.tokens[b, start + self.consumed[b]: start + have].tolist():
            if not matcher.accept_token(token):
                raise RuntimeError(f"row {b} committed token {token}, which its grammar forbids")
        self.consumed[b], self.committed[b] = have, None
        return matcher

    def _committed(self, b: int, matcher) -> torch.Tensor:
        """Row b's mask at its committed state (the matcher must be there)."""
        if self.committed[b] is None:
            self.committed[b] = self._mask(matcher)
        return self.committed[b]

    def _mask(self, matcher) -> torch.Tensor:
        """allowed [vocab] bool at the matcher's state."""
        matcher.fill_next_token_bitmask(self.bitmask, 0)
        bits = (self.bitmask[0, :, None] >> self.bits) & 1  # [words, 32]
        return bits.reshape(-1)[: self.vocab_size].bool()


class ForcedDrafts:
    """A proposer: each row's forced tokens (``GrammarMasks.forced``, found by ``prepare`` before the round)
    as its drafts; rows without any draft from ``inner`` (another proposer, or None: no drafts)."""

    def __init__(self, inner, grammar: GrammarMasks):
        self.inner, self.grammar, self.runs = inner, grammar, []
        self.model = getattr(inner, "model", None)  # (the runner's steady() and the engine look for it)
        self.needs_features = bool(getattr(inner, "needs_features", False))

    def prepare(self, state, limits: torch.Tensor) -> torch.Tensor:
        """Find this round's forced runs, row b's up to limits[b]; returns their lengths [batch]."""
        runs = self.grammar.forced(state, MAX_FORCED)
        self.runs = [run[: max(limit, 0)] for run, limit in zip(runs, limits.tolist())]
        return torch.tensor([len(r) for r in self.runs], device=limits.device)

    def propose(self, state, k: int):
        forced = torch.tensor([len(r) > 0 for r in self.runs], device=state.tokens.device) & state.active
        drafts = torch.full((state.batch_size, k), -1, dtype=torch.long, device=state.tokens.device)
        probs = None
        others = state.active & ~forced
        if self.inner is not None and bool(others.any()):
            drafts, probs = self.inner.propose(replace(state, active=others), k)
            drafts = drafts.masked_fill(forced[:, None], -1)
        for b in forced.nonzero().flatten().tolist():
            run = self.runs[b][:k]
            drafts[b, : len(run)] = torch.tensor(run)
            state.stats.forced += len(run)
            if probs is not None:  # one-hot: a forced token's draft distribution (padding positions: unused)
                probs[b] = 0
                probs[b, torch.arange(len(run)), torch.tensor(run)] = 1
        return drafts, probs
