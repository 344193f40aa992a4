"""Running the app under uvicorn: ``serve`` (``specdec serve``) and ``InProcessServer`` (tests, benchmarks).

Both run one ``Server``: uvicorn's, with the connection limits of the app's ServerConfig and a shutdown that
ends every request cleanly.
"""

from __future__ import annotations

import asyncio
import functools
import signal
import socket
import sys
import threading
import time

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

import specdec
from specdec.engine import Engine
from specdec.models.loading import checkpoint_folder, load_draft, source_path
from specdec.server.app import create_app
from specdec.server.config import ServerConfig
from specdec.server.loop import EngineLoop
from specdec.server.metrics import Metrics
from specdec.validate import integer

DRAIN_SECONDS = 2.0  # after the grace period: for the requests ended then to send their error and close


class _TimedH11(H11Protocol):
    """uvicorn's h11 protocol with a read deadline: a request's headers and body must arrive within
    ``read_timeout`` seconds of its first byte (of the connection, for its first request). uvicorn by itself
    waits forever on a connection that never sends a byte, stops inside its headers, or stops inside its body;
    after a response, its keep-alive timeout closes an idle connection. (uvicorn's other protocol, httptools,
    which it picks where that is installed, has neither this deadline nor h11's limit on unfinished headers.)"""

    def __init__(self, *args, read_timeout: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.read_timeout = read_timeout
        self.read_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._watch()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        self._unwatch()  # idle now: the keep-alive timeout's business
        super().on_response_complete()

    def connection_lost(self, exc) -> None:
        self._unwatch()
        super().connection_lost(exc)

    def _watch(self) -> None:
        """A request under way (nothing or part of it received) is under the deadline; one received is not."""
        if self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
            self._unwatch()
        elif self.read_deadline is None:
            self.read_deadline = self.loop.call_later(self.read_timeout, self._expire)

    def _unwatch(self) -> None:
        if self.read_deadline is not None:
            self.read_deadline.cancel()
            self.read_deadline = None

    def _expire(self) -> None:
        self.read_deadline = None
        if not self.transport.is_closing():
            self.transport.close()  # (a handler waiting for the body gets http.disconnect)


class Server(uvicorn.Server):
    """uvicorn serving ``app`` (made by create_app), with a shutdown that leaves no request cut.

    On shutdown the app admits no more requests and running ones may finish for ``grace`` seconds; then each
    still running ends with a 503 error its client reads as any other (an error object, or an error event
    then ``[DONE]`` on a stream), and ``DRAIN_SECONDS`` later uvicorn cancels whatever is left.
    """

    def __init__(self, app, grace: float, **where):
        config, self.admission, self.grace = app.state.server.config, app.state.server.admission, grace
        super().__init__(uvicorn.Config(
            app, log_level="warning", timeout_graceful_shutdown=grace + DRAIN_SECONDS,
            timeout_keep_alive=config.keep_alive_seconds, h11_max_incomplete_event_size=config.max_header_bytes,
            http=functools.partial(_TimedH11, read_timeout=config.read_timeout_seconds), **where))

    async def shutdown(self, sockets=None) -> None:
        self.admission.close()
        deadline = asyncio.get_running_loop().call_later(self.grace, self.admission.expire)
        try:
            await super().shutdown(sockets)
        finally:
            deadline.cancel()


class InProcessServer:
    """``with InProcessServer(app) as server:`` uvicorn in a thread on a free loopback port (``server.url``),
    stopped on exit by setting ``should_exit`` (no signals): for tests and the load benchmark."""

    def __init__(self, app, start_timeout: float = 30.0, graceful_shutdown: float = 5):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))  # loopback only
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = Server(app, graceful_shutdown)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.start_timeout = start_timeout

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + self.start_timeout
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"the server at {self.url} did not start within {self.start_timeout} s")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


