"""GET /v1/models and /v1/models/{id}: the one model this server serves."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from specdec.server.context import ServerContext, context

router = APIRouter()


def _card(ctx: ServerContext) -> dict:
    return {"id": ctx.config.model_name, "object": "model", "created": 0, "owned_by": "specdec"}


@router.get("/v1/models")
async def list_models(ctx: ServerContext = Depends(context)) -> dict:  # noqa: B008 - FastAPI's way
    return {"object": "list", "data": [_card(ctx)]}


@router.get("/v1/models/{model_id:path}")  # (a model's id may be a path or hold a "/": org/name)
async def retrieve_model(model_id: str, ctx: ServerContext = Depends(context)) -> dict:  # noqa: B008
    ctx.check_model(model_id)
    return _card(ctx)
