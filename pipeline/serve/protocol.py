"""The OpenAI request and response bodies the embedded server speaks, and its error body.

Only what the server implements is modelled. Fields a client sends that are not modelled here are ignored,
as vLLM's and lmdeploy's OpenAI servers do (the app logs their names); the few known OpenAI fields that would
change the answer if silently ignored (``tools``; ``suffix``; ``best_of`` other than ``n``) are refused with a
400 by the requests' ``unsupported()``.

``POST /v1/completions`` (:class:`CompletionRequest`) follows OpenAI's legacy completions API as lm-eval's
``local-completions`` model uses it: ``prompt`` as a string, a list of strings, a list of token ids or a list of
lists of token ids; integer ``logprobs`` (the top-k per token); ``echo`` returning the prompt and, with
``logprobs``, its token log-probs (the first one null); ``max_tokens`` defaulting to 16 and allowed to be 0.

Field names, types and bounds follow the OpenAI API reference for ``POST /v1/chat/completions`` (``temperature``
in [0, 2], ``top_p`` in (0, 1], at most 4 ``stop`` sequences, ``max_completion_tokens`` superseding
``max_tokens``) and the error body ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline.errors import QuantshipError

Role = Literal["system", "user", "assistant"]
FinishReason = Literal["stop", "length"]
MAX_STOP_SEQUENCES = 4  # the OpenAI API's limit
MAX_N = 16  # choices per request (each is one sequence in the batch)
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat top_logprobs (vLLM allows 20 for completions too)


class RequestError(QuantshipError):
    """A request the server refuses: carries the HTTP status and the OpenAI error fields.

    Raised by the engine (prompt longer than the context, a chat template that rejects the messages) and by the
    app (bad key, unknown model, unsupported option); the app turns it into the OpenAI error body.
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int = 400,
        type: str = "invalid_request_error",  # noqa: A002 - the OpenAI field's name
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.headers = headers
        self.message = message
        self.status_code = status_code
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return ErrorResponse(
            error=ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code)
        ).model_dump()


# ---------------------------------------------------------------------------------------------- errors


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def param_from_loc(loc: tuple[Any, ...] | list[Any]) -> str | None:
    """A pydantic error location as OpenAI names a parameter (OpenAI's errors say e.g. ``messages[0].role``).

    ``("body", "messages", 0, "role")`` -> ``"messages[0].role"``; the body itself -> None.
    """
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or None


def validation_error(errors: list[dict[str, Any]]) -> RequestError:
    """The 400 for a body that fails validation: the first error, naming its field, as OpenAI reports one."""
    if not errors:
        return RequestError("The request body is invalid.")
    err = errors[0]
    kind = err.get("type", "")
    param = param_from_loc(tuple(err.get("loc", ())))
    if kind == "json_invalid":  # FastAPI: loc ("body", character offset), ctx {"error": the decoder's message}
        where = err.get("loc", ("body", "?"))[-1]
        why = (err.get("ctx") or {}).get("error", "invalid JSON")
        return RequestError(
            f"The request body is not valid JSON ({why} at character {where}). Send a JSON object with 'model' and "
            "'messages' (Content-Type: application/json).",
            code="invalid_json",
        )
    if param is None:  # the body itself: empty, not JSON, or not an object
        return RequestError(
            "The request body is missing or is not a JSON object. Send a JSON object with 'model' and 'messages' "
            "(Content-Type: application/json).",
            code="invalid_json",
        )
    if kind == "missing":
        return RequestError(f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    msg = str(err.get("msg", "invalid value"))
    msg = msg.removeprefix("Value error, ")
    if "input" in err:
        got = err["input"]
        shown = repr(got) if not isinstance(got, (dict, list)) or len(repr(got)) < 80 else type(got).__name__
        msg = f"{msg} (got {shown})"
    return RequestError(f"Invalid '{param}': {msg}.", param=param, code="invalid_value")


# ---------------------------------------------------------------------------------------------- chat


def stop_list(v: Any) -> list[str] | None:
    """``stop`` as OpenAI accepts it (a string or up to 4 strings) as a list, or a ValueError naming the rule."""
    if v is None:
        return None
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise ValueError("stop must be a string or a list of strings")
    if len(v) > MAX_STOP_SEQUENCES:
        raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
    if any(s == "" for s in v):
        raise ValueError("stop sequences must not be empty strings")
    return v


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool | None = Field(default=None, strict=True)


class ChatMessage(BaseModel):
    """One message. ``content`` is a string; a list of ``{"type": "text", "text": ...}`` parts is joined into one."""

    model_config = ConfigDict(extra="ignore")

    role: Role
    content: str

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, v: Any) -> Any:
        if isinstance(v, list):
            texts = []
            for part in v:
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise ValueError(
                        "only text content is supported: a string or a list of {'type': 'text', 'text': ...}"
                    )
                texts.append(part["text"])
            return "".join(texts)
        if not isinstance(v, str):
            raise ValueError("content must be a string")
        return v


