"""The promise: speculative greedy decoding emits exactly the tokens of plain greedy decoding."""

import pytest
import torch
from conftest import ARCHS, FALLBACK_ARCHS, perturbed_copy, tiny_head, tiny_model
from hypothesis import given
from hypothesis import strategies as st

import specdec
from specdec.models.loading import as_native


def _draft(kind, arch):
    if kind == "self":
        return tiny_model(arch)  # everything accepted
    if kind == "perturbed":
        return perturbed_copy(arch)  # partial acceptance
    if kind == "ngram":
        return "ngram"  # prompt lookup: deterministic, ragged (rows without a match offer nothing)
    return tiny_model("smollm2", seed=7)  # an unrelated random model: almost everything rejected


@st.composite
def batches(draw, vocab):
    batch = draw(st.integers(1, 4))
    lengths = [draw(st.integers(1, 9)) for _ in range(batch)]
    width = max(lengths)
    ids = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, width - n:] = torch.tensor(draw(st.lists(st.integers(3, vocab - 1), min_size=n, max_size=n)))
        mask[b, width - n:] = 1
    return ids, mask


@pytest.mark.parametrize("arch", sorted(ARCHS) + sorted(FALLBACK_ARCHS))
@given(data=st.data())
def test_greedy_speculative_equals_plain_equals_transformers(arch, data):
    target = tiny_model(arch)
    ids, mask = data.draw(batches(target.config.vocab_size), label="prompts")
    k = data.draw(st.integers(1, 8), label="k")
    max_new = data.draw(st.integers(1, 40), label="max_new_tokens")
    kind = data.draw(st.sampled_from(["self", "perturbed", "random", "ngram"]), label="draft")
    if arch in FALLBACK_ARCHS and kind in ("perturbed", "random"):
        kind = data.draw(st.sampled_from(["self", "llama-as-draft"]), label="fallback draft")
    draft = tiny_model("llama", seed=3) if kind == "llama-as-draft" else _draft(kind, arch)
    plain = specdec.generate(target, ids, attention_mask=mask, max_new_tokens=max_new, eos_token_id=[])
    # an EOS id that does occur: one of the tokens plain decoding produced (or none)
    produced = plain[:, ids.shape[1]:].flatten().tolist()
    eos = data.draw(st.sampled_from(produced + [None]), label="eos")
    eos_ids = [] if eos is None else eos
    want = target.generate(ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                           eos_token_id=eos, pad_token_id=0)
    plain = specdec.generate(target, ids, attention_mask=mask, max_new_tokens=max_new, eos_token_id=eos_ids,
                             pad_token_id=0)
    spec = specdec.generate(target, ids, attention_mask=mask, max_new_tokens=max_new, eos_token_id=eos_ids,
                            pad_token_id=0, draft_model=draft, num_draft_tokens=k)
    assert torch.equal(plain, want)
    assert torch.equal(spec, want)


@pytest.mark.parametrize("k", [1, 3, 8])
def test_target_as_its_own_draft_emits_k_plus_one_per_pass(k):
    target = tiny_model("llama")
    ids = torch.tensor([[3, 4, 5, 6]])
    max_new = 3 * (k + 1)  # k + 1 per pass, no remainder: every pass is a full one
    out = specdec.generate(target, ids, max_new_tokens=max_new, eos_token_id=[], draft_model=target,
                           num_draft_tokens=k, return_dict_in_generate=True)
    s = out.stats
    assert s.emitted == max_new and s.target_passes == 3
    assert s.tokens_per_target_forward == k + 1
    assert s.acceptance_rate == 1.0 and s.per_position_acceptance == [1.0] * k


def test_near_the_end_drafting_stops_short():
    target = tiny_model("llama")
    out = specdec.generate(target, torch.tensor([[3, 4]]), max_new_tokens=6, eos_token_id=[], draft_model=target,
                           num_draft_tokens=4, return_dict_in_generate=True)
    assert out.sequences.shape[1] == 2 + 6
    # 5 tokens from the first pass (4 drafts + bonus), then 1 left: a plain step, no drafts
    assert out.stats.proposed == 4 and out.stats.target_passes == 2


