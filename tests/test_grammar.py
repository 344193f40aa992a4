"""Structured output under speculation (specdec/grammar.py): constrained speculative output equals constrained
plain output, every finished row follows its grammar, forced tokens ride as free drafts."""

import json
import re
import string

import pytest
import torch
from conftest import perturbed_copy, tiny_head, tiny_model, toy_tokenizer
from hypothesis import given
from hypothesis import strategies as st
from test_processing import RandomProposer

import specdec
from specdec.models.loading import as_native

SCHEMA = {"type": "object", "properties": {"name": {"type": "integer"}, "ok": {"type": "boolean"},
                                           "tag": {"type": "string", "enum": ["ab", "cd"]}},
          "required": ["name", "ok", "tag"]}


@pytest.fixture(scope="module")
def tokenizer():
    """The tests' 101-token tokenizer (tests/conftest.py): one character a token, '"name"', 'true', 'false'."""
    assert len(toy_tokenizer()) == tiny_model("llama").config.vocab_size
    return toy_tokenizer()


def _draft(kind, target):
    return {"none": lambda: None, "self": lambda: target, "perturbed": lambda: perturbed_copy("llama"),
            "ngram": lambda: "ngram", "head": lambda: tiny_head(as_native(target), seed=3),
            "random": lambda: RandomProposer(0)}[kind]()


def _text(tokenizer, row, width):
    ids = row[width:].tolist()
    return tokenizer.decode(ids[: ids.index(2)] if 2 in ids else ids)


@given(data=st.data())
def test_constrained_speculative_equals_constrained_plain_and_follows_the_schema(tokenizer, data):
    target = tiny_model("llama")
    batch = data.draw(st.integers(1, 3), label="batch")
    lengths = [data.draw(st.integers(1, 6)) for _ in range(batch)]
    width = max(lengths)
    ids = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, width - n:] = torch.tensor(data.draw(st.lists(st.integers(3, 100), min_size=n, max_size=n)))
        mask[b, width - n:] = 1
    kind = data.draw(st.sampled_from(["none", "self", "perturbed", "ngram", "head", "random"]), label="draft")
    k = data.draw(st.integers(1, 8), label="k")
    common = dict(max_new_tokens=60, eos_token_id=2, grammar={"json_schema": SCHEMA}, tokenizer=tokenizer)
    plain = specdec.generate(target, ids, mask, forced_drafts=False, **common)
    spec = specdec.generate(target, ids, mask, draft_model=_draft(kind, target), num_draft_tokens=k,
                            forced_drafts=data.draw(st.booleans(), label="forced"), **common)
    assert torch.equal(spec, plain)
    for row in spec:
        if 2 in row[width:].tolist():  # finished: valid JSON of the schema
            value = json.loads(_text(tokenizer, row, width))
            assert set(value) == {"name", "ok", "tag"} and value["tag"] in ("ab", "cd")


def test_forced_tokens_are_free_drafts_counted_in_the_stats(tokenizer):
    """Plain decoding under a schema: the keys, quotes and punctuation the schema fixes ride as drafts, all
    accepted, so a target pass yields more than one token."""
    target = tiny_model("llama")
    out = specdec.generate(target, torch.tensor([[5, 6, 7]]), max_new_tokens=60, eos_token_id=2,
                           grammar={"json_schema": SCHEMA}, tokenizer=tokenizer, return_dict_in_generate=True)
    stats = out.stats
    # every forced draft kept; none counts as the draft model's (there is none): the controller's alpha
    assert stats.forced > 5 and stats.forced_offered >= stats.forced and stats.proposed == stats.accepted == 0
    assert stats.tokens_per_target_forward > 1.5
    assert "grammar drafts offered / kept" in str(stats)
    assert set(stats.passes_by_k) <= {0}  # rounds with grammar drafts are not timed: no k a controller chose
    value = json.loads(_text(tokenizer, out.sequences[0], 3))  # it finishes: valid JSON of the schema
    assert set(value) == {"name", "ok", "tag"} and value["tag"] in ("ab", "cd")
    bare = specdec.generate(target, torch.tensor([[5, 6, 7]]), max_new_tokens=60, eos_token_id=2,
                            grammar={"json_schema": SCHEMA}, tokenizer=tokenizer, forced_drafts=False)
    assert torch.equal(out.sequences, bare)


