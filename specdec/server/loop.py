"""The engine's thread: the one place the engine is driven from."""

from __future__ import annotations

import queue
import threading
import uuid
from typing import Any

from specdec.engine import Engine, RequestParams
from specdec.server.errors import ApiError, shutting_down
from specdec.server.metrics import Metrics


class EngineLoop:
    """Owns the engine and drives it from one thread; everything else talks to it through ``submit``/``abort``.

    A request's outputs go to its ``sink`` (called on the engine thread) as RequestOutput objects, or an
    ApiError (400 refused late, 500 a failed step, 503 shutdown); the sink is dropped once the request
    finishes or is aborted.

    ``run()`` drives the engine in the calling thread until ``stop()``; ``start()`` runs it in a thread of
    its own. Prefer the thread that loaded the model (``specdec serve`` runs it on the main thread): torch's
    OpenMP runtime gives each thread that starts parallel work its own team of workers, and once a process
    holds more workers than CPUs it stops letting them spin between parallel regions — every matmul then
    waits for a sleeping worker to wake. Measured on a 2-core CPU, SmolLM2-135M float32: an engine step
    takes 38-48 ms on the main thread and 69-114 ms on a second thread after the main one has run the model.
    """

    def __init__(self, engine: Engine, metrics: Metrics | None = None):
        self.engine = engine
        self.metrics = metrics
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._sinks: dict[str, Any] = {}
        self._stopping = False
        self._thread = threading.Thread(target=self.run, name="specdec-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the loop to end (any thread may); waits for it when it runs in its own thread."""
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def submit(self, prompt_ids: list[int], params: RequestParams, sink) -> str:
        request_id = uuid.uuid4().hex
        self._inbox.put(("add", request_id, prompt_ids, params, sink))
        self._wake.set()
        return request_id

    def abort(self, request_id: str, reason: str = "abort") -> None:
        """Drop a request at the next step boundary; ``reason`` labels it in the finished-requests metric."""
        self._inbox.put(("abort", request_id, reason))
        self._wake.set()

    def _drain(self) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if item[0] == "add":
                _, request_id, prompt_ids, params, sink = item
                try:
                    self.engine.add_request(prompt_ids, params, request_id)
                except ValueError as err:  # validated before submission; a late refusal still reaches the client
                    sink(ApiError(400, str(err)))
                    continue
                except Exception as err:  # (a grammar's matcher failing to build): this request's, not the loop's
                    sink(ApiError(500, f"request failed: {type(err).__name__}: {err}", type="server_error"))
                    continue
                self._sinks[request_id] = sink
                if self.metrics is not None:
                    self.metrics.prompt.inc(len(prompt_ids))
            else:  # ("abort", request_id, reason): "stop" when a stop string ended it, else "abort"
                _, request_id, reason = item
                if self.engine.abort(request_id) and self.metrics is not None:
                    self.metrics.finished.labels(finish_reason=reason).inc()
                self._sinks.pop(request_id, None)

    def run(self) -> None:
        while not self._stopping:
            self._drain()
            if not self.engine.has_unfinished():
                if self.metrics is not None:  # aborts and finishes change the gauges too
                    self.metrics.gauges(self.engine)
                self._wake.wait(0.1)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as err:  # noqa: BLE001 - a failed step fails its requests, not the server
                for request_id, sink in list(self._sinks.items()):  # (the server's fault, not the requests')
                    self.engine.abort(request_id)
                    sink(ApiError(500, f"generation failed: {err}", type="server_error"))
                self._sinks.clear()
                continue
            if self.metrics is not None:
                self.metrics.after_step(self.engine)
            for out in outputs:
                sink = self._sinks.get(out.request_id)
                if sink is not None:
                    sink(out)
                if out.finished:
                    self._sinks.pop(out.request_id, None)
                    if self.metrics is not None:
                        self.metrics.finished.labels(finish_reason=out.finish_reason).inc()
        # shutting down: whatever is left is aborted, its blocks freed
        self._drain()
        for request_id, sink in list(self._sinks.items()):
            self.engine.abort(request_id)
            sink(shutting_down())
        self._sinks.clear()