def test_random_draft_stats_and_table():
    target, draft = tiny_model("llama"), _draft("random", "llama")
    out = specdec.generate(target, torch.tensor([[3, 4, 5]] * 2), max_new_tokens=20, eos_token_id=[],
                           draft_model=draft, num_draft_tokens=4, return_dict_in_generate=True)
    s = out.stats
    assert s.emitted == 40 and s.accepted <= s.proposed
    assert s.row_passes == 2 * s.target_passes  # both rows run every pass (neither finishes early)
    assert s.tokens_per_target_forward == pytest.approx(40 / (2 * s.target_passes))
    assert 0 <= s.acceptance_rate < 0.5
    assert s.cost_ratio is not None and s.cost_ratio > 0
    assert s.draft_passes > 0
    d = s.to_dict()
    assert d["proposed"] == s.proposed and "per_position_acceptance" in d
    text = str(s)
    assert "tokens per target forward" in text and "acceptance rate" in text


def test_auto_k_stays_exact_and_picks_plain_for_a_useless_draft(monkeypatch):
    """A draft the target (almost) never agrees with: after its probes and the plain steps that time the unit,
    the controller decides k = 0 on the large majority of its steps (it may pay a few k = 1 steps until it is
    sure, and a reprobe now and then), not merely on the plain last step that every generation ends with."""
    from specdec.speculative import DraftLength

    decided = []  # what the controller returned, step by step
    decide = DraftLength.next

    def spy(self, stats):
        k = decide(self, stats)
        decided.append(k)
        return k

    monkeypatch.setattr(DraftLength, "next", spy)
    target, ids, plain, Oracle = _oracle_on_its_own_clock(monkeypatch)  # timings on the test's own clock

    class Useless:  # proposes what plain decoding does not emit, at 0.1 target passes a draft step
        def propose(self, state, k):
            Oracle.clock[0] += 0.1 * k
            start = int(state.num_tokens[0])
            return (plain[:, start:start + k] + 1) % target.vocab_size, None

    out = specdec.generate(target, ids, max_new_tokens=40, eos_token_id=[], draft_model=Useless(),
                           num_draft_tokens="auto", return_dict_in_generate=True)
    assert torch.equal(out.sequences, plain[:, :ids.shape[1] + 40])
    # on the test's clock (deterministic): [4, 4, 0, 0, 0, then k = 1 seven times until Wilson's bound is sure,
    # then 0 but for one reprobe]: 27 of the 35 steps after the first five are 0
    assert decided[:2] == [DraftLength.PROBE] * 2  # (the first probe is the prefill, untimed)
    after = decided[2 + DraftLength.PLAIN_SAMPLES:]
    assert after.count(0) >= 0.75 * len(after), decided
    assert len(after) >= 20, decided  # (a step per token, mostly)
    assert out.stats.steps_by_k.get(0, 0) >= 0.75 * out.stats.target_passes  # speculation did not pay


