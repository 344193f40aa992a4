"""Structured output under speculation (specdec/grammar.py): constrained speculative output equals constrained
plain output, every finished row follows its grammar, forced tokens ride as free drafts."""

import json
import re
import string

import pytest
import torch
from conftest import perturbed_copy, tiny_head, tiny_model
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
    """101 tokens for the tiny models' 101 ids: <pad> <s> </s> (EOS = 2), the 95 printable ASCII characters,
    '"name"', 'true', 'false'; decoding concatenates them."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for piece in [*string.printable[:95], '"name"', "true", "false"]:
        vocab.setdefault(piece, len(vocab))
    assert len(vocab) == tiny_model("llama").config.vocab_size
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


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
    assert stats.forced > 5 and stats.accepted == stats.forced == stats.proposed
    assert stats.tokens_per_target_forward > 1.5
    assert "forced by the grammar" in str(stats)
    value = json.loads(_text(tokenizer, out.sequences[0], 3))  # it finishes: valid JSON of the schema
    assert set(value) == {"name", "ok", "tag"} and value["tag"] in ("ab", "cd")
    bare = specdec.generate(target, torch.tensor([[5, 6, 7]]), max_new_tokens=60, eos_token_id=2,
                            grammar={"json_schema": SCHEMA}, tokenizer=tokenizer, forced_drafts=False)
    assert torch.equal(out.sequences, bare)


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
    (dict(grammar={"regex": "a+"}, tokenizer=None), "tokenizer="),
    (dict(grammar={"regex": "a+"}, eos_token_id=None), "eos_token_id")])
def test_bad_grammars_are_refused_naming_the_argument(tokenizer, kwargs, match):
    target = tiny_model("llama")
    call = {"max_new_tokens": 4, "eos_token_id": 2, "tokenizer": tokenizer, **kwargs}
    with pytest.raises(ValueError, match=match):
        specdec.generate(target, torch.tensor([[5, 6]]), **call)
    assert specdec.generate(target, torch.tensor([[5, 6]]), max_new_tokens=2).shape == (1, 4)
