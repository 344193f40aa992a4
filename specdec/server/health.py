"""GET /health (503 once shutting down) and GET /metrics (Prometheus text)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from specdec.server.context import ServerContext, context

router = APIRouter()


@router.get("/health")
async def health(ctx: ServerContext = Depends(context)):  # noqa: B008 - FastAPI's way
    if ctx.admission.closing:
        return JSONResponse({"status": "shutting down"}, status_code=503)
    return {"status": "ok"}


@router.get("/metrics")
async def prometheus(ctx: ServerContext = Depends(context)) -> Response:  # noqa: B008 - FastAPI's way
    return Response(generate_latest(ctx.metrics.registry), media_type=CONTENT_TYPE_LATEST)