def _oracle_on_its_own_clock(monkeypatch):
    """A target, a prompt, plain decoding's output and a proposer class that proposes exactly that output at
    no cost, on a clock of the test's own (a target pass costs 1 + 0.01 per token, drafting nothing), so that
    a busy machine cannot make a verification pass look dear: what auto decides is the controller's alone."""
    from types import SimpleNamespace

    from specdec import speculative

    target = as_native(tiny_model("llama"))
    ids = torch.tensor([[3, 4, 5]])
    plain = specdec.generate(target, ids, max_new_tokens=60, eos_token_id=[])

    class Oracle:
        def propose(self, state, k):
            start = int(state.num_tokens[0])
            return plain[:, start:start + k], None

    clock = [0.0]
    forward = target.forward

    def timed_forward(input_ids, *args, **kwargs):
        clock[0] += 1.0 + 0.01 * input_ids.shape[1]
        return forward(input_ids, *args, **kwargs)

    monkeypatch.setattr(target, "forward", timed_forward)
    monkeypatch.setattr(speculative, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    Oracle.clock = clock  # (for proposers of a test's own that cost time on it)
    return target, ids, plain, Oracle


def test_auto_k_drafts_long_with_a_perfect_free_draft(monkeypatch):
    """An oracle that proposes plain decoding's own tokens at no cost: auto must pick large k."""
    target, ids, plain, Oracle = _oracle_on_its_own_clock(monkeypatch)
    out = specdec.generate(target, ids, max_new_tokens=60, eos_token_id=[], draft_model=Oracle(),
                           num_draft_tokens="auto", return_dict_in_generate=True)
    assert torch.equal(out.sequences, plain)
    assert max(out.stats.steps_by_k) == 8 and out.stats.tokens_per_target_forward > 5


def test_auto_keeps_its_timings_across_calls(monkeypatch):
    """generate()'s "auto" controller lives across calls, per target, draft, batch size and mode: the first
    call probes and times plain steps, a second one probes (acceptance is each call's own) but takes no plain
    step here: the unit carried over. Another draft, batch size or mode gets a controller of its own."""
    from specdec.speculative import DraftLength, _draft_length

    target, ids, plain, Oracle = _oracle_on_its_own_clock(monkeypatch)
    oracle = Oracle()
    runs = [specdec.generate(target, ids, max_new_tokens=60, eos_token_id=[], draft_model=oracle,
                             num_draft_tokens="auto", return_dict_in_generate=True) for _ in range(2)]
    assert all(torch.equal(run.sequences, plain) for run in runs)
    first, second = (run.stats.steps_by_k for run in runs)
    assert first[0] == DraftLength.PLAIN_SAMPLES and DraftLength.PROBE in first
    assert 0 not in second and DraftLength.PROBE in second and max(second) == 8  # (steps_by_k counts the k
    # a step ran with, the last one cut to the tokens left, so the probes are not counted exactly here)
    kept = _draft_length(target, oracle, "auto", 1, True)
    assert _draft_length(target, oracle, "auto", 1, True) is kept
    for other in ((target, Oracle(), "auto", 1, True), (target, oracle, "auto", 2, True),
                  (target, oracle, "auto", 1, False)):
        assert _draft_length(*other) is not kept
    assert _draft_length(target, oracle, 3, 1, True).k == 3  # a fixed k keeps nothing


@pytest.mark.parametrize("accepted,proposed,c,growth,want", [
    (900, 1000, 1.0, 0.0, 0),  # a draft as costly as the target never pays: E / (k + 1) <= 1
    (0, 1000, 0.01, 0.0, 0),  # nothing accepted: nothing gained
    (900, 1000, 0.05, 0.0, 8),  # alpha 0.9, cheap draft, flat verification: E/(kc+1) still rises at k = 8
    (600, 1000, 0.05, 0.0, 4),  # alpha 0.6: 1.52 at k=1, 1.78, 1.89, 1.92 at k=4, 1.91 at k=5
    (600, 1000, 0.05, 0.1, 2),  # the same, but each draft adds 10% to the verification pass: 1.39, 1.51, 1.50
])
def test_auto_k_controller_maximises_measured_speedup(accepted, proposed, c, growth, want):
    from specdec.speculative import DraftLength
    from specdec.stats import SpecStats

    stats = SpecStats(accepted=accepted, proposed=proposed, reached_at=[proposed], accepted_at=[accepted])
    _plain_steps(stats)  # the unit
    stats.record_pass(4, target_seconds=1.0 + 4 * growth, draft_seconds=4 * c)  # a measured step with k = 4
    assert DraftLength("auto").next(stats) == want
    assert DraftLength(5).next(stats) == 5


def _plain_steps(stats, seconds=(1.0, 1.0, 1.0)):
    """Plain passes timed as the controller asks for them before its first decision (PLAIN_SAMPLES)."""
    for t in seconds:
        stats.record_pass(0, target_seconds=t, draft_seconds=0.0)


def test_auto_k_probes_then_measures_plain_steps_first():
    from specdec.speculative import DraftLength
    from specdec.stats import SpecStats

    stats, length = SpecStats(), DraftLength("auto")
    assert length.next(stats) == DraftLength.PROBE  # nothing timed yet
    stats.record_pass(4, target_seconds=1.2, draft_seconds=0.2)
    for _ in range(DraftLength.PLAIN_SAMPLES):  # no plain step timed: take some, they are the unit of every cost
        assert length.next(stats) == 0
        stats.record_pass(0, target_seconds=1.0, draft_seconds=0.0)
    # five rejections are not yet enough to stop drafting: their alpha, 0.5 / 6, says plain (1.083 tokens for
    # 0.05 draft + 1.05 verification: 0.98 of plain), but Wilson's upper bound, 1 / 6, says k = 1 (1.06)
    stats.accepted, stats.proposed, stats.reached_at = 0, 5, [5]
    assert length.next(stats) == 1
    # twelve: the upper bound is 0.077 (1.077 / 1.10 < 1), and even an optimist takes plain steps
    stats.accepted, stats.proposed, stats.reached_at = 0, 12, [12]
    assert length.next(stats) == 0


@pytest.mark.parametrize("plain_times,speculates", [((1.3, 1.0, 1.0), False), ((1.3, 1.3, 1.3), True)])
def test_auto_k_reads_the_target_s_costs_as_the_least_of_their_recent_timings(plain_times, speculates):
    """One plain step timed while another process held the CPU (1.3 for 1.0) must not make the verification
    look cheap: alpha 0.65, a k = 1 pass at 1.6 and draft steps at 0.17 lose to plain (1.65 / 1.77 = 0.93),
    but pay against a unit read as 1.3 (1.65 / 1.36 = 1.21). The companion: where every plain step really
    costs 1.3, the same passes do pay, so the least timing is what decides, not a rule against drafting."""
    from specdec.speculative import DraftLength
    from specdec.stats import SpecStats

    stats, length = SpecStats(accepted=650, proposed=1000, reached_at=[1000], accepted_at=[650]), DraftLength("auto")
    for t in plain_times:  # one step at a time, as the controller sees them
        stats.record_pass(0, target_seconds=t, draft_seconds=0.0)
        length.next(stats)
    for _ in range(4):
        stats.record_pass(1, target_seconds=1.6, draft_seconds=0.17)
        length.next(stats)
    assert (length.next(stats) > 0) == speculates


def test_auto_k_retimes_the_plain_step_while_drafting():
    """After REFRESH drafting steps one plain step re-times the unit, and its timing is what the next decision
    reads: here the machine got faster (plain 1.0 -> 0.5, the verification pass with it: 1.2 plain steps at
    k = 8 now read 2.4), which the old unit would have misread as a verification at half its cost."""
    from specdec.speculative import DraftLength
    from specdec.stats import SpecStats

    stats, length = SpecStats(accepted=900, proposed=1000, reached_at=[1000], accepted_at=[900]), DraftLength("auto")
    _plain_steps(stats)
    stats.record_pass(4, target_seconds=1.2, draft_seconds=0.2)
    ks = []
    for _ in range(DraftLength.REFRESH + 1):
        ks.append(length.next(stats))
        if ks[-1]:
            stats.record_pass(ks[-1], target_seconds=1.2, draft_seconds=0.05 * ks[-1])
    assert all(ks[:-1]) and ks[-1] == 0
    stats.record_pass(0, target_seconds=0.5, draft_seconds=0.0)  # the refresh step, timed
    stats.accepted, stats.accepted_at = 300, [300]  # alpha 0.3
    for _ in range(DraftLength.WINDOW):
        stats.record_pass(8, target_seconds=1.2, draft_seconds=0.0)
    # against the old unit (1.0) k = 1 would pay 1.19x (1.3 tokens for a verification read as 1.05 steps and
    # 0.04 of a draft step); against the refreshed one (0.5) every pass costs twice the plain steps: plain
    assert length.next(stats) == 0


def test_prefills_are_not_timed_the_target_s_nor_the_draft_s():
    """The controller's costs come from timed passes; a prefill is not a decode step. The target's is the first
    pass; a draft model prefills in that same pass, a draft head (which needs the target's features) in the
    second: both are left out, n-gram lookup (no weights) leaves out only the target's."""
    target = tiny_model("llama")
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    for draft, untimed in ((target, 1), (tiny_head(target, seed=1), 2), ("ngram", 1)):
        stats = specdec.generate(target, ids, max_new_tokens=12, draft_model=draft, num_draft_tokens=2,
                                 eos_token_id=[], return_dict_in_generate=True).stats
        assert stats.timed_target_passes == stats.target_passes - untimed, draft


def test_wilson_upper_bound():
    from specdec.speculative import _wilson_upper

    assert _wilson_upper(0, 0) == 1.0
    assert _wilson_upper(0, 3) == pytest.approx(0.25)  # (1/6 + sqrt(1/36)) / (4/3)
    assert _wilson_upper(0, 12) == pytest.approx(1 / 13)  # z = 1, p = 0: 1 / (n + 1)
    assert 0.6 < _wilson_upper(600, 1000) < 0.62  # 0.6 + one standard deviation (0.0155)
    assert _wilson_upper(5, 5) == pytest.approx(1.0)


def test_auto_k_reads_alpha_per_reached_draft():
    from specdec.speculative import DraftLength
    from specdec.stats import SpecStats

    # probes at k = 4 of a draft accepted at a = 0.26 per token: 35 of 400 proposed drafts accepted, but
    # only 135 were reached (the rest followed a rejection). alpha = 0.26 makes k = 1 pay here (1.26 tokens
    # for 0.1 + 1.03 plain steps: 1.12); accepted / proposed = 0.09 would have said plain (0.96)
    stats = SpecStats(accepted=35, proposed=400, reached_at=[100, 26, 7, 2], accepted_at=[26, 7, 2, 0])
    _plain_steps(stats)
    stats.record_pass(4, target_seconds=1.12, draft_seconds=0.4)
    assert DraftLength("auto").next(stats) == 1


@pytest.mark.parametrize("requested,speculates", [(1000, True), (5000, False)])
def test_auto_k_discounts_rows_the_proposer_has_nothing_for(requested, speculates):
    from specdec.speculative import DraftLength
    from specdec.stats import SpecStats

    # alpha 0.6, free drafts, each draft adds 15% to the pass: pays when every row gets drafts (1.39 at k = 1),
    # not when only a fifth of the asked-for drafts exist (n-gram misses): (1 + 0.2 * 0.6) / 1.15 = 0.97
    stats = SpecStats(accepted=600, proposed=1000, requested=requested, reached_at=[1000], accepted_at=[600])
    _plain_steps(stats)
    stats.record_pass(4, target_seconds=1.6, draft_seconds=0.0)
    assert (DraftLength("auto").next(stats) > 0) == speculates


def test_auto_k_probe_size_follows_the_batch():
    from specdec.speculative import DraftLength
    from specdec.stats import SpecStats

    # about PROBE acceptance samples per probing step, whatever the batch
    assert [DraftLength("auto", batch_size=b).next(SpecStats()) for b in (1, 2, 3, 4, 16)] == [4, 2, 2, 1, 1]


def test_auto_k_reprobes_less_often_while_the_draft_does_not_pay():
    from specdec.speculative import DraftLength
    from specdec.stats import SpecStats

    stats, length = SpecStats(accepted=0, proposed=40, reached_at=[40], accepted_at=[0]), DraftLength("auto")
    _plain_steps(stats)
    stats.record_pass(1, target_seconds=1.1, draft_seconds=0.1)  # alpha ~ 0: plain steps pay best
    ks = [length.next(stats) for _ in range(16 + 1 + 32 + 1 + 64 + 1)]
    reprobes = [i for i, k in enumerate(ks) if k]
    assert reprobes == [16, 16 + 1 + 32, 16 + 1 + 32 + 1 + 64]  # waits of 16, 32, 64 plain steps
    stats.accepted = 40  # the text changed: the draft now agrees, the reprobe's verdict is to speculate
    assert length.next(stats) > 0 and length.reprobe == DraftLength.REPROBE


def test_auto_k_reprobe_wait_is_capped():
    from specdec.speculative import DraftLength
    from specdec.stats import SpecStats

    stats, length = SpecStats(accepted=0, proposed=40, reached_at=[40], accepted_at=[0]), DraftLength("auto")
    _plain_steps(stats)
    stats.record_pass(1, target_seconds=1.1, draft_seconds=0.1)
    at = [i for i in range(3000) if length.next(stats)]
    gaps = [b - a for a, b in zip(at, at[1:])]
    assert gaps[:4] == [33, 65, 129, 257] and set(gaps[4:]) == {DraftLength.MAX_REPROBE + 1}


def test_eos_as_first_draft_token_truncates():
    target = tiny_model("llama")
    ids = torch.tensor([[3, 4, 5]])
    first = int(specdec.generate(target, ids, max_new_tokens=1, eos_token_id=[])[0, -1])
    out = specdec.generate(target, ids, max_new_tokens=10, eos_token_id=first, draft_model=target,
                           num_draft_tokens=4, pad_token_id=0)
    assert out.tolist() == [[3, 4, 5, first]]


def test_rows_finish_at_different_steps():
    target = tiny_model("llama")
    ids = torch.tensor([[3, 4, 5], [9, 10, 11], [20, 21, 22]])
    plain = specdec.generate(target, ids, max_new_tokens=16, eos_token_id=[])
    eos = int(plain[1, 3 + 4])
    want = target.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=eos, pad_token_id=0)
    got = specdec.generate(target, ids, max_new_tokens=16, eos_token_id=eos, pad_token_id=0,
                           draft_model=perturbed_copy("llama"), num_draft_tokens=3)
    assert torch.equal(got, want)


