"""The engine: continuous batching over a paged pool emits exactly what single-request generate() emits."""

import functools
from dataclasses import replace

import pytest
import torch
from conftest import perturbed_copy, tiny_head, tiny_model, toy_tokenizer
from hypothesis import given
from hypothesis import strategies as st

import specdec
from specdec.cache import PagedKVCache
from specdec.engine import Engine, RequestParams
from specdec.kernels import cpu
from specdec.models.loading import as_native
from specdec.proposers import DraftModelProposer, HeadProposer
from specdec.sampling import SamplingConfig

VOCAB = 101


@functools.cache
def single(prompt: tuple, max_new: int, arch: str = "llama") -> list[int]:
    """What one request alone gets from generate(): the oracle."""
    out = specdec.generate(tiny_model(arch), torch.tensor([prompt]), max_new_tokens=max_new)
    return out[0, len(prompt):].tolist()  # batch 1: no padding, exactly the generated tokens


def run(engine: Engine, requests, arrivals=None, abort_at=None):
    """Drive the engine: request i is added before step arrivals[i]; returns tokens and finish reasons."""
    arrivals = arrivals or [0] * len(requests)
    tokens, reasons, step = {}, {}, 0
    pending = sorted(range(len(requests)), key=lambda i: arrivals[i])
    while pending or engine.has_unfinished():
        while pending and arrivals[pending[0]] <= step:
            i = pending.pop(0)
            prompt, params = requests[i]
            engine.add_request(list(prompt), params, f"r{i}")
            tokens[f"r{i}"] = []
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            assert out.num_output_tokens == len(tokens[out.request_id])
            if out.finished:
                reasons[out.request_id] = out.finish_reason
        step += 1
        assert step < 2000, "the engine made no progress"
    return tokens, reasons


def draft_of(kind):
    if kind == "head":
        return tiny_head(tiny_model("llama"), seed=1)
    return {"none": None, "ngram": "ngram", "perturbed": perturbed_copy("llama"), "self": tiny_model("llama")}[kind]


