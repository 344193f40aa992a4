"""Errors as OpenAI returns them: ``{"error": {"message", "type", "param", "code"}}``, whatever failed.

``param`` names the field as the client wrote it (``temperature``, ``stop[1]``, ``messages[0].content``), or
is null where no one field is at fault (a body that is not JSON, an unknown route).
"""

from __future__ import annotations

import json

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from specdec.server.protocol import ErrorBody, param_name

RETRY_AFTER_SECONDS = 1  # a busy server's advice to a client it turns away (429)


class ApiError(Exception):
    """A request refused or failed: its status, and the OpenAI error object the client gets."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers

    def body(self) -> dict:
        return ErrorBody.of(self.message, self.type, self.param, self.code).model_dump()

    def response(self) -> JSONResponse:
        return ErrorResponse(self.body(), status_code=self.status, headers=self.headers)


class ErrorResponse(JSONResponse):
    """JSON in ASCII: a message may quote what the client sent, lone surrogates included, which UTF-8 cannot
    encode; JSON's escapes can."""

    def render(self, content) -> bytes:
        return json.dumps(content, allow_nan=False).encode("ascii")


def shutting_down() -> ApiError:
    return ApiError(503, "server is shutting down", type="unavailable")


def too_many_requests(running: int, queued: int) -> ApiError:
    return ApiError(429, f"too many requests: {running} running and {queued} queued is the limit; retry later",
                    type="rate_limit_exceeded", headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


async def api_error(request: Request, err: ApiError) -> JSONResponse:
    return err.response()


async def invalid_request(request: Request, err: RequestValidationError) -> JSONResponse:
    """A body the protocol models refuse: 400, the field named as sent; but a request for a model this server
    does not serve is 404 whatever else is wrong with it (the model is checked first)."""
    body = err.body
    if isinstance(body, dict) and isinstance(body.get("model"), str):
        try:
            request.app.state.server.check_model(body["model"])
        except ApiError as unknown:
            return unknown.response()
    first = max(err.errors(), key=_depth, default={})
    param = None if first.get("type") == "json_invalid" else param_name(first.get("loc", ()))
    message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    if param is None or not message.startswith(param.split(".")[-1].split("[")[0] + " "):
        message = f"{param or 'body'}: {message}"
    return ApiError(400, message, param).response()


def _depth(error: dict) -> tuple:
    """How far into what the client sent an error lies: of a union's branches, the one that got furthest is
    the one to report (the deepest location, then the latest list index)."""
    loc = error.get("loc", ())
    return len(loc), [part for part in loc if isinstance(part, int)]


async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    """Starlette's own: an unknown route (404), a method the route lacks (405), a body it cannot parse."""
    message = str(err.detail)
    if err.status_code in (404, 405):
        message = f"{message}: {request.method} {request.url.path}"
    kind = "server_error" if err.status_code >= 500 else "invalid_request_error"
    return ApiError(err.status_code, message, type=kind, headers=err.headers).response()


async def server_error(request: Request, err: Exception) -> JSONResponse:
    """Anything else is the server's fault: 500 (the traceback goes to the log)."""
    return ApiError(500, f"internal server error: {type(err).__name__}", type="server_error").response()


#: what create_app registers: (exception class, handler)
HANDLERS = ((ApiError, api_error), (RequestValidationError, invalid_request), (StarletteHTTPException, http_error),
            (Exception, server_error))
