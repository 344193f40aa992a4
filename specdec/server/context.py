"""What the endpoints of one app share."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from specdec.engine import Engine
from specdec.server.config import ServerConfig
from specdec.server.errors import ApiError
from specdec.server.handle import Admission
from specdec.server.loop import EngineLoop
from specdec.server.metrics import Metrics


@dataclass
class ServerContext:
    """One app's engine and the loop that drives it, its tokenizer, limits and metrics, and the admission of
    its requests. Endpoints get it as a FastAPI dependency (``context``)."""

    engine: Engine
    tokenizer: Any
    config: ServerConfig
    loop: EngineLoop
    admission: Admission
    # where a response_format's grammar compiles: one thread of its own, so that schemas slow to compile wait
    # for each other, not for the default pool that every request's checks use
    compiler: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, "specdec-grammar"))

    @property
    def metrics(self) -> Metrics:
        return self.loop.metrics

    def check_model(self, name: str) -> None:
        """404 for a model this server does not serve (as OpenAI answers one)."""
        if name != self.config.model_name:
            raise ApiError(404, f"model: unknown model {name!r}; this server serves {self.config.model_name!r}",
                           "model", code="model_not_found")


def context(request: Request) -> ServerContext:
    """FastAPI dependency: the ServerContext of the app that received ``request``."""
    return request.app.state.server
