"""OpenAI Batch API output files, written from a finished job's output Parquet.

:func:`export_openai_batch` writes a finished job's output Parquet as an OpenAI
Batch *output* file, one line per output row, in output (input) order::

    {"id": "batch_req_<hex>", "custom_id": "request-1",
     "response": {"status_code": 200, "request_id": "...", "body": <chat.completion>},
     "error": null}

The body is rebuilt from the output columns (``created`` is 0: the output does not keep
when each answer came). The ``finish_reason`` is mapped onto the values OpenAI's schema
allows: a missing one is ``stop`` (``tool_calls`` when the answer calls tools), DeepSeek's
``insufficient_system_resource`` (generation cut short) is ``length``, and any other
unknown value is ``stop``.

*Failed rows.* OpenAI reports a failed request in two shapes: a request that got an HTTP
error keeps ``response`` with that ``status_code`` and the error object as ``body`` (and
``"error": null``); a request that never got an answer (for example when the batch
expired) has ``"response": null`` and ``"error": {"code": ..., "message": ...}``. A failed
row whose last answer was an HTTP error (its ``http_status`` column, 400 and up) is written
in the first shape, with ``{"error": {"message": <the row's error>}}`` as the body (the
provider's own error object is not kept); any other failed row (a timeout, a connection
error, an answer judged invalid or truncated) in the second, with the code
``request_failed``. Failed rows stay in the same file as the others (OpenAI splits them into
an error file) so the export has exactly one line per input row.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import InputError, StateError, UsageError
from pipeline.io.openai_batch import ENDPOINTS

EXPORT_BATCH_ROWS = 1024

_CHAT_FINISH = frozenset({"stop", "length", "tool_calls", "content_filter", "function_call"})
_TEXT_FINISH = frozenset({"stop", "length", "content_filter"})
_FINISH_ALIASES = {"insufficient_system_resource": "length"}
_EXPORT_COLUMNS = (
    "id",
    "status",
    "response",
    "reasoning",
    "finish_reason",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "error",
    "http_status",
    "model",
    "response_id",
    "tool_calls",
)


def _stable_hex(kind: str, custom_id: str, length: int = 24) -> str:
    digest = hashlib.blake2b(f"{kind}\0{custom_id}".encode(), digest_size=16).hexdigest()
    return digest[:length]


def _finish_reason(value: Any, *, allowed: frozenset[str], tool_calls: bool) -> str:
    if isinstance(value, str):
        name = _FINISH_ALIASES.get(value, value)
        if name in allowed:
            return name
    return "tool_calls" if tool_calls and "tool_calls" in allowed else "stop"


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _usage(row: Mapping[str, Any]) -> dict[str, Any]:
    prompt = _count(row.get("prompt_tokens"))
    completion = _count(row.get("completion_tokens"))
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": _count(row.get("cached_tokens"))},
        "completion_tokens_details": {"reasoning_tokens": _count(row.get("reasoning_tokens"))},
    }


def _tool_calls(value: Any, custom_id: str) -> list[dict[str, Any]]:
    """The ``tool_calls`` column in OpenAI's message shape (missing parts filled in)."""
    if not isinstance(value, list):
        return []
    calls = []
    for number, call in enumerate(value):
        if not isinstance(call, Mapping):
            continue
        call_id = call.get("id") or f"call_{_stable_hex(f'call{number}', custom_id)}"
        calls.append(
            {
                "id": str(call_id),
                "type": "function",
                "function": {
                    "name": str(call.get("name") or ""),
                    "arguments": str(call.get("arguments") or "{}"),
                },
            }
        )
    return calls


def _chat_body(row: Mapping[str, Any], custom_id: str) -> dict[str, Any]:
    calls = _tool_calls(row.get("tool_calls"), custom_id)
    message: dict[str, Any] = {"role": "assistant", "content": row.get("response")}
    if row.get("reasoning") is not None:
        message["reasoning_content"] = row["reasoning"]
    if calls:
        message["tool_calls"] = calls
    finish = _finish_reason(row.get("finish_reason"), allowed=_CHAT_FINISH, tool_calls=bool(calls))
    return {
        "id": row.get("response_id") or f"chatcmpl-{_stable_hex('completion', custom_id)}",
        "object": "chat.completion",
        "created": 0,
        "model": row.get("model") or "",
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
        "usage": _usage(row),
    }