@given(data=st.data())
def test_engine_equals_single_request_generate(data):
    """Random arrival steps, prompt lengths, max_new_tokens, k, drafts, block sizes and pool sizes (down to
    pools so small that sequences are preempted): every output equals its single-request run, and when all
    is done no block is held."""
    n = data.draw(st.integers(1, 6), label="requests")
    requests = [(tuple(data.draw(st.lists(st.integers(3, VOCAB - 1), min_size=1, max_size=12), label="prompt")),
                 RequestParams(max_new_tokens=data.draw(st.integers(1, 20), label="max_new"))) for _ in range(n)]
    arrivals = [data.draw(st.integers(0, 8), label="arrival") for _ in range(n)]
    kind = data.draw(st.sampled_from(["none", "ngram", "perturbed", "self", "head"]), label="draft")
    k = data.draw(st.one_of(st.integers(1, 6), st.just("auto")), label="k")
    block_size = data.draw(st.sampled_from([1, 2, 3, 4, 16]), label="block_size")
    # the smallest legal pool fits the largest request alone: anything beyond that is headroom
    least = max(-(-(len(p) + r.max_new_tokens) // block_size) for p, r in requests)
    kv_blocks = data.draw(st.integers(least, least * n + 4), label="kv_blocks")
    engine = Engine(tiny_model("llama"), draft_of(kind), num_draft_tokens=k,
                    max_num_seqs=data.draw(st.integers(1, 5), label="max_num_seqs"), kv_blocks=kv_blocks,
                    block_size=block_size)
    tokens, reasons = run(engine, requests, arrivals)
    for i, (prompt, params) in enumerate(requests):
        want = single(prompt, params.max_new_tokens)
        assert tokens[f"r{i}"] == want, f"request {i}"
        assert reasons[f"r{i}"] == ("stop" if want[-1] == 2 else "length")  # 2: the tiny models' EOS
    assert engine.pool.num_used == 0
    assert engine.draft_pool is None or engine.draft_pool.num_used == 0
    assert not engine.has_unfinished()


@pytest.mark.parametrize("kind", ["none", "perturbed", "head"])
def test_pool_too_small_preempts_and_outputs_are_unchanged(kind):
    requests = [(tuple(range(3 + i, 13 + i)), RequestParams(max_new_tokens=24)) for i in range(6)]
    # each request needs up to 34 positions = 9 blocks of 4; 12 blocks cannot hold even two of them grown
    engine = Engine(tiny_model("llama"), draft_of(kind), num_draft_tokens=3, max_num_seqs=6, kv_blocks=12,
                    block_size=4)
    tokens, _ = run(engine, requests)
    assert engine.num_preemptions > 0
    for i, (prompt, params) in enumerate(requests):
        assert tokens[f"r{i}"] == single(prompt, params.max_new_tokens)
    assert engine.pool.num_used == 0 and (engine.draft_pool is None or engine.draft_pool.num_used == 0)


def test_one_target_forward_per_step_over_the_whole_batch():
    target = as_native(tiny_model("llama"))
    calls = []
    original = target.forward

    def counting(input_ids, positions, cache, logits_index=None):
        calls.append(input_ids.shape[0])
        return original(input_ids, positions, cache, logits_index=logits_index)

    target.forward = counting
    try:
        engine = Engine(target, "ngram", num_draft_tokens=3, max_num_seqs=8, kv_blocks=64, block_size=4)
        for i in range(5):
            engine.add_request([3 + i, 4, 5, 6, 3 + i, 4], RequestParams(max_new_tokens=20), f"r{i}")
        steps = 0
        engine.step()  # the prefill step admits all five
        assert calls == [5]
        while engine.has_unfinished():
            before = len(calls)
            running = engine.num_running
            engine.step()
            steps += 1
            assert len(calls) == before + 1 and calls[-1] == running  # every running sequence, one forward
    finally:
        del target.forward
    assert engine.stats.target_passes == steps + 1


def test_rollback_returns_blocks_past_the_accepted_length():
    engine = Engine(tiny_model("llama"), tiny_model("smollm2", seed=7), num_draft_tokens=8, max_num_seqs=1,
                    kv_blocks=20, block_size=2)  # an unrelated draft: almost everything rejected
    engine.add_request([3, 4, 5], RequestParams(max_new_tokens=30), "r")
    while engine.has_unfinished():
        engine.step()
        if engine.has_unfinished():
            seq = engine._running[0]
            # blocks cover the accepted positions only, not the 8 drafts the step wrote
            assert len(seq.blocks) == -(-seq.cached // 2)
            assert engine.pool.num_used == len(seq.blocks)
    assert engine.pool.num_used == 0 and engine.draft_pool.num_used == 0


def test_abort_frees_blocks_at_once_and_others_are_unaffected():
    engine = Engine(tiny_model("llama"), "ngram", num_draft_tokens=2, max_num_seqs=4, kv_blocks=40, block_size=4)
    prompts = [(3, 4, 5, 6), (7, 8, 9), (10, 11, 12, 13, 14)]
    for i, p in enumerate(prompts):
        engine.add_request(list(p), RequestParams(max_new_tokens=25), f"r{i}")
    tokens = {f"r{i}": [] for i in range(3)}
    for _ in range(3):
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
    held = len(engine._ids["r1"].blocks)
    used = engine.pool.num_used
    assert engine.abort("r1") and not engine.abort("r1") and not engine.abort("nope")
    assert engine.pool.num_used == used - held
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
    assert tokens["r0"] == single(prompts[0], 25) and tokens["r2"] == single(prompts[2], 25)
    assert engine.pool.num_used == 0
    engine.add_request([5, 6], RequestParams(max_new_tokens=3), "w")
    assert engine.abort("w") and not engine.has_unfinished()  # a waiting request is dropped too


def test_seeded_sampling_does_not_depend_on_the_batch():
    """Each request samples with its own generator on its own row: alone or among others, the same seed
    gives the same tokens (deterministic proposer, fixed k)."""
    params = RequestParams(max_new_tokens=15, temperature=0.8, top_p=0.9, seed=123)

    twin = replace(params, seed=7)  # same settings: warped in one group with r0, its own random numbers

    def alone(prompt, params):
        engine = Engine(tiny_model("llama"), "ngram", num_draft_tokens=3, max_num_seqs=4, kv_blocks=64, block_size=4)
        return run(engine, [(prompt, params)])[0]["r0"]

    engine = Engine(tiny_model("llama"), "ngram", num_draft_tokens=3, max_num_seqs=4, kv_blocks=64, block_size=4)
    others = [((9, 8, 7), RequestParams(max_new_tokens=12)), ((5, 6), RequestParams(max_new_tokens=9, temperature=1.3)),
              ((3, 4, 5, 3), twin)]
    mixed = run(engine, [((3, 4, 5, 3, 4), params)] + others, arrivals=[1, 0, 0, 0])[0]
    assert mixed["r0"] == alone((3, 4, 5, 3, 4), params)
    assert mixed["r3"] == alone((3, 4, 5, 3), twin)
    assert mixed["r1"] == single((9, 8, 7), 12)  # a greedy row beside sampled ones stays greedy


class GreedyDraft(DraftModelProposer):
    """A draft model that drafts its own argmax whatever a request's settings and offers no draft_probs: a
    deterministic proposer (as n-gram lookup is) with a draft pool of its own, so a seeded request's tokens
    depend on nothing but its own generator. (The plain DraftModelProposer samples sampled rows' drafts from
    the engine's generator, which no request seeds.)"""

    def propose(self, state, k):
        drafts, _ = super().propose(replace(state, sampling=SamplingConfig()), k)
        return drafts, None


class GreedyHead(HeadProposer):
    """A draft head that drafts its own argmax and offers no draft_probs: a deterministic proposer."""

    def propose(self, state, k):
        drafts, _ = super().propose(replace(state, sampling=SamplingConfig()), k)
        return drafts, None


def seeded_draft_of(kind):
    """The proposers under which a seeded request must reproduce its tokens (fixed k): deterministic ones."""
    if kind == "greedy-head":
        target = tiny_model("llama")
        return GreedyHead(tiny_head(target, seed=1), as_native(target))
    return {"none": None, "ngram": "ngram", "greedy-draft": GreedyDraft(as_native(perturbed_copy("llama")))}[kind]


#: one batch of mixed settings: hot and cool temperatures, top-k, top-p, both, two requests with the same
#: settings (warped in one group, each with its own random numbers), a greedy one, the largest seed
MIXED = [dict(temperature=0.8, top_p=0.9, seed=11), dict(temperature=1.0, top_k=5, seed=12),
         dict(temperature=1.3, seed=13), dict(temperature=0.6, top_k=3, top_p=0.8, seed=14), {},
         dict(temperature=0.8, top_p=0.9, seed=99), dict(temperature=1.0, top_p=0.5, seed=2**64 - 1)]


@pytest.mark.parametrize("kind", ["none", "ngram", "greedy-draft", pytest.param("greedy-head", marks=pytest.mark.xfail(
    strict=True, raises=AssertionError, reason="a known limit: a head cannot draft in the pass that recomputes a "
    "readmitted sequence (it drafts from the features that pass makes), so that step is plain where it would have "
    "drafted, and the request's generator draws other numbers from there on (batching alone changes nothing)"))])
def test_seeded_sampled_requests_are_unchanged_by_preemption_and_by_the_batch(kind):
    """Seven requests of different settings in one batch, through a pool so small that sampled requests are
    preempted in the middle of their generation and recomputed, and through one large enough for all: every
    request emits the tokens it emits alone with the same seed. A preempted request keeps its generator where
    it was (re-seeding it would replay the draws it already used)."""
    requests = [(tuple(range(3 + i, 13 + i)), RequestParams(max_new_tokens=24, **s)) for i, s in enumerate(MIXED)]

    def engine(kv_blocks, max_num_seqs=len(requests)):
        return Engine(tiny_model("llama"), seeded_draft_of(kind), num_draft_tokens=3, max_num_seqs=max_num_seqs,
                      kv_blocks=kv_blocks, block_size=4)

    # each request needs up to 34 positions = 9 blocks of 4: 12 blocks hold one grown request and a bit
    small = engine(12)
    preempted = []  # (request, tokens it had emitted) at each preemption
    preempt = small._preempt

    def spy(seq):
        preempted.append((seq.request_id, seq.num_output))
        preempt(seq)

    small._preempt = spy
    tight, _ = run(small, requests)
    large = engine(9 * len(requests) + 4)
    roomy, _ = run(large, requests)
    assert large.num_preemptions == 0
    sampled = {f"r{i}" for i, (_, params) in enumerate(requests) if params.temperature > 0}
    # a sampled request was preempted after it had drawn random numbers and before it was done
    assert any(r in sampled and 0 < n < 24 for r, n in preempted), preempted
    for i, request in enumerate(requests):
        alone = run(engine(12, max_num_seqs=1), [request])[0]["r0"]
        assert tight[f"r{i}"] == alone, f"request {i} ({MIXED[i]}) preempted: {preempted}"
        assert roomy[f"r{i}"] == alone, f"request {i} ({MIXED[i]}) in a batch"
    assert tight["r4"] == single(requests[4][0], 24)  # the greedy one
    assert all(tight[f"r{i}"] != single(requests[i][0], 24) for i in range(len(requests)) if f"r{i}" in sampled)
    assert len({tuple(t) for t in tight.values()}) == len(requests)  # (the settings do differ)
    assert small.pool.num_used == 0 and (small.draft_pool is None or small.draft_pool.num_used == 0)


def support(logits, params: RequestParams):
    """The tokens a request may sample where the target's logits are ``logits`` [positions, vocab]: temperature,
    then the top_k highest, then the fewest of those whose (renormalized) mass reaches top_p, by transformers'
    rule (a token is kept where the mass ranked above it is < top_p). Written out here, independent of
    specdec.sampling. Returns a bool mask [positions, vocab]."""
    probs = torch.softmax(logits / params.temperature, dim=-1)
    order = probs.argsort(dim=-1, descending=True)
    ranked = probs.gather(-1, order)
    keep = torch.ones_like(ranked, dtype=torch.bool)
    if params.top_k:
        keep[:, params.top_k:] = False
        ranked = torch.where(keep, ranked, 0)
        ranked = ranked / ranked.sum(dim=-1, keepdim=True)
    keep &= (ranked.cumsum(dim=-1) - ranked) < params.top_p
    return torch.zeros_like(keep).scatter(-1, order, keep)


def test_sampled_rows_with_a_draft_model_keep_to_their_settings_and_free_their_blocks():
    """With a sampling draft (drafts drawn from the draft's own warped distribution), every sampled token lies
    among the tokens its request's settings allow at its position: the target's top 2, its top-p 0.5 nucleus,
    or its top 3 cut again at top-p 0.6, computed from the target over the prompt and the tokens before it. The
    temperatures are hot (2.0): without the filters most of the mass would lie outside the kept tokens. And
    the rows did sample: some tokens are not the target's first choice."""
    target = tiny_model("llama")
    engine = Engine(target, perturbed_copy("llama"), num_draft_tokens=4, max_num_seqs=4, kv_blocks=40,
                    block_size=4, seed=0)  # (drafts from a random seed: all accepted in ~8% of runs)
    settings = [dict(temperature=2.0, top_k=2), dict(temperature=2.0, top_p=0.5),
                dict(temperature=2.0, top_k=3, top_p=0.6), {}]
    requests = [((3, 4, 5), RequestParams(max_new_tokens=24, seed=i, **s)) for i, s in enumerate(settings)]
    tokens, _ = run(engine, requests)
    second_choices = 0
    for i, (prompt, params) in enumerate(requests[:3]):
        out = tokens[f"r{i}"]
        with torch.inference_mode():
            logits = target(torch.tensor([list(prompt) + out])).logits[0, len(prompt) - 1: -1]  # [len(out), vocab]
        allowed = support(logits, params)
        for j, t in enumerate(out):
            assert allowed[j, t], f"request {i} ({settings[i]}) token {j}: {t} is not among {allowed[j].nonzero()}"
        second_choices += sum(t != int(row.argmax()) for t, row in zip(out, logits))
    assert second_choices >= 3  # sampled, not greedy
    assert tokens["r3"] == single((3, 4, 5), 24)
    assert engine.stats.proposed > 0 and 0 < engine.stats.acceptance_rate < 1
    assert engine.pool.num_used == 0 and engine.draft_pool.num_used == 0


def test_an_engine_seed_reproduces_the_drafts_it_samples():
    """Sampled drafts from a draft model: two engines with one seed propose and accept the same drafts."""
    def accepted(seed):
        engine = Engine(tiny_model("llama"), perturbed_copy("llama"), num_draft_tokens=4, max_num_seqs=2,
                        kv_blocks=40, block_size=4, seed=seed)
        requests = [((3, 4, 5), RequestParams(max_new_tokens=24, temperature=2.0, seed=i)) for i in range(2)]
        tokens, _ = run(engine, requests)
        return engine.stats.accepted_at, tokens

    assert accepted(5) == accepted(5)


def test_plain_sampled_requests_draw_what_seeded_generate_draws():
    """Plain decoding (k = 0) draws, per step and request, the numbers generate() draws for a batch of one
    (``random_numbers``: no uniforms, then the exponentials of the race): so a request seeded with s in a
    batch of mixed settings emits exactly what generate() emits with a generator seeded with s and the same
    temperature, top_k and top_p. Any setting applied wrongly, or any other random number drawn, shows."""
    target = tiny_model("llama")
    engine = Engine(target, None, max_num_seqs=len(MIXED), kv_blocks=64, block_size=4)
    requests = [((3 + i, 7, 11 + i), RequestParams(max_new_tokens=20, **s)) for i, s in enumerate(MIXED)]
    tokens, _ = run(engine, requests)
    for i, (prompt, params) in enumerate(requests):
        if params.temperature == 0:  # (the settings as given, not as the engine reads them)
            want = single(prompt, 20)
        else:
            out = specdec.generate(target, torch.tensor([prompt]), max_new_tokens=20, do_sample=True,
                                   temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                                   generator=torch.Generator().manual_seed(params.seed))
            want = out[0, len(prompt):].tolist()  # batch 1: no padding
        assert tokens[f"r{i}"] == want, f"request {i} ({MIXED[i]})"


# Measured (2-core x86-64 CPU, torch 2.13): float64 differs by at most 8.9e-16; float32 by exactly 0 through
# the CPU kernels (each token computed alone) and by at most 1.4e-6 through torch's own path
# (SPECDEC_REFERENCE_KERNELS=1), where the logits reach |3.3| and one float32 step there is 2.4e-7: ~6 steps.
# The bounds are ~10x those: 1e-14, and 1e-5 on torch's path (another BLAS may sum in another order); the
# CPU kernels must agree exactly, as the bit-for-bit engine test below relies on.
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-14), (torch.float32, 0.0 if cpu.available() else 1e-5)])
def test_paged_batched_logits_match_a_contiguous_single_run(dtype, tol):
    """Batch invariance in numbers: the same sequence through the paged pool in a ragged batch of four and
    alone through the contiguous cache. float64 agrees to ~1e-15 (the tests of exact token identity run
    there); float32 exactly through the CPU kernels, else to ~1e-6 — near-ties can flip a greedy token in
    float32, as for any batched server."""
    target = as_native(tiny_model("llama", dtype=dtype))
    prompts = [[3, 4, 5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15], [16]]
    pool = target.new_pool(num_blocks=16, block_size=3)
    tables = [pool.allocate(pool.blocks_for(len(p))) for p in prompts]
    with torch.inference_mode():
        width = max(map(len, prompts))
        ids = torch.tensor([p + [0] * (width - len(p)) for p in prompts])
        positions = torch.tensor([list(range(len(p))) + [-1] * (width - len(p)) for p in prompts])
        batched = target(ids, positions, PagedKVCache(pool, tables, [0] * 4))
        for b, p in enumerate(prompts):
            cache = target.new_cache(1, 16)
            alone = target(torch.tensor([p]), torch.arange(len(p))[None], cache)
            assert (batched[b, : len(p)] - alone[0]).abs().max() <= tol


