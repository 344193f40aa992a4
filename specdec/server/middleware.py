"""ASGI middleware of the server."""

from __future__ import annotations

from specdec.server.errors import ApiError


class BodyLimit:
    """Bodies over ``limit`` bytes get 413 before any handler sees them (Content-Length is checked first; a
    chunked body is read and counted, then replayed to the app)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        too_large = ApiError(413, f"request body exceeds {self.limit} bytes").response()
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
