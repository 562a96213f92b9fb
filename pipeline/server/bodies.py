"""The built-in server's JSON response bodies (pure): OpenAI-style errors, the HTML pages of
the 502/503 faults, and the chat-completion and (FIM) text-completion objects with their
``usage``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from pipeline.server.requests import ChatRequest, CompletionRequest
    from pipeline.server.simulate import SimulatedReply


def error_body(
    message: str, kind: str, *, param: str | None = None, code: str | None = None
) -> bytes:
    return json.dumps(
        {"error": {"message": message, "type": kind, "param": param, "code": code}}
    ).encode()


UNAUTHORIZED_BODY: Final = error_body(
    "Incorrect API key provided", "invalid_request_error", code="invalid_api_key"
)
CONCURRENCY_BODY: Final = error_body(
    "Rate limit reached for requests in flight; please retry later.", "rate_limit_error"
)
SERVER_ERROR_BODY: Final = error_body(
    "The server had an error while processing your request. Sorry about that!", "server_error"
)


def model_not_found_body(model: str) -> bytes:
    """OpenAI's 404 answer to a request for a model it does not serve."""
    return error_body(
        f"The model `{model}` does not exist or you do not have access to it.",
        "invalid_request_error",
        code="model_not_found",
    )


HTML_503: Final = b"<html><body><h1>503 Service Temporarily Unavailable</h1></body></html>"
HTML_502: Final = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
    b"</body>\r\n</html>\r\n"
)


@dataclass(frozen=True, slots=True, kw_only=True)
class BodyMeta:
    """What a reply body carries besides the answer: its id, time, prompt usage, profile."""

    completion_id: str
    created: int
    prompt_tokens: int
    cache_hit: int
    profile: str


def usage_body(reply: SimulatedReply, meta: BodyMeta) -> dict[str, Any]:
    """The ``usage`` object, with the fields of the profile (DeepSeek adds cache hit/miss)."""
    prompt_tokens, cache_hit = meta.prompt_tokens, meta.cache_hit
    usage: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": reply.completion_tokens,
        "total_tokens": prompt_tokens + reply.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cache_hit},
        "completion_tokens_details": {"reasoning_tokens": reply.reasoning_tokens},
    }
    if meta.profile == "deepseek":
        usage["prompt_cache_hit_tokens"] = cache_hit
        usage["prompt_cache_miss_tokens"] = prompt_tokens - cache_hit
    return usage


def completion_body(meta: BodyMeta, request: ChatRequest, reply: SimulatedReply) -> dict[str, Any]:
    """The chat-completion JSON object: the message (text, reasoning, tool calls) and usage."""
    message: dict[str, Any] = {"role": "assistant", "content": reply.content}
    if reply.reasoning is not None:
        message["reasoning_content"] = reply.reasoning
    if reply.tool_calls:
        message["tool_calls"] = [call.to_json() for call in reply.tool_calls]
    return {
        "id": meta.completion_id,
        "object": "chat.completion",
        "created": meta.created,
        "model": request.model,
        "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": reply.finish_reason}
        ],
        "usage": usage_body(reply, meta),
        "system_fingerprint": "fp_pipeline_local",
    }


def text_completion_body(
    meta: BodyMeta, request: CompletionRequest, reply: SimulatedReply
) -> dict[str, Any]:
    """The (FIM) text-completion JSON object: the text that fills the hole, and usage."""
    choice = {
        "index": 0,
        "text": reply.content or "",
        "logprobs": None,
        "finish_reason": reply.finish_reason,
    }
    return {
        "id": meta.completion_id,
        "object": "text_completion",
        "created": meta.created,
        "model": request.model,
        "choices": [choice],
        "usage": usage_body(reply, meta),
        "system_fingerprint": "fp_pipeline_local",
    }
