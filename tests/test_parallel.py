"""Tensor parallelism (specdec/parallel.py): two ranks on gloo, spawned by the test, each holding half of every
decoder layer, produce what one process produces: plain decoding, speculation with a draft model, a draft head
and n-gram lookup, ragged batches with EOS, seeded sampling.

Each case runs in both ranks (SPMD: the same call with the same arguments); rank 0 sends its outputs back. The
tiny float64 models' sums over a split differ from the whole ones in the last bits only, far below any greedy
margin of these models, so greedy outputs are compared token for token, as are the seeded sampled ones (the
same logits to ~1e-15 and the same generator give the same draws). A model whose heads and MLP columns do
not divide evenly (6 heads over 3 key/value heads, 111 columns) splits as evenly as they go."""

import multiprocessing
import os
import socket

import pytest
import torch
from conftest import perturbed_copy, tiny_head, tiny_model

import specdec
from specdec.models.loading import as_native

TIMEOUT = 120  # seconds for both ranks to start, run every case and finish: a hung rank fails the test

IDS = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])  # [batch, P], the first row left-padded
MASK = (IDS != 0).long()
CASES = {  # name: (draft, generate()'s arguments)
    "plain": (None, dict(max_new_tokens=20)),
    "draft-model": ("perturbed", dict(max_new_tokens=20, num_draft_tokens=3)),
    "head": ("head", dict(max_new_tokens=20, num_draft_tokens=2)),
    "ngram": ("ngram", dict(max_new_tokens=20, num_draft_tokens=4)),
    "eos": ("perturbed", dict(max_new_tokens=30, num_draft_tokens=3, eos_token_id=[2, 17])),
    "sampled": ("perturbed", dict(max_new_tokens=16, num_draft_tokens=3, do_sample=True, temperature=0.9)),
    # "auto" picks k from timings, which differ between processes: the ranks take rank 0's (its k sequence may
    # differ from the single process's, but greedy output does not depend on k)
    "auto": ("perturbed", dict(max_new_tokens=24, num_draft_tokens="auto")),
}