def test_prompt_of_one_token_and_one_new_token():
    target = tiny_model("qwen2")
    for max_new in (1, 2):
        want = target.generate(torch.tensor([[5]]), max_new_tokens=max_new, do_sample=False, eos_token_id=None,
                               pad_token_id=0)
        got = specdec.generate(target, torch.tensor([[5]]), max_new_tokens=max_new, eos_token_id=[],
                               draft_model=target, num_draft_tokens=4)
        assert torch.equal(got, want)


def test_seeded_speculative_sampling_reproduces():
    target, draft = tiny_model("llama"), perturbed_copy("llama")
    ids = torch.tensor([[3, 4, 5]] * 3)
    def run(seed):
        return specdec.generate(target, ids, max_new_tokens=20, do_sample=True, temperature=0.9, top_p=0.9,
                                draft_model=draft, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(4), run(4)) and not torch.equal(run(4), run(5))


def test_vocab_mismatch_is_refused_naming_both_sizes():
    target = tiny_model("llama")
    other = tiny_model("llama", seed=1)
    native = as_native(other)
    import copy
    bad = copy.copy(native)
    bad.config = copy.copy(native.config)
    bad.config.vocab_size = 57
    with pytest.raises(ValueError, match=r"57.*101"):
        specdec.generate(target, torch.tensor([[3]]), max_new_tokens=2, draft_model=bad)


