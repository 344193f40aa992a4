"""Serving one generation request, whatever its endpoint: its engine parameters, then its response, whole
(JSON) or streamed (server-sent events ending with ``[DONE]``). Each endpoint says how its responses are laid
out (a ``Shape``)."""

from __future__ import annotations

import asyncio
import json

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from specdec.engine import RequestParams
from specdec.server.context import ServerContext
from specdec.server.errors import ApiError
from specdec.server.handle import RequestHandle
from specdec.server.protocol import GenerationRequest


class Shape:
    """How an endpoint family lays out its responses: one choice whole, one streamed chunk's choice."""

    prefix: str  # of response ids
    object: str  # of a whole response
    chunk_object: str  # of a streamed chunk
    prompt_param: str  # the field that holds the prompt
    chat: bool  # without max_tokens: up to the context (at most max_chat_tokens), not default_max_tokens

    def choice(self, text: str, reason: str | None) -> dict:
        raise NotImplementedError

    def delta(self, text: str | None, reason: str | None) -> dict:
        raise NotImplementedError

    def opening(self) -> dict | None:
        """A first chunk's choice, before any text (chat: the role); None: none."""
        return None


#: the engine's arguments (validate.ArgumentError) as a request's fields
FIELDS = {"logit_bias": "logit_bias", "grammar": "response_format"}


def request_params(body: GenerationRequest, prompt_len: int, ctx: ServerContext, shape: Shape) -> RequestParams:
    """The engine's parameters: the body's, the server's defaults where it has none, within the context."""
    max_model_len, config = ctx.engine.max_model_len, ctx.config
    name = "max_tokens" if body.max_completion_tokens is None else "max_completion_tokens"
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if max_tokens is None:
        max_tokens = (max(1, min(config.max_chat_tokens, max_model_len - prompt_len)) if shape.chat
                      else config.default_max_tokens)
    if prompt_len + max_tokens > max_model_len:
        param = shape.prompt_param if prompt_len >= max_model_len else name
        raise ApiError(400, f"{param}: the prompt ({prompt_len} tokens) + {name} ({max_tokens}) exceeds the "
                            f"context of {max_model_len} tokens", param)
    temperature = 1.0 if body.temperature is None else body.temperature
    top_p = 1.0 if body.top_p is None else body.top_p
    top_k = 0 if body.top_k is None else body.top_k
    # (a negative seed is as good as any: torch seeds are unsigned 64-bit, so it wraps)
    return RequestParams(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                         seed=None if body.seed is None else body.seed % 2**64,
                         frequency_penalty=body.frequency_penalty or 0.0,
                         presence_penalty=body.presence_penalty or 0.0, logit_bias=body.logit_bias or None,
                         grammar=None if body.response_format is None else body.response_format.grammar)


async def respond(ctx: ServerContext, body: GenerationRequest, prompt_ids: list[int], request: Request,
                  shape: Shape) -> Response:
    """Check what needs the server, admit the request, and answer it whole or streamed."""
    if not prompt_ids:
        raise ApiError(400, f"{shape.prompt_param}: the prompt is empty", shape.prompt_param)
    if len(body.stop) > ctx.config.max_stop:
        raise ApiError(400, f"stop: at most {ctx.config.max_stop} stop strings, got {len(body.stop)}", "stop")
    params = request_params(body, len(prompt_ids), ctx, shape)
    ctx.admission.check()  # (429 or 503 now, not after compiling its grammar; admitted below, after the checks)
    try:  # off the event loop: compiling a response_format's grammar takes a while (the compiler keeps it)
        await asyncio.get_running_loop().run_in_executor(ctx.compiler if params.grammar is not None else None,
                                                         ctx.engine.check_request, prompt_ids, params)
    except ImportError as err:  # (xgrammar missing)
        raise ApiError(400, f"response_format: {err}", "response_format") from None
    except ValueError as err:  # the engine's argument, as the request names it; else the KV pool's size
        param = FIELDS.get(getattr(err, "argument", None), "max_tokens")
        message = str(err) if param in str(err) else f"{param}: {err}"
        raise ApiError(400, message, param) from None
    handle = RequestHandle(ctx, prompt_ids, params, body.stop)
    handle.start()
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _streamed(handle, shape, ctx.config.model_name, include_usage)
    return await _whole(handle, request, shape, ctx.config.model_name)


async def _whole(handle: RequestHandle, request: Request, shape: Shape, model: str) -> Response:
    """The whole response at the end. A plain handler is not cancelled when its client goes: without the watch
    on the connection, an abandoned request would run to max_tokens, holding its slot and its blocks."""
    work, watch = asyncio.ensure_future(handle.result()), asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((work, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        abandoned = not work.done()
        if abandoned:  # the client is gone (or the handler cancelled): abort the request now
            work.cancel()
            handle.release()
    if abandoned:
        return Response(status_code=499)  # (nobody reads it: nginx's "client closed request")
    text, reason = work.result()  # an ApiError reaches the client here
    return JSONResponse({"id": shape.prefix + handle.id, "object": shape.object, "created": handle.created,
                         "model": model, "choices": [shape.choice(text, reason)], "usage": handle.usage()})


async def _disconnected(request: Request) -> None:
    """Returns when the client leaves (the body is read: the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _streamed(handle: RequestHandle, shape: Shape, model: str, include_usage: bool) -> StreamingResponse:
    """Server-sent events: a chunk per text delta, one with the finish reason, the usage if asked, then
    ``[DONE]``; an error ends the text with an event holding the error object, then ``[DONE]``."""
    def chunk(choices: list[dict], **more) -> str:
        return _event({"id": shape.prefix + handle.id, "object": shape.chunk_object, "created": handle.created,
                       "model": model, "choices": choices, **more})

    async def events():
        try:
            opening = shape.opening()
            if opening is not None:
                yield chunk([opening])
            async for delta, reason in handle.events():
                if delta:
                    yield chunk([shape.delta(delta, None)])
                if reason is not None:
                    yield chunk([shape.delta(None, reason)])
        except ApiError as err:
            yield _event(err.body())
        finally:
            handle.release()
        if include_usage:
            yield chunk([], usage=handle.usage())
        yield "data: [DONE]\n\n"

    return _Stream(events(), handle.release, media_type="text/event-stream",
                   headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


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
