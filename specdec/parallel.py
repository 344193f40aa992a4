"""Tensor parallelism on torch.distributed: a native model's layers split over the ranks of a process group.

Megatron's split: attention by heads (q, k and v column-parallel, each rank its share of the query and key/value
heads; o_proj row-parallel over those heads' columns), the MLP by columns (gate and up) then rows (down), and one
all-reduce after each row-parallel layer, which ``ShardRunner.linear`` adds (the model's forward is unchanged:
kernels/runner.py). The KV cache and the paged pool shard with the heads (each rank's cache holds its own heads).
The output layer splits by vocabulary, each rank its rows, and an all-gather gives every rank all the logits
(SmolLM2's, 2 gloo ranks on a 2-core CPU: 7.1-7.5 ms a call at batch 1 against 11.7-12.2 ms for the whole
layer on each rank; bench/tensor_parallel.py); the embedding (one row read a token) and the norms stay whole.
Every rank then holds the same logits and, running the same decoding with the same seeded generator, makes the
same decisions, drafts and rollbacks included: a draft runs whole on every rank, which sends nothing (proposals
broadcast from rank 0 would cost ~0.15 ms a step for the tokens and, for sampling, 0.4-2.7 ms for their
probabilities).

    torch.distributed.init_process_group("gloo")          # or "nccl"; one process per rank
    model, tokenizer = specdec.load(name)                 # the same weights on every rank
    specdec.parallel.shard(model)                         # this rank's share, in place
    out = specdec.generate(model, ids, ...)               # every rank calls it with the same arguments

The engine across ranks is ``EngineGroup``: every rank steps alike (SPMD), or, under a server
(``specdec serve --tensor-parallel N``: server/ranks.py), rank 0 steps and the others ``follow``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from specdec.kernels.runner import TorchRunner


class ShardRunner(TorchRunner):
    """The torch runner with the collectives a split model needs: each rank's output of a row-parallel layer is
    its share of the sum, which an all-reduce completes before the residual is added (once, not per rank); the
    output layer's is its share of the vocabulary, which an all-gather completes (every rank then holds all the
    logits, the same bits on every rank).

    rows    the row-parallel layers (o_proj, down_proj of every decoder layer)
    output  the output layer, this rank's rows of it (``share(vocab_size, rank, world)``)
    vocab   the whole vocabulary's size
    group   the process group (None: the default one)
    """

    def __init__(self, device: str, rows: list, output=None, vocab: int = 0, group=None):
        super().__init__(device)
        self.rows, self.output, self.vocab, self.group = {id(layer) for layer in rows}, output, vocab, group

    def agree(self, value: int) -> int:
        """Rank 0's ``value`` on every rank: decisions made from timings (a round's k under "auto") differ
        between processes, and ranks that verify different widths would pair mismatched all-reduces."""
        return _from_rank0(value, self.group, self.device)

    def linear(self, layer, x, norm=None, gated: bool = False, residual=None):
        if layer is self.output:
            return self._gather(super().linear(layer, x, norm=norm))
        if id(layer) not in self.rows:
            return super().linear(layer, x, norm=norm, gated=gated, residual=residual)
        y = super().linear(layer, x, norm=norm, gated=gated)  # [..., out]: this rank's share of the sum
        dist.all_reduce(y, group=self.group)
        return y if residual is None else residual + y

    def _gather(self, y):
        """[..., this rank's share of the vocabulary] -> [..., vocab] on every rank (shares padded to the
        largest: gloo gathers tensors of one size)."""
        world = dist.get_world_size(self.group)
        widest = -(-self.vocab // world)
        padded = torch.nn.functional.pad(y, (0, widest - y.shape[-1]))
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous(), group=self.group)
        return torch.cat([p[..., : _size(share(self.vocab, r, world))] for r, p in enumerate(parts)], dim=-1)


def shard(model, group=None):
    """Split a native Llama-family ``model`` (the same weights on every rank of ``group``, torch.distributed's
    default group if None) in place: this rank keeps its share of every decoder layer (``share``: heads by
    key/value head, MLP columns, as evenly as they go); returns the model. ValueError where there are fewer
    key/value heads than ranks, or a layer is quantized."""
    from specdec.models.llama import LlamaModel

    if not isinstance(model, LlamaModel):
        raise ValueError(f"model: tensor parallelism shards a native model (specdec.load), got {type(model).__name__}")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    layers = model.model.layers
    attn = layers[0].self_attn
    if attn.num_kv_heads < world:
        raise ValueError(f"the model's {attn.num_kv_heads} key/value heads are fewer than its {world} ranks: "
                         "each rank needs one at least (replicating them is not supported)")
    for layer in layers:
        for linear in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
            if type(linear) is not torch.nn.Linear:
                raise ValueError(f"a {type(linear).__name__} layer does not shard yet: shard a float model")
    with torch.no_grad():
        for layer in layers:
            _shard_attention(layer.self_attn, rank, world)
            _shard_mlp(layer.mlp, rank, world)
        vocab = share(model.vocab_size, rank, world)
        output = torch.nn.Linear(model.lm_head.in_features, _size(vocab), bias=False, device=model.device,
                                 dtype=model.lm_head.weight.dtype)
        output.weight.copy_(model.lm_head.weight[vocab])  # (a tied embedding stays whole)
        model.lm_head = output
    rows = [m for layer in layers for m in (layer.self_attn.o_proj, layer.mlp.down_proj)]
    model.runner = ShardRunner(model.device.type, rows, model.lm_head, model.vocab_size, group)
    return model


def _size(part: slice) -> int:
    return part.stop - part.start


def share(count: int, rank: int, world: int) -> slice:
    """Rank's share of ``count`` things split among ``world`` ranks as evenly as they go (the first count %
    world ranks one more)."""
    base, extra = divmod(count, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def _shard_attention(attn, rank: int, world: int) -> None:
    """qkv_proj keeps this rank's key/value heads and the query heads that read them (rows; SmolLM2's 3
    key/value heads over 2 ranks: 2 and 1, with 6 and 3 of its 9 query heads), o_proj those query heads'
    columns; the bias of o_proj, added once to the sum, stays on rank 0."""
    d, group = attn.head_dim, attn.num_heads // attn.num_kv_heads
    kv = share(attn.num_kv_heads, rank, world)
    q = slice(kv.start * group, kv.stop * group)
    parts = attn.qkv_proj.weight.split(attn.split)  # q [heads * d, hidden], k, v [kv_heads * d, hidden]
    rows = (slice(q.start * d, q.stop * d), slice(kv.start * d, kv.stop * d))
    q_heads, kv_heads = q.stop - q.start, kv.stop - kv.start
    keep = (rows[0], rows[1], rows[1])
    attn.qkv_proj.weight = torch.nn.Parameter(torch.cat([p[r] for p, r in zip(parts, keep)]))
    if attn.qkv_proj.bias is not None:
        biases = attn.qkv_proj.bias.split(attn.split)
        attn.qkv_proj.bias = torch.nn.Parameter(torch.cat([b[r] for b, r in zip(biases, keep)]))
    attn.o_proj.weight = torch.nn.Parameter(attn.o_proj.weight[:, rows[0]].contiguous())
    if attn.o_proj.bias is not None and rank != 0:
        attn.o_proj.bias.zero_()
    attn.num_heads, attn.num_kv_heads = q_heads, kv_heads
    attn.split = (q_heads * d, kv_heads * d, kv_heads * d)
    attn.qkv_proj.out_features, attn.o_proj.in_features = sum(attn.split), q_heads * d


def _shard_mlp(mlp, rank: int, world: int) -> None:
    """gate_up_proj keeps this rank's columns of gate and of up (rows of its weight), down_proj their columns."""
    cols = share(mlp.down_proj.in_features, rank, world)
    inner = cols.stop - cols.start
    gate, up = mlp.gate_up_proj.weight.chunk(2)  # [inner, hidden] each
    mlp.gate_up_proj.weight = torch.nn.Parameter(torch.cat((gate[cols], up[cols])))
    mlp.down_proj.weight = torch.nn.Parameter(mlp.down_proj.weight[:, cols].contiguous())
    mlp.gate_up_proj.out_features, mlp.down_proj.in_features = 2 * inner, inner


