"""Request schemas and the error type of ``posttrain serve`` (OpenAI's shapes, plus the vLLM extensions
that a token-level client such as ``rollout.engine=server`` sends).

Unknown fields are an error (HTTP 400), not silently ignored, so a client never believes a setting took
effect when it did not.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_TOP_LOGPROBS = 5  # OpenAI's own limit for the legacy endpoint; keeps responses small


class APIError(Exception):
    """Answered as OpenAI's error object ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")  # 'name' etc. are metadata; they do not change output

    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid")  # an unknown field is an error, not ignored

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None  # end-user id for the provider's abuse tracking: metadata only


class ChatRequest(_Sampling):
    messages: list[_Message] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


# vLLM's extra /v1/completions fields that the token path implements (same names and meaning as in
# vLLM's CompletionRequest); they need token-id prompts or return_token_ids=true
TOKEN_FIELDS = ("return_tokens_as_token_ids", "stop_token_ids", "top_k", "ignore_eos",
                "include_stop_str_in_output", "skip_special_tokens", "posttrain_weights_version", "posttrain_seeds")


class CompletionRequest(_Sampling):
    # a string, strings, one prompt's token ids, or several prompts' token ids (as OpenAI and vLLM)
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    return_token_ids: bool = False  # per choice: token_ids (completion) and prompt_token_ids
    return_tokens_as_token_ids: bool = False  # logprobs tokens as "token_id:<id>"
    stop_token_ids: list[int] | None = None  # further token ids that end a completion
    top_k: int | None = None  # -1, 0 or null = off
    ignore_eos: bool = False  # the model's EOS does not end a completion
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True  # for the returned text only; token ids are always complete
    posttrain_weights_version: int | None = None  # refuse (409) unless the server holds this version
    posttrain_seeds: list[int] | None = None  # one sampling seed per prompt (then ``seed`` is not used)

    def token_prompts(self) -> list[list[int]] | None:
        """The prompts as token ids, or None when they are text."""
        p = self.prompt
        if isinstance(p, list) and p and all(isinstance(x, int) for x in p):
            return [list(p)]
        if isinstance(p, list) and p and all(isinstance(x, list) for x in p):
            return [list(x) for x in p]
        return None


class WeightsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1)  # a safetensors file this server can read (same host / shared fs)
    version: int = Field(ge=1)  # the trainer's count of weight updates; echoed by GET /posttrain/weights
