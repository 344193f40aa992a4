"""Logits processors under speculation: processed speculative output equals processed plain output, and both
equal transformers' generate() with the same processors (float64 tiny models)."""

import pytest
import torch
from conftest import VOCAB, perturbed_copy, tiny_head, tiny_model
from hypothesis import given
from hypothesis import strategies as st
from test_speculative import batches
from transformers import LogitsProcessor, LogitsProcessorList, RepetitionPenaltyLogitsProcessor
from transformers.generation.logits_process import UnbatchedClassifierFreeGuidanceLogitsProcessor

import specdec
from specdec.models.loading import as_native


class NextIdBoost(LogitsProcessor):
    """A user's processor: +3 to the id after the last token (reads the prefix, so a wrong one shows)."""

    def __call__(self, input_ids, scores):
        nxt = (input_ids[:, -1:] + 1) % scores.shape[-1]  # [rows, 1]
        return scores + 3.0 * (torch.arange(scores.shape[-1]) == nxt)


def allowed_by_parity(batch_id, prefix):
    """prefix_allowed_tokens_fn: even ids after an odd token, ids = batch_id mod 3 after an even one."""
    if int(prefix[-1]) % 2:
        return list(range(0, VOCAB, 2))
    return list(range(batch_id % 3, VOCAB, 3))


class RandomProposer:
    """Proposes random ids: forbidden ones (by the processors) included."""

    def __init__(self, seed):
        self.generator = torch.Generator().manual_seed(seed)

    def propose(self, state, k):
        return torch.randint(0, state.vocab_size, (state.batch_size, k), generator=self.generator), None


@st.composite
def processor_settings(draw, vocab):
    """A random combination of generate()'s processor arguments (some left out)."""
    out = {}
    if draw(st.booleans()):
        out["repetition_penalty"] = draw(st.sampled_from([0.7, 1.3, 2.0]))
    if draw(st.booleans()):
        out["no_repeat_ngram_size"] = draw(st.integers(1, 3))
    if draw(st.booleans()):
        words = st.lists(st.integers(3, vocab - 1), min_size=1, max_size=2)
        out["bad_words_ids"] = draw(st.lists(words, min_size=1, max_size=4))
    if draw(st.booleans()):
        out["suppress_tokens"] = draw(st.lists(st.integers(3, vocab - 1), min_size=1, max_size=5))
    if draw(st.booleans()):
        out["min_new_tokens"] = draw(st.integers(1, 6))
    if draw(st.booleans()):
        out["prefix_allowed_tokens_fn"] = allowed_by_parity
    if draw(st.booleans()):
        out["logits_processor"] = LogitsProcessorList([NextIdBoost()])
    return out


def _draft(kind, target):
    return {"self": lambda: target, "perturbed": lambda: perturbed_copy("llama"), "ngram": lambda: "ngram",
            "head": lambda: tiny_head(as_native(target), seed=3), "random": lambda: RandomProposer(0)}[kind]()


@given(data=st.data())
def test_processed_speculative_equals_processed_plain_equals_transformers(data):
    """Ragged batches, k = 1..8, every draft kind (a draft model that agrees, one that partly agrees, a head,
    n-gram lookup, random proposals the processors forbid), the processors in random combinations, EOS."""
    target = tiny_model("llama")
    ids, mask = data.draw(batches(target.config.vocab_size), label="prompts")
    knobs = data.draw(processor_settings(target.config.vocab_size), label="processors")
    k = data.draw(st.integers(1, 8), label="k")
    kind = data.draw(st.sampled_from(["self", "perturbed", "ngram", "head", "random"]), label="draft")
    eos = data.draw(st.sampled_from([2, 5, None]), label="eos")
    common = dict(max_new_tokens=data.draw(st.integers(1, 24), label="max_new_tokens"), eos_token_id=eos,
                  pad_token_id=0, **knobs)
    want = target.generate(ids, attention_mask=mask, do_sample=False, **common)
    common["eos_token_id"] = [] if eos is None else eos
    plain = specdec.generate(target, ids, mask, **common)
    spec = specdec.generate(target, ids, mask, draft_model=_draft(kind, target), num_draft_tokens=k, **common)
    assert torch.equal(plain, want)
    assert torch.equal(spec, want)