def test_forced_text_is_a_draft_the_target_may_reject(tokenizer):
    """The text a schema forces ('{"name": ') is drafted a character a token; a target that writes the key as
    the one token '"name"' rejects the character drafts, and the output is plain decoding's all the same."""
    target = tiny_model("llama")
    key = tokenizer.convert_tokens_to_ids('"name"')

    def prefer_key(input_ids, scores):  # [rows, L], [rows, vocab]
        return scores + 100 * (torch.arange(scores.shape[-1]) == key)

    common = dict(max_new_tokens=40, eos_token_id=2, grammar={"json_schema": SCHEMA}, tokenizer=tokenizer,
                  logits_processor=[prefer_key])
    out = specdec.generate(target, torch.tensor([[5, 6, 7]]), return_dict_in_generate=True, **common)
    plain = specdec.generate(target, torch.tensor([[5, 6, 7]]), forced_drafts=False, **common)
    assert torch.equal(out.sequences, plain)
    assert key in plain[0].tolist() and out.stats.forced < out.stats.forced_offered


@pytest.mark.parametrize("grammar, fits", [({"regex": "(ab|c)+x"}, lambda t: re.fullmatch("(ab|c)+x", t)),
                                           ({"ebnf": 'root ::= "k" [0-9]+ ";"'}, lambda t: re.fullmatch("k[0-9]+;", t)),
                                           ({"json_object": True}, None)])
def test_regex_ebnf_and_any_json(tokenizer, grammar, fits):
    """The regex and EBNF rows finish (EOS) and match; any JSON: the tiny model never closes its object within
    40 tokens, so only spec == plain is checked there."""
    target = tiny_model("llama")
    ids = torch.tensor([[5, 6, 7]])
    out = specdec.generate(target, ids, max_new_tokens=40, eos_token_id=2, grammar=grammar, tokenizer=tokenizer,
                           draft_model=perturbed_copy("llama"), num_draft_tokens=3)
    plain = specdec.generate(target, ids, max_new_tokens=40, eos_token_id=2, grammar=grammar, tokenizer=tokenizer)
    assert torch.equal(out, plain)
    if fits is not None:
        assert 2 in out[0, 3:].tolist() and fits(_text(tokenizer, out[0], 3))


@pytest.mark.parametrize("kwargs, match", [
    (dict(grammar={"yaml": "x"}), "grammar must be one of"), (dict(grammar="{}"), "grammar must be one of"),
    (dict(grammar={"regex": "(ab"}), "grammar regex does not compile"),
    (dict(grammar={"json_schema": "{not json"}), "grammar json_schema does not compile"),
    (dict(grammar={"regex": 3}), "grammar regex must be text"),
    (dict(grammar={"json_object": False}), "json_object takes True"),
    (dict(grammar={"regex": "a+"}, tokenizer=None), "tokenizer="),
    (dict(grammar={"regex": "a+"}, eos_token_id=None), "eos_token_id")])
def test_bad_grammars_are_refused_naming_the_argument(tokenizer, kwargs, match):
    target = tiny_model("llama")
    call = {"max_new_tokens": 4, "eos_token_id": 2, "tokenizer": tokenizer, **kwargs}
    with pytest.raises(ValueError, match=match):
        specdec.generate(target, torch.tensor([[5, 6]]), **call)
    assert specdec.generate(target, torch.tensor([[5, 6]]), max_new_tokens=2).shape == (1, 4)


# ---------------------------------------------------------------------------------------------------------
# Random regular expressions, greedy: whatever the draft proposes (forbidden ids included), constrained
# speculative output is constrained plain output, and it follows the expression. The reference for "follows"
# is Python's re (``Language``: the expression's strings, enumerated), never xgrammar.
# ---------------------------------------------------------------------------------------------------------
import itertools  # noqa: E402

REGEX_ALPHABET = "abcx"  # one token each in the 101-token tokenizer; none of its longer tokens is made of them


class Language:
    """The strings of length <= ``longest`` over ``alphabet`` that ``pattern`` fully matches (Python's re, by
    enumeration) and all their prefixes."""

    def __init__(self, pattern: str, alphabet: str, longest: int):
        compiled = re.compile(pattern)
        words = ("".join(w) for n in range(longest + 1) for w in itertools.product(alphabet, repeat=n))
        self.strings = {w for w in words if compiled.fullmatch(w)}
        self.prefixes = {w[:i] for w in self.strings for i in range(len(w) + 1)}


