"""``specdec distill`` on a tiny random target with a tiny tokenizer: the loss goes down, the result is a
transformers checkpoint, runs resume, and bad input is refused without overwriting anything."""

from __future__ import annotations

import dataclasses
import functools
import json

import pytest
import torch
from conftest import tiny_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

import specdec
from specdec.distill import HEAD, DistillConfig, _batch, distill, distill_loss, make_chunks, make_draft, train
from specdec.models.head import DraftHead
from specdec.prompts import training_prompts

SMALL = DistillConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
                      num_prompts=40, eval_prompts=8, max_new_tokens=16, gen_batch=8, teacher_top_k=8, steps=80,
                      batch_size=8, warmup=5, lr=1e-2, checkpoint_every=20)


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(training_prompts(300, seed=5), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")


@pytest.fixture(scope="module")
def target_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-target")
    tokenizer = _tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True))
    with torch.no_grad():  # sharper than random init: the teacher has something to teach
        model.lm_head.weight.mul_(6.0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_distill_reduces_loss_and_saves_a_transformers_checkpoint(target_folder, tmp_path):
    out = tmp_path / "draft"
    report = distill(str(target_folder), out, SMALL, progress=False)
    assert report["final_loss"] < report["initial_loss"] - 0.5, report
    assert 0.0 <= report["agreement"] <= 1.0 and report["answer_tokens"] > 0
    per_k = report["tokens_per_target_forward"]
    assert all(1.0 <= per_k[k] <= k + 1 for k in per_k) and per_k[8] >= per_k[1]
    assert report["cost_ratio_c"] > 0
    assert json.loads((out / "eval.json").read_text())["final_loss"] == report["final_loss"]
    draft = AutoModelForCausalLM.from_pretrained(out)  # a plain transformers checkpoint
    assert draft.config.vocab_size == json.loads((target_folder / "config.json").read_text())["vocab_size"]
    assert draft.dtype == torch.bfloat16
    prompts = json.loads((out / "prompts.json").read_text())
    assert not set(prompts["train"]) & set(prompts["eval"])  # the evaluation is held out

    # resume of a finished run: nothing is generated or trained again; a run saved before a setting existed
    # (here: its distill.json without the self-prompt settings) resumes with that setting's default
    settings = json.loads((out / "distill.json").read_text())
    del settings["config"]["self_prompts"], settings["config"]["max_prompt_tokens"]
    (out / "distill.json").write_text(json.dumps(settings))
    chunks = {p: p.stat().st_mtime_ns for p in (out / "data").rglob("*.pt")}
    again = distill(str(target_folder), out, SMALL, resume=True, progress=False)
    assert {p: p.stat().st_mtime_ns for p in (out / "data").rglob("*.pt")} == chunks
    assert again["agreement"] == pytest.approx(report["agreement"], abs=0.02)  # bfloat16 save/reload

    # resumed with more prompts (in another batch size) the data grows, the chunks made stay; other settings
    # may not change
    grown = DistillConfig(**{**SMALL.__dict__, "num_prompts": 48, "gen_batch": 4})
    distill(str(target_folder), out, grown, resume=True, progress=False)
    after = {p: p.stat().st_mtime_ns for p in (out / "data").rglob("*.pt")}
    assert {p: after[p] for p in chunks} == chunks
    assert sorted(p.name for p in set(after) - set(chunks)) == ["00040-00044.pt", "00044-00048.pt"]
    with pytest.raises(ValueError, match="other settings"):
        distill(str(target_folder), out, DistillConfig(**{**grown.__dict__, "lr": 1e-4}), resume=True, progress=False)


SMALL_HEAD = DistillConfig(**{**HEAD, "num_prompts": 24, "eval_prompts": 8, "max_new_tokens": 16, "gen_batch": 8,
                                "steps": 60, "batch_size": 8, "warmup": 5, "lr": 3e-3, "kept_vocab": 200,
                                "checkpoint_every": 20})


def test_distill_head_reduces_loss_and_the_head_drafts_exactly(target_folder, tmp_path):
    out = tmp_path / "head"
    report = distill(str(target_folder), out, SMALL_HEAD, progress=False)
    assert report["final_loss"] < report["initial_loss"] - 0.5, report
    per_k = report["tokens_per_target_forward"]
    assert all(1.0 <= per_k[k] <= k + 1 for k in per_k) and per_k[8] >= per_k[1]
    assert 0.0 < report["kept_vocab_coverage"] <= 1.0 and report["cost_ratio_c"] > 0
    assert report["first_draft_agreement"] > 5 / SMALL_HEAD.kept_vocab  # learned: a random head's is ~1/200
    head, tokenizer = specdec.load(out)
    assert isinstance(head, DraftHead) and head.dtype == torch.bfloat16 and len(head.vocab_ids) == 200
    target, _ = specdec.load(target_folder)
    ids = torch.tensor([tokenizer("Explain what a tree is.")["input_ids"]])
    plain = specdec.generate(target, ids, max_new_tokens=24, eos_token_id=[])
    spec = specdec.generate(target, ids, max_new_tokens=24, eos_token_id=[], draft_model=head, num_draft_tokens=3)
    assert torch.equal(spec, plain)


def test_training_resumes_from_its_checkpoint(target_folder, tmp_path):
    from specdec.distill import _load_target, answer_batch, teacher_records

    model, tokenizer = _load_target(str(target_folder))
    config = DistillConfig(**{**SMALL.__dict__, "steps": 10, "num_prompts": 8})
    records = make_chunks(training_prompts(8), tmp_path / "data", 4, "answers", lambda start, prompts: teacher_records(
        model, answer_batch(model, tokenizer, config.data, start, prompts), config.teacher_top_k))
    draft = make_draft(model, config.objective)
    first = train(draft, records, tmp_path, config.train, lambda rs: distill_loss(draft, *_batch(rs, 2)),
                  resume=False, progress=False)
    longer = DistillConfig(**{**config.__dict__, "steps": 16})
    draft = make_draft(model, longer.objective)
    history = train(draft, records, tmp_path, longer.train, lambda rs: distill_loss(draft, *_batch(rs, 2)),
                    resume=True, progress=False)
    assert history[:10] == first and len(history) == 16  # continued at step 10, not restarted


def test_bad_input_is_refused_and_nothing_overwritten(target_folder, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="out=.*exists.*resume"):
        distill(str(target_folder), out, SMALL, progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).write_bytes((target_folder / name).read_bytes())
    with pytest.raises(ValueError, match="tokenizer"):
        distill(str(no_tokenizer), tmp_path / "new", SMALL, progress=False)
    assert not (tmp_path / "new").exists()

    with pytest.raises(FileNotFoundError, match="target="):
        distill(str(tmp_path / "missing"), tmp_path / "new", SMALL, progress=False)
    # --device: checked before the target is loaded or anything is written
    head = dataclasses.replace(SMALL, head=True)
    for device, config, message in (("gpu0", head, "device='gpu0' is not a torch device"),
                                    ("cuda", SMALL, "a small draft trains on the CPU only"),
                                    ("meta", head, "distill runs on cpu or cuda")):
        with pytest.raises(ValueError, match=message):
            distill(str(tmp_path / "missing"), tmp_path / "new", config, progress=False, device=device)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no CUDA device"):
            distill(str(tmp_path / "missing"), tmp_path / "new", head, progress=False, device="cuda")
    assert not (tmp_path / "new").exists()
    for bad in (dict(num_layers=0), dict(hidden_size=30, num_heads=4), dict(sample_fraction=1.5), dict(lr=-1.0),
                dict(kept_vocab=0), dict(unroll=0), dict(self_prompts=-1), dict(max_prompt_tokens=0),
                dict(hidden_size=12, num_heads=4, num_kv_heads=2), dict(head=True, max_new_tokens=1)):
        with pytest.raises(ValueError):
            DistillConfig(**bad)

    # --resume continues a run; a folder that holds none (or a file) is refused, not overwritten
    for not_a_run in (out, tmp_path / "file.txt"):
        if not not_a_run.exists():
            not_a_run.write_text("mine")
        with pytest.raises(ValueError, match="not a distill run"):
            distill(str(target_folder), not_a_run, SMALL, resume=True, progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (tmp_path / "file.txt").read_text() == "mine"
    # settings that only the target can refute: refused once it is loaded, before anything is written
    with pytest.raises(ValueError, match="teacher_top_k=1000000 exceeds"):
        distill(str(target_folder), tmp_path / "new", dataclasses.replace(SMALL, teacher_top_k=10**6), progress=False)
    gpt2 = tmp_path / "gpt2"
    tiny_model("gpt2").save_pretrained(gpt2)
    AutoTokenizer.from_pretrained(target_folder).save_pretrained(gpt2)
    with pytest.raises(ValueError, match="'gpt2' model; distill trains drafts for the native architectures"):
        distill(str(gpt2), tmp_path / "new", SMALL, progress=False)
    assert not (tmp_path / "new").exists()


@pytest.fixture(scope="module")
def chatty_target_folder(target_folder, tmp_path_factory):
    """The tiny target with an EOS logit of sum(normed hidden) / 2 (its tied EOS row set to halves): it ends a
    text within ~10 tokens often enough to write prompts of its own (the random one almost never does)."""
    folder = tmp_path_factory.mktemp("chatty-target")
    model = LlamaForCausalLM.from_pretrained(target_folder)
    with torch.no_grad():
        model.lm_head.weight[2] = 0.5
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(target_folder).save_pretrained(folder)
    return folder


def test_distill_with_self_written_prompts_holds_some_out_and_reports_each_source(chatty_target_folder, tmp_path):
    out = tmp_path / "head"
    config = DistillConfig(**{**SMALL_HEAD.__dict__, "steps": 10, "self_prompts": 8, "max_prompt_tokens": 24})
    report = distill(str(chatty_target_folder), out, config, progress=False)
    prompts = json.loads((out / "prompts.json").read_text())
    written = json.loads((out / "self_prompts.json").read_text())["prompts"]
    assert len(written) == 8 + 8 and prompts["eval_self"] == written[:8]  # 8 held out, 8 more to train on
    assert prompts["train"] == training_prompts(24 + 8)[8:] + written[8:]
    by_source = report["by_source"]
    assert set(by_source) == {"eval", "eval_self"}
    assert report["answer_tokens"] == by_source["eval"]["answer_tokens"] + by_source["eval_self"]["answer_tokens"]
    assert sum(len(torch.load(f)) for f in (out / "data" / "eval-self").glob("*.pt")) == 8


def test_make_chunks_resumes_and_grows(tmp_path):
    """Chunks cover prompt ranges: a second call makes only what no chunk covers, in its own batch size, and
    returns every prompt's records in order; prompts past the list (a run resumed with fewer) are left out."""
    made = []

    def make(start, prompts):
        made.append((start, len(prompts)))
        return [{"prompt": p, "start": start} for p in prompts]

    prompts = [f"p{i}" for i in range(10)]
    first = make_chunks(prompts[:6], tmp_path, 4, "test", make)
    assert made == [(0, 4), (4, 2)] and [r["prompt"] for r in first] == prompts[:6]
    (tmp_path / "00004-00006.pt").unlink()  # as if that batch had been interrupted
    grown = make_chunks(prompts, tmp_path, 3, "test", make)
    assert made[2:] == [(4, 3), (7, 3)] and [r["prompt"] for r in grown] == prompts
    assert [r["prompt"] for r in make_chunks(prompts[:4], tmp_path, 3, "test", make)] == prompts[:4]
    assert len(made) == 4  # nothing made again
    with pytest.raises(ValueError, match="00004-00007.pt.*at least 7"):  # a chunk half past the prompts
        make_chunks(prompts[:5], tmp_path, 3, "test", make)


def test_answers_with_features_are_generate_s_and_a_second_pass_s(target_folder):
    """The answers are specdec.generate's greedy ones, and the features recorded while answering are the
    bits one pass over prompt + answer records (each row's bits do not depend on how it was batched)."""
    from specdec.distill import answer

    target, _ = specdec.load(target_folder)
    prompts = [[1, 5, 9, 13], [1, 7], [1, 3, 3, 8, 2, 6]]
    answers = answer(target, prompts, 12, [])
    for row, prompt in enumerate(prompts):
        plain = specdec.generate(target, torch.tensor([prompt]), max_new_tokens=12, eos_token_id=[])
        assert plain[0].tolist() == answers[row].ids.tolist() and answers[row].prompt_len == len(prompt)
        seq = plain[0]
        cache = target.new_cache(1, len(seq), features=True)
        with torch.inference_mode():
            target(seq[None], torch.arange(len(seq))[None], cache, logits_index=torch.zeros(1, 1, dtype=torch.long))
        assert torch.equal(answers[row].features, cache.features[0, :len(seq) - 1])  # all but the last token's


@torch.inference_mode()
def _answer_step_by_step(target, prompts, max_new_tokens, eos, sampling, generator=None):
    """An independent decode loop, the reference for generate()'s feature_hook: every row steps until all have
    answered an EOS or max_new_tokens, each answer token fed back (the last one only to write its feature)
    into a cache that keeps every position's feature. -> answers [B, new], features [B, >= P + new, hidden]"""
    from specdec.sampling import sample

    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)  # [B, P] right-padded, as the native model takes
    positions = torch.full((len(prompts), width), -1)
    for row, prompt in enumerate(prompts):
        ids[row, :len(prompt)], positions[row, :len(prompt)] = torch.tensor(prompt), torch.arange(len(prompt))
    lengths = (positions >= 0).sum(1)  # [B]
    cache = target.new_cache(len(prompts), width + max_new_tokens, features=True)
    logits = target(ids, positions, cache, logits_index=(lengths - 1)[:, None])  # [B, 1, vocab]
    finished, answers = torch.zeros(len(prompts), dtype=torch.bool), []
    for _ in range(max_new_tokens):
        logits = logits[:, -1]  # [B, vocab]
        token = logits.argmax(-1) if sampling.greedy else sample(sampling.probs(logits), generator)  # [B]
        answers.append(token)
        logits = target(token[:, None], lengths[:, None], cache)
        lengths = lengths + 1
        finished |= torch.isin(token, torch.tensor(eos, dtype=torch.long))
        if bool(finished.all()):
            break
    return torch.stack(answers, 1), cache.features


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_generate_s_feature_hook_gives_the_answers_and_features_of_a_step_by_step_loop(target_folder, dtype):
    """``answer`` (specdec.generate with a feature_hook) against a loop that steps every row until all are
    done: the same answers, greedy and sampled (the same random numbers), cut through the first EOS, and the
    same features at every position but each answer's last. In float32 bit for bit (the CPU kernels compute
    every token alone); in float64 within 1e-12 relative (there the rows that finished are padding in
    generate's passes and live rows in the loop's, and the reference runner's sums differ in the last bit)."""
    from specdec.distill import answer
    from specdec.sampling import SamplingConfig

    target, _ = specdec.load(target_folder, dtype=dtype)
    prompts = [[1, 5, 9, 13], [1, 7], [1, 3, 3, 8, 2, 6], [1, 40, 41]]
    endless = answer(target, prompts, 12, [])
    ends = sorted({int(endless[0].ids[4 + 4]), int(endless[2].ids[6 + 1])})  # ids rows 0 and 2 answer
    sampling = SamplingConfig(do_sample=True, temperature=0.7, top_p=0.9)
    for eos, sampled in (([], False), (ends, False), ([], True)):
        answers = answer(target, prompts, 12, eos, sampled, torch.Generator().manual_seed(3))
        tokens, features = _answer_step_by_step(target, prompts, 12, eos, sampling if sampled else SamplingConfig(),
                                                torch.Generator().manual_seed(3))
        for row, prompt in enumerate(prompts):
            through_eos = next((i + 1 for i, t in enumerate(tokens[row].tolist()) if t in eos), tokens.shape[1])
            assert answers[row].ids.tolist() == prompt + tokens[row, :through_eos].tolist()
            want = features[row, :len(answers[row].ids) - 1]
            if dtype == torch.float32:
                assert torch.equal(answers[row].features, want)
            else:
                assert torch.allclose(answers[row].features, want, rtol=1e-12, atol=1e-12 * want.abs().max())
        assert any(len(a.ids) - a.prompt_len < 12 for a in answers) == bool(eos)  # EOS ends rows early


def test_feature_hook_changes_nothing_generate_returns_and_is_checked(target_folder):
    """generate() with a feature_hook returns what it returns without one, plain or speculative, and hands
    the hook the same features either way; a hook that is not a function, or a target without native
    features, is refused with a ValueError naming it."""
    target, _ = specdec.load(target_folder)
    ids = torch.tensor([[1, 5, 9, 13], [0, 0, 1, 7]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    kept = {}
    for draft in (None, "ngram"):
        settings = dict(draft_model=draft, num_draft_tokens=3, max_new_tokens=10, eos_token_id=[],
                        return_dict_in_generate=True)
        hooked = specdec.generate(target, ids, mask, **settings, feature_hook=functools.partial(kept.__setitem__,
                                                                                                draft))
        plain = specdec.generate(target, ids, mask, **settings)
        assert torch.equal(hooked.sequences, plain.sequences) and hooked.stats.emitted == plain.stats.emitted
        assert kept[draft].shape == (2, 4 + 10, target.config.hidden_size)
    for row, prompt_len in enumerate((4, 2)):  # slot == position; every position but the last token's
        assert torch.equal(kept["ngram"][row, :prompt_len + 9], kept[None][row, :prompt_len + 9])
    with pytest.raises(ValueError, match="feature_hook must be a function of the features, got feature_hook=3"):
        specdec.generate(target, ids, mask, max_new_tokens=4, feature_hook=3)
    with pytest.raises(ValueError, match="feature_hook reads the target's hidden states.*TransformersModel"):
        specdec.generate(tiny_model("gpt2"), ids, mask, max_new_tokens=4, feature_hook=print)


def test_self_written_prompts_keep_finished_new_messages_and_resume(target_folder, tmp_path, monkeypatch):
    """The bookkeeping around the target's samples, on scripted samples: a message counts when it ends with EOS,
    has three words and is new but for case and punctuation (among those kept and ``exclude``); the file lets
    a second call reuse them without sampling; 20 rounds in a row without a new one give up."""
    import specdec.speculative
    from specdec.distill import SELF_PROMPT_BATCH, DataConfig, _load_target, self_written_prompts

    model, tokenizer = _load_target(str(target_folder))
    prefix = [tokenizer.bos_token_id]  # the tiny tokenizer has no chat template: messages start after BOS

    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    eos, pad = 2, 0
    script = [ids("one two three") + [eos], ids("One, two three!") + [eos], ids("too short") + [eos],
              ids("four five six") * 2, ids("seven eight nine") + [eos], ids("ten eleven twelve") + [eos]]
    calls = []

    def scripted(model, rows, max_new_tokens, **kwargs):
        assert rows.tolist() == [prefix] * SELF_PROMPT_BATCH and max_new_tokens == 24
        assert kwargs["eos_token_id"] == [eos] and kwargs["do_sample"] and kwargs["temperature"] == 1.0
        calls.append(kwargs["generator"].initial_seed())
        new = [(script[i] if i < len(script) else []) for i in range(SELF_PROMPT_BATCH)]
        new = [(row + [pad] * max_new_tokens)[:max_new_tokens] for row in new]  # no EOS: ran out of tokens
        return torch.cat([rows, torch.tensor(new)], dim=1)

    monkeypatch.setattr(specdec.speculative, "generate", scripted)
    config = DataConfig(max_prompt_tokens=24)
    file = tmp_path / "self_prompts.json"
    want = ["one two three", "seven eight nine"]
    assert self_written_prompts(model, tokenizer, 2, file, config, progress=False,
                                exclude=["Ten, eleven twelve."]) == want
    assert len(calls) == 1  # one round made both
    assert self_written_prompts(model, tokenizer, 2, file, config, progress=False) == want
    assert len(calls) == 1  # reused from the file
    with pytest.raises(ValueError, match="20 rounds .* no new prompt"):  # ten eleven twelve, then nothing new
        self_written_prompts(model, tokenizer, 4, file, config, progress=False)
    assert json.loads(file.read_text())["prompts"] == want + ["ten eleven twelve"]
    assert calls == [i for i in range(22)]  # round i seeded with i (seed 0): a resumed run repeats nothing

    # a GPU run's larger batches sample larger rounds: gen_batch rows where that is more than 64
    wide = dataclasses.replace(config, gen_batch=2 * SELF_PROMPT_BATCH)
    rows_seen = []
    def counted(model, rows, **kwargs):
        rows_seen.append(len(rows))
        return scripted(model, rows[:SELF_PROMPT_BATCH], **kwargs)

    monkeypatch.setattr(specdec.speculative, "generate", counted)
    assert self_written_prompts(model, tokenizer, 3, file, wide, progress=False) == want + ["ten eleven twelve"]
    assert rows_seen == []  # (all three from the file)
    with pytest.raises(ValueError, match=f"20 rounds of {2 * SELF_PROMPT_BATCH} samples"):
        self_written_prompts(model, tokenizer, 4, file, wide, progress=False)
    assert rows_seen == [2 * SELF_PROMPT_BATCH] * 20


def test_one_trainer_runs_both_objectives(target_folder, tmp_path):
    """The same answers made into each objective's records, then the same ``train`` over either: a few steps
    lower the loss, and each evaluation reports its figures."""
    from specdec.distill import DraftObjective, HeadObjective, TrainConfig, _load_target, answer_batch
    from specdec.models.loading import as_native

    model, tokenizer = _load_target(str(target_folder))
    target = as_native(model)
    answers = answer_batch(target, tokenizer, SMALL.data, 0, training_prompts(16))
    config = TrainConfig(steps=12, batch_size=8, lr=1e-2, warmup=2, checkpoint_every=5)
    for objective, figure in ((DraftObjective(SMALL.objective, target, tokenizer), "agreement"),
                              (HeadObjective(SMALL_HEAD.objective, target, tokenizer), "first_draft_agreement")):
        records = objective.records(answers)
        trained = objective.make(records, config.seed)
        out = tmp_path / type(objective).__name__
        out.mkdir()
        history = train(trained, records, out, config, functools.partial(objective.loss, trained), resume=False,
                        progress=False)
        assert [step for step, _, _ in history] == list(range(1, 13)) and (out / "trainer.pt").is_file()
        assert history[-1][1] < history[0][1], (type(objective).__name__, history)
        assert 0.0 <= objective.evaluate(trained, records)[figure] <= 1.0


def test_each_config_validates_its_fields_and_the_flat_one_makes_them():
    """Every setting is checked where it enters, by the config it belongs to (a ValueError naming it and
    its value); DistillConfig, flat as the command line gives it, makes the configs the pipeline reads:
    the objective's is a DraftConfig, or with head a HeadConfig."""
    from specdec.distill import DataConfig, DraftConfig, HeadConfig, TrainConfig

    for config, bad, message in (
            (DataConfig, dict(num_prompts=0), "num_prompts=0"), (DataConfig, dict(self_prompts=-1), "self_prompts=-1"),
            (DataConfig, dict(sample_fraction=1.5), "sample_fraction=1.5"),
            (DataConfig, dict(max_prompt_tokens=0), "max_prompt_tokens=0"), (DataConfig, dict(seed=-1), "seed=-1"),
            (TrainConfig, dict(steps=0), "steps=0"), (TrainConfig, dict(lr=-1.0), "lr=-1.0"),
            (TrainConfig, dict(lr=float("nan")), "lr=nan"), (TrainConfig, dict(warmup=-1), "warmup=-1"),
            (TrainConfig, dict(weight_decay=-0.1), "weight_decay=-0.1"),
            (TrainConfig, dict(checkpoint_every=0), "checkpoint_every=0"),
            (DraftConfig, dict(num_layers=0), "num_layers=0"), (DraftConfig, dict(teacher_top_k=0), "teacher_top_k=0"),
            (DraftConfig, dict(hidden_size=30, num_heads=4), "hidden_size=30 must divide by num_heads=4"),
            (DraftConfig, dict(hidden_size=12, num_heads=4, num_kv_heads=2), "hidden_size=12 and num_heads=4"),
            (DraftConfig, dict(dtype="float16"), "dtype='float16'"), (HeadConfig, dict(num_layers=0), "num_layers=0"),
            (HeadConfig, dict(kept_vocab=0), "kept_vocab=0"), (HeadConfig, dict(unroll=0), "unroll=0"),
            (HeadConfig, dict(dtype="int8"), "dtype='int8'")):
        with pytest.raises(ValueError, match=message):
            config(**bad)
        with pytest.raises(ValueError, match=message):  # the flat settings are checked by the same configs
            DistillConfig(**bad)
    head = DistillConfig(**HEAD)
    assert head.objective == HeadConfig() and DistillConfig().objective == DraftConfig()
    assert head.train == TrainConfig(steps=600, batch_size=16, lr=1e-3, warmup=50, weight_decay=0.0,
                                     checkpoint_every=50)
    assert SMALL.data == DataConfig(num_prompts=40, eval_prompts=8, max_new_tokens=16, gen_batch=8)
    assert DistillConfig(seed=3).data.seed == DistillConfig(seed=3).train.seed == 3


def test_training_prompts_are_varied_and_held_out_from_the_benchmark():
    from pathlib import Path

    prompts = training_prompts(2000)
    assert len(set(prompts)) == 2000
    bench = Path(__file__).resolve().parents[1] / "bench" / "prompts"
    evaluation = {p for f in bench.glob("*.json") for p in json.loads(f.read_text())}
    assert evaluation and not evaluation & set(prompts)
    with pytest.raises(ValueError, match="n="):
        training_prompts(0)


def test_the_shipped_head_saw_no_evaluation_prompt():
    """Its training prompts (templates and the ones SmolLM2 wrote itself) hold no prompt of bench/prompts/, not
    even but for case and punctuation: the benchmark's acceptance figures are out of sample."""
    from pathlib import Path

    from specdec.distill import _prompt_key

    root = Path(__file__).resolve().parents[1]
    prompts = json.loads((root / "models" / "smollm2-135m-instruct-head" / "prompts.json").read_text())
    evaluation = {_prompt_key(p) for f in (root / "bench" / "prompts").glob("*.json") for p in json.loads(f.read_text())}
    assert len(evaluation) >= 20 and len(prompts["train"]) >= 1000
    assert not evaluation & {_prompt_key(p) for p in prompts["train"]}