@pytest.mark.parametrize("k", [1, 4])
def test_the_draft_is_processed_as_the_target(k):
    """The target as its own draft, with processors that read the prefix: every draft is accepted only if
    each draft position is processed with the same prefix as the target's (greedy and sampled)."""
    target = tiny_model("llama")
    knobs = dict(repetition_penalty=2.0, no_repeat_ngram_size=2, logits_processor=[NextIdBoost()],
                 prefix_allowed_tokens_fn=allowed_by_parity)
    for sampled in (dict(do_sample=False), dict(do_sample=True, temperature=0.8, min_p=0.05)):
        out = specdec.generate(target, torch.tensor([[3, 4, 5, 6]]), max_new_tokens=24, eos_token_id=[],
                               draft_model=target, num_draft_tokens=k, return_dict_in_generate=True,
                               generator=torch.Generator().manual_seed(0), **knobs, **sampled)
        assert out.stats.acceptance_rate == 1.0, sampled


@given(data=st.data())
def test_outputs_keep_the_constraint_whatever_the_drafts(data):
    """Random allowed-token functions, random drafts (forbidden ids included), random k: every new token is
    one the function allowed after its prefix, and the output equals plain decoding."""
    target = tiny_model("llama")
    vocab = target.config.vocab_size
    ids, mask = data.draw(batches(vocab), label="prompts")
    seed = data.draw(st.integers(0, 2**16), label="constraint")

    def allowed(batch_id, prefix):  # a random set of 1..20 ids per (row, last token)
        g = torch.Generator().manual_seed(seed * 1000 + batch_id * 101 + int(prefix[-1]))
        return torch.randperm(vocab, generator=g)[: 1 + int(torch.randint(20, (1,), generator=g))].tolist()

    k = data.draw(st.integers(1, 8), label="k")
    sampled = data.draw(st.booleans(), label="sampled")
    common = dict(max_new_tokens=12, eos_token_id=[], prefix_allowed_tokens_fn=allowed, do_sample=sampled)
    spec = specdec.generate(target, ids, mask, draft_model=RandomProposer(seed), num_draft_tokens=k,
                            generator=torch.Generator().manual_seed(1), **common)
    width = ids.shape[1]
    for b in range(len(ids)):
        for t in range(width, spec.shape[1]):
            assert int(spec[b, t]) in allowed(b, spec[b, :t])
    if not sampled:
        assert torch.equal(spec, specdec.generate(target, ids, mask, **common))


def test_generation_config_processors_are_read_and_an_explicit_none_drops_them():
    import copy

    target = copy.deepcopy(tiny_model("llama"))
    target.generation_config.repetition_penalty = 3.0  # (Qwen2.5-Instruct ships 1.05)
    ids = torch.tensor([[3, 4, 5, 6]])
    want = target.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(specdec.generate(target, ids, max_new_tokens=12, draft_model="ngram"), want)
    bare = target.generate(ids, max_new_tokens=12, do_sample=False, repetition_penalty=None)
    assert torch.equal(specdec.generate(target, ids, max_new_tokens=12, repetition_penalty=None), bare)
    assert not torch.equal(want, bare)


@pytest.mark.parametrize("name, value", [
    ("repetition_penalty", 0.0), ("repetition_penalty", float("nan")), ("repetition_penalty", "2"),
    ("no_repeat_ngram_size", -1), ("no_repeat_ngram_size", 1.5), ("min_new_tokens", -2), ("min_length", "3"),
    ("bad_words_ids", [5]), ("bad_words_ids", [[]]), ("bad_words_ids", [[-1]]), ("suppress_tokens", [[5]]),
    ("suppress_tokens", 7), ("min_p", 1.5), ("prefix_allowed_tokens_fn", 3), ("logits_processor", [3])])
def test_bad_processor_arguments_are_refused_naming_them(name, value):
    with pytest.raises(ValueError, match=name):
        specdec.generate(tiny_model("llama"), torch.tensor([[3, 4]]), max_new_tokens=2, do_sample=True,
                         **{name: value})