BAD = [
    (lambda e: e.add_request([], None), "prompt_ids is empty"),
    (lambda e: e.add_request([3, VOCAB], None), "outside the vocabulary"),
    (lambda e: e.add_request("hello", None), "prompt_ids must be a list"),
    (lambda e: e.add_request([3], RequestParams(max_new_tokens=600)), "exceeds the context"),
    (lambda e: e.add_request([3] * 10, RequestParams(max_new_tokens=500)), "KV blocks"),
    (lambda e: e.add_request([3], {"max_new_tokens": 3}), "params must be a RequestParams"),
    (lambda e: e.add_request([3], None, "dup"), "request_id must be a new string"),
    (lambda e: RequestParams(temperature=float("nan")), "temperature"),
    (lambda e: RequestParams(temperature=-1.0), "temperature"),
    (lambda e: RequestParams(top_p=0.0), "top_p"),
    (lambda e: RequestParams(top_p=1.5), "top_p"),
    (lambda e: RequestParams(top_k=-2), "top_k"),
    (lambda e: RequestParams(max_new_tokens=0), "max_new_tokens"),
    (lambda e: RequestParams(seed=-1), "seed"),
    (lambda e: RequestParams(seed=2**64), "seed"),  # beyond torch's unsigned 64-bit seeds
    (lambda e: Engine(tiny_model("llama"), num_draft_tokens=0), "num_draft_tokens"),
    (lambda e: Engine(tiny_model("llama"), max_num_seqs=0), "max_num_seqs"),
    (lambda e: Engine(tiny_model("llama"), kv_blocks=0), "kv_blocks"),
    (lambda e: Engine(tiny_model("llama"), block_size=0), "block_size"),
    (lambda e: Engine(tiny_model("llama"), max_model_len=-5), "max_model_len"),
    (lambda e: Engine(tiny_model("llama"), max_model_len=2.5), "max_model_len"),
    (lambda e: Engine(tiny_model("llama"), seed=-1), "seed"),
    (lambda e: Engine(tiny_model("gpt2")), "native model"),
    (lambda e: RequestParams(frequency_penalty=2.5), "frequency_penalty"),
    (lambda e: RequestParams(presence_penalty=True), "presence_penalty"),
    (lambda e: RequestParams(logit_bias={3: 101}), "logit_bias"),
    (lambda e: RequestParams(logit_bias={"3": 1}), "logit_bias"),
    (lambda e: e.add_request([3], RequestParams(logit_bias={VOCAB: 1.0})), "logit_bias"),
    (lambda e: e.add_request([3], RequestParams(grammar={"json_object": True})), "tokenizer"),
    (lambda e: e.add_request([3], RequestParams(grammar={"yaml": "x"})), "grammar"),
]


