"""The feature-conditioned draft head: exact greedy output, lossless sampling, a cache that is only kept where
it was fed the target's features, save/load, and clear errors."""

import pytest
import torch
from conftest import tiny_head, tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st
from distribution import check, reference_joint
from test_sampling import ALL, PROMPT, _sampled, _toy
from test_speculative import batches

import specdec
from specdec.kernels import cpu_linear
from specdec.models.head import DraftHead
from specdec.models.loading import as_native
from specdec.models.loading import load_draft
from specdec.proposers import HeadProposer
from specdec.sampling import SamplingConfig


@pytest.mark.parametrize("arch", ["llama", "smollm2", "qwen2"])
@given(data=st.data())
def test_greedy_with_a_head_equals_plain(arch, data):
    target = tiny_model(arch)
    vocab = target.config.vocab_size
    ids, mask = data.draw(batches(vocab), label="prompts")
    k = data.draw(st.integers(1, 8), label="k")
    max_new = data.draw(st.integers(1, 30), label="max_new_tokens")
    kept = data.draw(st.sampled_from([None, list(range(0, vocab, 2))]), label="kept ids")
    head = tiny_head(target, kept, seed=data.draw(st.integers(0, 3), label="seed"))
    plain = specdec.generate(target, ids, attention_mask=mask, max_new_tokens=max_new, eos_token_id=[2])
    spec = specdec.generate(target, ids, attention_mask=mask, max_new_tokens=max_new, eos_token_id=[2],
                            draft_model=head, num_draft_tokens=k)
    assert torch.equal(spec, plain)


class CheckedHeadProposer(HeadProposer):
    """Asserts that the drafts from the cached, rolled-back head equal a head run from scratch over the whole
    history with the target's features; then hands the verifier the target's own continuation for a varying
    number of positions (a random head is rarely right), so rounds end after 0..k accepted drafts."""

    def __init__(self, head, target, truth):
        super().__init__(head, target)
        self.truth, self.calls = truth, 0  # truth [1, L] the plain greedy output

    def propose(self, state, k):
        drafts, probs = super().propose(state, k)
        if (drafts < 0).all():
            return drafts, probs
        self.calls += 1
        n = int(state.num_tokens[0])
        head, embed = self.head, self.embed
        cache = head.new_cache(1, state.max_len)
        ids = state.tokens[:1, :n]
        target_features = state.target_cache.features_at(torch.arange(n - 1)[None])  # [1, n - 1, hidden]
        features = torch.cat((torch.zeros_like(target_features[:, :1]), target_features), dim=1)
        positions = torch.arange(n)[None]
        want = []
        for _ in range(k):
            logits = head(embed(ids), features, positions, cache)[:, -1]
            want.append(int(head.vocab_ids[logits.argmax(-1)]))
            features = cache.features_at(positions[:, -1:])
            ids, positions = torch.tensor([[want[-1]]]), positions[:, -1:] + 1
        assert drafts[0].tolist() == want
        right = self.truth[0, n:n + k]
        good = self.calls % (k + 1)  # this round: the first `good` drafts are right, the next one wrong
        forced = torch.where(torch.arange(len(right)) < good, right, (right + 1) % state.vocab_size)
        drafts = drafts.clone()
        drafts[0, :len(right)] = forced
        return drafts, probs


@pytest.mark.parametrize("k", [1, 2, 5])
def test_the_heads_cache_holds_only_what_the_targets_features_made(k):
    target = tiny_model("llama")
    ids = torch.tensor([[3, 17, 5, 40, 9]])
    plain = specdec.generate(target, ids, max_new_tokens=40, eos_token_id=[])
    proposer = CheckedHeadProposer(tiny_head(target, seed=1), as_native(target), plain)
    out = specdec.generate(target, ids, max_new_tokens=40, eos_token_id=[], draft_model=proposer,
                           num_draft_tokens=k, return_dict_in_generate=True)
    assert torch.equal(out.sequences, plain)
    assert proposer.calls >= 40 // (k + 1)  # every round after the prefill was checked
    assert set(out.stats.accepted_at) != {0}  # rounds ended after partial acceptance too


@pytest.mark.parametrize("block_size", [1, 3, 16])
def test_in_the_engine_the_paged_head_drafts_as_from_scratch(block_size):
    """The same check through the engine: the target's features and the head's cache live in paged pools."""
    from specdec import Engine, RequestParams

    target = tiny_model("llama")
    prompt = [3, 17, 5, 40, 9]
    plain = specdec.generate(target, torch.tensor([prompt]), max_new_tokens=30, eos_token_id=[])
    proposer = CheckedHeadProposer(tiny_head(target, seed=1), as_native(target), plain)
    engine = Engine(target, proposer, num_draft_tokens=3, max_num_seqs=2, kv_blocks=64, block_size=block_size,
                    eos_token_id=[])
    engine.add_request(prompt, RequestParams(max_new_tokens=30), "r")
    tokens = []
    while engine.has_unfinished():
        tokens += [t for out in engine.step() for t in out.new_token_ids]
    assert tokens == plain[0, len(prompt):].tolist()
    assert proposer.calls >= 30 // 4 and set(engine.stats.accepted_at) != {0}
    assert engine.pool.num_used == 0 and engine.draft_pool.num_used == 0


