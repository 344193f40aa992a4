"""The benchmark harness: its arithmetic on constructed inputs, a small run on tiny random models that writes
valid JSON and PNGs, and a deliberately wrong speculative output reported as a mismatch."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import perturbed_copy, tiny_head, tiny_model, toy_tokenizer
from specdec.bench.harness import (
    Bench,
    BenchConfig,
    Run,
    SyntheticProposer,
    break_even,
    median_rate,
    plan,
    plots,
    roofline,
    table,
)
from specdec.stats import round_budget

from specdec.cli import main as cli


def test_roofline_arithmetic():
    # 10 tok/s, 2 tokens per forward, batch 1: 5 forwards/s, each reading 100 + 3 * 10 bytes
    r = roofline(10.0, 2.0, 1, target_bytes=100, draft_bytes=10, mean_k=3, bandwidth=1300.0)
    assert r["weight_bytes_per_s"] == pytest.approx(650.0)
    assert r["bandwidth_fraction"] == pytest.approx(0.5)
    assert r["ceiling_tokens_per_s"] == pytest.approx(1300.0 * 2.0 / 130.0)
    # batch 4: one forward serves four rows, so the same tokens/s needs a quarter of the reads
    r4 = roofline(10.0, 2.0, 4, target_bytes=100, draft_bytes=10, mean_k=3, bandwidth=1300.0)
    assert r4["weight_bytes_per_s"] == pytest.approx(650.0 / 4)
    assert r4["ceiling_tokens_per_s"] == pytest.approx(4 * r["ceiling_tokens_per_s"])


def test_median_and_break_even():
    assert median_rate([10, 20, 30], [1.0, 1.0, 2.0]) == 15.0  # rates 10, 20, 15
    assert break_even([0.0, 0.5, 1.0], [0.8, 0.9, 1.3]) == pytest.approx(0.5 + 0.1 / 0.4 * 0.5)
    assert break_even([0.0, 1.0], [0.5, 0.9]) is None
    assert break_even([0.2, 0.0], [1.1, 1.05]) == 0.0  # unsorted input; pays from the start


def test_round_budget_splits_the_round_in_plain_steps():
    # plain steps take 20 ms; a round takes 32 ms: 1.6 plain steps, of which the verification pass is 22 ms
    # (1.1) and drafting 6 ms (0.3), leaving 0.2 for the rest
    b = round_budget(0.032, verify_seconds=0.022, draft_seconds=0.006, plain_step_seconds=0.020)
    assert b["round"] == pytest.approx(1.6)
    assert (b["verify"], b["draft"], b["rest"]) == pytest.approx((1.1, 0.3, 0.2))


def test_plan_runs_plain_first_and_skips_what_transformers_refuses():
    runs = plan(BenchConfig(methods=("hf-assisted", "draft", "synthetic"), ks=(1, 2), batch_sizes=(1, 4),
                            modes=("greedy", "sampling"), synthetic_rates=(0.5,)))
    greedy4 = [r for r in runs if r.mode == "greedy" and r.batch == 4]
    assert greedy4[0] == Run("plain", "greedy", 4)
    assert not any(r.method == "hf-assisted" for r in greedy4)  # batch > 1: transformers refuses
    assert not any(r.method == "synthetic" for r in runs if r.mode == "sampling")
    assert [r.k for r in greedy4 if r.method == "draft"] == [1, 2]


@pytest.mark.parametrize("kwargs, word", [
    (dict(methods=("plain", "medusa")), "medusa"), (dict(ks=(0,)), "ks"), (dict(ks=(17,)), "ks"),
    (dict(modes=("beam",)), "modes"), (dict(batch_sizes=(0,)), "batch_sizes"), (dict(synthetic_rates=(1.5,)), "rates"),
    (dict(draft=None), "draft"), (dict(head=None, methods=("plain", "head")), "head"),
])
def test_bad_config(kwargs, word):
    with pytest.raises(ValueError, match=word):
        BenchConfig(**kwargs)


@pytest.mark.parametrize("args, word", [
    (["--methods", "plain", "spec-magic"], "spec-magic"), (["--ks", "0"], "ks"), (["--ks", "17"], "ks"),
    (["--json", "/proc/no/such/dir/out.json"], "--json"), (["--draft", "/no/such/model"], "no such"),
    (["--json", "/proc/out.json"], "--json"),  # a folder that exists and refuses new files (root or not)
    (["--plot", "/proc/plots"], "--plot"),
])
def test_cli_refuses_bad_input_before_loading(args, word, capsys, monkeypatch):
    from specdec.bench import harness

    monkeypatch.setattr(harness, "load_models", lambda *a: pytest.fail("a model was loaded"))
    assert cli(["bench", *args]) == 2
    assert word in capsys.readouterr().err


def test_every_registered_method_and_preset_is_reachable_from_the_cli(monkeypatch):
    """``--methods NAME`` reaches each registered method, ``--preset NAME`` each preset (flags beside it win),
    and every one of them plans at least one run."""
    from specdec.bench import harness
    from specdec.bench.methods import METHODS

    seen = []
    monkeypatch.setattr(harness, "main", lambda config, **_: seen.append(config))
    for name in METHODS:
        assert cli(["bench", "--methods", name]) == 0
        assert seen[-1].methods == (name,) and any(r.method == name for r in plan(seen[-1])), name
    for name, preset in harness.PRESETS.items():
        assert cli(["bench", "--preset", name, "--seed", "5"]) == 0
        assert seen[-1] == harness.BenchConfig(**{**preset.fields, "seed": 5}) and plan(seen[-1]), name
    assert cli(["bench", "--preset", "ngram", "--repeats", "1"]) == 0
    assert seen[-1].methods == ("plain", "ngram") and seen[-1].repeats == 1
    assert cli(["bench", "--quick"]) == 0 and seen[-1] == harness.configure("quick")


@pytest.mark.parametrize("args, value", [
    (["--preset", "speedy"], "speedy"), (["--methods", "plain", "medusa"], "medusa"),
    (["--quick", "--preset", "ngram"], "ngram"),
])
def test_unknown_preset_or_method_is_a_value_error_naming_it(args, value, capsys, monkeypatch):
    from specdec.bench import harness

    monkeypatch.setattr(harness, "main", lambda *a, **k: pytest.fail("the benchmark ran"))
    assert cli(["bench", *args]) == 2
    assert repr(value) in capsys.readouterr().err
    with pytest.raises(ValueError, match="'speedy'"):
        harness.configure("speedy")
    with pytest.raises(ValueError, match="'medusa'"):
        harness.configure("ngram", methods=("plain", "medusa"))


def test_cli_refuses_draft_with_other_vocabulary(tmp_path, capsys, monkeypatch):
    from specdec.bench import harness

    for name, arch in (("target", "llama"), ("draft", "gpt2")):
        tiny_model(arch).save_pretrained(tmp_path / name)
    monkeypatch.setattr(harness, "load_models", lambda *a: pytest.fail("a model was loaded"))
    from transformers import AutoConfig
    cfg = AutoConfig.from_pretrained(tmp_path / "draft")
    cfg.vocab_size = 200
    cfg.save_pretrained(tmp_path / "draft")
    assert cli(["bench", "--model", str(tmp_path / "target"), "--draft", str(tmp_path / "draft")]) == 2
    assert "--draft" in (err := capsys.readouterr().err) and "vocabulary" in err
    # a run that uses no draft neither checks nor loads one: it gets as far as loading the target
    class Loading(Exception):
        pass

    def load_models(config):
        assert config.draft_in_use is None
        raise Loading

    monkeypatch.setattr(harness, "load_models", load_models)
    with pytest.raises(Loading):
        cli(["bench", "--model", str(tmp_path / "target"), "--draft", str(tmp_path / "draft"),
             "--methods", "plain", "ngram"])


def test_output_paths_are_probed_and_an_existing_json_is_not_truncated(tmp_path):
    from specdec.bench.harness import check_outputs

    kept = tmp_path / "old.json"
    kept.write_text('{"mine": 1}')
    check_outputs(kept, tmp_path / "new" / "plots")
    assert kept.read_text() == '{"mine": 1}' and (tmp_path / "new" / "plots").is_dir()
    check_outputs(tmp_path / "fresh.json", None)
    assert not (tmp_path / "fresh.json").exists()  # the probe leaves nothing behind
    with pytest.raises(ValueError, match="--json"):
        check_outputs(tmp_path, None)  # a folder


def _prompts():
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(3, 101, (n,), generator=gen).tolist() for n in (5, 9, 7)]


def test_small_run_writes_json_and_plots(tmp_path):
    config = BenchConfig(ks=(1, 3), modes=("greedy", "sampling"), batch_sizes=(1, 2), max_new_tokens=12, repeats=2,
                         synthetic_rates=(0.0, 1.0), synthetic_k=3)
    report = Bench(config, tiny_model("llama"), perturbed_copy("llama"), _prompts(), progress=False,
                   head=tiny_head(tiny_model("llama"), seed=1)).run()
    text = json.dumps(report)  # every figure serialises
    assert json.loads(text)["mismatches"] == 0
    runs = report["runs"]
    methods = {r["method"] for r in runs}
    assert methods == {"hf", "hf-assisted", "hf-lookup", "plain", "draft", "auto", "head", "head-auto", "ngram",
                       "synthetic"}
    for r in runs:
        assert r["tokens_per_s"] > 0 and math.isfinite(r["tokens_per_s"])
        if r["mode"] == "greedy" and r["method"] != "plain":
            assert r["check"] in ("exact",), r  # float64: exact, no near-ties
    plain = next(r for r in runs if r["method"] == "plain" and r["batch"] == 1 and r["mode"] == "greedy")
    assert plain["tokens_per_target_forward"] == 1.0 and plain["vs_plain"] == 1.0
    assert "round_budget" not in plain
    for r in runs:
        if r["method"] in ("draft", "head", "synthetic"):  # every specdec speculative run: its round, in parts
            b = r["round_budget"]
            assert b["verify"] > 0 and b["draft"] >= 0
            assert b["verify"] + b["draft"] + b["rest"] == pytest.approx(b["round"])
    # synthetic rate 1.0 with k=3: every draft accepted, so 4 tokens per forward except at the end of a row
    full = next(r for r in runs if r["method"] == "synthetic" and r["rate"] == 1.0 and r["batch"] == 1)
    zero = next(r for r in runs if r["method"] == "synthetic" and r["rate"] == 0.0 and r["batch"] == 1)
    assert full["acceptance_rate"] == 1.0 and full["tokens_per_target_forward"] > 2.5
    assert zero["acceptance_rate"] == 0.0 and zero["tokens_per_target_forward"] == 1.0
    assert set(report["synthetic"]) == {"batch=1", "batch=2"}
    assert "| draft | greedy | 1 | 3 |" in table(report)
    written = plots(report, tmp_path / "plots")
    assert len(written) == 4
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_quantized_weights_self_speculation_and_the_llama_cpp_line(tmp_path, monkeypatch):
    """--weights int4 and --head-quantize int8 reach the target and the head, the "self" method drafts exactly,
    and llama.cpp's line: its figure beside specdec's plain, or why it was skipped."""
    import copy

    from specdec.bench import llama_cpp
    from specdec.bench.harness import peer_line, with_weights
    from specdec.models.loading import as_native
    from specdec.models.quantized import QuantizedLinear

    config = BenchConfig(methods=("plain", "self"), ks=(2,), modes=("greedy",), batch_sizes=(1,), max_new_tokens=8,
                         repeats=1, weights="int8", head_quantize="int4")
    target = copy.deepcopy(tiny_model("llama", torch.float32))
    target.__dict__.pop("_specdec_native", None)
    report = Bench(config, target, None, _prompts(), progress=False).run()
    assert isinstance(as_native(target).lm_head, QuantizedLinear)
    assert report["mismatches"] == 0 and {r["method"] for r in report["runs"]} == {"plain", "self"}
    with pytest.raises(ValueError, match="weights='gguf' needs a .gguf model"):
        with_weights(as_native(target), BenchConfig(model=str(tmp_path), weights="gguf"))
    with pytest.raises(ValueError, match="weights must be one of"):
        BenchConfig(weights="fp8")
    fake = tmp_path / "llama-bench"  # a stand-in that prints what llama-bench -o json prints
    fake.write_text("#!/bin/sh\necho '[{\"n_gen\": 8, \"avg_ts\": 50.0, \"stddev_ts\": 1.0, "
                    "\"model_type\": \"llama 135M Q4_1\", \"build_commit\": \"abc\"}]'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("SPECDEC_LLAMA_BENCH", str(fake))
    peer = llama_cpp.summary([llama_cpp.measure(tmp_path / "m.gguf", 8, 2)] * 3)
    line = peer_line({**report, "llama_cpp": peer})
    assert "plain 50.0 tok/s" in line and "llama 135M Q4_1" in line and "specdec plain" in line
    monkeypatch.setenv("SPECDEC_LLAMA_BENCH", str(tmp_path / "missing"))
    line = peer_line({**report, "llama_cpp": llama_cpp.measure(tmp_path / "m.gguf", 8, 2)})
    assert line.startswith("llama.cpp: skipped (llama-bench failed")


def test_llama_cpp_prompt_lookup_is_summed_over_prompts_and_set_beside_ngram(tmp_path, monkeypatch):
    """llama-lookup's report read from its output and summed over the prompts (decoded tokens over decoding
    seconds, drafts accepted over drafted); the line beside specdec's n-gram runs; a missing binary skipped."""
    from specdec.bench import llama_cpp
    from specdec.bench.harness import lookup_line

    fake = tmp_path / "llama-lookup"  # a stand-in that prints (on stderr) what llama-lookup reports
    fake.write_text("#!/bin/sh\necho 'I decoded   40 tokens in    0.500 seconds, speed:  80.0 t/s' >&2\n"
                    "echo 'I n_drafted    = 30' >&2\necho 'I n_accept     = 12' >&2\n")
    fake.chmod(0o755)
    monkeypatch.setenv("SPECDEC_LLAMA_LOOKUP", str(fake))
    peer = llama_cpp.lookup(tmp_path / "m.gguf", ["a", "b"], 8, 2)
    assert (peer["tokens"], peer["tokens_per_s"], peer["acceptance"]) == (80, 80.0, 0.4)
    report = {"runs": [{"method": "ngram", "batch": 1, "k": "auto", "tokens_per_s": 100.0}]}
    line = lookup_line({**report, "llama_cpp_lookup": peer})
    assert "80.0 tok/s" in line and "acceptance 0.40" in line and "specdec ngram k = auto 100.0 tok/s = 1.25x" in line
    fake.write_text("#!/bin/sh\necho nothing\n")
    assert llama_cpp.lookup(tmp_path / "m.gguf", ["a"], 8, 2)["skipped"].startswith("llama-lookup failed")
    monkeypatch.setenv("SPECDEC_LLAMA_LOOKUP", "")
    monkeypatch.setenv("SPECDEC_LLAMA_BENCH", str(tmp_path / "nowhere" / "llama-bench"))
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert "no llama-lookup" in llama_cpp.lookup(tmp_path / "m.gguf", ["a"], 8, 2)["skipped"]