@pytest.mark.parametrize("call, message", BAD, ids=[m for _, m in BAD])
def test_bad_input_raises_value_error_and_leaves_the_engine_usable(call, message):
    engine = Engine(tiny_model("llama"), "ngram", max_num_seqs=2, kv_blocks=20, block_size=16)
    engine.add_request([3, 4, 5], RequestParams(max_new_tokens=5), "dup")
    with pytest.raises(ValueError, match=message):
        call(engine)
    run(engine, [])  # the queued request still runs to completion
    assert engine.pool.num_used == 0


def test_sampled_first_token_has_the_target_distribution_with_a_sampling_draft():
    """Lossless per row: the first emitted token (an accepted draft or the recovered token after a rejection)
    is distributed as the target's softmax, not the draft's. 600 seeded requests, 64 per step; the bound is
    the 99th percentile of the total variation of 600 direct samples from the target (simulated), and the
    draft's own distribution lies ~4x farther than that bound."""
    target = as_native(tiny_model("llama"))
    draft = perturbed_copy("llama", scale=1.0)
    prompt = [3, 14, 15, 92, 65]
    with torch.inference_mode():
        want, draft_probs = (torch.softmax(as_native(m)(torch.tensor([prompt]), torch.arange(5)[None],
                                                        as_native(m).new_cache(1, 8))[0, -1], dim=-1)
                             for m in (target, draft))
    n = 600
    g = torch.Generator().manual_seed(0)

    def tv(samples):
        return float(0.5 * (torch.bincount(samples, minlength=VOCAB).double() / n - want).abs().sum())

    bound = sorted(tv(torch.multinomial(want, n, replacement=True, generator=g)) for _ in range(200))[197]
    assert float(0.5 * (draft_probs - want).abs().sum()) > 3 * bound  # the test can tell the two apart
    engine = Engine(target, draft, num_draft_tokens=1, max_num_seqs=64, kv_blocks=128, block_size=4)
    requests = [(tuple(prompt), RequestParams(max_new_tokens=2, temperature=1.0, seed=i)) for i in range(n)]
    tokens, _ = run(engine, requests)
    assert engine.stats.proposed > 0 and 0 < engine.stats.acceptance_rate < 1
    assert tv(torch.tensor([t[0] for t in tokens.values()])) < bound