def _regex_parts(parts):
    """(pattern, longest string's length) built from smaller ones: concatenation, alternation, ?, {m,n}."""
    pairs = st.tuples(parts, parts)
    return st.one_of(
        pairs.map(lambda p: (p[0][0] + p[1][0], p[0][1] + p[1][1])),  # xy
        pairs.map(lambda p: (f"({p[0][0]}|{p[1][0]})", max(p[0][1], p[1][1]))),  # (x|y)
        parts.map(lambda p: (f"({p[0]})?", p[1])),  # (x)?
        st.tuples(parts, st.integers(0, 2), st.integers(1, 2)).map(  # (x){m,n}, m <= 2, n - m <= 2
            lambda p: (f"({p[0][0]}){{{p[1]},{p[1] + p[2]}}}", (p[1] + p[2]) * p[0][1])))


#: (pattern, longest) of at most 5 letters or classes, whose strings have at most 8 characters
REGEXES = st.recursive(st.sampled_from([(c, 1) for c in REGEX_ALPHABET] + [("[ab]", 1), ("[cx]", 1)]),
                       _regex_parts, max_leaves=5).filter(lambda r: r[1] <= 8)


@given(data=st.data())
def test_random_regexes_speculative_equals_plain_and_rows_follow_the_regex(tokenizer, data):
    """Random small regular expressions, ragged prompts (batch 1..3), drafts that propose forbidden ids (random
    ids, a perturbed copy, n-gram lookup, the grammar's alone), k = 1..8, grammar drafts on or off: greedy
    constrained speculative output equals greedy constrained plain output; every finished row's text (before
    its EOS) fully matches the expression, every unfinished row's text is a prefix of a string that does."""
    pattern, longest = data.draw(REGEXES, label="regex")
    language = Language(pattern, REGEX_ALPHABET, longest)
    target = tiny_model("llama")
    lengths = data.draw(st.lists(st.integers(1, 6), min_size=1, max_size=3), label="prompt lengths")
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)  # [batch, width], left-padded
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, width - n:] = torch.tensor(data.draw(st.lists(st.integers(3, 100), min_size=n, max_size=n)))
        mask[b, width - n:] = 1
    kind = data.draw(st.sampled_from(["random", "perturbed", "ngram", "none"]), label="draft")
    draft = RandomProposer(data.draw(st.integers(0, 2**16))) if kind == "random" else _draft(kind, target)
    common = dict(max_new_tokens=data.draw(st.integers(1, longest + 2), label="max_new_tokens"), eos_token_id=2,
                  grammar={"regex": pattern}, tokenizer=tokenizer)
    plain = specdec.generate(target, ids, mask, forced_drafts=False, **common)
    k = data.draw(st.integers(1, 8), label="k")
    spec = specdec.generate(target, ids, mask, draft_model=draft, num_draft_tokens=k,
                            forced_drafts=data.draw(st.booleans(), label="grammar drafts"), **common)
    assert torch.equal(spec, plain)
    for row in spec:
        text = _text(tokenizer, row, width)
        if 2 in row[width:].tolist():
            assert re.fullmatch(pattern, text), (pattern, text)
        else:
            assert text in language.prefixes, (pattern, text)


# ---------------------------------------------------------------------------------------------------------
# Sampling under a grammar: constrained speculative sampling has the constrained target's distribution.
# The toy model of tests/test_sampling.py (7 ids) with a tokenizer of its own (TOY_PIECES: a to e, EOS, and
# "ab", a second way to write a then b) under TOY_REGEX = [cd][de]?ab[de]?: every position forbids some tokens
# (EOS until "ab" is written), "a" forces "b" and a last letter forces EOS, and after [cd][de] the grammar
# forces the text "ab", which the tokenizer writes as the token "ab": a grammar draft the target may reject
# (writing "a"). GRAMMAR_ROWS rows of one prompt go through one generate() call with max_new_tokens = new >=
# k + 2: the first pass verifies all k drafts, and the passes after it, inside the window, verify grammar
# drafts of some rows (beside the model drafts of others, with a draft model). The joint of the new tokens
# and each token's marginal are checked (tests/distribution.py: chi-square at a 1e-5 false alarm a table,
# 6 sigma a cell) against transformers' ancestral sampling of the toy with ``RegexMask``, a logits processor
# that reads the grammar from Python's re (neither xgrammar nor specdec/grammar.py), enumerated over every
# prefix.
# ---------------------------------------------------------------------------------------------------------
from distribution import bug, check, chi_square, noncentrality, power, reference_joint, rejects  # noqa: E402
from test_sampling import PROMPT, TOY_VOCAB, _sampled, _toy  # noqa: E402
from test_sampling import _draft as sampling_draft  # noqa: E402
from transformers import LogitsProcessor  # noqa: E402

