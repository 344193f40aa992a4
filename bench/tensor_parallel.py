"""What tensor parallelism costs here: SmolLM2 float32 plain decoding, one process against N ranks on gloo
(specdec/parallel.py), batch 1 and 16, tokens/s as medians over repeats. On a 2-core CPU this measures the
machinery (the split runs torch ops, not the C kernels, and an all-reduce follows every row-parallel layer),
not a speed-up: the ranks share the cores one process had.

    python bench/tensor_parallel.py                                        # one process: C kernels, and the torch runner
    python -m torch.distributed.run --nproc-per-node 2 bench/tensor_parallel.py   # 2 ranks (rank 0 prints)
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
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