def test_verify_per_row_is_bit_identical_to_verifying_each_row_alone():
    """One ``verify`` call for a mixed batch, each row with its own setting and generator (as the engine calls
    it) == ``verify`` row by row on each row's own drafts: greedy and sampled rows, shared and distinct
    settings, draft distributions given, a row with no drafts."""
    from types import SimpleNamespace

    from specdec.sampling import SamplingConfig, verify

    g = torch.Generator().manual_seed(0)
    batch, k, vocab = 5, 3, 11
    logits = torch.randn(batch, k + 1, vocab, generator=g)
    draft_probs = torch.softmax(torch.randn(batch, k, vocab, generator=g), dim=-1)
    drafts = torch.multinomial(draft_probs.reshape(-1, vocab), 1, generator=g).reshape(batch, k)
    num_drafts = torch.tensor([3, 0, 2, 3, 1])
    warm = SamplingConfig(True, 0.8, 0, 0.9)
    configs = [warm, warm, SamplingConfig(), SamplingConfig(True, 1.3, 4, 1.0), warm]

    def seqs(repeat):
        return [SimpleNamespace(sampling=c, generator=torch.Generator().manual_seed(1000 * repeat + i))
                for i, c in enumerate(configs)]

    outcomes = set()
    for repeat in range(20):  # many draws: acceptances and rejections both occur
        rows = seqs(repeat)
        emitted, accepted = verify(drafts, draft_probs, logits, num_drafts, [s.sampling for s in rows],
                                   [s.generator for s in rows])
        outcomes.update(accepted.tolist())
        for i, s in enumerate(seqs(repeat)):  # the same seeds, one row at a time
            n = int(num_drafts[i])
            e, a = verify(drafts[i:i + 1, :n], draft_probs[i:i + 1, :n], logits[i:i + 1, :n + 1],
                          num_drafts[i:i + 1], s.sampling, s.generator)
            assert int(accepted[i]) == int(a[0]) and emitted[i, :n + 1].tolist() == e[0].tolist()
            assert (emitted[i, n + 1:] == -1).all()
        drafts = torch.roll(drafts, 1, dims=1)  # another batch for the next repeat
    assert {0, 1} <= outcomes  # rejections at the first draft and acceptances both happened