TOY_PIECES = ["a", "b", "c", "d", "e", "</s>", "ab"]  # the toy's ids as text
TOY_EOS = 5
TOY_REGEX = "[cd][de]?ab[de]?"  # 18 strings of 3 to 5 letters: 2 to 5 tokens and EOS
GRAMMAR_ROWS = 50_000

GRAMMAR_CASES = {  # name: (draft kind, k, new tokens counted, warpers); grammar drafts on in every case
    # the draft model drafts both positions of the first pass (masked by the grammar); in the second, rows
    # at "[cd][de]a" and "[cd]ab[de]" take a forced "b" or EOS, rows at "[cd][de]" the draft "ab" (of 10,000
    # rows: ~3,800 grammar drafts, ~270 rejected), the others the model's
    "model-k2": ("model", 2, 5, {}),
    # one model draft a round: in the second, rows at "[cd][de]" (over half) take the grammar draft "ab"
    # beside the model's rows (draft_probs: sampled for those, one-hot for the grammar's; ~40% rejected);
    # top-3 after the grammar mask keeps 3 of the 4 tokens [cd] allows
    "model-k1-temperature-topk": ("model", 1, 4, dict(temperature=0.8, top_k=3)),
    # no draft model: the grammar's drafts alone (draft_probs None: one-hot; ~30% rejected)
    "grammar-drafts-only": ("plain", 1, 4, {}),
}


@pytest.fixture(scope="module")
def seven_tokenizer():
    """TOY_PIECES for the toy's 7 ids; encoding writes "ab" as one token (as a BPE merge would)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # (unk_token: never used; every text of a to e splits into known pieces)
    tok = Tokenizer(models.WordLevel({piece: i for i, piece in enumerate(TOY_PIECES)}, unk_token="</s>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("ab|."), "isolated")
    tok.decoder = decoders.Fuse()
    assert len(TOY_PIECES) == TOY_VOCAB
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")


class RegexMask(LogitsProcessor):
    """A grammar as a transformers logits processor: after a row's new tokens (past ``width`` prompt ids), -inf
    on every token whose text does not continue the row's text to a prefix of ``language``, and on EOS until
    the text is in it. Rows that ended (EOS) or left the language (prefixes of probability 0) are left as
    they are: every token masked would put NaN in the reference's products."""

    def __init__(self, language: Language, pieces: list[str], eos: int, width: int):
        self.language, self.pieces, self.eos, self.width = language, pieces, eos, width

    def __call__(self, input_ids, scores):  # [rows, width + new], [rows, vocab] -> [rows, vocab]
        out = scores.clone()
        for row, new in enumerate(input_ids[:, self.width:].tolist()):
            text = "".join(self.pieces[t] for t in new)
            if self.eos in new or text not in self.language.prefixes:
                continue
            allowed = torch.tensor([text + piece in self.language.prefixes for piece in self.pieces])  # [vocab]
            allowed[self.eos] = text in self.language.strings
            out[row] = out[row].masked_fill(~allowed, -torch.inf)
        return out


def _grammar_counts(case, tokenizer):
    kind, k, new, knobs = GRAMMAR_CASES[case]
    target = _toy(0)
    settings = {**knobs, "grammar": {"regex": TOY_REGEX}, "tokenizer": tokenizer, "forced_drafts": True}
    (counts,) = _sampled(target, sampling_draft(kind, target), k, settings, new, rows=GRAMMAR_ROWS, eos=TOY_EOS)
    return counts  # [8] * new


def _grammar_reference(case):
    _, _, new, knobs = GRAMMAR_CASES[case]
    mask = RegexMask(Language(TOY_REGEX, "abcde", 5), TOY_PIECES, TOY_EOS, len(PROMPT))
    return reference_joint(_toy(0), PROMPT, new, knobs, eos=TOY_EOS, processors=[mask])  # [8] * new


@pytest.mark.parametrize("case", list(GRAMMAR_CASES))
def test_constrained_sampling_has_the_constrained_targets_distribution(case, seven_tokenizer):
    """False alarm <= (new + 1) * 1e-5 a case (the joint and each token's marginal at 1e-5): 6e-5 for five
    tokens, 5e-5 for four; power: test_the_grammar_distribution_test_sees_a_shift_of_a_point_and_a_half."""
    check(_grammar_counts(case, seven_tokenizer), _grammar_reference(case))


