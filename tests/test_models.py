"""Native models against transformers: same logits for prefill and for single-token decode steps."""

import pytest
import torch
from conftest import ARCHS, tiny_model

from specdec.models.llama import LlamaModel
from specdec.models.loading import as_native

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def _relative(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_logits_match_transformers_prefill_and_decode(arch, dtype):
    hf = tiny_model(arch, dtype)
    native = as_native(hf)
    assert isinstance(native, LlamaModel)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, hf.config.vocab_size, (2, 11), generator=gen)
    prompt, steps = 7, ids.shape[1] - 7
    cache = native.new_cache(2, 32)
    with torch.no_grad():
        expected = hf(ids).logits
        got = native(ids[:, :prompt], torch.arange(prompt).expand(2, -1), cache)
        assert _relative(got, expected[:, :prompt]) < TOLERANCE[dtype]
        for t in range(prompt, prompt + steps):  # one token at a time through the cache
            got = native(ids[:, t:t + 1], torch.full((2, 1), t), cache)
            assert _relative(got[:, 0], expected[:, t]) < TOLERANCE[dtype]
    assert cache.lengths.tolist() == [11, 11]


def test_bfloat16_runs_and_tracks_float32(arch):
    hf = tiny_model(arch, torch.float32)
    native32 = as_native(hf)
    native16 = as_native(tiny_model(arch, torch.bfloat16))
    ids = torch.randint(0, hf.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(9)[None]
    with torch.no_grad():
        a = native32(ids, pos, native32.new_cache(1, 16))
        b = native16(ids, pos, native16.new_cache(1, 16))
    assert b.dtype == torch.float32  # logits come back in float32 for sampling
    # bfloat16 keeps 8 bits of mantissa: ~0.4% per rounding, a few percent through two layers
    assert _relative(b, a) < 0.05


def test_ragged_batch_equals_rows_alone():
    """Right-padded ragged input (positions -1) gives each row the logits it gets alone."""
    native = as_native(tiny_model("llama"))
    ids = torch.randint(3, 90, (3, 6), generator=torch.Generator().manual_seed(1))
    lengths = [6, 2, 4]
    positions = torch.tensor([[p if p < n else -1 for p in range(6)] for n in lengths])
    with torch.no_grad():
        batched = native(ids, positions, native.new_cache(3, 16))
        for row, n in enumerate(lengths):
            alone = native(ids[row:row + 1, :n], torch.arange(n)[None], native.new_cache(1, 16))
            assert torch.allclose(batched[row, :n], alone[0], rtol=0, atol=1e-12)


def test_unsupported_architecture_is_refused_by_native_class():
    from conftest import FALLBACK_ARCHS

    config = tiny_model(next(iter(FALLBACK_ARCHS))).config
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        LlamaModel(config)


def test_native_architectures_listed():
    assert {tiny_model(a).config.model_type for a in ARCHS} == {"llama", "mistral", "qwen2"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 9, 40])
def test_cpu_linear_matches_plain_and_follows_weight_changes(rows, dtype):
    """The packed CPU path (specdec's kernel, or oneDNN for bfloat16 without it) for decode, verification
    and prefill sized inputs, and its packed copy remade when the weight changes in place."""
    import torch.nn.functional as F

    from specdec.kernels.cpu_runner import CpuRunner

    layer, runner = torch.nn.Linear(96, 33, bias=True).to(dtype), CpuRunner()
    x = torch.randn(1, rows, 96, dtype=dtype)
    # same products, sums in float32 in another order: a bfloat16 rounding (2^-8) or float32 ones apart
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    with torch.no_grad():
        want = F.linear(x, layer.weight, layer.bias)
        got = runner.linear(layer, x)
        assert torch.allclose(got.float(), want.float(), rtol=tol, atol=tol)
        packed = runner.packed(layer, dtype)
        layer.weight.mul_(2)  # in place: the packed copy must be remade
        mine = runner.linear(layer, x)
        assert torch.allclose(mine.float(), F.linear(x, layer.weight, layer.bias).float(), rtol=tol, atol=tol)
        assert runner.packed(layer, dtype) is not packed or packed is None