def test_a_draft_pool_too_small_for_k_drafts_still_makes_progress():
    # found by hypothesis: one prompt token, max_new_tokens 1, k = 3 and a pool of 2 one-position blocks;
    # reserving k - 1 draft positions preempted the only sequence every step
    engine = Engine(tiny_model("llama"), draft_of("perturbed"), num_draft_tokens=3, max_num_seqs=1, kv_blocks=2,
                    block_size=1)
    tokens, reasons = run(engine, [((3,), RequestParams(max_new_tokens=1))])
    assert tokens["r0"] == single((3,), 1) and reasons["r0"] in ("stop", "length")
    assert engine.pool.num_used == 0 and engine.draft_pool.num_used == 0


@pytest.mark.skipif(not cpu.available(),
                    reason="float32 batch invariance rests on the CPU kernels (each token computed alone)")
@pytest.mark.parametrize("draft", [None, "ngram"])
def test_float32_engine_equals_single_request_generate_bit_for_bit(draft):
    # torch's batched float32 matmuls may round a row differently with other rows beside it; the CPU kernels
    # compute every token alone (tests/test_kernels_cpu_attention.py), so batching changes no token here
    target = tiny_model("llama", torch.float32)
    requests = [(tuple(range(3 + i, 9 + 2 * i)), RequestParams(max_new_tokens=12)) for i in range(5)]
    engine = Engine(target, draft, num_draft_tokens=3, max_num_seqs=5, kv_blocks=64, block_size=4)
    tokens, _ = run(engine, requests, arrivals=[0, 0, 1, 2, 2])
    for i, (prompt, _) in enumerate(requests):
        want = specdec.generate(target, torch.tensor([prompt]), max_new_tokens=12)[0, len(prompt):].tolist()
        assert tokens[f"r{i}"] == want, f"request {i}"


