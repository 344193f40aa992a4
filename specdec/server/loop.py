"""The engine's thread: the one place the engine is driven from."""

from __future__ import annotations

import queue
import threading
import uuid
from typing import Any

from specdec.engine import Engine, RequestParams
from specdec.server.errors import ApiError, shutting_down
from specdec.server.metrics import Metrics

IDLE_WAIT = 0.1  # seconds the loop sleeps while it has nothing to run (woken early by a request)


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

    Under tensor parallelism (``group``: an EngineGroup over ``engine``, specdec/parallel.py) requests go
    through the group, which hands them to every rank at its next step; while idle the loop sends the group a
    heartbeat every IDLE_WAIT seconds. A failed step or heartbeat leaves the ranks out of step: the requests in
    flight end with a 500, and the loop stops with the error in ``failure``.
    """

    def __init__(self, engine: Engine, metrics: Metrics | None = None, group=None):
        self.engine = engine
        self.metrics = metrics
        self.group = group
        self._driver = engine if group is None else group  # what requests, aborts and steps go through
        self.failure: Exception | None = None
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
                    self._driver.add_request(prompt_ids, params, request_id)
                except ValueError as err:  # validated before submission; a late refusal still reaches the client
                    sink(ApiError(400, str(err)))
                    continue
                except Exception as err:  # (a grammar's matcher failing to build): this request's, not the loop's
                    sink(_failed(err))
                    continue
                self._sinks[request_id] = sink
                if self.metrics is not None:
                    self.metrics.prompt.inc(len(prompt_ids))
            else:  # ("abort", request_id, reason): "stop" when a stop string ended it, else "abort"
                _, request_id, reason = item
                if self._driver.abort(request_id) and self.metrics is not None:
                    self.metrics.finished.labels(finish_reason=reason).inc()
                self._sinks.pop(request_id, None)

    def run(self) -> None:
        while not self._stopping:
            self._drain()
            if not self._driver.has_unfinished():
                if self.metrics is not None:  # aborts and finishes change the gauges too
                    self.metrics.gauges(self.engine)
                self._wake.wait(IDLE_WAIT)
                self._wake.clear()
                if self.group is not None and not self._stopping:
                    self._guarded(self.group.idle)
                    self._refused()
                continue
            outputs = self._guarded(self._driver.step)
            if self.group is not None:
                self._refused()
            if outputs is None:
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
        self._fail_all(shutting_down())

    def _guarded(self, call):
        """``call()``; if it raises, every request in flight ends with a 500 (the server's fault, not the
        requests') and None is returned; a group's failure also stops the loop."""
        try:
            return call()
        except Exception as err:  # noqa: BLE001 - a failed step fails its requests, not the server
            if self.group is not None:
                self.failure, self._stopping = err, True
                message = f"tensor-parallel group failed: {type(err).__name__}: {err}"
            else:
                message = f"generation failed: {err}"
            self._fail_all(ApiError(500, message, type="server_error"))
            return None

    def _refused(self) -> None:
        """A group's requests that the engines refused as they joined: each its 500, as _drain gives one."""
        while self.group.refused:
            request_id, err = self.group.refused.popitem()
            sink = self._sinks.pop(request_id, None)
            if sink is not None:
                sink(_failed(err))

    def _fail_all(self, error: ApiError) -> None:
        for request_id, sink in list(self._sinks.items()):
            self._driver.abort(request_id)
            sink(error)
        self._sinks.clear()


def _failed(err: Exception) -> ApiError:
    """The 500 of a request the engine could not take."""
    return ApiError(500, f"request failed: {type(err).__name__}: {err}", type="server_error")