def test_padding_only_vocab_difference_is_accepted_and_other_tokenizers_are_not():
    from types import SimpleNamespace

    from specdec.speculative import check_vocab

    def m(vocab, eos):
        return SimpleNamespace(vocab_size=vocab, config=SimpleNamespace(bos_token_id=None, eos_token_id=eos))

    check_vocab(m(151936, 151643), m(152064, 151643))  # Qwen2 0.5B vs 7B: one tokenizer, padded embeddings
    with pytest.raises(ValueError, match="32000.*128256"):
        check_vocab(m(32000, 2), m(128256, 2))
    with pytest.raises(ValueError, match="50257.*50304.*differ"):  # GPT-2 vs GPT-NeoX: close sizes, other tokenizer
        check_vocab(m(50257, 50256), m(50304, 0))


def test_exception_inside_a_step_leaves_models_usable():
    target, draft = tiny_model("llama"), perturbed_copy("llama")
    ids = torch.tensor([[3, 4, 5]])
    want = specdec.generate(target, ids, max_new_tokens=8, draft_model=draft)

    class Exploding:
        calls = 0

        def propose(self, state, k):
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("boom")
            return state.tokens.new_full((state.batch_size, k), 3), None

    with pytest.raises(RuntimeError, match="boom"):
        specdec.generate(target, ids, max_new_tokens=8, draft_model=Exploding())
    assert torch.equal(specdec.generate(target, ids, max_new_tokens=8, draft_model=draft), want)