def serve(model: str, draft: str | None = "ngram", host: str = "127.0.0.1", port: int = 8000, *,
          num_draft_tokens="auto", max_num_seqs: int = 32, kv_blocks: int | None = None, block_size: int = 16,
          max_queued: int = 64, dtype: str | None = None, quantize: str | None = None, activations: str = "int8",
          grace_seconds: float = 10.0, tensor_parallel: int = 1, replicas: int = 1,
          min_replicas: int | None = None, max_replicas: int | None = None) -> int:
    """Load the model (and draft), build the engine, and serve until SIGINT/SIGTERM.

    On SIGTERM the server stops accepting connections and lets running requests finish for ``grace_seconds``;
    those still running then end with a 503 error (their requests aborted, their blocks freed), and the
    process exits 0. ``tensor_parallel`` > 1: the target split over that many processes (server/ranks.py).
    ``replicas`` > 1, or ``min_replicas`` / ``max_replicas`` (Ray Serve's autoscaling bounds): engine replicas
    behind Ray Serve's proxy (server/replicas.py).
    """
    build = dict(model=model, draft=draft, num_draft_tokens=num_draft_tokens, max_num_seqs=max_num_seqs,
                 kv_blocks=kv_blocks, block_size=block_size, dtype=dtype, quantize=quantize, activations=activations)
    config = ServerConfig(model_name=model, max_queued=max_queued)
    autoscaling = _autoscaling(replicas, min_replicas, max_replicas)
    if integer("tensor_parallel", tensor_parallel, 1) > 1 and (replicas > 1 or autoscaling):
        raise ValueError(f"tensor_parallel={tensor_parallel} with replicas={replicas}: serve one or the other")
    if replicas > 1 or autoscaling:
        from specdec.server.replicas import serve_replicas

        checkpoint_folder(model)  # a missing model is refused here, a GGUF converted once, before any replica starts

        return serve_replicas(replicas, build, config, grace_seconds, host, port, autoscaling)
    if tensor_parallel > 1:
        from specdec.server.ranks import serve_ranks

        _check_splittable(model, dtype, quantize, tensor_parallel)

        return serve_ranks(tensor_parallel, build, config, grace_seconds, host=host, port=port)
    engine, tokenizer = build_engine(**build)
    worker = EngineLoop(engine, Metrics())
    return _run(Server(create_app(engine, tokenizer, config, worker=worker), grace_seconds, host=host, port=port),
                worker)


def _check_splittable(model: str, dtype, quantize, tensor_parallel: int) -> None:
    """What ``shard`` would refuse on every rank, refused before the ranks start (and a GGUF converted once)."""
    if quantize is not None:
        raise ValueError(f"tensor_parallel={tensor_parallel} splits float weights; quantize={quantize!r} is not "
                         "supported with it")
    if dtype in (None, "auto") and source_path(model).suffix == ".gguf":
        raise ValueError(f"tensor_parallel={tensor_parallel} splits float weights; a .gguf file keeps its quantized "
                         "blocks unless a dtype is given (dtype='float32' or 'bfloat16')")
    checkpoint_folder(model)


def _autoscaling(replicas: int, min_replicas: int | None, max_replicas: int | None) -> dict | None:
    """Ray Serve's autoscaling bounds, checked (None: a fixed number of replicas)."""
    integer("replicas", replicas, 1)
    if min_replicas is None and max_replicas is None:
        return None
    low = integer("min_replicas", min_replicas if min_replicas is not None else 1, 0)
    high = integer("max_replicas", max_replicas if max_replicas is not None else max(replicas, low), 1)
    if not low <= replicas <= high:
        raise ValueError(f"replicas must lie within min_replicas..max_replicas, got replicas={replicas}, "
                         f"min_replicas={low}, max_replicas={high}")
    return {"min_replicas": low, "max_replicas": high}


def build_engine(model: str, draft: str | None, *, num_draft_tokens, max_num_seqs: int, kv_blocks: int | None,
                 block_size: int, dtype: str | None, quantize: str | None, activations: str, split=None,
                 seed: int | None = None) -> tuple[Engine, object]:
    """The served engine (its target, ``split(target)`` first where given: a tensor-parallel rank's share; its
    draft) and the target's tokenizer."""
    target, tokenizer = specdec.load(model, dtype=dtype, quantize=quantize, activations=activations)
    if split is not None:
        split(target)
    draft_model = None if draft is None else load_draft(draft, dtype)
    return Engine(target, draft_model, num_draft_tokens=num_draft_tokens if draft else 1, max_num_seqs=max_num_seqs,
                  kv_blocks=kv_blocks, block_size=block_size, tokenizer=tokenizer, seed=seed), tokenizer


def _run(server: Server, worker: EngineLoop) -> int:
    """uvicorn on a thread of its own, the engine on this one (the thread that loaded the model: see
    EngineLoop for why); SIGTERM/SIGINT shut down gracefully, a second one at once."""
    def http():  # uvicorn off the main thread installs no signal handlers: ours below stand in for them
        try:
            server.run()
        finally:
            worker.stop()  # after the graceful shutdown: what still runs is aborted, its blocks freed

    def on_signal(signum, frame):
        server.force_exit = server.should_exit
        server.should_exit = True

    main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)} if main else {}
    thread = threading.Thread(target=http, name="specdec-http", daemon=True)
    try:
        thread.start()
        worker.run()
        if worker.failure is not None:  # its requests have their 500; any that came after end now, with a 503
            server.grace, server.should_exit = 0.0, True
        thread.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if worker.failure is not None:
        print(f"specdec serve: stopped: tensor-parallel group failed: {type(worker.failure).__name__}: "
              f"{worker.failure}", file=sys.stderr, flush=True)
        return 1
    return 0 if server.started else 1  # never started: the port was taken, uvicorn said why