def test_wrong_speculative_output_is_reported(capsys):
    class Corrupting(Bench):
        def call(self, run, work, reference, seed):
            got, secs, stats = super().call(run, work, reference, seed)
            if run.method == "ngram":
                got[0] = got[0].clone()
                got[0][1] = (got[0][1] + 1) % 101  # a token plain greedy decoding would not choose
            return got, secs, stats

    config = BenchConfig(methods=("plain", "ngram", "synthetic"), batch_sizes=(1,), modes=("greedy",),
                         max_new_tokens=8, repeats=1, synthetic_rates=(0.5,))
    report = Corrupting(config, tiny_model("llama"), None, _prompts(), progress=False).run()
    ngram = next(r for r in report["runs"] if r["method"] == "ngram")
    assert ngram["check"].startswith("MISMATCH") and ngram["mismatches"] == 3
    assert report["mismatches"] == 3
    assert "\x1b[31mMISMATCH" in table(report)
    assert "MISMATCH" in capsys.readouterr().err


def test_synthetic_proposer_accepts_at_its_rate():
    """rate r: each proposed token is the reference token with probability r (binomial: 4000 draws,
    3 sigma = 0.024 at r = 0.5); the companion rate 0 proposes no reference token at all."""
    from types import SimpleNamespace

    reference = [torch.arange(10, 5010)]
    state = SimpleNamespace(batch_size=1, num_tokens=torch.tensor([10]), vocab_size=6000)
    drafts, probs = SyntheticProposer(reference, 0.5, torch.Generator().manual_seed(0)).propose(state, 4000)
    assert probs is None
    hits = (drafts[0] == reference[0][10:4010]).float().mean().item()
    assert abs(hits - 0.5) < 0.024
    drafts, _ = SyntheticProposer(reference, 0.0, torch.Generator().manual_seed(0)).propose(state, 4000)
    assert not (drafts[0] == reference[0][10:4010]).any()
    state.num_tokens = torch.tensor([4998])  # near the end: fewer drafts (-1)
    drafts, _ = SyntheticProposer(reference, 1.0, torch.Generator().manual_seed(0)).propose(state, 4)
    assert drafts[0].tolist() == [5008, 5009, -1, -1]