def test_a_row_that_wants_no_drafts_is_not_drafted_for(monkeypatch):
    """A row one token from its max_new_tokens wants no drafts: the proposer sees it inactive (its draft
    model does not run over it), while the other row drafts on; both outputs stay those of plain."""
    from specdec.proposers import DraftModelProposer, HeadProposer

    seen = []
    real = DraftModelProposer.propose

    def propose(self, state, k):
        seen.append(state.active.tolist())
        return real(self, state, k)

    monkeypatch.setattr(DraftModelProposer, "propose", propose)
    engine = Engine(tiny_model("llama"), tiny_model("llama"), num_draft_tokens=2, max_num_seqs=2)  # self-draft
    requests = [((3, 4, 5), RequestParams(max_new_tokens=4)), ((6, 7, 8), RequestParams(max_new_tokens=30))]
    tokens, _ = run(engine, requests)
    for i, (prompt, params) in enumerate(requests):
        assert tokens[f"r{i}"] == single(prompt, params.max_new_tokens)
    assert [False, True] in seen  # request 0 near its end, request 1 drafting


def test_a_head_keeps_the_cache_of_a_row_that_does_not_draft(monkeypatch):
    """A draft head's cache of a row that takes a plain step stays as it was (every entry came from the
    target's features), rather than being dropped and recomputed from the prompt the next time it drafts."""
    from specdec.proposers import HeadProposer

    kept = []
    real = HeadProposer.propose

    def propose(self, state, k):
        cache = state.scratch[self]  # the engine hands in the head's paged cache
        before = cache.lengths.clone()
        out = real(self, state, k)
        idle = ~state.active
        kept.append(bool(idle.any()) and torch.equal(cache.lengths[idle], before[idle]))
        return out

    monkeypatch.setattr(HeadProposer, "propose", propose)
    target = tiny_model("llama")
    engine = Engine(target, tiny_head(target, seed=1), num_draft_tokens=2, max_num_seqs=2)
    requests = [((3, 4, 5), RequestParams(max_new_tokens=4)), ((6, 7, 8), RequestParams(max_new_tokens=30))]
    tokens, _ = run(engine, requests)
    for i, (prompt, params) in enumerate(requests):
        assert tokens[f"r{i}"] == single(prompt, params.max_new_tokens)
    assert any(kept)  # a step where request 0 did not draft, and its head cache stayed


# Per-request processing: OpenAI's penalties and bias, and grammars, in a batch of rows that differ.
# ---------------------------------------------------------------------------------------------------------
def openai_processor(prompt_len: int, params: RequestParams):
    """OpenAI's rule as a generate() processor, over the output alone: the engine's reference."""
    def process(input_ids, scores):  # [1, L], [1, vocab]
        counts = torch.bincount(input_ids[0, prompt_len:], minlength=scores.shape[-1]).to(scores.dtype)
        bias = torch.zeros_like(scores)
        for token, value in (params.logit_bias or {}).items():
            bias[0, token] = value
        return scores - params.frequency_penalty * counts - params.presence_penalty * (counts > 0) + bias
    return process


@pytest.mark.parametrize("kind", ["none", "ngram", "perturbed", "head"])
def test_per_request_penalties_bias_and_grammars_equal_generate(kind):
    """Rows with penalties, a bias, a grammar, or nothing, side by side: each greedy output is generate()'s
    for its request alone with the same processing, and the grammar's output parses."""
    from test_grammar import SCHEMA

    tok = toy_tokenizer()
    requests = [((5, 6, 7), RequestParams(max_new_tokens=40, grammar={"json_schema": SCHEMA})),
                ((8, 9), RequestParams(max_new_tokens=25, frequency_penalty=1.2, presence_penalty=-0.5,
                                       logit_bias={7: 4.0, 11: -100})),
                ((10, 11, 12), RequestParams(max_new_tokens=25)),
                ((13,), RequestParams(max_new_tokens=40, presence_penalty=2.0, grammar={"regex": "[a-c]+x"}))]
    engine = Engine(tiny_model("llama"), draft_of(kind), num_draft_tokens=3, max_num_seqs=4, kv_blocks=80,
                    block_size=4, tokenizer=tok, eos_token_id=2)
    tokens, _ = run(engine, requests)
    for i, (prompt, params) in enumerate(requests):
        processors = [openai_processor(len(prompt), params)] if params.processed else None
        want = specdec.generate(tiny_model("llama"), torch.tensor([prompt]), max_new_tokens=params.max_new_tokens,
                                eos_token_id=2, logits_processor=processors, grammar=params.grammar,
                                tokenizer=tok)[0, len(prompt):].tolist()
        assert tokens[f"r{i}"] == want[: len(tokens[f"r{i}"])] and len(tokens[f"r{i}"]) == len(want), f"request {i}"
    assert 11 not in tokens["r1"]
    assert tok.decode(tokens["r0"][:-1]).startswith('{"name": ') and tokens["r0"][-1] == 2
    assert engine.pool.num_used == 0
    assert engine.stats.forced > 0  # the grammar's drafts ride along (a plain engine's too), counted apart


