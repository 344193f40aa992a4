"""Left out vs explicit None: generate()'s settings resolve as transformers' model.generate() resolves them.

An argument left out takes the model's generation_config (and where that is None, transformers' global default);
an explicit None means what it means to transformers (eos_token_id=None: never stop; top_k=None: no top-k; ...).
Each case runs against transformers itself, greedy token for token, plain and speculative.
"""

import inspect
import warnings

import pytest
import torch
from conftest import perturbed_copy, tiny_model

import specdec
import specdec.speculative

PROMPT_LENGTHS = [5, 2, 7]
DRAFTS = ["plain", "draft", "ngram"]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():  # transformers warns about its default max_length and the like
        warnings.simplefilter("ignore")
        yield


def _left_padded(lengths, vocab, seed=0):
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, width - n:] = torch.randint(3, vocab, (n,), generator=gen)
        mask[b, width - n:] = 1
    return ids, mask


def _draft(name):
    return {"plain": None, "draft": perturbed_copy("llama"), "ngram": "ngram"}[name]


def _both(hf, ids, draft, **kwargs):
    """(specdec's output, transformers') for the same arguments; specdec with a fixed k (deterministic)."""
    got = specdec.generate(hf, ids, draft_model=_draft(draft), num_draft_tokens=3, **kwargs)
    return got, hf.generate(ids, **kwargs)


@pytest.fixture
def hf(monkeypatch):
    """The tiny float64 Llama whose generation_config each test may change (restored afterwards), with EOS set
    to a token that greedy decoding emits early in row 0 of the ragged batch (and not in every row)."""
    model = tiny_model("llama")
    perturbed_copy("llama")  # (made, and cached, from the target as it is, before its generation_config changes)
    config = model.generation_config
    for name in ("max_new_tokens", "max_length", "temperature", "top_k", "top_p", "do_sample", "eos_token_id",
                 "pad_token_id"):
        monkeypatch.setattr(config, name, getattr(config, name))  # restored after the test
    ids, mask = _left_padded(PROMPT_LENGTHS, model.config.vocab_size)
    free = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, eos_token_id=[])
    new = free[:, ids.shape[1]:]
    eos = int(new[0, 2])  # row 0 stops after 3 tokens
    assert eos not in new[1].tolist() or eos not in new[2].tolist(), "the test wants rows of different lengths"
    config.eos_token_id = eos
    assert config.pad_token_id == 0 and config.max_new_tokens is None and config.max_length is None
    return model


def test_left_out_arguments_default_to_a_sentinel_that_says_so():
    parameters = inspect.signature(specdec.generate).parameters
    for name in ("eos_token_id", "pad_token_id", "max_new_tokens", "max_length", "do_sample", "temperature", "top_k",
                 "top_p"):
        assert parameters[name].default is specdec.speculative._UNSET
    assert "generation_config" in repr(specdec.speculative._UNSET)


@pytest.mark.parametrize("draft", DRAFTS)
def test_eos_left_out_stops_and_eos_none_never_stops(hf, draft):
    ids, mask = _left_padded(PROMPT_LENGTHS, hf.config.vocab_size)
    eos = hf.generation_config.eos_token_id
    got, want = _both(hf, ids, draft, attention_mask=mask, max_new_tokens=12)
    assert torch.equal(got, want)
    row0 = got[0, ids.shape[1]:].tolist()
    assert row0[2] == eos and set(row0[3:]) == {0}  # stopped at the EOS, then padded with the pad id
    got_none, want_none = _both(hf, ids, draft, attention_mask=mask, max_new_tokens=12, eos_token_id=None)
    assert torch.equal(got_none, want_none)
    assert got_none.shape[1] == ids.shape[1] + 12 and 0 not in got_none[0, ids.shape[1]:].tolist()  # ran on


