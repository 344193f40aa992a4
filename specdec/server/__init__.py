"""``specdec serve``: an OpenAI-compatible HTTP server over the Engine (FastAPI + uvicorn).

POST /v1/completions, POST /v1/chat/completions (streaming as server-sent events ending with ``[DONE]``),
GET /v1/models and /v1/models/{id}, GET /health, GET /metrics (Prometheus). The engine runs on its own thread
(``EngineLoop``); request handlers hand it work through an inbox and read its outputs from an asyncio queue per
request (``RequestHandle``), so the event loop never waits for a forward pass, and requests join and leave only
between steps.

Modules: ``protocol`` (request bodies and the error object, strictly typed), ``completions``, ``chat``,
``models``, ``health`` (the endpoints), ``serving`` (one generation request, answered whole or streamed),
``handle`` (a request's life: admission, outputs, text, latency, release), ``loop`` (the engine's thread),
``stream`` (detokenization with stop strings), ``metrics``, ``errors`` (OpenAI's error object for every
failure), ``middleware`` (the body limit), ``config``, ``context``, ``app`` (``create_app``), ``run``
(uvicorn: ``serve``, ``InProcessServer``) and ``ranks`` (the server over tensor-parallel ranks).
"""

from specdec.server.app import create_app
from specdec.server.config import ServerConfig
from specdec.server.context import ServerContext
from specdec.server.errors import ApiError
from specdec.server.handle import Admission, RequestHandle
from specdec.server.loop import EngineLoop
from specdec.server.metrics import Metrics
from specdec.server.protocol import ChatMessage, ChatRequest, CompletionRequest, ContentPart, ErrorBody
from specdec.server.run import InProcessServer, Server, serve
from specdec.server.stream import TextStream

__all__ = ["Admission", "ApiError", "ChatMessage", "ChatRequest", "CompletionRequest", "ContentPart", "EngineLoop",
           "ErrorBody", "InProcessServer", "Metrics", "RequestHandle", "Server", "ServerConfig", "ServerContext",
           "TextStream", "create_app", "serve"]
