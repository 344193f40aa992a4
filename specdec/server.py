"""``specdec serve``: an OpenAI-compatible HTTP server over the Engine (FastAPI + uvicorn).

POST /v1/completions, POST /v1/chat/completions (streaming as server-sent events ending with ``[DONE]``),
GET /v1/models, GET /health, GET /metrics (Prometheus). The engine runs on its own thread (``EngineLoop``);
request handlers hand it work through an inbox and read its outputs from an asyncio queue per request, so
the event loop never waits for a forward pass, and requests join and leave only between steps.
"""

from __future__ import annotations

import asyncio
import json
import math
import queue
import signal
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict

from specdec.engine import Engine, RequestOutput, RequestParams
from specdec.validate import integer


@dataclass(frozen=True)
class ServerConfig:
    """Limits of one server. Running requests are capped by the engine's max_num_seqs."""

    model_name: str
    max_queued: int = 64  # requests waiting beyond the running ones; more get 429
    max_stop: int = 4  # stop strings per request (OpenAI's limit)
    max_body_bytes: int = 1 << 20  # request bodies larger than this get 413
    default_max_tokens: int = 16  # completions without max_tokens (OpenAI's default)
    max_chat_tokens: int = 512  # chat without max_tokens: up to the context, at most this many

    def __post_init__(self):
        if not isinstance(self.model_name, str) or not self.model_name:
            raise ValueError(f"model_name must be a non-empty string, got model_name={self.model_name!r}")
        for name in ("max_queued", "max_stop", "max_body_bytes", "default_max_tokens", "max_chat_tokens"):
            integer(name, getattr(self, name), 0 if name == "max_queued" else 1)