def test_processors_that_keep_state_or_read_their_row_are_refused():
    target, ids = tiny_model("llama"), torch.tensor([[3, 4], [5, 6]])
    guidance = UnbatchedClassifierFreeGuidanceLogitsProcessor(1.5, target)
    with pytest.raises(ValueError, match="UnbatchedClassifierFreeGuidanceLogitsProcessor"):
        specdec.generate(target, ids, max_new_tokens=2, logits_processor=[guidance])
    per_row = RepetitionPenaltyLogitsProcessor(1.5, prompt_ignore_length=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="repetition_penalty="):
        specdec.generate(target, ids, max_new_tokens=2, logits_processor=[per_row])
    out = specdec.generate(target, ids, max_new_tokens=2)  # and nothing is left broken
    assert out.shape == (2, 4)


# Sampling: the distribution of processed speculative sampling is the processed target's. Each case draws
# N = 50,000 rows of the toy model (tests/test_sampling.py) and checks the joint of their first tokens and
# each token's marginal against transformers' own ancestral sampling with the same processors, enumerated
# (tests/distribution.py: chi-square at a 1e-5 false alarm a table plus a 6-sigma bound per cell). The
# companions below place the two ways speculation and processors go wrong and must be caught.
# ---------------------------------------------------------------------------------------------------------
from distribution import bug, check, reference_joint, rejects  # noqa: E402
from test_sampling import PROMPT, _new, _sampled, _toy  # noqa: E402
from test_sampling import _draft as sampling_draft  # noqa: E402
from transformers import NoBadWordsLogitsProcessor, SuppressTokensLogitsProcessor  # noqa: E402

SAMPLED_CASES = {  # name: (draft kind, k, warpers, generate()'s processor arguments, transformers' processors)
    "model-penalty-minp": ("model", 3, dict(temperature=0.9, min_p=0.05), dict(repetition_penalty=2.0),
                           lambda: [RepetitionPenaltyLogitsProcessor(2.0)]),
    "constant-penalty-custom": ("constant", 3, {}, dict(repetition_penalty=1.8, logits_processor=[NextIdBoost()]),
                                lambda: [RepetitionPenaltyLogitsProcessor(1.8), NextIdBoost()]),
    "head-badwords-suppress": ("head", 2, dict(temperature=1.3), dict(bad_words_ids=[[4]], suppress_tokens=[6]),
                               lambda: [NoBadWordsLogitsProcessor([[4]]), SuppressTokensLogitsProcessor([6])]),
    "ngram-penalty": ("ngram", 3, {}, dict(repetition_penalty=1.5), lambda: [RepetitionPenaltyLogitsProcessor(1.5)]),
    "plain-penalty-minp": ("plain", 1, dict(min_p=0.1), dict(repetition_penalty=2.0),
                           lambda: [RepetitionPenaltyLogitsProcessor(2.0)]),
}


def _processed_counts(case):
    kind, k, knobs, arguments, _ = SAMPLED_CASES[case]
    target = _toy(0)
    (counts,) = _sampled(target, sampling_draft(kind, target), k, {**knobs, **arguments}, _new(k))
    return counts


def _processed_reference(case):
    kind, k, knobs, _, processors = SAMPLED_CASES[case]
    return reference_joint(_toy(0), PROMPT, _new(k), knobs, processors=processors())


@pytest.mark.parametrize("case", list(SAMPLED_CASES))
def test_processed_sampling_has_the_processed_targets_distribution(case):
    """False alarm <= (new + 1) * 1e-5 a case."""
    check(_processed_counts(case), _processed_reference(case))


@pytest.mark.parametrize("name", ["processors see a draft position without the drafts before it",
                                  "acceptance on the unprocessed target distribution"])
def test_the_distribution_test_catches_processors_applied_wrongly(name, monkeypatch):
    import specdec.processing as processing
    import specdec.speculative as speculative

    monkeypatch.setattr(speculative, "Processing", bug(name, processing).Processing)
    assert rejects(_processed_counts("model-penalty-minp"), _processed_reference("model-penalty-minp"))