def test_the_runner_is_chosen_where_the_model_is_built_loaded_or_moved():
    """The runner follows the weights: built on the CPU, moved to the meta device and back, loaded onto meta
    weights replaced in place (as the loaders do), deep-copied (a fresh runner: packed weights and C's address
    table belong to the original's tensors)."""
    import copy

    from specdec.kernels.cpu_runner import CpuRunner
    from specdec.kernels.runner import TorchRunner

    model = copy.deepcopy(as_native(tiny_model("smollm2", torch.float32)))
    assert type(model.runner) is CpuRunner
    ids, positions = torch.tensor([[5, 6, 7]]), torch.arange(3)[None]
    with torch.no_grad():
        want = model(ids, positions, model.new_cache(1, 4))
    clone = copy.deepcopy(model)
    assert type(clone.runner) is CpuRunner and clone.runner is not model.runner and not clone.runner._packs
    with torch.device("meta"):  # as the loaders build: meta weights, then the checkpoint's assigned in place
        loaded = LlamaModel(model.config)
    assert type(loaded.runner) is TorchRunner and loaded.runner.device == "meta"
    loaded.load_state_dict(model.state_dict(), assign=True)
    assert type(loaded.runner) is CpuRunner
    loaded.inv_freq = model.inv_freq
    with torch.no_grad():
        assert torch.equal(loaded(ids, positions, loaded.new_cache(1, 4)), want)
        assert torch.equal(clone(ids, positions, clone.new_cache(1, 4)), want)
    model.to("meta")
    assert type(model.runner) is TorchRunner
    model.to_empty(device="cpu")
    assert type(model.runner) is CpuRunner


def test_the_torch_runner_is_the_reference_of_the_cpu_runner(arch):
    """The same float32 model through torch's ops and through the C kernels: the same logits up to float32
    rounding (the kernels sum in another order), and the same greedy tokens."""
    import copy

    from specdec.kernels.runner import TorchRunner

    native = as_native(tiny_model(arch, torch.float32))
    ids = torch.randint(0, native.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    logits = []
    for runner in (native.runner, TorchRunner("cpu")):
        model = native if runner is native.runner else copy.deepcopy(native)
        model.runner = runner
        with torch.no_grad():
            logits.append(model(ids, torch.arange(9).expand(2, -1), model.new_cache(2, 9)))
    assert _relative(logits[0], logits[1]) < TOLERANCE[torch.float32]
    assert torch.equal(logits[0].argmax(-1), logits[1].argmax(-1))


def test_layer_graphs_replay_the_layers_with_each_steps_inputs(monkeypatch):
    """LayerGraphs (CUDA graphs of the layers on a GPU) with a capture that replays by running again: every
    decode and verification pass goes through static copies of its inputs, and greedy output, plain and
    speculative, equals the model without graphs. Here the layers take the torch path (float64); on a GPU
    they run the Triton kernels, which bench/gpu_check.py checks with real graphs."""
    import specdec
    from specdec.kernels import cuda_runner

    captured, replays, made = [], [], []

    def capture(run):
        run()
        captured.append(run)

        def replay():
            replays.append(run)
            run()
        return replay

    class Recorded(cuda_runner.LayerGraphs):
        def __init__(self, *args):
            super().__init__(*args)
            made.append(self)

    target = tiny_model("llama")
    draft = tiny_model("smollm2", seed=7)
    ids = torch.tensor([[0, 0, 5, 6, 7], [3, 4, 5, 6, 7]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    want = [specdec.generate(target, ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[], draft_model=d,
                             num_draft_tokens=3) for d in (None, draft, "ngram")]
    native = as_native(target)
    monkeypatch.setattr(native, "runner", cuda_runner.CudaRunner("cpu", capture))
    monkeypatch.setattr(cuda_runner, "LayerGraphs", Recorded)
    got = [specdec.generate(target, ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[], draft_model=d,
                            num_draft_tokens=3) for d in (None, draft, "ngram")]
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert captured and len(replays) > 2 * len(captured)  # most passes replay a graph made earlier
    # widths captured: the prefill (5 tokens) has none; plain decode one; a k = 3 generation 4 (its passes of
    # 3 and 2 new tokens at the end ride in it) and 1 (4 is more than twice 1)
    assert [sorted(t for _, t in g.graphs) for g in made[:2]] == [[1], [1, 4]]
    with pytest.raises(ValueError, match="use_cuda_graphs needs the model on a CUDA device"):
        native.use_cuda_graphs()


def test_a_cache_with_graphs_is_freed_when_its_last_reference_goes(monkeypatch):
    """cache.graphs holds the LayerGraphs, which refers back to the cache only weakly: no cycle keeps the KV
    memory (and on a GPU the graphs' pools) alive past the call, waiting for the cyclic GC."""
    import gc
    import weakref

    from specdec.kernels.cuda_runner import CudaRunner

    native = as_native(tiny_model("llama"))
    monkeypatch.setattr(native, "runner", CudaRunner("cpu", lambda run: (run(), lambda: None)[1]))  # replay: no-op
    cache = native.new_cache(1, 16)
    with torch.no_grad():
        native(torch.tensor([[3, 4, 5]]), torch.arange(3)[None], cache)  # prefill: no graph
        native(torch.tensor([[6]]), torch.tensor([[3]]), cache)  # decode: captured
    assert cache.graphs[native].graphs
    gone = weakref.ref(cache)
    gc.disable()
    try:
        del cache
        assert gone() is None
    finally:
        gc.enable()