def test_gpu_mode_runs_its_code_on_a_tiny_shape():
    """The realistic-size section (Llama-3-8B shape on CUDA) runs the same code on the CPU with a tiny preset:
    every synthetic run is compared with plain greedy (none departs), verification costs exist."""
    from specdec.bench.large_model import report

    out = report("cpu", "tiny", torch.float32, ks=(1, 2), batch_sizes=(1, 2), rates=(0.0, 1.0), synthetic_k=3,
                 tokens=12, prompt_len=6, progress=False)
    assert set(out["verification_cost"]) == {1, 2} and all(v > 0 for v in out["verification_cost"].values())
    assert out["plain_tokens_per_s"] > 0 and 0 < out["fraction_of_roofline"]
    for batch in (1, 2):
        curve = out["synthetic"]["curves"][batch]
        assert len(curve["speedups"]) == 2 and curve["rows_departed"] == [0, 0]
    assert out["mismatches"] == 0
    json.dumps(out)


def test_load_rounds_take_medians_and_pair_each_round_with_its_own_plain_run():
    """bench/load.py --rounds: medians over rounds per (mode, concurrency), and ratios against the plain run
    of the same round (a slow round for both modes must not read as a speedup or a loss)."""
    from specdec.bench.load import against_plain, medians, table

    def row(mode, rnd, tps, itl):
        return {"mode": mode, "concurrency": 1, "round": rnd, "requests": 4, "tokens_per_second": tps,
                "ttft_p50": 0.1, "ttft_p90": 0.1, "ttft_p99": 0.1, "itl_p50": itl, "itl_p90": itl, "itl_p99": itl,
                "tokens_per_target_forward": 1.0, "acceptance": None, "mean_k": 0.0, "same_text": [4, 4]}

    # round 1 ran on a machine twice as slow for both modes
    levels = [row("plain", 0, 40.0, 0.025), row("draft-auto", 0, 60.0, 0.015),
              row("plain", 1, 20.0, 0.050), row("draft-auto", 1, 30.0, 0.030)]
    med = {r["mode"]: r for r in medians(levels)}
    assert med["plain"]["tokens_per_second"] == 30.0 and med["plain"]["requests"] == 8
    assert med["draft-auto"]["itl_p50"] == 0.0225 and med["draft-auto"]["same_text_as_plain"] == "8/8"
    (ratio,) = against_plain(levels)
    assert ratio["itl_p50_ratio"] == pytest.approx([0.6, 0.6])
    assert ratio["tokens_per_second_ratio"] == pytest.approx([1.5, 1.5])
    text = table({"medians": medians(levels), "against_plain_by_round": [ratio]})
    assert "median 0.60x" in text and "median 1.50x" in text