class _Stream(StreamingResponse):
    """A streaming response that calls ``on_close`` however it ends: its generator's own ``finally`` does not
    run if the response fails before the first item is asked for (the client gone before the headers went
    out), and then the request would run on to max_tokens, uncounted."""

    def __init__(self, content, on_close, **kwargs):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def _error_response(status: int, message: str, param=None, kind="invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status)


# ------------------------------------------------------------------------------------------- metrics

class Metrics:
    """Prometheus metrics on a registry of this server's own (two servers in one process do not collide)."""

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.running = Gauge("specdec_requests_running", "Requests in the running batch", registry=r)
        self.waiting = Gauge("specdec_requests_waiting", "Requests queued for admission", registry=r)
        self.kv_used = Gauge("specdec_kv_blocks_used", "Target KV pool blocks in use", registry=r)
        self.kv_free = Gauge("specdec_kv_blocks_free", "Target KV pool blocks free", registry=r)
        self.acceptance = Gauge("specdec_acceptance_rate", "Accepted / proposed draft tokens so far", registry=r)
        self.position = Gauge("specdec_position_acceptance", "P(position i accepted | positions < i accepted)",
                              ["position"], registry=r)
        self.k = Gauge("specdec_num_draft_tokens", "k of the last decode step", registry=r)
        self.proposed = Counter("specdec_draft_tokens_proposed", "Draft tokens offered to the target", registry=r)
        self.accepted = Counter("specdec_draft_tokens_accepted", "Draft tokens the target kept", registry=r)
        self.generated = Counter("specdec_generation_tokens", "Tokens emitted", registry=r)
        self.prompt = Counter("specdec_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.steps = Counter("specdec_engine_steps", "Engine steps (one target forward each)", registry=r)
        self.preemptions = Gauge("specdec_preemptions", "Sequences preempted so far", registry=r)
        self.finished = Counter("specdec_requests_finished", "Requests ended", ["finish_reason"], registry=r)
        self.tokens_per_forward = Histogram(
            "specdec_tokens_per_target_forward", "Tokens a request emitted per target forward",
            buckets=(1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 17), registry=r)
        latency = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
        self.ttft = Histogram("specdec_time_to_first_token_seconds", "Arrival to first token", buckets=latency,
                              registry=r)
        self.itl = Histogram("specdec_inter_token_latency_seconds", "Time per output token after the first",
                             buckets=latency, registry=r)
        self._seen = (0, 0)

    def gauges(self, engine: Engine) -> None:
        """Engine thread: the engine's state now."""
        self.running.set(engine.num_running)
        self.waiting.set(engine.num_waiting)
        self.kv_used.set(engine.pool.num_used)
        self.kv_free.set(engine.pool.num_free)
        self.preemptions.set(engine.num_preemptions)

    def after_step(self, engine: Engine) -> None:
        """Engine thread, after each step: the gauges, and the step's figures once."""
        self.gauges(engine)
        info = engine.last_step
        if info is None:
            return
        self.steps.inc()
        self.generated.inc(sum(info.emitted))
        for n in info.emitted:
            self.tokens_per_forward.observe(n)
        if not info.prefill:
            self.k.set(info.k)
        stats = engine.stats
        proposed, accepted = stats.proposed - self._seen[0], stats.accepted - self._seen[1]
        self._seen = (stats.proposed, stats.accepted)
        self.proposed.inc(proposed)
        self.accepted.inc(accepted)
        if stats.proposed:
            self.acceptance.set(stats.acceptance_rate)
            for i, rate in enumerate(stats.per_position_acceptance):
                self.position.labels(position=str(i)).set(rate)


# ------------------------------------------------------------------------------------------- engine thread

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
                    sink(ApiError(500, f"generation failed: {err}", None, "server_error"))
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
            sink(ApiError(503, "server shutting down", None, "unavailable"))
        self._sinks.clear()


# ------------------------------------------------------------------------------------------- text

class TextStream:
    """Incremental detokenization with stop strings.

    Text is released only when it can no longer change: a trailing incomplete UTF-8 sequence (decoded as
    U+FFFD) and a tail that could still grow into a stop string are held back, so neither a stop string nor
    anything after it is ever sent, even when it spans several tokens or a multi-token step.
    """

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters of text released
        self.stopped = False

    def push(self, token_ids: list[int]) -> str:
        """Feed emitted ids (one step's); returns the text released. After a stop, ignores the rest."""
        start = self.sent
        for token in token_ids:
            if self.stopped:
                break
            self.ids.append(token)
            self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
            hits = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
            if hits:
                self.text, self.stopped = self.text[: min(hits)], True
                self.sent = len(self.text)
                break
            safe = len(self.text) - self._held_back()
            self.sent = max(self.sent, safe)
        return self.text[start: self.sent]

    def flush(self) -> str:
        """At the end: release what was held back (it did not become a stop string)."""
        start, self.sent = self.sent, len(self.text)
        return self.text[start:]

    def _held_back(self) -> int:
        text = self.text
        hold = len(text) - len(text.rstrip("\ufffd"))
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        return hold


# ------------------------------------------------------------------------------------------- requests

class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # an extension: OpenAI has no top_k
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    n: int = 1


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict] | None = None


class ChatRequest(_Common):
    messages: list[ChatMessage]


#: OpenAI parameters this server does not implement: refused when set to anything but their neutral value,
#: rather than silently generating something else than asked
UNSUPPORTED = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
               "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}),
               "suffix": (None, ""), "tools": (None, []), "response_format": (None, {"type": "text"})}


