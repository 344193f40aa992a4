"""POST /v1/completions: text (or token ids) in, text out."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from specdec.server.context import ServerContext, context
from specdec.server.errors import ApiError
from specdec.server.protocol import CompletionRequest
from specdec.server.serving import Shape, respond

router = APIRouter()


class CompletionShape(Shape):
    prefix, object, chunk_object, prompt_param, chat = "cmpl-", "text_completion", "text_completion", "prompt", False

    def choice(self, text, reason):
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}

    def delta(self, text, reason):
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}


COMPLETION = CompletionShape()


def prompt_ids(prompt: str | list[int], ctx: ServerContext) -> list[int]:
    """A prompt is the client's whole prompt: special tokens written in it are special tokens (as OpenAI and
    vLLM read it); token ids must lie in the target's vocabulary."""
    if isinstance(prompt, str):
        return list(ctx.tokenizer(prompt)["input_ids"]) if prompt else []
    vocab = ctx.engine.target.vocab_size
    if any(not 0 <= t < vocab for t in prompt):
        raise ApiError(400, f"prompt: token ids must lie in 0..{vocab - 1}", "prompt")
    return list(prompt)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request,
                      ctx: ServerContext = Depends(context)) -> Response:  # noqa: B008 - FastAPI's way
    ctx.check_model(body.model)
    return await respond(ctx, body, prompt_ids(body.prompt, ctx), request, COMPLETION)