# ---------------------------------------------------------------------------------------------- structured output

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "tag": {"type": "string", "enum": ["ab", "cd"]}},
          "required": ["ok", "tag"]}  # bounded: the tiny models finish it within 40 tokens


@pytest.fixture(scope="module", name="toy_tokenizer")
def toy_tokenizer_fixture():
    """The tests' 101-token tokenizer (tests/conftest.py)."""
    return toy_tokenizer()


def test_structured_plan_checks_forced_runs_against_plain_under_the_schema():
    from specdec.bench.harness import configure

    runs = plan(BenchConfig(methods=("hf", "plain", "head"), ks=(2,), modes=("greedy",), batch_sizes=(1,),
                            constraints=("free", "forced")))
    assert [(r.method, r.constraint) for r in runs] == [
        ("plain", "free"), ("hf", "free"), ("head", "free"),
        ("plain", "schema"),  # the reference of "forced", run although "schema" was not asked for
        ("plain", "forced"), ("head", "forced")]  # transformers' methods run unconstrained only
    runs = plan(configure("structured"))
    assert len(runs) == 12 and {r.constraint for r in runs} == {"free", "schema", "forced"}
    assert plan(BenchConfig(methods=("plain", "ngram"), batch_sizes=(1,), modes=("greedy",))) == [
        Run("plain", "greedy", 1), Run("ngram", "greedy", 1, "auto")]  # no constraints: as ever
    with pytest.raises(ValueError, match="constraints"):
        BenchConfig(constraints=("loose",))
    with pytest.raises(ValueError, match="categories"):
        configure("structured", categories=("chat",))


