"""Plain decoding: transformers' generate() output, layout and defaults; bad input is refused cleanly."""

import pytest
import torch
from conftest import FALLBACK_ARCHS, tiny_model

import specdec


def _left_padded(batch, lengths, vocab, seed=0):
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, width - n:] = torch.randint(3, vocab, (n,), generator=gen)
        mask[b, width - n:] = 1
    return ids, mask


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral", *FALLBACK_ARCHS])
def test_plain_greedy_equals_transformers_with_left_padding(name):
    hf = tiny_model(name)
    ids, mask = _left_padded(3, [5, 2, 8], hf.config.vocab_size)
    eos = 7
    want = hf.generate(ids, attention_mask=mask, max_new_tokens=25, do_sample=False, eos_token_id=eos,
                       pad_token_id=0)
    got = specdec.generate(hf, ids, attention_mask=mask, max_new_tokens=25, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, want)


def test_defaults_come_from_generation_config():
    hf = tiny_model("llama")
    ids = torch.tensor([[3, 4, 5]])
    want = hf.generate(ids, do_sample=False)  # max_length=20 from generation_config, eos 2, pad 0
    assert torch.equal(specdec.generate(hf, ids), want)


def test_eos_stops_rows_and_pads_them():
    hf = tiny_model("llama")
    ids, mask = _left_padded(2, [4, 4], hf.config.vocab_size, seed=5)
    plain = specdec.generate(hf, ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[])
    eos = int(plain[0, 4 + 2])  # the third token row 0 generates
    out = specdec.generate(hf, ids, attention_mask=mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=99)
    row0 = out[0, 4:].tolist()
    first = row0.index(eos)
    assert all(t == 99 for t in row0[first + 1:])
    assert torch.equal(out, hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                        eos_token_id=eos, pad_token_id=99))


def test_seeded_sampling_is_reproducible_and_varies_with_seed():
    hf = tiny_model("llama")
    ids = torch.tensor([[3, 4, 5]] * 4)
    def run(seed):
        return specdec.generate(hf, ids, max_new_tokens=15, do_sample=True, temperature=1.5,
                                generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


def test_streamer_receives_prompt_then_every_token():
    hf = tiny_model("llama")
    seen = []

    class Recorder:
        def put(self, value):
            seen.append(value.reshape(-1).tolist())

        def end(self):
            seen.append("end")

    ids = torch.tensor([[3, 4, 5]])
    out = specdec.generate(hf, ids, max_new_tokens=6, eos_token_id=[], streamer=Recorder())
    assert seen[0] == [3, 4, 5] and seen[-1] == "end"
    assert sum(seen[1:-1], []) == out[0, 3:].tolist()


BAD = [
    (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), "input_ids"),
    (dict(input_ids=torch.tensor([[3, 500]])), "input_ids"),
    (dict(input_ids=torch.tensor([[3, -1]])), "input_ids"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(temperature=float("nan"), do_sample=True), "temperature"),
    (dict(temperature=-1.0, do_sample=True), "temperature"),
    (dict(temperature=float("inf"), do_sample=True), "temperature"),
    (dict(top_p=float("nan"), do_sample=True), "top_p"),
    (dict(pad_token_id=-3), "pad_token_id"),
    (dict(attention_mask=torch.tensor([[1.0, 0.5, 1.0]])), "attention_mask"),
    (dict(top_p=0.0, do_sample=True), "top_p"),
    (dict(top_p=1.5, do_sample=True), "top_p"),
    (dict(top_k=-1, do_sample=True), "top_k"),
    (dict(attention_mask=torch.ones(2, 3, dtype=torch.long)), "attention_mask"),
    (dict(attention_mask=torch.zeros(1, 3, dtype=torch.long)), "attention_mask"),
    (dict(num_draft_tokens=0, draft_model="self"), "num_draft_tokens"),
    (dict(num_draft_tokens="many", draft_model="self"), "num_draft_tokens"),
]


@pytest.mark.parametrize("kwargs,argument", BAD, ids=[a for _, a in BAD])
def test_bad_input_names_the_argument_and_leaves_the_model_usable(kwargs, argument):
    hf = tiny_model("llama")
    args = dict(input_ids=torch.tensor([[3, 4, 5]]), max_new_tokens=4)
    args.update(kwargs)
    if args.get("draft_model") == "self":
        args["draft_model"] = hf
    prompt = torch.tensor([[3, 4, 5]])
    before = specdec.generate(hf, prompt, max_new_tokens=4)
    with pytest.raises(ValueError, match=argument):
        specdec.generate(hf, **args)
    assert torch.equal(specdec.generate(hf, prompt, max_new_tokens=4), before)
    assert torch.equal(hf.generate(prompt, max_new_tokens=4, do_sample=False), before)  # the caller's model too


def test_a_k_beyond_the_generation_sizes_the_caches_by_what_can_be_drafted():
    """k = 10^8 with 3 new tokens: at most 2 drafts fit, so the caches hold the prompt + 3 (+ 1), not 10^8 slots
    (which would be ~100 GB for this tiny model)."""
    hf = tiny_model("llama")
    ids = torch.tensor([[3, 4, 5]])
    out = specdec.generate(hf, ids, draft_model=hf, num_draft_tokens=10**8, max_new_tokens=3)
    assert torch.equal(out, specdec.generate(hf, ids, max_new_tokens=3))


def test_not_a_model_is_refused():
    with pytest.raises(ValueError, match="model"):
        specdec.generate(object(), torch.tensor([[1]]), max_new_tokens=1)


def test_temperature_zero_is_greedy():
    hf = tiny_model("llama")
    ids = torch.tensor([[3, 4, 5]])
    greedy = specdec.generate(hf, ids, max_new_tokens=10)
    assert torch.equal(specdec.generate(hf, ids, max_new_tokens=10, do_sample=True, temperature=0.0,
                                        generator=torch.Generator().manual_seed(0)), greedy)


def test_generation_config_settings_specdec_does_not_implement_are_refused():
    import copy

    hf = copy.deepcopy(tiny_model("llama"))
    hf.generation_config.typical_p = 0.9
    with pytest.raises(ValueError, match="typical_p"):
        specdec.generate(hf, torch.tensor([[3, 4]]), max_new_tokens=3)


def test_conversion_follows_the_model_to_another_dtype():
    import copy

    hf = copy.deepcopy(tiny_model("qwen2", torch.float32))
    ids = torch.tensor([[3, 4, 5]])
    assert torch.equal(specdec.generate(hf, ids, max_new_tokens=8), hf.generate(ids, max_new_tokens=8, do_sample=False))
    hf.to(torch.float64)
    with torch.no_grad():
        hf.lm_head.weight.mul_(-1)  # in place, after the move: the conversion must see it
    assert specdec.models.loading.as_native(hf).dtype == torch.float64
    assert torch.equal(specdec.generate(hf, ids, max_new_tokens=8), hf.generate(ids, max_new_tokens=8, do_sample=False))