@pytest.mark.parametrize("kv_blocks", [7, 9, 40])
def test_grammar_drafts_take_the_blocks_the_pool_has(kv_blocks):
    """Grammar drafts beyond the step's k take blocks from the pool as far as it has them (a pool of 7
    blocks of 4 holds the request and nothing more): the output is generate()'s, and every block comes back."""
    from test_grammar import SCHEMA

    tok = toy_tokenizer()
    params = RequestParams(max_new_tokens=24, grammar={"json_schema": SCHEMA})
    engine = Engine(tiny_model("llama"), None, max_num_seqs=2, kv_blocks=kv_blocks, block_size=4, tokenizer=tok,
                    eos_token_id=2)
    tokens, _ = run(engine, [((5, 6, 7), params), ((8,), params)])
    for i, prompt in enumerate([(5, 6, 7), (8,)]):
        want = specdec.generate(tiny_model("llama"), torch.tensor([prompt]), max_new_tokens=24, eos_token_id=2,
                                grammar=params.grammar, tokenizer=tok)[0, len(prompt):].tolist()
        assert tokens[f"r{i}"] == want[: len(tokens[f"r{i}"])] and len(tokens[f"r{i}"]) == len(want)
    assert engine.pool.num_used == 0 and engine.stats.forced > 0


@pytest.mark.parametrize("kind", ["none", "perturbed"])
def test_grammar_requests_survive_preemption_and_abort(kind):
    """A pool that holds one grammar request grown: the younger ones are preempted and recomputed, one is
    aborted mid-way; each finished output is generate()'s, and a grammar request added afterwards runs as if
    alone (the matchers follow their own requests, whatever happens to the others)."""
    from test_grammar import SCHEMA

    tok = toy_tokenizer()
    params = RequestParams(max_new_tokens=30, grammar={"json_schema": SCHEMA})
    prompts = [(5, 6, 7), (8, 9), (10,), (11, 12)]
    engine = Engine(tiny_model("llama"), draft_of(kind), num_draft_tokens=3, max_num_seqs=4, kv_blocks=12,
                    block_size=4, tokenizer=tok, eos_token_id=2)
    tokens = {}
    for i, prompt in enumerate(prompts):
        engine.add_request(list(prompt), params, f"r{i}")
        tokens[f"r{i}"] = []
    for step in range(200):
        if step == 3:
            assert engine.abort("r2")
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
        if not engine.has_unfinished():
            break
    assert engine.num_preemptions > 0 and engine.pool.num_used == 0
    engine.add_request([13, 14], params, "late")
    tokens["late"] = run(engine, [])[0]["late"]
    for name, prompt in [("r0", prompts[0]), ("r1", prompts[1]), ("r3", prompts[3]), ("late", (13, 14))]:
        want = specdec.generate(tiny_model("llama"), torch.tensor([prompt]), max_new_tokens=30, eos_token_id=2,
                                grammar=params.grammar, tokenizer=tok)[0, len(prompt):].tolist()
        assert tokens[name] == want[: len(tokens[name])] and len(tokens[name]) == len(want), name


def test_a_request_whose_grammar_dead_ends_does_not_touch_the_others():
    """A grammar with no way out (a pattern nothing matches) ends its own request with EOS; the requests beside
    it, with a grammar or without, are what they are alone."""
    from test_grammar import SCHEMA

    tok = toy_tokenizer()
    dead = RequestParams(max_new_tokens=10, grammar={"json_schema": {"type": "string", "pattern": "[^\\s\\S]"}})
    fine = RequestParams(max_new_tokens=30, grammar={"json_schema": SCHEMA})
    engine = Engine(tiny_model("llama"), "ngram", num_draft_tokens=3, max_num_seqs=4, kv_blocks=60, block_size=4,
                    tokenizer=tok, eos_token_id=2)
    tokens, reasons = run(engine, [((5, 6, 7), dead), ((8, 9), fine), ((10, 11), RequestParams(max_new_tokens=12))])
    assert tokens["r0"] == [tok.convert_tokens_to_ids('"'), 2] and reasons["r0"] == "stop"
    want = specdec.generate(tiny_model("llama"), torch.tensor([[8, 9]]), max_new_tokens=30, eos_token_id=2,
                            grammar=fine.grammar, tokenizer=tok)[0, 2:].tolist()
    assert tokens["r1"] == want[: len(tokens["r1"])] and len(tokens["r1"]) == len(want)
    assert tokens["r2"] == single((10, 11), 12)