class RecordingHeadProposer(HeadProposer):
    """Keeps every round's drafts."""

    def __init__(self, head, target):
        super().__init__(head, target)
        self.drafts = []

    def propose(self, state, k):
        drafts, probs = super().propose(state, k)
        self.drafts.append(drafts.clone())
        return drafts, probs


def _drafts_both_ways(run):
    """run(proposer_factory) with the head's steps in one C call, then in the Python loop: (the two outputs,
    the two proposers' drafts, how often the one call ran)."""
    from specdec.kernels import cpu_head
    from specdec.kernels.cpu_runner import CpuRunner

    calls, results = [], []
    one_call = cpu_head.head_drafts
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu_head, "head_drafts", lambda *a, **kw: calls.append(1) or one_call(*a, **kw))
        for flag in (True, False):  # (the target's layers too: the same kernels, the same bits either way)
            patch.setattr(CpuRunner, "one_call", flag)
            results.append(run())
    (out_c, c), (out_py, py) = results
    return (out_c, out_py), (c.drafts, py.drafts), len(calls)


needs_kernels = pytest.mark.skipif(not cpu_linear.available(), reason="no AVX-512 CPU or no C compiler")


@needs_kernels
@pytest.mark.parametrize("arch", ["smollm2", "qwen2"])  # (qwen2: a q/k/v bias)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("quantize", [None, "int8"])
@settings(max_examples=6, deadline=None)
@given(data=st.data())
def test_the_heads_steps_in_one_call_draft_as_its_python_loop(arch, dtype, quantize, data):
    """Greedy drafting runs the head's k steps in one C call (kernels/cpu_head.c): the same drafts as the
    Python loop over the same kernels, bit for bit, every round of a ragged batch; output == plain."""
    target = tiny_model(arch, dtype)
    ids, mask = data.draw(batches(target.config.vocab_size), label="prompts")
    k = data.draw(st.integers(1, 6), label="k")
    head = tiny_head(target, list(range(0, target.config.vocab_size, 3)), seed=data.draw(st.integers(0, 3)))
    if quantize:
        head = specdec.quantize(head, quantize)
    plain = specdec.generate(target, ids, attention_mask=mask, max_new_tokens=20, eos_token_id=[2])

    def run():
        proposer = RecordingHeadProposer(head, as_native(target))
        out = specdec.generate(target, ids, attention_mask=mask, max_new_tokens=20, eos_token_id=[2],
                               draft_model=proposer, num_draft_tokens=k)
        return out, proposer

    outs, (one_call, looped), calls = _drafts_both_ways(run)
    assert calls == len(one_call) > 0
    assert len(one_call) == len(looped) and all(torch.equal(a, b) for a, b in zip(one_call, looped))
    assert torch.equal(outs[0], plain) and torch.equal(outs[1], plain)


@needs_kernels
@pytest.mark.parametrize("block_size", [1, 4])
def test_in_the_engine_the_heads_one_call_drafts_as_its_python_loop(block_size):
    """The same through the engine's paged pools, requests joining and leaving (batch 1 to 3)."""
    from specdec import Engine, RequestParams

    target = tiny_model("smollm2", torch.float32)
    head = tiny_head(target, seed=2)
    prompts = {"a": [3, 17, 5, 40, 9], "b": [8, 8, 30], "c": [50, 4, 4, 4, 61, 7, 12]}

    def run():
        proposer = RecordingHeadProposer(head, as_native(target))
        engine = Engine(target, proposer, num_draft_tokens=4, max_num_seqs=3, kv_blocks=64, block_size=block_size,
                        eos_token_id=[])
        out = {}
        for i, (name, prompt) in enumerate(prompts.items()):
            engine.add_request(prompt, RequestParams(max_new_tokens=12 + 6 * i), name)
            for _ in range(2):
                for o in engine.step():
                    out.setdefault(o.request_id, []).extend(o.new_token_ids)
        while engine.has_unfinished():
            for o in engine.step():
                out.setdefault(o.request_id, []).extend(o.new_token_ids)
        return out, proposer

    outs, (one_call, looped), calls = _drafts_both_ways(run)
    assert calls == len(one_call) > 0 and outs[0] == outs[1]
    assert len(one_call) == len(looped) and all(torch.equal(a, b) for a, b in zip(one_call, looped))
    for name, prompt in prompts.items():
        plain = specdec.generate(target, torch.tensor([prompt]), max_new_tokens=len(outs[0][name]), eos_token_id=[])
        assert outs[0][name] == plain[0, len(prompt):].tolist()