def test_a_custom_proposer_is_used_losslessly():
    """A deterministic proposer (no draft_probs) that always offers the same token: greedy stays exact."""
    target = tiny_model("llama")

    class Constant:
        def propose(self, state, k):
            return state.tokens.new_full((state.batch_size, k), 24), None

    ids = torch.tensor([[3, 4, 5]])
    assert torch.equal(specdec.generate(target, ids, max_new_tokens=15, draft_model=Constant()),
                       specdec.generate(target, ids, max_new_tokens=15))


@pytest.mark.parametrize("draft_vocab", [1088, 1216])
def test_vocab_sizes_that_differ_by_padding_stay_exact(draft_vocab):
    """Target 1152 ids (a multiple of 64), draft 1088 or 1216: the same tokenizer, padded differently."""
    from conftest import one_layer_llama

    target, draft = one_layer_llama(1152, 32, seed=0, scale=8), one_layer_llama(draft_vocab, 32, seed=0, scale=8)
    with torch.no_grad():  # a draft that agrees on the shared ids often: same weights where the shapes meet
        shared = min(1152, draft_vocab)
        for p, q in zip(draft.parameters(), target.parameters()):
            if p.shape == q.shape:
                p.copy_(q)
            else:
                p[:shared].copy_(q[:shared])
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    plain = specdec.generate(target, ids, max_new_tokens=20, pad_token_id=0)
    out = specdec.generate(target, ids, max_new_tokens=20, pad_token_id=0, draft_model=draft, num_draft_tokens=3,
                           return_dict_in_generate=True)
    assert torch.equal(out.sequences, plain)
    assert out.stats.accepted > 0