STEP, IDLE, STOP = "step", "idle", "stop"  # what rank 0 tells the others with its queued events
TIMEOUT = 120  # seconds a rank waits for a silent peer in a collective (torchrun -m specdec, serve --tensor-parallel)


class EngineGroup:
    """An Engine on every rank of a tensor-parallel group (its target split with ``shard``), driven from rank 0.

    Every rank calls ``step`` alike; rank 0 alone calls ``add_request`` and ``abort``, which take effect at its
    next step: that step begins with one broadcast of what rank 0 was asked since the last one, every rank
    applies it to its engine, and the engines, fed alike, schedule, preempt and decide alike (a round's k is
    rank 0's: ``runner.agree``; a sampled request without a seed gets one from rank 0, and the engine's own
    draft generator must be seeded: ``Engine(seed=)``). ``step`` returns the engine's outputs on every rank; a
    request that every engine refused as it joined (its grammar's matcher failing to build) is left out on every
    rank and named, with the error, in ``refused``.
    """

    def __init__(self, engine, group=None):
        seed = engine.draft_seed
        differs = torch.tensor([int(seed != _agreed_seed(seed, group, engine.target.device))],
                               device=engine.target.device)
        dist.all_reduce(differs, op=dist.ReduceOp.MAX, group=group)  # (refused on every rank alike)
        if int(differs):
            raise ValueError("engine: the ranks' engines sample drafts with different generators; build each with "
                             "the same Engine(seed=)")
        self.engine, self.group, self.pending = engine, group, []
        self.named = 0  # requests named here (those added without an id: "req-0", "req-1", ...)
        self.refused: dict[str, Exception] = {}  # requests the engines refused as they joined, and why

    def add_request(self, prompt_ids, params=None, request_id: str | None = None) -> str:
        """Rank 0: queue a request (checked now; it joins every rank's engine at the next step)."""
        from dataclasses import replace

        prompt_ids, params = self.engine.check_request(prompt_ids, params)
        if params.temperature != 0 and params.seed is None:  # (every rank must draw the same numbers)
            params = replace(params, seed=int(torch.randint(0, 2**63 - 1, ())))
        if request_id is None:
            request_id, self.named = f"req-{self.named}", self.named + 1
        self.pending.append(("add", prompt_ids, params, request_id))
        return request_id

    def abort(self, request_id: str) -> bool:
        """Rank 0: drop a request at the next step, on every rank. False if it is unknown or finished."""
        queued = any(event[0] == "add" and event[3] == request_id for event in self.pending)
        self.pending.append(("abort", request_id))
        return queued or request_id in self.engine

    def has_unfinished(self) -> bool:
        """Whether this rank's engine has work, or (rank 0) requests are queued: no message, since the engines
        agree; every rank's answer is rank 0's once a step has passed on what rank 0 queued."""
        return self.engine.has_unfinished() or bool(self.pending)

    def step(self) -> list:
        """Every rank (or rank 0 while the others ``follow``): rank 0's queued requests and aborts, then one
        engine step."""
        self._exchange(STEP)
        return self.engine.step()

    def idle(self) -> None:
        """Rank 0 of a served group: rank 0's queued requests and aborts on every rank, no step. A server calls
        it while it has nothing to run, as a heartbeat: the followers wait in a collective that times out, and a
        rank that died is found now rather than at the next request."""
        self._exchange(IDLE)

    def close(self) -> None:
        """Rank 0 of a served group: the followers' ``follow`` returns."""
        self._exchange(STOP)

    def follow(self) -> None:
        """Every rank but 0 of a served group: do what rank 0 does (``step``, ``idle``) until it ``close``s."""
        while (action := self._exchange(None)) != STOP:
            self.refused.clear()  # (rank 0 answers for them)
            if action == STEP:
                self.engine.step()

    def _exchange(self, action: str | None) -> str:
        """Rank 0's queued events and ``action``, applied on every rank; returns the action."""
        message = [(self.pending, action)]
        dist.broadcast_object_list(message, src=_rank0(self.group), group=self.group)
        self.pending = []
        events, action = message[0]
        for event in events:
            if event[0] == "add":
                try:
                    self.engine.add_request(event[1], event[2], event[3])
                except Exception as err:  # noqa: BLE001 - every rank refuses it alike (a grammar's matcher
                    self.refused[event[3]] = err  # failing to build): the request's error, not the group's
            else:
                self.engine.abort(event[1])
        return action


def _rank0(group) -> int:
    return dist.get_global_rank(group, 0) if group is not None else 0


def _from_rank0(value: int, group, device) -> int:
    """Rank 0's ``value`` (a signed 64-bit integer) on every rank."""
    shared = torch.tensor([value], dtype=torch.int64, device=device)  # (NCCL sends CUDA tensors only)
    dist.broadcast(shared, src=_rank0(group), group=group)
    return int(shared)


def _agreed_seed(seed: int, group, device) -> int:
    """Rank 0's ``seed`` (an unsigned 64-bit torch seed)."""
    return _from_rank0(seed if seed < 2**63 else seed - 2**64, group, device) % 2**64