@needs_kernels
def test_the_one_call_refuses_ids_past_the_targets_embedding():
    """C reads the embedding row of each id it drafts: ids changed in place after the proposer checked them
    are refused with a clear error, not read past the table."""
    target = tiny_model("llama", torch.float32)
    head = tiny_head(target, list(range(0, 90, 2)), seed=1)
    proposer = HeadProposer(head, as_native(target))
    ids = torch.tensor([[3, 17, 5, 40, 9]])
    specdec.generate(target, ids, max_new_tokens=4, draft_model=proposer, num_draft_tokens=2)  # fine
    with torch.no_grad():
        head.vocab_ids[-1] = target.config.vocab_size
    with pytest.raises(ValueError, match="outside the target's embedding"):
        specdec.generate(target, ids, max_new_tokens=4, draft_model=proposer, num_draft_tokens=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_rope_table_holds_each_steps_bits(dtype):
    """The one-call drafts read RoPE from a table of the model's angles at every position: its rows are what a
    step computes for its own positions."""
    model = as_native(tiny_model("smollm2", torch.float32))
    cos, sin = model.rope(torch.arange(3000)[None], dtype)
    positions = torch.tensor([[0, 1, 2, 997], [2047, 2048, 2999, -1]])
    step_cos, step_sin = model.rope(positions, dtype)
    rows = positions.clamp(min=0)
    assert torch.equal(step_cos, cos[0, rows]) and torch.equal(step_sin, sin[0, rows])


def _toy_head(target, seed):
    head = tiny_head(target, kept=[0, 1, 3, 4, 6], seed=seed)  # ids 2 and 5 are never proposed
    with torch.no_grad():
        head.body.model.embed_tokens.weight.mul_(2.0)
    return head


@pytest.mark.parametrize("k", [1, 2])
def test_sampling_with_a_head_matches_the_targets_distribution(k):
    """The chi-square and 6-sigma tests of tests/distribution.py (false alarm 1e-5; their power and
    companions: test_sampling). With 3 new tokens the head drafts once per row (it has no features before the
    prefill), so this covers its sampled first draft over the kept ids; later drafts go through the same lines."""
    target = _toy(0)
    out = specdec.generate(target, torch.tensor([PROMPT]), max_new_tokens=3, eos_token_id=[], do_sample=True,
                           draft_model=_toy_head(target, 2), num_draft_tokens=k, generator=torch.Generator(),
                           return_dict_in_generate=True, **ALL)
    assert out.stats.proposed > 0  # the head drafted (after the prefill)
    (counts,) = _sampled(target, _toy_head(target, 2), k, ALL, 3)
    check(counts, reference_joint(target, PROMPT, 3, ALL))


def test_save_and_load_round_trip(tmp_path):
    target = tiny_model("smollm2")
    head = tiny_head(target, kept=[0, 5, 7, 9, 50], seed=3)
    head.save(tmp_path / "head")
    loaded = DraftHead.load(tmp_path / "head", dtype=torch.float64)
    assert torch.equal(loaded.vocab_ids, head.vocab_ids)
    want, got = head.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    ids = torch.tensor([[3, 4, 5, 6]])
    a = specdec.generate(target, ids, max_new_tokens=12, draft_model=head, return_dict_in_generate=True)
    b = specdec.generate(target, ids, max_new_tokens=12, draft_model=loaded, return_dict_in_generate=True)
    assert torch.equal(a.sequences, b.sequences) and a.stats.accepted == b.stats.accepted
    # as a draft, a head keeps the dtype it was saved in whatever the target's (its cost is its weights' bytes)
    head.to(torch.bfloat16).save(tmp_path / "head16")
    assert load_draft(tmp_path / "head16", torch.float64).dtype == torch.bfloat16
    assert torch.equal(specdec.generate(target, ids, max_new_tokens=12, draft_model=load_draft(tmp_path / "head16")),
                       a.sequences)  # greedy output does not change


def test_a_head_for_another_target_is_refused():
    target = tiny_model("llama")
    wide = DraftHead.for_target(tiny_model("llama").config.__class__(hidden_size=32, intermediate_size=64,
                                                                     num_attention_heads=2, num_key_value_heads=1,
                                                                     vocab_size=101), torch.arange(101))
    with pytest.raises(ValueError, match="features of size 32"):
        specdec.generate(target, torch.tensor([[3, 4]]), max_new_tokens=2, draft_model=wide.double())
    far = tiny_head(target, kept=[0, 1])
    far.vocab_ids[1] = 500
    with pytest.raises(ValueError, match="outside the target's vocabulary"):
        specdec.generate(target, torch.tensor([[3, 4]]), max_new_tokens=2, draft_model=far)
    config = tiny_head(target).config
    for ids in ([5, 3], [-1, 4], [2, 2]):
        with pytest.raises(ValueError, match="vocab_ids"):
            DraftHead(type(config)(**{**config.to_dict(), "vocab_size": 2}), torch.tensor(ids))
    with pytest.raises(ValueError, match="target_hidden_size"):
        DraftHead(type(config)(**{**config.to_dict(), "target_hidden_size": 32}), torch.arange(config.vocab_size))
    with pytest.raises(ValueError, match="only a native model"):
        specdec.generate(tiny_model("gpt2"), torch.tensor([[3, 4]]), max_new_tokens=2,
                         draft_model=tiny_head(target))
