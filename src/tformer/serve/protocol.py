"""The requests the server takes, as OpenAI's API names their fields, checked where they
enter: a field of the wrong type, out of range, or unknown is a 400 naming it.

Types are strict (a number in quotes is not a number), as a typed client sends them. The
extras llama.cpp and vLLM accept beside OpenAI's fields: top_k (0 or -1: off),
repetition_penalty, min_p. Fields OpenAI has and this server does not implement
(logit_bias, suffix, best_of > 1, tools) are refused rather than ignored.
"""

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tformer.checks import MAX_SEED
from tformer.serve.errors import APIError, invalid

MAX_STOPS = 16
MAX_N = 64


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def null_is_the_default(cls, data: object) -> object:
        """A field sent as null takes its default, as OpenAI's API reads it."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


class StreamOptions(Strict):
    include_usage: bool = False


class Sampling(Strict):
    """The fields both generation endpoints share."""

    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    user: str | None = None
    top_k: int | None = Field(None, ge=-1)
    repetition_penalty: float = Field(1.0, gt=0)
    min_p: float | None = Field(None, ge=0, le=1)
    logit_bias: dict[str, float] | None = None


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=1)


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list | None = None
    response_format: dict | None = None


class TranslationRequest(Strict):
    model: str
    input: str | list[str]
    beam_size: int = Field(4, ge=1, le=16)
    length_penalty: float = Field(1.0, ge=-10, le=10)
    max_tokens: int = Field(128, ge=1)


class AnswerRequest(Strict):
    model: str
    question: str = Field(min_length=1)
    context: str | None = None
    top_passages: int = Field(5, ge=1, le=50)
    top_answers: int = Field(3, ge=1, le=20)
    max_answer_tokens: int = Field(30, ge=1, le=512)


class InspectRequest(Strict):
    model: str
    text: str = Field(min_length=1)
    layer: int = Field(0, ge=0)  # whose attention comes back: every head of this layer
    top: int = Field(3, ge=1, le=20)  # the logit lens's most likely tokens per position
    target: str | None = None  # translation models: the target (else the model's own)
    stack: Literal["encoder", "decoder", "cross"] | None = None  # translation: default cross


def parse_body(raw: bytes, model: type[Strict]) -> Strict:
    """A request body -> the request, or a 400 that names the field (or the JSON error)."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise invalid(f"the body is not valid JSON: {e}", None, "invalid_json") from None
    if not isinstance(data, dict):
        raise invalid(f"the body must be a JSON object, got {type(data).__name__}", None)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None


def validation_error(error: ValidationError) -> APIError:
    """Pydantic's first complaint, as one line naming the field."""
    first = error.errors()[0]
    # Unions report one error per member ("prompt.str", "prompt.list[int]"): keep the
    # field's own path, without the member names.
    parts = [str(p) for p in first["loc"] if not _is_member_name(p)]
    param = _dotted(parts)
    kind = first["type"]
    if kind == "extra_forbidden":
        return invalid(f"unrecognized request argument: {param}", param, "unknown_field")
    if kind == "missing":
        return invalid(f"missing required field: {param}", param, "missing_field")
    value = json.dumps(first.get("input"), default=str)[:60]
    return invalid(f"{param}: {first['msg'].lower()} (got {value})", param)


def _is_member_name(part: object) -> bool:
    return isinstance(part, str) and (
        part in ("str", "int", "float", "bool", "dict", "list", "none")
        or part.startswith(("list[", "dict[", "function-"))
        or part in ("TextPart",)
    )


def _dotted(parts: list[str]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out
