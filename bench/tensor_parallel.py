"""What tensor parallelism costs here: SmolLM2 float32 plain decoding, one process against N ranks on gloo
(specdec/parallel.py), batch 1 and 16, tokens/s as medians over repeats. On a 2-core CPU this measures the
machinery (the split runs torch ops, not the C kernels, and an all-reduce follows every row-parallel layer),
not a speed-up: the ranks share the cores one process had.

    python bench/tensor_parallel.py                                        # one process: C kernels, and the torch runner
    python -m torch.distributed.run --nproc-per-node 2 bench/tensor_parallel.py   # 2 ranks (rank 0 prints)

Under 2 ranks it also times where the output layer and the draft could live (``placements``).
"""

from __future__ import annotations

import os
import statistics
import time

import torch
import torch.distributed as dist

import specdec
from specdec.kernels.runner import TorchRunner
from specdec.parallel import shard

NEW, REPEATS = 64, 3


def rate(model, batch: int) -> float:
    """Median tokens/s of plain greedy decoding, ``batch`` rows of a 16-token prompt, NEW new tokens each."""
    ids = torch.arange(100, 116).repeat(batch, 1)
    specdec.generate(model, ids, max_new_tokens=4, eos_token_id=[])  # warm-up
    rates = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        specdec.generate(model, ids, max_new_tokens=NEW, eos_token_id=[])
        rates.append(batch * NEW / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, 2 // world))
    model, _ = specdec.load("smollm2-135m-instruct", dtype="float32")
    runs = {}
    output = model.lm_head.weight.detach().clone()  # [vocab, hidden]: the whole output layer, for placements()
    if world > 1:
        dist.init_process_group("gloo")
        shard(model)
        runs[f"{world} ranks (torch ops + all-reduce)"] = model
    else:
        runs["1 process, C kernels"] = model
        torch_ops, _ = specdec.load("smollm2-135m-instruct", dtype="float32")
        torch_ops.runner = TorchRunner("cpu")
        runs["1 process, torch ops"] = torch_ops
    for name, m in runs.items():
        figures = {batch: rate(m, batch) for batch in (1, 16)}
        if world == 1 or dist.get_rank() == 0:
            print(f"| {name} | {figures[1]:.1f} | {figures[16]:.1f} |", flush=True)
    if world > 1:
        placements(output)
        dist.destroy_process_group()


def _timed(call, repeats: int = 30) -> float:
    """Median milliseconds of ``call()`` on every rank, the ranks starting each call together."""
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def placements(weight, k: int = 3) -> None:
    """Where the output layer and the draft live, per call (rank 0 prints): the output layer replicated (every
    rank multiplies all of it) against sharded by vocabulary (each rank its rows, then an all-gather of the
    logits); a draft replicated (nothing to send) against run on rank 0 alone with its proposals broadcast: the
    tokens [batch, k], and for sampling their draft probabilities [batch, k, vocab] as well. weight: the whole
    output layer [vocab, hidden]."""
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = weight[rank * weight.shape[0] // world:(rank + 1) * weight.shape[0] // world]
    lines = []
    for batch in (1, 16):
        h = torch.randn(batch, weight.shape[1])
        parts = [torch.empty(batch, rows.shape[0]) for _ in range(world)]
        tokens, probs = torch.zeros(batch, k, dtype=torch.long), torch.zeros(batch, k, weight.shape[0])
        figures = (_timed(lambda: torch.nn.functional.linear(h, weight)),
                   _timed(lambda: dist.all_gather(parts, torch.nn.functional.linear(h, rows))),
                   _timed(lambda: dist.broadcast(tokens, 0)),
                   _timed(lambda: (dist.broadcast(tokens, 0), dist.broadcast(probs, 0))))
        lines.append(f"| {batch} | " + " | ".join(f"{x:.2f}" for x in figures) + " |")
    if rank == 0:
        print(f"\n| batch | output layer replicated, ms | sharded by vocabulary + all-gather, ms | draft tokens "
              f"broadcast (k = {k}), ms | + draft probabilities, ms |\n|---|---|---|---|---|", flush=True)
        print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
