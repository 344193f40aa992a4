"""POST /v1/chat/completions: messages in, through the model's chat template; the assistant's reply out."""

from __future__ import annotations

import re
import uuid

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from specdec.server.context import ServerContext, context
from specdec.server.errors import ApiError
from specdec.server.protocol import ChatRequest
from specdec.server.serving import Shape, respond

router = APIRouter()


class ChatShape(Shape):
    prefix, object, chunk_object = "chatcmpl-", "chat.completion", "chat.completion.chunk"
    prompt_param, chat = "messages", True

    def choice(self, text, reason):
        return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}

    def delta(self, text, reason):
        return {"index": 0, "delta": {} if text is None else {"content": text}, "logprobs": None,
                "finish_reason": reason}

    def opening(self):
        return {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}


CHAT = ChatShape()


def encode_chat(tokenizer, messages: list[dict]) -> list[int]:
    """The prompt ids of ``messages`` through the tokenizer's chat template, the messages' contents encoded as
    text: a special token's text typed in a message (``<|im_end|>``) becomes that text's tokens, never the
    special token, so no message can end its turn or forge another; the template's own special tokens are the
    prompt's only ones.

    Contents without a special token's text (nearly all) get exactly the template's own tokenization. Otherwise
    each such text in a content is swapped for a stand-in no client can guess, the template is rendered, the
    rendering is split at the special tokens (all the template's now), and each piece between them is
    tokenized with special tokens split, its stand-ins given back their text first.
    """
    specials = sorted({t.content for t in tokenizer.added_tokens_decoder.values() if t.special}, key=len,
                      reverse=True)  # (longest first: a special token's text may begin another's)
    pattern = re.compile("|".join(map(re.escape, specials))) if specials else None
    if pattern is None or not any(pattern.search(m["content"]) for m in messages):
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"])
    stand_in = {s: f"\ue000{uuid.uuid4().hex}\ue001" for s in specials}  # (private-use characters)
    hidden = [{**m, "content": pattern.sub(lambda hit: stand_in[hit.group()], m["content"])} for m in messages]
    rendered = tokenizer.apply_chat_template(hidden, add_generation_prompt=True, tokenize=False)
    ids = []
    for i, piece in enumerate(re.split(f"({pattern.pattern})", rendered)):  # text, special, text, ...
        if i % 2:
            ids.append(tokenizer.convert_tokens_to_ids(piece))
        elif piece:
            for text, mark in stand_in.items():
                piece = piece.replace(mark, text)
            ids += tokenizer(piece, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return ids


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatRequest, request: Request,
                           ctx: ServerContext = Depends(context)) -> Response:  # noqa: B008 - FastAPI's way
    ctx.check_model(body.model)
    if not getattr(ctx.tokenizer, "chat_template", None):
        raise ApiError(400, f"messages: model {ctx.config.model_name!r} has no chat template; use /v1/completions",
                       "messages")
    messages = [{"role": m.role, "content": m.text} for m in body.messages]
    return await respond(ctx, body, encode_chat(ctx.tokenizer, messages), request, CHAT)
