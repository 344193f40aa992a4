"""The OpenAI API's request bodies and error object, as pydantic models.

Types are strict, as OpenAI's are: ``"5"``, ``5.0`` and ``true`` are not a max_tokens, ``true`` is not a
temperature (``1`` is: an integer is a number), ``"yes"`` is not a stream. Every check of a field on its own
lives here, so a bad body is refused before any work, with the field named as the client wrote it
(``param_name``); the checks that need the server (its model, context, vocabulary, limits) are the endpoints'.
Sampling parameters are checked by ``SamplingConfig``, penalties and logit_bias by ``RequestParams``: the
engine's own rules, not copies of them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from specdec.sampling import SamplingConfig

# strict types; parameters this server does not know are ignored (clients send other servers' extensions)
STRICT = ConfigDict(strict=True, extra="allow")


def _unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"not valid Unicode: a lone surrogate (U+{ord(text[err.start]):04X}) at character "
                         f"{err.start}") from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]  # what a tokenizer can read


def _sampling(name: str) -> AfterValidator:
    """``name``'s value checked by SamplingConfig (None: the server's default)."""
    def check(value):
        if value is not None:
            SamplingConfig(True, **{name: value})
        return value
    return AfterValidator(check)


def _at_least_one(value: int | None) -> int | None:
    if value is not None and value < 1:
        raise ValueError(f"must be >= 1, got {value}")
    return value


def _seed(value: int | None) -> int | None:
    if value is not None and not -2**63 <= value < 2**63:
        raise ValueError(f"seed must be a 64-bit signed integer, got seed={value}")
    return value


def _one_choice(value: int | None) -> int | None:
    if value not in (None, 1):
        raise ValueError(f"n must be 1 (one choice per request), got n={value}")
    return value


def _stops(value: str | list[str] | None) -> list[str]:
    stop = [value] if isinstance(value, str) else list(value or [])
    if any(not s for s in stop):
        raise ValueError("stop strings must be non-empty")
    return stop


#: OpenAI parameters this server does not implement: refused when set to anything but their neutral value,
#: rather than silently generating something else than asked
UNSUPPORTED = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
               "suffix": (None, ""), "tools": (None, [])}


def _request_param(name: str) -> AfterValidator:
    """``name``'s value checked by RequestParams, the engine's own rule (None: the server's default)."""
    def check(value):
        if value is not None:
            from specdec.engine import RequestParams

            RequestParams(**{name: value})
        return value
    return AfterValidator(check)


def _logit_bias(value: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI's {"token id": bias}, the ids as JSON keys (text) -> {id: bias}."""
    if value is None:
        return None
    out = {}
    for key, bias in value.items():
        if not (key.isascii() and key.isdigit()):
            raise ValueError(f"keys must be token ids, got {key!r}")
        if int(key) in out:
            raise ValueError(f"keys name token {int(key)} twice (one is {key!r})")
        out[int(key)] = bias
    return out


class JsonSchema(BaseModel):
    """``response_format.json_schema``: the schema the output follows (OpenAI's name and strict are read,
    and the output follows the schema in either case)."""

    model_config = ConfigDict(strict=True, extra="allow", populate_by_name=True)

    name: str
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")  # (none or empty: any JSON object)
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = STRICT

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    @model_validator(mode="after")
    def _needs_schema(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('type json_schema needs json_schema: {"name": ..., "schema": {...}}')
        return self

    @property
    def grammar(self) -> dict | None:
        """As generate()'s grammar= (None: free text)."""
        if self.type == "json_object":
            return {"json_object": True}
        if self.type == "json_schema":
            return {"json_schema": self.json_schema.schema_ or {"type": "object"}}
        return None


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool | None = None


class GenerationRequest(BaseModel):
    """What completions and chat share."""

    model_config = STRICT

    model: str
    max_tokens: Annotated[int | None, AfterValidator(_at_least_one)] = None
    max_completion_tokens: Annotated[int | None, AfterValidator(_at_least_one)] = None
    temperature: Annotated[float | None, _sampling("temperature")] = None
    top_p: Annotated[float | None, _sampling("top_p")] = None
    top_k: Annotated[int | None, _sampling("top_k")] = None  # an extension: OpenAI has no top_k
    seed: Annotated[int | None, AfterValidator(_seed)] = None
    stop: Annotated[Text | list[Text] | None, AfterValidator(_stops)] = Field(default_factory=list)  # -> list
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: Annotated[int | None, AfterValidator(_one_choice)] = 1
    logprobs: Any = None  # these: UNSUPPORTED
    top_logprobs: Any = None
    echo: Any = None
    best_of: Any = None
    presence_penalty: Annotated[float | None, _request_param("presence_penalty")] = None
    frequency_penalty: Annotated[float | None, _request_param("frequency_penalty")] = None
    logit_bias: Annotated[dict[str, float] | None, AfterValidator(_logit_bias), _request_param("logit_bias")] = None
    response_format: ResponseFormat | None = None
    suffix: Any = None
    tools: Any = None

    @field_validator(*UNSUPPORTED)
    @classmethod
    def _unsupported(cls, value, info: ValidationInfo):
        if value not in UNSUPPORTED[info.field_name]:
            raise ValueError(f"{info.field_name} is not supported by this server (got {info.field_name}={value!r})")
        return value


def _one_prompt(value: str | list[str] | list[int]) -> str | list[int]:
    if isinstance(value, list) and value and isinstance(value[0], str):
        if len(value) != 1:
            raise ValueError(f"one prompt per request (n = 1), got {len(value)}")
        return value[0]
    return value


class CompletionRequest(GenerationRequest):
    prompt: Annotated[Text | list[Text] | list[int], AfterValidator(_one_prompt)]  # -> text or token ids


def _text_only(kind: str) -> str:
    if kind != "text":
        raise ValueError(f"only text parts are supported (this server's models read text), got type={kind!r}")
    return kind


class ContentPart(BaseModel):
    model_config = STRICT

    type: Annotated[str, AfterValidator(_text_only)]
    text: Text


class ChatMessage(BaseModel):
    model_config = STRICT

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Text | list[ContentPart] | None = None

    @property
    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part.text for part in self.content)


class ChatRequest(GenerationRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """The error object: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorInfo

    @classmethod
    def of(cls, message: str, type: str, param: str | None = None, code: str | None = None) -> ErrorBody:
        return cls(error=ErrorInfo(message=message, type=type, param=param, code=code))


_FIELDS = frozenset().union(*(m.model_fields for m in (CompletionRequest, ChatRequest, ChatMessage, ContentPart,
                                                        StreamOptions, ResponseFormat, JsonSchema)), {"schema"})


def param_name(loc) -> str | None:
    """A pydantic error's location as the client wrote the parameter: ("body", "messages", 0, "content") ->
    "messages[0].content". Union branches in the location ("str", "list[int]", ...) are no field: left out."""
    name = ""
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif part in _FIELDS:
            name += f".{part}" if name else part
    return name or None