def test_the_grammar_distribution_test_catches_grammar_drafts_without_their_draft_probs(seven_tokenizer,
                                                                                      monkeypatch):
    """SAMPLER_BUGS["grammar drafts without their one-hot draft_probs"]: a grammar draft sharing a round with
    model drafts gets draft probability 0, so the target keeps it whenever it allows it (after [cd][de]: "ab"
    always, where it should be ~60%, "a" never). Every output still follows the grammar, and greedy decoding
    never reads draft_probs, so neither the greedy tests nor the library's check that committed tokens follow
    the grammar can see it: the distribution test must."""
    import specdec.grammar as grammar
    import specdec.speculative as speculative

    mutated = bug("grammar drafts without their one-hot draft_probs", grammar)
    monkeypatch.setattr(speculative, "ForcedDrafts", mutated.ForcedDrafts)
    case = "model-k1-temperature-topk"
    assert rejects(_grammar_counts(case, seven_tokenizer), _grammar_reference(case))


def _marginal_shift_powers(probs: torch.Tensor, shift: float, rows: int) -> list[float]:
    """The power of each token's marginal test at ``rows`` rows against ``shift`` of probability moved from one
    outcome of that token to another, every ordered pair of possible outcomes; probs [8] * new."""
    powers = []
    for j in range(probs.dim()):
        marginal = probs.sum(dim=[d for d in range(probs.dim()) if d != j])  # [8]
        _, df = chi_square(rows * marginal, marginal)
        for a, b in itertools.permutations(marginal.nonzero().flatten().tolist(), 2):
            if marginal[a] >= shift:
                wrong = marginal.clone()
                wrong[a], wrong[b] = wrong[a] - shift, wrong[b] + shift
                powers.append(power(noncentrality(marginal, wrong, rows), df))
    return sorted(powers)


def test_the_grammar_distribution_test_sees_a_shift_of_a_point_and_a_half():
    """Power of ``check`` at GRAMMAR_ROWS, from the noncentral chi-square law of each token's marginal test (a
    lower bound: ``check`` fails when any of its tests does): 0.015 of probability moved between any two
    outcomes of one token is seen with power > 0.99 in every case; 0.01 moved, with power > 0.95 for half of
    the pairs or more (the hardest pairs, between two outcomes of 0.35 to 0.6 each: 0.53 to 0.56). And the cases
    are in play as described: every token has forbidden ids, "a" forces "b" (> 5% of the rows), EOS ends > 5%
    of the rows inside the window."""
    for case in GRAMMAR_CASES:
        probs = _grammar_reference(case)  # [8] * new
        marginals = [probs.sum(dim=[d for d in range(probs.dim()) if d != j]) for j in range(probs.dim())]
        assert all(bool((m[:TOY_VOCAB] == 0).any()) for m in marginals)
        forced = 0.0
        for j in range(probs.dim() - 1):
            pair = probs.sum(dim=[d for d in range(probs.dim()) if d not in (j, j + 1)])  # [8, 8] tokens j, j + 1
            assert pair[0].sum() == pair[0, 1]  # "a" is followed by "b" alone
            forced += float(pair[0, 1])
        assert forced > 0.05
        assert sum(float(m[TOY_EOS]) for m in marginals) > 0.05
        assert _marginal_shift_powers(probs, 0.015, GRAMMAR_ROWS)[0] > 0.99, case
        one_point = _marginal_shift_powers(probs, 0.01, GRAMMAR_ROWS)
        assert one_point[len(one_point) // 2] > 0.95, case


def test_a_grammar_left_with_no_token_ends_its_row_alone(tokenizer):
    """A schema whose string pattern nothing matches allows no token after the opening quote: the row ends
    there with EOS (the only way out), plain or with drafts. (Requests beside such a row, which generate()
    cannot hold as it takes one grammar for all rows, are test_engine's.)"""
    target = tiny_model("llama")
    dead = {"json_schema": {"type": "string", "pattern": "[^\\s\\S]"}}
    ids = torch.tensor([[5, 6, 7]])
    for draft in (None, perturbed_copy("llama")):
        out = specdec.generate(target, ids, max_new_tokens=10, eos_token_id=2, grammar=dead, tokenizer=tokenizer,
                               draft_model=draft, num_draft_tokens=3)
        assert out[0, 3:5].tolist() == [tokenizer.convert_tokens_to_ids('"'), 2]