class _GenerationRequest(BaseModel):
    """The sampling fields both endpoints share (OpenAI's names and ranges)."""

    model_config = ConfigDict(extra="allow")  # unknown fields are kept only so the app can log their names

    model: str = Field(description="The served model's name, as listed by GET /v1/models.")
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, description="0 = greedy; default 1.")
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, description="Nucleus sampling mass; default 1.")
    n: int | None = Field(strict=True, default=None, ge=1, le=MAX_N, description="Choices (choice i uses seed + i).")
    stop: list[str] | None = Field(default=None, description="Up to 4 strings that end the text (not included).")
    seed: int | None = Field(strict=True, default=None, description="Seed for sampling; same seed, same text.")
    stream: bool | None = Field(strict=True, default=None, description="Server-sent events in OpenAI's chunk format.")
    stream_options: StreamOptions | None = Field(default=None, description="include_usage: a last usage chunk.")
    user: str | None = Field(default=None, description="End-user id; accepted and ignored.")

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, v: Any) -> Any:
        return stop_list(v)

    def ignored_fields(self) -> list[str]:
        return sorted((self.model_extra or {}).keys())


class ChatCompletionRequest(_GenerationRequest):
    """``POST /v1/chat/completions`` body (non-streaming)."""

    messages: list[ChatMessage] = Field(min_length=1, description="The conversation, oldest first.")
    max_tokens: int | None = Field(
        strict=True,
        default=None,
        ge=1,
        description="Deprecated alias of max_completion_tokens.",
    )
    max_completion_tokens: int | None = Field(strict=True, default=None, ge=1, description="Most tokens to generate.")
    logprobs: bool | None = Field(strict=True, default=None, description="Return the chosen tokens' log-probabilities.")
    top_logprobs: int | None = Field(
        strict=True,
        default=None,
        ge=0,
        le=MAX_TOP_LOGPROBS,
        description="Top-k per token.",
    )
    tools: list[Any] | None = Field(default=None, description="Tool definitions; not supported.")

    def completion_budget(self) -> int | None:
        """``max_completion_tokens`` if given, else ``max_tokens`` (OpenAI's newer name wins), else None."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def unsupported(self) -> RequestError | None:
        """The first option this server cannot honour (so it must not silently ignore), as a 400; else None."""
        if self.top_logprobs is not None and not self.logprobs:
            return RequestError(
                "top_logprobs needs logprobs=true (as in OpenAI's API).", param="top_logprobs", code="invalid_value"
            )
        if self.tools:
            return RequestError(
                "Tool calling is not supported by this server; send the request without 'tools'.",
                param="tools",
                code="unsupported_parameter",
            )
        return None


# ---------------------------------------------------------------------------------------------- completions

PromptType = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_GenerationRequest):
    """``POST /v1/completions`` body (module docstring)."""

    prompt: PromptType = Field(description="Text, texts, token ids, or lists of token ids.")
    max_tokens: int | None = Field(
        strict=True,
        default=16,
        ge=0,
        description="Most tokens to generate (0 with echo: score only).",
    )
    best_of: int | None = Field(strict=True, default=None, ge=1, description="Only best_of = n is supported.")
    logprobs: int | None = Field(
        strict=True,
        default=None,
        ge=0,
        le=MAX_TOP_LOGPROBS,
        description="Top-k log-probs per token.",
    )
    echo: bool | None = Field(strict=True, default=None, description="Return the prompt before the completion.")
    suffix: str | None = Field(default=None, description="Not supported.")

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        if isinstance(v, bool) or not isinstance(v, (str, list)):
            raise ValueError("prompt must be a string, a list of strings, a list of token ids or a list of lists")
        if isinstance(v, list):
            if not v:
                raise ValueError("prompt must not be an empty list")
            kinds = {("ids" if isinstance(x, list) else "int" if isinstance(x, int) else type(x).__name__) for x in v}
            if any(isinstance(x, bool) for x in v) or len(kinds) != 1 or not kinds <= {"str", "int", "ids"}:
                raise ValueError("prompt lists must hold only strings, only token ids, or only lists of token ids")
            if "ids" in kinds and any(not x or not all(type(i) is int for i in x) for x in v):
                raise ValueError("each token-id list must be a non-empty list of integers")
        return v

    def prompts(self) -> list[str | list[int]]:
        """Each prompt, as text or as token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]

    def unsupported(self) -> RequestError | None:
        if self.suffix:
            return RequestError("suffix (insertion) is not supported by this server.", param="suffix",
                                code="unsupported_parameter")  # fmt: skip
        if self.best_of is not None and self.best_of != (self.n or 1):
            return RequestError("Only best_of equal to n is supported.", param="best_of", code="unsupported_parameter")
        return None


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatCompletionChoice(BaseModel):
    index: int = 0
    message: ChatCompletionMessage
    finish_reason: FinishReason
    logprobs: dict[str, Any] | None = None  # {"content": [{"token", "logprob", "bytes", "top_logprobs"}]}


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReason
    logprobs: dict[str, Any] | None = None  # {"tokens", "token_logprobs", "top_logprobs", "text_offset"}


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


# ---------------------------------------------------------------------------------------------- models


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "quantship"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