@pytest.mark.parametrize("draft", DRAFTS)
def test_pad_left_out_is_the_configs_and_pad_none_is_the_first_eos(hf, draft):
    ids, mask = _left_padded(PROMPT_LENGTHS, hf.config.vocab_size)
    eos = hf.generation_config.eos_token_id
    got, want = _both(hf, ids, draft, attention_mask=mask, max_new_tokens=10)
    assert torch.equal(got, want)
    got_none, want_none = _both(hf, ids, draft, attention_mask=mask, max_new_tokens=10, pad_token_id=None)
    assert torch.equal(got_none, want_none)
    assert got[0, ids.shape[1] + 3:].eq(0).all() and got_none[0, ids.shape[1] + 3:].eq(eos).all()
    # no EOS and no pad at all: every row runs to the limit (transformers needs no pad id either)
    got_neither, want_neither = _both(hf, ids, draft, attention_mask=mask, max_new_tokens=10, eos_token_id=None,
                                      pad_token_id=None)
    assert torch.equal(got_neither, want_neither)


@pytest.mark.parametrize("draft", ["plain", "ngram"])
def test_without_a_mask_the_pad_id_masks_the_prompt_as_in_transformers(hf, draft):
    """transformers infers the attention mask from a set pad id (that is no EOS id); pad_token_id=None turns
    the pad id into the first EOS id and so infers nothing."""
    ids = torch.tensor([[0, 0, 5, 6, 7], [3, 4, 5, 6, 7]])
    got, want = _both(hf, ids, draft, max_new_tokens=8, eos_token_id=[])
    assert torch.equal(got, want)
    masked = specdec.generate(hf, ids, attention_mask=(ids != 0).long(), max_new_tokens=8, eos_token_id=[])
    assert torch.equal(got, masked)
    got_none, want_none = _both(hf, ids, draft, max_new_tokens=8, pad_token_id=None)
    assert torch.equal(got_none, want_none)
    unmasked = specdec.generate(hf, ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, pad_token_id=None)
    assert torch.equal(got_none, unmasked) and not torch.equal(got_none[0], got[0])
    with pytest.raises(ValueError, match="pad_token_id"):  # a prompt of padding only: nothing to condition on
        specdec.generate(hf, torch.tensor([[0, 0], [3, 4]]), max_new_tokens=2)


@pytest.mark.parametrize("draft", DRAFTS)
def test_max_new_tokens_left_out_is_the_configs_and_none_falls_back_to_max_length(hf, draft):
    ids, mask = _left_padded(PROMPT_LENGTHS, hf.config.vocab_size)
    width = ids.shape[1]
    hf.generation_config.eos_token_id = None  # lengths alone decide
    hf.generation_config.max_new_tokens = 6
    got, want = _both(hf, ids, draft, attention_mask=mask)
    assert torch.equal(got, want) and got.shape[1] == width + 6
    got, want = _both(hf, ids, draft, attention_mask=mask, max_new_tokens=None)  # the default 20
    assert torch.equal(got, want) and got.shape[1] == width + 20
    got, want = _both(hf, ids, draft, attention_mask=mask, max_length=width + 4)  # max_new_tokens wins
    assert torch.equal(got, want) and got.shape[1] == width + 6
    got, want = _both(hf, ids, draft, attention_mask=mask, max_new_tokens=None, max_length=width + 4)
    assert torch.equal(got, want) and got.shape[1] == width + 4
    hf.generation_config.max_length = width + 9  # counts the prompt's padded width
    got, want = _both(hf, ids, draft, attention_mask=mask, max_new_tokens=None)
    assert torch.equal(got, want) and got.shape[1] == width + 9
    hf.generation_config.max_new_tokens = None
    got, want = _both(hf, ids, draft, attention_mask=mask)
    assert torch.equal(got, want) and got.shape[1] == width + 9
    got, want = _both(hf, ids, draft, attention_mask=mask, max_length=None, max_new_tokens=5)  # harmless here
    assert torch.equal(got, want) and got.shape[1] == width + 5


def test_the_default_length_stops_at_max_position_embeddings(hf):
    hf.generation_config.eos_token_id = None
    ids = torch.randint(3, hf.config.vocab_size, (1, hf.config.max_position_embeddings - 5),
                        generator=torch.Generator().manual_seed(0))
    got, want = _both(hf, ids, "plain")
    assert torch.equal(got, want) and got.shape[1] == hf.config.max_position_embeddings  # 5 new, not 20
    with pytest.raises(ValueError, match="max_position_embeddings"):
        specdec.generate(hf, torch.full((1, hf.config.max_position_embeddings), 3))


