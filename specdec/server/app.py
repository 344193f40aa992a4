"""The app factory: routes, middleware, exception handlers and lifespan, wired."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

from specdec.engine import Engine
from specdec.server import chat, completions, health, models
from specdec.server.config import ServerConfig
from specdec.server.context import ServerContext
from specdec.server.errors import HANDLERS
from specdec.server.handle import Admission
from specdec.server.loop import EngineLoop
from specdec.server.metrics import Metrics
from specdec.server.middleware import BodyLimit


def create_app(engine: Engine, tokenizer, config: ServerConfig, worker: EngineLoop | None = None) -> FastAPI:
    """The FastAPI app. Without ``worker`` an engine thread starts and stops with the app's lifespan; with
    one, its owner drives it (``worker.run()``, e.g. on the main thread, see EngineLoop) and stops it."""
    own = worker is None
    engine_loop = EngineLoop(engine, Metrics()) if own else worker
    if engine_loop.metrics is None:
        engine_loop.metrics = Metrics()
    ctx = ServerContext(engine, tokenizer, config, engine_loop, Admission(engine.max_num_seqs, config.max_queued))

    @asynccontextmanager
    async def lifespan(app):
        if own:
            engine_loop.start()
        try:
            yield
        finally:
            ctx.admission.close()
            if own:
                engine_loop.stop()

    app = FastAPI(title="specdec", lifespan=lifespan)
    app.state.server = ctx
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)
    for exception, handler in HANDLERS:
        app.add_exception_handler(exception, handler)
    for module in (completions, chat, models, health):
        app.include_router(module.router)
    return app
