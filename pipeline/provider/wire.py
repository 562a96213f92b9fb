"""The wire format, parsed: usage, ``Retry-After``, tool calls and whole reply bodies, as
values. Pure: no I/O, so the client and the limiter share it and tests need no network."""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import Mapping
from typing import Any

from pipeline.money.pricing import Usage
from pipeline.results import Reply, ToolCall

ERROR_TEXT_LIMIT = 300


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _is_mapping(value: Any) -> bool:
    """``isinstance(value, Mapping)``, with the JSON parser's ``dict`` answered first (the
    check against the ABC costs several times as much, and a reply makes a dozen)."""
    return isinstance(value, (dict, Mapping))  # dict first: an exact type, matched at once


def parse_usage(usage: Any) -> Usage | None:
    """Token counts from an OpenAI- or DeepSeek-style ``usage`` object."""
    if not _is_mapping(usage):
        return None
    prompt_details = usage.get("prompt_tokens_details")
    completion_details = usage.get("completion_tokens_details")
    cached = _int(usage.get("prompt_cache_hit_tokens"))
    if not cached and _is_mapping(prompt_details):
        cached = _int(prompt_details.get("cached_tokens"))
    reasoning = 0
    if _is_mapping(completion_details):
        reasoning = _int(completion_details.get("reasoning_tokens"))
    return Usage(
        prompt_tokens=_int(usage.get("prompt_tokens")),
        completion_tokens=_int(usage.get("completion_tokens")),
        cached_tokens=cached,
        reasoning_tokens=reasoning,
    )


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds to wait: delta-seconds or an HTTP date."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


def short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= ERROR_TEXT_LIMIT else text[:ERROR_TEXT_LIMIT] + "..."


def error_message(status: int, raw: bytes, content_type: str) -> str:
    """A one-line reason for a non-200 answer, from a JSON error body when there is one."""
    text = raw.decode("utf-8", "replace").strip()
    if "html" in content_type or text.lower().startswith(("<!doctype", "<html")):
        return f"HTTP {status}: an HTML error page instead of JSON"
    try:
        payload = json.loads(text)
    except json.JSONDecodeError:
        return f"HTTP {status}: {short(text)}" if text else f"HTTP {status}"
    error = payload.get("error") if isinstance(payload, Mapping) else None
    if isinstance(error, Mapping) and error.get("message"):
        return f"HTTP {status}: {short(str(error['message']))}"
    if isinstance(error, str):
        return f"HTTP {status}: {short(error)}"
    return f"HTTP {status}: {short(text)}"


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def parse_tool_calls(value: Any) -> tuple[ToolCall, ...] | None:
    """OpenAI-style ``message.tool_calls``; None when the value is malformed."""
    if value is None:
        return ()
    if not isinstance(value, list):
        return None
    calls: list[ToolCall] = []
    for item in value:
        function = item.get("function") if isinstance(item, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            return None
        arguments = function.get("arguments")
        if not isinstance(arguments, str):  # some servers send an object, not JSON text
            arguments = json.dumps(arguments, ensure_ascii=False)
        calls.append(
            ToolCall(id=_str(item.get("id")) or "", name=function["name"], arguments=arguments)
        )
    return tuple(calls)


def parse_reply(raw: bytes) -> tuple[Reply | None, Usage | None, str | None]:
    """Parse a 200 body (leading blank keep-alive lines allowed) into (reply, usage, error).

    Chat completions carry ``choices[0].message``; text (FIM) completions carry
    ``choices[0].text``, which becomes the reply's content.
    """
    try:
        payload = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        stripped = raw.strip()
        if stripped.lower().startswith((b"<!doctype", b"<html")):
            return None, None, "HTTP 200 with an HTML page instead of JSON"
        return None, None, "the response body is not complete JSON (truncated or malformed)"
    if not _is_mapping(payload):
        return None, None, "the response body is not a JSON object"
    usage = parse_usage(payload.get("usage"))
    choices = payload.get("choices")
    if not isinstance(choices, list) or not choices or not _is_mapping(choices[0]):
        return None, usage, "the response has no choices"
    choice = choices[0]
    message = choice.get("message")
    if not _is_mapping(message):
        if isinstance(choice.get("text"), str):
            message = {"content": choice["text"]}
        else:
            return None, usage, "the response's first choice has no message"
    calls = parse_tool_calls(message.get("tool_calls"))
    if calls is None:
        return None, usage, "the response's tool_calls are malformed"
    reasoning = message.get("reasoning_content")
    reply = Reply(
        content=_str(message.get("content")),
        reasoning=reasoning if isinstance(reasoning, str) and reasoning else None,
        finish_reason=_str(choice.get("finish_reason")),
        model=_str(payload.get("model")),
        response_id=_str(payload.get("id")),
        tool_calls=calls,
    )
    return reply, usage, None