def _text_body(row: Mapping[str, Any], custom_id: str) -> dict[str, Any]:
    finish = _finish_reason(row.get("finish_reason"), allowed=_TEXT_FINISH, tool_calls=False)
    choice = {"index": 0, "text": row.get("response") or "", "logprobs": None}
    return {
        "id": row.get("response_id") or f"cmpl-{_stable_hex('completion', custom_id)}",
        "object": "text_completion",
        "created": 0,
        "model": row.get("model") or "",
        "choices": [{**choice, "finish_reason": finish}],
        "usage": _usage(row),
    }


def batch_output_line(row: Mapping[str, Any], *, endpoint: str) -> dict[str, Any]:
    """One OpenAI batch output line for one output row (see the module docstring)."""
    custom_id = str(row.get("id"))
    line: dict[str, Any] = {"id": f"batch_req_{_stable_hex('batch_req', custom_id, 32)}"}
    line["custom_id"] = custom_id
    if row.get("status") != "ok":
        message = str(row.get("error") or "the request failed")
        status = row.get("http_status")
        if isinstance(status, int) and status >= 400:
            line["response"] = {
                "status_code": status,
                "request_id": f"req_{_stable_hex('request', custom_id, 32)}",
                "body": {"error": {"message": message}},
            }
            line["error"] = None
        else:
            line["response"] = None
            line["error"] = {"code": "request_failed", "message": message}
        return line
    body = (
        _chat_body(row, custom_id) if endpoint == "chat/completions" else _text_body(row, custom_id)
    )
    request_id = row.get("response_id") or f"req_{_stable_hex('request', custom_id, 32)}"
    line["response"] = {"status_code": 200, "request_id": request_id, "body": body}
    line["error"] = None
    return line


def _endpoint_name(endpoint: str) -> str:
    name = ENDPOINTS.get(endpoint, endpoint)
    if name not in ("chat/completions", "completions"):
        raise UsageError(f'unknown endpoint {endpoint!r}: use "chat/completions" or "completions".')
    return name


def _output_file(path: Path) -> pq.ParquetFile:
    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        raise InputError(path, f"is not a readable Parquet file ({exc}).") from None
    if "id" not in parquet.schema_arrow.names or "status" not in parquet.schema_arrow.names:
        raise InputError(
            path, "has no `id` and `status` columns; fix it: give the output of a pipeline run."
        )
    return parquet


def export_openai_batch(output_parquet: Path, dest: Path, *, endpoint: str) -> int:
    """Write ``output_parquet`` as an OpenAI batch output file at ``dest``; rows written.

    Reads the output batch by batch (memory stays bounded) and replaces ``dest`` atomically:
    a temporary file beside it is written, fsynced and renamed into place.
    """
    name = _endpoint_name(endpoint)
    parquet = _output_file(output_parquet)
    present = [c for c in _EXPORT_COLUMNS if c in parquet.schema_arrow.names]
    tmp = dest.with_name(f".{dest.name}.partial")
    rows = 0
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("w", encoding="utf-8", newline="\n") as handle:
            for batch in parquet.iter_batches(batch_size=EXPORT_BATCH_ROWS, columns=present):
                for row in batch.to_pylist():
                    line = batch_output_line(row, endpoint=name)
                    handle.write(json.dumps(line, ensure_ascii=False, separators=(",", ":")))
                    handle.write("\n")
                    rows += 1
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(dest)
    except pa.ArrowException as exc:
        tmp.unlink(missing_ok=True)
        raise InputError(output_parquet, f"cannot be read ({exc}).") from None
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StateError(f"cannot write the batch output {dest} ({exc}).") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return rows