def _params(body: _Common, prompt_len: int, max_model_len: int, config: ServerConfig, chat: bool) -> RequestParams:
    for name, value in (body.model_extra or {}).items():
        if name in UNSUPPORTED and value not in UNSUPPORTED[name]:
            raise ApiError(400, f"{name} is not supported by this server (got {name}={value!r})", name)
    if body.n != 1:
        raise ApiError(400, f"n must be 1, got n={body.n}", "n")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if max_tokens is None:
        max_tokens = (max(1, min(config.max_chat_tokens, max_model_len - prompt_len)) if chat
                      else config.default_max_tokens)
    if max_tokens < 1:
        raise ApiError(400, f"max_tokens must be >= 1, got max_tokens={max_tokens}", "max_tokens")
    if prompt_len + max_tokens > max_model_len:
        raise ApiError(400, f"max_tokens: the prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds "
                            f"the context of {max_model_len} tokens", "max_tokens")
    temperature = 1.0 if body.temperature is None else body.temperature
    top_p = 1.0 if body.top_p is None else body.top_p
    top_k = 0 if body.top_k is None else body.top_k
    for name, value in (("temperature", temperature), ("top_p", top_p)):
        if math.isnan(value):
            raise ApiError(400, f"{name} must be a number, got {name}=NaN", name)
    if temperature < 0:
        raise ApiError(400, f"temperature must be >= 0, got temperature={temperature}", "temperature")
    if not 0 < top_p <= 1:
        raise ApiError(400, f"top_p must lie in (0, 1], got top_p={top_p}", "top_p")
    if top_k < 0:
        raise ApiError(400, f"top_k must be >= 0, got top_k={top_k}", "top_k")
    if body.seed is not None and not -2**63 <= body.seed < 2**63:
        raise ApiError(400, f"seed must be a 64-bit signed integer, got seed={body.seed}", "seed")
    try:  # (a negative seed is as good as any: torch seeds are unsigned 64-bit, so it wraps)
        return RequestParams(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                             seed=None if body.seed is None else body.seed % 2**64)
    except ValueError as err:
        raise ApiError(400, str(err)) from None


def _stops(body: _Common, config: ServerConfig) -> list[str]:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > config.max_stop:
        raise ApiError(400, f"stop: at most {config.max_stop} stop strings, got {len(stop)}", "stop")
    if any(not s for s in stop):
        raise ApiError(400, "stop: stop strings must be non-empty", "stop")
    return stop


def _chat_text(content) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(part.get("text", "") for part in content if part.get("type") == "text")


