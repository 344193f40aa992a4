"""``specdec serve --tensor-parallel N``: the server on rank 0 of N processes that split the target.

The serving process is rank 0. It spawns ranks 1..N-1 (multiprocessing's spawn start method), and every rank
joins one gloo process group on a free loopback port (on the CPU, where ``specdec serve`` runs its model),
loads the target, keeps its share (``specdec.parallel.shard``) and builds the same engine with the same draft seed.
Rank 0 serves HTTP and drives an ``EngineGroup``: each step, and a heartbeat every 0.1 s while it is idle,
begins with one broadcast of what it was asked; the other ranks ``follow``.

Failures end the whole group, never hang it: a rank that dies fails rank 0's next collective (within a
heartbeat when idle), the requests in flight end with a 500, and rank 0 stops the server and exits 1 with
the reason on stderr; when rank 0 dies, the others' collective fails and they exit 1; a collective that waits
on a silent peer fails after parallel.TIMEOUT seconds. SIGTERM / SIGINT go to rank 0 alone (the others ignore them):
it shuts down as one server does, then tells the others to stop, and every process exits 0 (rank 0 exits 1
where another did not).
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import secrets
import signal
import socket
import sys

import torch
import torch.distributed as dist

from specdec.parallel import TIMEOUT, EngineGroup, shard
from specdec.server.app import create_app
from specdec.server.config import ServerConfig
from specdec.server.loop import EngineLoop
from specdec.server.metrics import Metrics
from specdec.server.run import Server, _run, build_engine

JOIN_SECONDS = 30  # that rank 0 waits for the others to exit after telling them to stop


def serve_ranks(world: int, build: dict, config: ServerConfig, grace_seconds: float, **where) -> int:
    """Rank 0: spawn the other ranks, join them, serve; the exit code of ``specdec serve``."""
    address = f"tcp://127.0.0.1:{_free_port()}"  # the rendezvous: loopback only
    build = dict(build, seed=secrets.randbits(63))  # the draft generator's seed, the same on every rank
    spawn = multiprocessing.get_context("spawn")
    ranks = [spawn.Process(target=_follower, args=(rank, world, address, build), name=f"specdec-rank-{rank}",
                           daemon=True) for rank in range(1, world)]
    for rank, process in enumerate(ranks, 1):
        process.start()
        print(f"specdec serve: tensor-parallel rank {rank} of {world}: pid {process.pid}",
              file=sys.stderr, flush=True)
    stopped = False  # the others told to stop: they exit on their own
    try:
        engine, tokenizer = _join(0, world, address, build)
        group = EngineGroup(engine)
        worker = EngineLoop(engine, Metrics(), group=group)
        code = _run(Server(create_app(engine, tokenizer, config, worker=worker), grace_seconds, **where), worker)
        if worker.failure is None:
            group.close()
            stopped = True
    finally:
        if not stopped and dist.is_initialized():  # a rank waiting on rank 0 in a collective fails now
            dist.destroy_process_group()
        codes = [_ended(process, JOIN_SECONDS if stopped else 5) for process in ranks]
        if dist.is_initialized():
            dist.destroy_process_group()
    return code if all(c == 0 for c in codes) else 1


def _ended(process, seconds: float) -> int:
    """The process's exit code, once it has ended within ``seconds`` or been killed."""
    process.join(seconds)
    if process.is_alive():
        process.kill()
        process.join()
    return process.exitcode


def _follower(rank: int, world: int, address: str, build: dict) -> None:
    """Ranks 1..N-1: join, then do what rank 0 does until it says stop."""
    for sig in (signal.SIGINT, signal.SIGTERM):  # rank 0 ends them: a terminal's Ctrl-C reaches every process
        signal.signal(sig, signal.SIG_IGN)
    try:
        engine, _ = _join(rank, world, address, build)
        EngineGroup(engine).follow()
    except Exception as err:  # noqa: BLE001 - any failure ends this rank loudly
        print(f"specdec serve: tensor-parallel rank {rank} failed: {type(err).__name__}: {err}", file=sys.stderr,
              flush=True)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _join(rank: int, world: int, address: str, build: dict):
    """Join the group and build this rank's engine over its share of the target (on the CPU, where
    ``specdec serve`` runs its model: gloo, the cores shared among the ranks)."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=address, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=TIMEOUT))
    return build_engine(**build, split=shard)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