def test_structured_prompts_carry_their_schema():
    import jsonschema
    from specdec.bench.common import load_structured

    items = load_structured()
    assert len(items) >= 3 and len({item["name"] for item in items}) == len(items)
    for item in items:
        jsonschema.Draft202012Validator.check_schema(item["schema"])
        assert json.dumps(item["schema"]) in item["prompt"] and "{schema}" not in item["prompt"]
    assert len(load_structured(2)) == 2


def test_schema_error_with_and_without_jsonschema(monkeypatch):
    import sys

    from specdec.bench.common import schema_error

    assert schema_error('{"ok":true,"tag":"ab"}', SCHEMA) is None
    assert schema_error('{"ok":true,"tag":"zz"}', SCHEMA).startswith("not of the schema")
    assert schema_error('{"ok":tru', SCHEMA).startswith("not JSON")
    monkeypatch.setitem(sys.modules, "jsonschema", None)  # not installed: JSON with the required keys
    assert schema_error('{"ok":true,"tag":"zz"}', SCHEMA) is None
    assert schema_error('{"ok":true}', SCHEMA) == "missing required key(s) ['tag']"


def _structured_bench(monkeypatch, tokenizer, bench_class=Bench, **fields):
    """The structured preset over two prompts, its figures at k = 2 and 32 new tokens (the schema's answer
    takes 26 on the tokenizer's characters); the 1 GB bandwidth probe is left out."""
    from specdec.bench import harness

    monkeypatch.setattr(harness, "bandwidth_gbs", lambda: 10.0)
    config = harness.configure("structured", **{"ks": (2,), "max_new_tokens": 32, "repeats": 1, **fields})
    target = tiny_model("llama")
    return bench_class(config, target, None, _prompts()[:2], progress=False, head=tiny_head(target, seed=1),
                       tokenizer=tokenizer, schemas=[SCHEMA] * 2)


