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

*Object storage.* The output read and the file written may each be a URL (``s3://``,
``gs://``, ``az://``): the output is read in batches through :mod:`pipeline.io.remote`, and
the export is written to a local temporary file, then uploaded in one commit. By default the
export goes beside the output, wherever that is (:func:`export_path`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import InputError, StateError, UsageError
from pipeline.io import remote
from pipeline.io.openai_batch import ENDPOINTS
from pipeline.job.urls import url_with_name

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


def output_exists(output: str) -> bool:
    """Whether a job's output (a path, or a URL in object storage) exists yet."""
    if not remote.is_url(output):
        return Path(output).is_file()
    try:
        return remote.exists(output)
    except remote.StorageError as exc:
        raise InputError(output, f"cannot be read: {exc}") from None


def export_path(output: str, fmt: str) -> str:
    """Where an export goes by default: beside the output (``x.parquet`` ->
    ``x.<fmt>.jsonl``), in the same bucket for an output in object storage."""
    if remote.is_url(output):
        stem = Path(remote.url_name(output)).stem
        return url_with_name(output, f"{stem}.{fmt}.jsonl")
    path = Path(output)
    return str(path.with_name(f"{path.stem}.{fmt}.jsonl"))


@contextlib.contextmanager
def _output_file(path: Path | str) -> Iterator[pq.ParquetFile]:
    try:
        if remote.is_url(str(path)):
            parquet = pq.ParquetFile(remote.open_input(str(path)))
        else:
            parquet = pq.ParquetFile(path)
    except remote.StorageError as exc:
        raise InputError(path, f"cannot be read: {exc}") from None
    except (OSError, pa.ArrowException) as exc:
        problem = remote.scrub(str(exc))
        raise InputError(path, f"is not a readable Parquet file ({problem}).") from None
    try:
        if "id" not in parquet.schema_arrow.names or "status" not in parquet.schema_arrow.names:
            raise InputError(
                path,
                "has no `id` and `status` columns; fix it: give the output of a pipeline run.",
            )
        yield parquet
    finally:
        parquet.close(force=True)


def export_openai_batch(output_parquet: Path | str, dest: Path | str, *, endpoint: str) -> int:
    """Write ``output_parquet`` as an OpenAI batch output file at ``dest``; rows written.
    Either may be a URL in object storage (see the module docstring).

    Reads the output batch by batch (memory stays bounded) and replaces ``dest`` atomically:
    a temporary file beside it is written, fsynced and renamed into place (or uploaded).
    """
    name = _endpoint_name(endpoint)
    url = str(dest) if remote.is_url(str(dest)) else None
    with _output_file(output_parquet) as parquet:
        present = [c for c in _EXPORT_COLUMNS if c in parquet.schema_arrow.names]
        if url is None:
            target = Path(dest)
            tmp = target.with_name(f".{target.name}.partial")
        else:
            handle, temporary = tempfile.mkstemp(prefix=".export-", suffix=".jsonl.partial")
            os.close(handle)
            tmp = Path(temporary)
        try:
            tmp.parent.mkdir(parents=True, exist_ok=True)
            rows = _write_lines(parquet, present, name, tmp)
            if url is None:
                tmp.replace(dest)
            else:
                remote.upload(tmp, url)
        except pa.ArrowException as exc:
            raise InputError(output_parquet, f"cannot be read ({exc}).") from None
        except OSError as exc:
            raise StateError(f"cannot write the batch output {dest} ({exc}).") from None
        except remote.StorageError as exc:
            raise StateError(f"cannot upload the batch output to {dest}: {exc}") from None
        finally:
            tmp.unlink(missing_ok=True)
    return rows


def _write_lines(parquet: pq.ParquetFile, columns: list[str], endpoint: str, tmp: Path) -> int:
    """Write one batch output line per row of ``parquet`` to ``tmp``, fsynced; rows written."""
    rows = 0
    with tmp.open("w", encoding="utf-8", newline="\n") as handle:
        for batch in parquet.iter_batches(batch_size=EXPORT_BATCH_ROWS, columns=columns):
            for row in batch.to_pylist():
                line = batch_output_line(row, endpoint=endpoint)
                handle.write(json.dumps(line, ensure_ascii=False, separators=(",", ":")))
                handle.write("\n")
                rows += 1
        handle.flush()
        os.fsync(handle.fileno())
    return rows