def test_bad_lengths_name_the_argument(hf):
    ids = torch.tensor([[3, 4, 5]])
    # max_length=None with no max_new_tokens leaves no limit: transformers fails on it (a TypeError); so do we
    with pytest.raises((TypeError, ValueError)):
        hf.generate(ids, max_length=None)
    with pytest.raises(ValueError, match="max_length"):
        specdec.generate(hf, ids, max_length=None)
    with pytest.raises(ValueError, match="max_length=3"):
        specdec.generate(hf, ids, max_length=3)
    with pytest.raises(ValueError, match="max_length='8'"):
        specdec.generate(hf, ids, max_length="8")
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        specdec.generate(hf, ids, max_new_tokens=0)
    with pytest.raises(ValueError, match="pad_token_id"):
        specdec.generate(hf, ids, max_new_tokens=2, pad_token_id=[])
    hf.generation_config.max_length = 2
    with pytest.raises(ValueError, match="generation_config.max_length=2"):
        specdec.generate(hf, ids)


@pytest.mark.parametrize("draft", DRAFTS)
def test_do_sample_none_is_greedy_even_where_the_config_samples(hf, draft):
    ids, mask = _left_padded(PROMPT_LENGTHS, hf.config.vocab_size)
    hf.generation_config.do_sample = True
    got, want = _both(hf, ids, draft, attention_mask=mask, max_new_tokens=10, do_sample=None)
    assert torch.equal(got, want)
    assert torch.equal(got, hf.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False))


#: (generation_config settings, explicit arguments): sampled, each compared with transformers' warpers
SAMPLING = [
    (dict(), dict()),  # transformers' global default top_k 50
    (dict(), dict(top_k=None)),
    (dict(temperature=0.7, top_k=5, top_p=0.6), dict()),
    (dict(temperature=0.7, top_k=5, top_p=0.6), dict(top_k=None)),
    (dict(temperature=0.7, top_k=5, top_p=0.6), dict(top_k=0)),
    (dict(temperature=0.7, top_k=5, top_p=0.6), dict(top_p=None)),
    (dict(temperature=0.7, top_k=5, top_p=0.6), dict(temperature=None)),
    (dict(temperature=0.7, top_k=5, top_p=0.6), dict(temperature=None, top_k=None, top_p=None)),
    (dict(temperature=0.7, top_k=60, top_p=0.5), dict(top_k=3)),
]


@pytest.mark.parametrize("draft", ["plain", "draft"])
@pytest.mark.parametrize("settings,arguments", SAMPLING, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_sampling_settings_resolve_to_transformers_warpers(hf, monkeypatch, draft, settings, arguments):
    """The distribution specdec samples from (the SamplingConfig its verifier gets, applied to the target's
    logits) is the one transformers' warpers make of the same logits: the same kept tokens, the same scores."""
    seen = []
    verify = specdec.speculative.verify

    def recording(drafts, draft_probs, logits, num_drafts, sampling, generator=None):
        seen.append(sampling)
        return verify(drafts, draft_probs, logits, num_drafts, sampling, generator)

    monkeypatch.setattr(specdec.speculative, "verify", recording)
    hf.generation_config.do_sample = True
    for name, value in settings.items():
        setattr(hf.generation_config, name, value)
    ids = torch.tensor([[3, 4, 5, 6]])
    specdec.generate(hf, ids, draft_model=_draft(draft), num_draft_tokens=2, max_new_tokens=3,
                     generator=torch.Generator().manual_seed(0), **arguments)
    assert seen and all(s == seen[0] for s in seen) and not seen[0].greedy
    out = hf.generate(ids, max_new_tokens=1, output_scores=True, output_logits=True, return_dict_in_generate=True,
                      **arguments)
    want, logits = out.scores[0], out.logits[0]  # [1, vocab]: after transformers' warpers, and before
    got = seen[0].warp(logits)
    kept = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), kept)
    assert torch.allclose(got[kept], want[kept], rtol=1e-12, atol=0)
    if "top_k" in arguments and arguments["top_k"] is None:
        assert seen[0].top_k == 0  # no top-k at all, whatever the generation_config says