def test_per_position_acceptance_counted_by_hand():
    """A proposer that is right for the first `good` positions, then wrong: the counts are known exactly."""
    target = tiny_model("llama")
    ids = torch.tensor([[3, 4, 5]])
    plain = specdec.generate(target, ids, max_new_tokens=40, eos_token_id=[])

    class RightThenWrong:
        good = 2

        def propose(self, state, k):
            start = int(state.num_tokens[0])
            right = plain[:, start:start + k]
            wrong = (right + 1) % target.config.vocab_size
            return torch.where(torch.arange(k) < self.good, right, wrong), None

    out = specdec.generate(target, ids, max_new_tokens=40, eos_token_id=[], draft_model=RightThenWrong(),
                           num_draft_tokens=4, return_dict_in_generate=True)
    s = out.stats
    assert torch.equal(out.sequences, plain)
    # every pass: positions 0, 1 accepted, position 2 reached and rejected, position 3 never reached; 3 tokens
    # a pass, so 12 passes with k = 4 and one with k = 3 (4 tokens left) emit 39, and one plain step the 40th
    assert s.steps_by_k == {4: 12, 3: 1, 0: 1} and s.target_passes == 14
    assert s.proposed == 12 * 4 + 3 and s.accepted == 13 * 2 and s.emitted == 40
    assert s.reached_at == [13, 13, 13, 0] and s.per_position_acceptance == [1.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("bad", ["shape", "dtype", "range", "probs"])
def test_a_proposer_returning_garbage_is_refused(bad):
    class Garbage:
        def propose(self, state, k):
            tokens = state.tokens.new_full((state.batch_size, k), 3)
            probs = None
            if bad == "shape":
                tokens = tokens[:, :-1]
            elif bad == "dtype":
                tokens = tokens.float()
            elif bad == "range":
                tokens[0, 0] = 10_000
            else:
                probs = torch.ones(state.batch_size, k, 7)
            return tokens, probs

    with pytest.raises(ValueError, match="draft_model"):
        specdec.generate(tiny_model("llama"), torch.tensor([[3, 4]]), max_new_tokens=5, draft_model=Garbage(),
                         num_draft_tokens=3)


def test_a_proposer_that_is_also_a_module_is_used_as_a_proposer():
    class ModuleProposer(torch.nn.Module):
        def propose(self, state, k):
            return state.tokens.new_full((state.batch_size, k), 3), None

    target = tiny_model("llama")
    ids = torch.tensor([[3, 4]])
    assert torch.equal(specdec.generate(target, ids, max_new_tokens=6, draft_model=ModuleProposer()),
                       specdec.generate(target, ids, max_new_tokens=6))
