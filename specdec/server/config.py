"""The limits of one server."""

from __future__ import annotations

import math
from dataclasses import dataclass

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
    keep_alive_seconds: float = 5.0  # an idle connection after its response is closed after this long
    read_timeout_seconds: float = 30.0  # a request's headers and body must arrive within this (run.py)
    max_header_bytes: int = 16 * 1024  # a request's headers larger than this get 400 (h11's default)

    def __post_init__(self):
        if not isinstance(self.model_name, str) or not self.model_name:
            raise ValueError(f"model_name must be a non-empty string, got model_name={self.model_name!r}")
        for name in ("max_queued", "max_stop", "max_body_bytes", "default_max_tokens", "max_chat_tokens",
                     "max_header_bytes"):
            integer(name, getattr(self, name), 0 if name == "max_queued" else 1)
        for name in ("keep_alive_seconds", "read_timeout_seconds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"{name} must be a number of seconds > 0, got {name}={value!r}")