def uneven_model():
    """6 query heads over 3 key/value heads and 111 MLP columns: over 2 ranks, 4 + 2 heads and 56 + 55 columns."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=101, hidden_size=48, intermediate_size=111, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=512, eos_token_id=2)
    model = LlamaForCausalLM(config).to(torch.float64).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return as_native(model)


def _uneven(target) -> dict:
    return {f"uneven-{kind}": specdec.generate(target, IDS, MASK, draft_model=kind, num_draft_tokens=3,
                                              max_new_tokens=20) for kind in (None, "ngram")}


def _run_cases(target, head) -> dict:
    """Every case's output sequences on ``target``; ``head`` a draft head made from the whole model (the same
    on every rank as in the single process)."""
    drafts = {None: None, "ngram": "ngram", "perturbed": perturbed_copy("llama"), "head": head}
    return {name: specdec.generate(target, IDS, MASK, draft_model=drafts[kind],
                                   generator=torch.Generator().manual_seed(7), **kwargs)
            for name, (kind, kwargs) in CASES.items()}


def _rank(rank: int, world: int, port: int, results) -> None:
    import torch.distributed as dist

    from specdec.kernels.runner import TorchRunner
    from specdec.parallel import shard

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        target = as_native(tiny_model("llama"))
        head = tiny_head(target, seed=1)  # (made before the split)
        outputs = _run_cases(shard(target), head)
        outputs["heads"] = target.model.layers[0].self_attn.num_heads  # this rank's share of the 4
        outputs.update(_uneven(shard(uneven_model())))
        # the companion: the split without its all-reduce (each rank's share taken for the sum) must differ
        target.runner = TorchRunner(target.runner.device)
        outputs["no all-reduce"] = specdec.generate(target, IDS, MASK, max_new_tokens=20)
        if rank == 0:  # (as lists: a tensor would travel in shared memory that this process's exit removes)
            results.put({name: value.tolist() if torch.is_tensor(value) else value for name, value in outputs.items()})
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(rank_fn, reports: int, world: int = 2) -> tuple[list, list]:
    """Run rank_fn(rank, world, port, results) in ``world`` spawned processes on a free loopback port; returns
    the first ``reports`` items they put in ``results`` and the processes' exit codes (a rank still running
    after TIMEOUT fails the test; every process is gone when this returns)."""
    context = multiprocessing.get_context("spawn")
    results, port = context.Queue(), _free_port()
    ranks = [context.Process(target=rank_fn, args=(r, world, port, results), daemon=True) for r in range(world)]
    for p in ranks:
        p.start()
    try:
        got = [results.get(timeout=TIMEOUT) for _ in range(reports)]
    finally:
        for p in ranks:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return got, [p.exitcode for p in ranks]


def test_two_ranks_generate_what_one_process_generates():
    target = as_native(tiny_model("llama"))
    want = {**_run_cases(target, tiny_head(target, seed=1)), **_uneven(uneven_model())}
    (got,), exitcodes = _spawn(_rank, 1)
    assert exitcodes == [0, 0], exitcodes
    for name in [*CASES, "uneven-None", "uneven-ngram"]:
        assert got[name] == want[name].tolist(), name
    assert got["heads"] == 2 and got["no all-reduce"] != want["plain"].tolist()


def test_shard_refuses_what_does_not_divide(monkeypatch):
    import torch.distributed as dist

    from specdec.parallel import shard

    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 3)
    target = as_native(tiny_model("llama", seed=5))  # 4 heads, 2 key/value heads
    with pytest.raises(ValueError, match="2 key/value heads are fewer than its 3 ranks"):
        shard(target)
    with pytest.raises(ValueError, match="native model"):
        shard(tiny_model("gpt2"))
    attn = target.model.layers[0].self_attn  # a refused split leaves the model whole
    assert (attn.num_heads, attn.num_kv_heads, attn.qkv_proj.weight.shape[0]) == (4, 2, 128)


def _dying_rank(rank: int, world: int, port: int, results) -> None:
    """Rank 1 dies (os._exit) in its third decoding step; rank 0 reports what its generate() raised."""
    import datetime

    import torch.distributed as dist

    from specdec.parallel import shard

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    calls = []

    def die_on_third_call(input_ids, scores):
        calls.append(1)
        if rank == 1 and len(calls) == 3:
            os._exit(3)
        return scores

    target = shard(as_native(tiny_model("llama")))
    try:
        specdec.generate(target, IDS, MASK, max_new_tokens=20, logits_processor=[die_on_third_call])
        results.put("finished")
    except RuntimeError as err:
        results.put(f"raised: {err}")


def test_a_rank_that_dies_fails_the_others_instead_of_hanging():
    (said,), exitcodes = _spawn(_dying_rank, 1)
    assert said.startswith("raised:"), said  # (gloo: the connection to the dead peer was reset or closed)
    assert exitcodes[1] == 3


# The engine on two ranks (EngineGroup): rank 0 is asked, every rank steps alike.
SCRIPT = [  # (arrival step, prompt, params, request id)
    (0, [5, 6, 7], dict(max_new_tokens=18), "greedy-a"),
    (0, [8, 9], dict(max_new_tokens=12, temperature=0.9, seed=4), "seeded"),
    (2, [10, 11, 12, 13], dict(max_new_tokens=20), "greedy-b"),
    (3, [14], dict(max_new_tokens=16, temperature=1.0), "unseeded"),
    (3, [15, 16], dict(max_new_tokens=25), "aborted"),
]
ABORT_AT = 6


def _drive(group, is_rank0: bool) -> dict:
    """The script through an EngineGroup (or a bare Engine, is_rank0 True): every request's tokens."""
    from specdec.engine import RequestParams

    tokens, step = {}, 0
    while step <= ABORT_AT or group.has_unfinished():
        if is_rank0:
            for at, prompt, params, request_id in SCRIPT:
                if at == step:
                    group.add_request(prompt, RequestParams(**params), request_id)
            if step == ABORT_AT:
                group.abort("aborted")
        for out in group.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        step += 1
    return tokens


def _engine(target, seed: int = 0):
    from specdec.engine import Engine

    # a pool of 7 blocks of 4 (28 positions) holds the longest request (27) but not the three that run together
    # from step 2 (their prompts and outputs need 21 + 14 + 24 positions): the younger ones are preempted, at
    # whatever k "auto" picks (8 blocks let them through without a preemption when "auto" drafted little)
    return Engine(target, "ngram", num_draft_tokens="auto", max_num_seqs=4, kv_blocks=7, block_size=4, seed=seed)


def _engine_rank(rank: int, world: int, port: int, results) -> None:
    import torch.distributed as dist

    from specdec.parallel import EngineGroup, shard

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        target = shard(as_native(tiny_model("llama")))
        try:  # engines whose draft generators differ would sample different drafts: refused on every rank
            EngineGroup(_engine(target, seed=rank))
            refused = False
        except ValueError:
            refused = True
        engine = _engine(target)
        tokens = _drive(EngineGroup(engine), rank == 0)
        results.put((rank, tokens, engine.num_preemptions, engine.pool.num_used, refused))
    finally:
        dist.destroy_process_group()


def test_the_engine_on_two_ranks_serves_what_one_engine_serves():
    """Arrivals, preemption, an abort, "auto" k, greedy and sampled requests: both ranks' engines emit the same
    tokens; the greedy and seeded ones are a single process's engine's, and every block comes back."""
    want = _drive(_engine(as_native(tiny_model("llama"))), True)
    reports, exitcodes = _spawn(_engine_rank, 2)
    got = {rank: rest for rank, *rest in reports}
    (tokens0, preempted, used, refused0), (tokens1, _, _, refused1) = got[0], got[1]
    assert exitcodes == [0, 0], exitcodes
    assert refused0 and refused1
    assert tokens0 == tokens1 and preempted > 0 and used == 0
    for name in ("greedy-a", "seeded", "greedy-b"):
        assert tokens0[name] == want[name], name
    assert len(tokens0["aborted"]) < 25