class _BodyLimit:
    """ASGI middleware: bodies over ``limit`` bytes get 413 before any handler sees them (Content-Length is
    checked first; a chunked body is read and counted, then replayed to the app)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        too_large = _error_response(413, f"request body exceeds {self.limit} bytes")
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await too_large(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending its body
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return await too_large(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # afterwards: http.disconnect, which streaming responses listen for

        return await self.app(scope, replay, send)


# ------------------------------------------------------------------------------------------- app

def create_app(engine: Engine, tokenizer, config: ServerConfig, worker: EngineLoop | None = None) -> FastAPI:
    """The FastAPI app. Without ``worker`` an engine thread starts and stops with the app's lifespan; with
    one, its owner drives it (``worker.run()``, e.g. on the main thread, see EngineLoop) and stops it."""
    own = worker is None
    engine_loop = EngineLoop(engine, Metrics()) if own else worker
    metrics = engine_loop.metrics
    inflight = {"n": 0, "closing": False}

    @asynccontextmanager
    async def lifespan(app):
        if own:
            engine_loop.start()
        try:
            yield
        finally:
            inflight["closing"] = True
            if own:
                engine_loop.stop()

    app = FastAPI(title="specdec", lifespan=lifespan)
    app.state.metrics, app.state.engine = metrics, engine
    app.add_middleware(_BodyLimit, limit=config.max_body_bytes)

    @app.exception_handler(ApiError)
    async def _api_error(request, err: ApiError):
        return _error_response(err.status, err.message, err.param, err.kind)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":  # loc holds a character offset, not a field
            loc = []
        param = ".".join(loc) or None
        return _error_response(400, f"{param or 'body'}: {first.get('msg', 'invalid request')}", param)

    def _check_model(name: str) -> None:
        if name != config.model_name:
            raise ApiError(404, f"model: unknown model {name!r}; this server serves {config.model_name!r}",
                           "model", "model_not_found")

    def _admit() -> None:
        if inflight["closing"]:
            raise ApiError(503, "server is shutting down", None, "unavailable")
        limit = engine.max_num_seqs + config.max_queued
        if inflight["n"] >= limit:
            raise ApiError(429, f"too many requests: {engine.max_num_seqs} running and {config.max_queued} queued "
                                f"is the limit; retry later", None, "rate_limit_exceeded")

    async def _run(body: _Common, prompt_ids: list[int], chat: bool, request: Request):
        _check_model(body.model)
        if not prompt_ids:
            raise ApiError(400, "messages: the prompt is empty" if chat else "prompt: the prompt is empty",
                           "messages" if chat else "prompt")
        params = _params(body, len(prompt_ids), engine.max_model_len, config, chat)
        stop = _stops(body, config)
        try:
            engine.check_request(prompt_ids, params)
        except ValueError as err:
            raise ApiError(400, str(err), "prompt" if "prompt" in str(err) else "max_tokens") from None
        _admit()
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()

        def sink(item):
            try:
                loop.call_soon_threadsafe(outputs.put_nowait, item)
            except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
                pass

        inflight["n"] += 1
        request_id = engine_loop.submit(prompt_ids, params, sink)
        kind = "chat.completion" if chat else "text_completion"
        created = int(time.time())
        name = ("chatcmpl-" if chat else "cmpl-") + request_id
        text = TextStream(tokenizer, stop)
        arrival = time.perf_counter()
        timing = {"last": None}

        progress = {"finished": False, "released": False}

        def release() -> None:
            """Once per request, however it ends: a request abandoned before it finished (client gone,
            handler cancelled) is aborted, and its blocks are freed at the next step boundary."""
            if progress["released"]:
                return
            progress["released"] = True
            inflight["n"] -= 1
            if not progress["finished"]:
                engine_loop.abort(request_id)

        async def events():
            """(text delta, finish_reason or None) until the request finishes."""
            try:
                while True:
                    item = await outputs.get()
                    if isinstance(item, ApiError):  # refused late, a failed step, or shutdown
                        progress["finished"] = True
                        raise item
                    out: RequestOutput = item
                    _observe_latency(out)
                    delta = text.push(out.new_token_ids)
                    if text.stopped:  # a stop string: the engine may still be generating; drop it now
                        if not out.finished:
                            engine_loop.abort(request_id, reason="stop")
                        progress["finished"] = True
                        yield delta, "stop"
                        return
                    if out.finished:
                        progress["finished"] = True
                        yield delta + text.flush(), out.finish_reason
                        return
                    if delta:
                        yield delta, None
            finally:
                release()

        def _observe_latency(out: RequestOutput) -> None:
            if not out.new_token_ids:
                return
            now = time.perf_counter()
            if timing["last"] is None:
                metrics.ttft.observe(now - arrival)
            else:
                per_token = (now - timing["last"]) / len(out.new_token_ids)
                for _ in out.new_token_ids:
                    metrics.itl.observe(per_token)
            timing["last"] = now

        def usage():
            return {"prompt_tokens": len(prompt_ids), "completion_tokens": len(text.ids),
                    "total_tokens": len(prompt_ids) + len(text.ids)}

        if not body.stream:
            pieces, reason = [], None

            async def collect():
                nonlocal reason
                async for delta, reason in events():
                    pieces.append(delta)

            async def client_gone():  # the body is read: the next ASGI message is the client leaving
                while (await request.receive())["type"] != "http.disconnect":
                    pass

            # (a plain handler is not cancelled when its client goes: without the watch, an abandoned request
            # would run to max_tokens, holding its slot and its blocks)
            work, watch = asyncio.ensure_future(collect()), asyncio.ensure_future(client_gone())
            try:
                await asyncio.wait((work, watch), return_when=asyncio.FIRST_COMPLETED)
            finally:
                watch.cancel()
                abandoned = not work.done()
                if abandoned:  # the client is gone (or the handler cancelled): abort the request now
                    work.cancel()
                    release()
            if abandoned:
                return Response(status_code=499)  # (nobody reads it: nginx's "client closed request")
            work.result()  # an ApiError from the engine loop reaches the client here
            content = "".join(pieces)
            choice = ({"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": reason}
                      if chat else {"index": 0, "text": content, "logprobs": None, "finish_reason": reason})
            return JSONResponse({"id": name, "object": kind, "created": created, "model": config.model_name,
                                 "choices": [choice], "usage": usage()})

        include_usage = bool((body.stream_options or {}).get("include_usage"))
        chunk_kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str | None, reason, role=False):
            if chat:
                d = {"role": "assistant", "content": ""} if role else ({} if delta is None else {"content": delta})
                choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": reason}
            payload = {"id": name, "object": chunk_kind, "created": created, "model": config.model_name,
                       "choices": [choice]}
            return f"data: {json.dumps(payload)}\n\n"

        async def sse():
            try:
                if chat:
                    yield chunk(None, None, role=True)
                async for delta, reason in events():
                    if reason is None:
                        yield chunk(delta, None)
                    else:
                        if delta:
                            yield chunk(delta, None)
                        yield chunk(None, reason)
            except ApiError as err:
                yield f"data: {json.dumps({'error': {'message': err.message, 'type': err.kind}})}\n\n"
            finally:
                release()
            if include_usage:
                payload = {"id": name, "object": chunk_kind, "created": created, "model": config.model_name,
                           "choices": [], "usage": usage()}
                yield f"data: {json.dumps(payload)}\n\n"
            yield "data: [DONE]\n\n"

        return _Stream(sse(), release, media_type="text/event-stream",
                       headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ApiError(400, f"prompt: one prompt per request (n = 1), got {len(prompt)}", "prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = tokenizer(prompt)["input_ids"] if prompt else []
        else:
            ids = list(prompt)
            vocab = engine.target.vocab_size
            if any(not 0 <= t < vocab for t in ids):
                raise ApiError(400, f"prompt: token ids must lie in 0..{vocab - 1}", "prompt")
        return await _run(body, ids, chat=False, request=request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        if not getattr(tokenizer, "chat_template", None):
            raise ApiError(400, f"messages: model {config.model_name!r} has no chat template; use /v1/completions",
                           "messages")
        if not body.messages:
            raise ApiError(400, "messages: at least one message is needed", "messages")
        messages = [{"role": m.role, "content": _chat_text(m.content)} for m in body.messages]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        return await _run(body, list(ids["input_ids"]), chat=True, request=request)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0,
                                            "owned_by": "specdec"}]}

    @app.get("/health")
    async def health():
        if inflight["closing"]:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


class InProcessServer:
    """``with InProcessServer(app) as server:`` uvicorn in a thread on a free loopback port (``server.url``),
    stopped on exit by setting ``should_exit`` (no signals): for tests and the load benchmark."""

    def __init__(self, app, start_timeout: float = 30.0, graceful_shutdown: int = 5):
        import socket

        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))  # loopback only
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning",
                                                    timeout_graceful_shutdown=graceful_shutdown))
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
          max_queued: int = 64, dtype: str | None = None, quantize: str | None = None,
          grace_seconds: float = 10.0) -> int:
    """Load the model (and draft), build the engine, and serve until SIGINT/SIGTERM.

    On SIGTERM uvicorn stops accepting connections and lets running requests finish for ``grace_seconds``;
    then it cancels the rest (their requests are aborted, their blocks freed) and the process exits 0.
    """
    import uvicorn

    import specdec
    from specdec.models.loading import load_draft

    target, tokenizer = specdec.load(model, dtype=dtype, quantize=quantize)
    draft_model = None if draft is None else load_draft(draft, dtype)
    engine = Engine(target, draft_model, num_draft_tokens=num_draft_tokens if draft else 1, max_num_seqs=max_num_seqs,
                    kv_blocks=kv_blocks, block_size=block_size)
    worker = EngineLoop(engine, Metrics())
    app = create_app(engine, tokenizer, ServerConfig(model_name=model, max_queued=max_queued), worker=worker)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                           timeout_graceful_shutdown=grace_seconds))

    def http():  # uvicorn off the main thread installs no signal handlers: ours below stand in for them
        try:
            server.run()
        finally:
            worker.stop()  # after the graceful shutdown: what still runs is aborted, its blocks freed

    def on_signal(signum, frame):  # SIGTERM/SIGINT: stop accepting, let running requests finish; twice: now
        server.force_exit = server.should_exit
        server.should_exit = True

    # The engine runs on this thread, the one that loaded the model (see EngineLoop for why).
    main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)} if main else {}
    thread = threading.Thread(target=http, name="specdec-http", daemon=True)
    try:
        thread.start()
        worker.run()
        thread.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if server.started else 1  # never started: the port was taken, uvicorn said why
