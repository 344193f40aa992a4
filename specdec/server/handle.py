"""One request's life in the server, from admission to release."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from specdec.engine import RequestOutput, RequestParams
from specdec.server.errors import ApiError, shutting_down, too_many_requests
from specdec.server.stream import TextStream

if TYPE_CHECKING:
    from specdec.server.context import ServerContext


class Admission:
    """The requests one server holds: at most ``max_running + max_queued`` at a time (more get 429), none
    once it is closing (503). At the end of a shutdown's grace period, ``expire`` ends those still held."""

    def __init__(self, max_running: int, max_queued: int):
        self.max_running, self.max_queued = max_running, max_queued
        self.handles: set[RequestHandle] = set()
        self.closing = False

    def check(self) -> None:
        """Raise what ``admit`` would raise now: a request it would refuse is refused before work is done for it
        (a response_format's grammar compiled)."""
        if self.closing:
            raise shutting_down()
        if len(self.handles) >= self.max_running + self.max_queued:
            raise too_many_requests(self.max_running, self.max_queued)

    def admit(self, handle: RequestHandle) -> None:
        self.check()
        self.handles.add(handle)

    def release(self, handle: RequestHandle) -> None:
        self.handles.discard(handle)

    def close(self) -> None:
        """Admit no more (a shutdown has begun)."""
        self.closing = True

    def expire(self) -> None:
        """Event loop: the grace period is over; every request still held ends now with a 503 error, which its
        response reports as any other (an error object, or an error event then ``[DONE]``)."""
        self.close()
        for handle in list(self.handles):
            handle.fail(shutting_down())


class RequestHandle:
    """One admitted request: its engine request, its outputs (an asyncio queue the engine thread feeds), its
    text (a TextStream over its stop strings), its latency metrics and its usage.

    Lives on the event loop. ``release()`` runs once however the request ends (finished, stopped, failed, or
    abandoned by its client): it frees the admission slot, and aborts the engine request unless the engine
    finished it, so its blocks are freed at the next step boundary.
    """

    def __init__(self, ctx: ServerContext, prompt_ids: list[int], params: RequestParams, stop: list[str]):
        self.engine_loop, self.metrics, self.admission = ctx.loop, ctx.metrics, ctx.admission
        self.prompt_ids, self.params = prompt_ids, params
        self.text = TextStream(ctx.tokenizer, stop)
        self.outputs: asyncio.Queue = asyncio.Queue()  # RequestOutput | ApiError
        self.event_loop = asyncio.get_running_loop()
        self.id = ""
        self.created = int(time.time())
        self.finished = self.released = False
        self.arrival, self.last_token = time.perf_counter(), None

    def start(self) -> None:
        """Admit the request (ApiError 429 or 503 if not) and hand it to the engine."""
        self.admission.admit(self)
        self.id = self.engine_loop.submit(self.prompt_ids, self.params, self._sink)

    def _sink(self, item) -> None:
        """Engine thread: a RequestOutput, or an ApiError (refused late, a failed step, shutdown)."""
        try:
            self.event_loop.call_soon_threadsafe(self.outputs.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            pass

    def fail(self, error: ApiError) -> None:
        """Event loop: end the request with ``error`` (after the outputs already queued)."""
        self.outputs.put_nowait(error)

    async def events(self):
        """(text delta, finish_reason or None) until the request finishes; an ApiError it got is raised."""
        try:
            while True:
                item = await self.outputs.get()
                if isinstance(item, ApiError):
                    raise item
                out: RequestOutput = item
                self._observe_latency(out)
                delta = self.text.push(out.new_token_ids)
                if self.text.stopped:  # a stop string: the engine may still be generating; drop it now
                    if not out.finished:
                        self.engine_loop.abort(self.id, reason="stop")
                    self.finished = True
                    yield delta, "stop"
                    return
                if out.finished:
                    self.finished = True
                    yield delta + self.text.flush(), out.finish_reason
                    return
                if delta:
                    yield delta, None
        finally:
            self.release()

    async def result(self) -> tuple[str, str | None]:
        """The whole text and the finish reason."""
        pieces, reason = [], None
        async for delta, reason in self.events():  # noqa: B007 - the last reason is the finish reason
            pieces.append(delta)
        return "".join(pieces), reason

    def release(self) -> None:
        """Once per request, however it ends (see the class)."""
        if self.released:
            return
        self.released = True
        self.admission.release(self)
        if not self.finished:  # (an engine that already dropped the request ignores the abort)
            self.engine_loop.abort(self.id)

    def usage(self) -> dict:
        text = self.text
        return {"prompt_tokens": len(self.prompt_ids), "completion_tokens": len(text.ids),
                "total_tokens": len(self.prompt_ids) + len(text.ids)}

    def _observe_latency(self, out: RequestOutput) -> None:
        if not out.new_token_ids:
            return
        now = time.perf_counter()
        if self.last_token is None:
            self.metrics.ttft.observe(now - self.arrival)
        else:
            per_token = (now - self.last_token) / len(out.new_token_ids)
            for _ in out.new_token_ids:
                self.metrics.itl.observe(per_token)
        self.last_token = now