def test_structured_preset_runs_end_to_end(toy_tokenizer, monkeypatch):
    from specdec.bench.harness import GRAMMAR_COUNTERS, structured_table

    report = json.loads(json.dumps(_structured_bench(monkeypatch, toy_tokenizer).run()))  # every figure serialises
    assert report["mismatches"] == 0 and report["invalid"] == 0
    rows = {(r["method"], r["constraint"]): r for r in report["runs"]}
    assert set(rows) == {(m, c) for m in ("plain", "head", "head-auto", "ngram") for c in ("free", "schema", "forced")}
    for (method, constraint), r in rows.items():
        assert r["tokens_per_s"] > 0 and r["tokens_per_target_forward"] >= 1.0
        assert len(r["lengths"]) == 2 and sum(r["lengths"]) == r["tokens"]
        assert r["mean_length"] == pytest.approx(r["tokens"] / 2)
        assert r["decode_tokens_per_s"] > 0  # (the prefill left out: runs stop at different lengths)
        assert r["vs_free"] == pytest.approx(r["decode_tokens_per_s"] / rows[method, "free"]["decode_tokens_per_s"])
        if constraint == "free":
            assert not any(f"{name}_share" in r for name in GRAMMAR_COUNTERS)
        else:  # every constrained answer finishes (the schema is bounded) and is JSON of the schema
            assert r["finished"] == r["valid"] == 2 and r["invalid"] == 0
            assert all(r[f"{name}_share"] == pytest.approx(r[name] / r["tokens"]) for name in GRAMMAR_COUNTERS)
        if (method, constraint) not in (("plain", "free"), ("plain", "schema")):
            assert r["check"] == "exact", r
    # on a one-character vocabulary keys and punctuation are forced: free drafts, more than a token a pass
    assert rows["plain", "forced"]["forced_share"] > 0.3 and rows["plain", "schema"]["forced_share"] == 0
    assert rows["plain", "forced"]["tokens_per_target_forward"] > 1.3
    assert rows["plain", "forced"]["vs_plain"] == pytest.approx(
        rows["plain", "forced"]["tokens_per_s"] / rows["plain", "schema"]["tokens_per_s"])
    text = structured_table(report)
    assert "forced share" in text and "valid JSON / finished" in text and "| head | greedy | 1 | 2 | forced |" in text
    assert "2 / 2" in text and "INVALID" not in text


def test_invalid_constrained_answer_is_reported(toy_tokenizer, capsys, monkeypatch):
    from specdec.bench.harness import structured_table

    class Corrupting(Bench):
        def call(self, run, work, reference, seed):
            got, secs, stats = super().call(run, work, reference, seed)
            if run.method == "ngram" and run.constraint == "forced":
                got[0] = torch.tensor([toy_tokenizer.convert_tokens_to_ids("{"), 2])  # "{" then EOS: not JSON
            return got, secs, stats

    report = _structured_bench(monkeypatch, toy_tokenizer, Corrupting, methods=("plain", "ngram")).run()
    ngram = next(r for r in report["runs"] if r["method"] == "ngram" and r["constraint"] == "forced")
    assert ngram["invalid"] == 2 and ngram["valid"] == 0 and report["invalid"] == 2
    assert ngram["check"].startswith("MISMATCH")  # and it departs from plain decoding under the schema
    assert "\x1b[31m0 / 2 (2 INVALID)" in structured_table(report)
    assert "INVALID" in capsys.readouterr().err
