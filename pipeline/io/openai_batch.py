"""OpenAI Batch API files: read a batch input file as a job's input, write batch output.

**Input.** A batch input file is JSONL, one request a line::

    {"custom_id": "request-1", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "...", "messages": [...], "max_tokens": 100}}

Users who already have such files (for OpenAI's Batch API, or vLLM's ``run_batch``) can run
them here unchanged: :func:`scan_batch_file` checks the whole file before anything is sent
(every problem names its line and field), :func:`iter_batch_records` streams it as record
batches of ``custom_id`` and ``body``, and :class:`BatchPlanner` turns those into planned
requests exactly as :class:`pipeline.rows.plan.Planner` does for prompt templates. The custom id is
the row id, so a row's request key is ``request_key(url, canonical body, custom_id)`` and
resuming works as for any job. Only the chat-completions and completions endpoints are
accepted, one per file, and never with ``stream``.

**Output.** :func:`export_openai_batch` writes a finished job's output Parquet as an OpenAI
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

import array
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import InputError, StateError, UsageError
from pipeline.io.sources import json_lines, open_text
from pipeline.job.spec import (
    DEFAULT_MODEL,
    InputSpec,
    JobSpec,
    LimitsSpec,
    OutputSpec,
    RequestSpec,
)
from pipeline.rows.plan import PlannedRow
from pipeline.rows.templating import encode_body, request_key

BATCH_COLUMNS = ("custom_id", "body")
_REQUIRED_KEYS = ("custom_id", "method", "url", "body")
_ENDPOINTS = {
    "/v1/chat/completions": "chat/completions",
    "/chat/completions": "chat/completions",
    "/v1/completions": "completions",
    "/completions": "completions",
}
_ACCEPTED_URLS = ", ".join(_ENDPOINTS)
_DIGEST_BYTES = 16
_EXPORT_BATCH_ROWS = 1024
_SCHEMA = pa.schema([("custom_id", pa.string()), ("body", pa.string())])


# ---------------------------------------------------------------------------------------------
# Reading


def _is_jsonl_name(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith((".jsonl", ".jsonl.gz"))


def _gzipped(path: Path) -> bool:
    return path.name.lower().endswith(".gz")


def looks_like_batch_file(path: Path) -> bool:
    """True for a .jsonl(.gz) file whose first non-blank line is a batch request object.

    Lets the caller pick the batch reader for such a file without any job-file setting.
    """
    if not _is_jsonl_name(path) or not path.is_file():
        return False
    try:
        with open_text(path, gzipped=_gzipped(path)) as handle:
            for line in handle:
                if line.strip():
                    first = json.loads(line)
                    return isinstance(first, dict) and all(k in first for k in _REQUIRED_KEYS)
    except (OSError, UnicodeDecodeError, EOFError, ValueError, RecursionError):
        return False
    return False


@dataclass(frozen=True, slots=True)
class _Request:
    """One checked line of a batch input file."""

    line: int
    custom_id: str
    url: str
    body: dict[str, Any]


def _problem(path: Path, line: int, text: str) -> InputError:
    return InputError(path, f"line {line}: {text}")


def _not_json(path: Path, line: int, detail: str) -> InputError:
    return _problem(path, line, f"is not valid JSON ({detail}); fix that line.")


def _check_line(path: Path, number: int, record: Any) -> _Request:
    """The request on one line, or an :class:`InputError` naming the line and field."""
    if not isinstance(record, dict):
        raise _problem(
            path,
            number,
            f"is a JSON {type(record).__name__}, not an object; fix it to "
            '{"custom_id": ..., "method": "POST", "url": ..., "body": {...}}.',
        )
    custom_id = record.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id.strip():
        state = "is missing" if custom_id is None else f"is {json.dumps(custom_id)[:40]}"
        raise _problem(
            path,
            number,
            f"field `custom_id` {state}; fix it: every request needs a non-empty string id.",
        )
    method = record.get("method")
    if method != "POST":
        raise _problem(
            path, number, f'field `method` is {json.dumps(method)[:40]}; fix it to "POST".'
        )
    url = record.get("url")
    if not isinstance(url, str) or url not in _ENDPOINTS:
        raise _problem(
            path,
            number,
            f"field `url` is {json.dumps(url)[:60]}; fix it to one of {_ACCEPTED_URLS} "
            "(only chat completions and completions can be run).",
        )
    body = record.get("body")
    if not isinstance(body, dict):
        state = "is missing" if body is None else f"is a JSON {type(body).__name__}"
        raise _problem(path, number, f"field `body` {state}; fix it to the request object.")
    if body.get("stream") is True:
        raise _problem(
            path,
            number,
            "field `body.stream` is true; fix it: remove `stream` (batch answers are whole).",
        )
    return _Request(number, custom_id, url, body)


def _requests(path: Path, limit: int | None) -> Iterator[_Request]:
    """Each checked request of the file, in order, up to ``limit`` requests."""
    if limit is not None and limit <= 0:
        return
    lines = json_lines(path, gzipped=_gzipped(path), not_json=_not_json)
    for count, (number, record) in enumerate(lines, start=1):
        yield _check_line(path, number, record)
        if limit is not None and count >= limit:
            return


@dataclass(frozen=True, slots=True)
class BatchScan:
    """What the one pass over a batch input file learned."""

    path: Path
    rows: int
    endpoint: str
    """``"chat/completions"`` or ``"completions"``."""
    models: tuple[str, ...]
    """The distinct ``body.model`` values, in order of first use."""


@dataclass(slots=True)
class _IdBook:
    """Custom-id digests (16 bytes each) and their line numbers: bounded, compact memory."""

    digests: bytearray = field(default_factory=bytearray)
    lines: array.array[int] = field(default_factory=lambda: array.array("Q"))

    def add(self, custom_id: str, line: int) -> None:
        data = custom_id.encode("utf-8", "surrogatepass")
        self.digests += hashlib.blake2b(data, digest_size=_DIGEST_BYTES).digest()
        self.lines.append(line)

    def first_duplicate(self) -> tuple[int, int] | None:
        """(first line, repeating line) of the earliest repeated id, if any."""
        count = len(self.lines)
        if count < 2:
            return None
        import polars as pl  # here: a run that reads no batch file does not pay its import

        hashes = pa.Array.from_buffers(
            pa.binary(_DIGEST_BYTES), count, [None, pa.py_buffer(self.digests)]
        )
        frame = pl.DataFrame(
            {"h": pl.from_arrow(hashes), "line": pl.Series(self.lines, dtype=pl.UInt64)}
        )
        repeated = frame.filter(pl.col("h").is_duplicated())
        if repeated.is_empty():
            return None
        # The duplicate noticed first in reading order is the one whose second use comes first.
        seconds = repeated.with_columns(rank=pl.col("line").rank("ordinal").over("h"))
        second = seconds.filter(pl.col("rank") == 2).sort("line").row(0, named=True)
        first: Any = repeated.filter(pl.col("h") == second["h"])["line"].min()
        return int(first), int(second["line"])


def scan_batch_file(path: Path, *, limit: int | None = None) -> BatchScan:
    """Check every request of ``path`` (up to ``limit``) before anything is sent.

    Raises :class:`InputError` naming the line and field of the first problem; repeated
    custom ids are reported after the pass, naming both lines. The pass over an unchanged
    file (same inode, size and modification time) is done once per process.
    """
    try:
        info = path.stat()
    except OSError:
        return _scan_batch_file(path, limit)  # reports the problem, naming the file
    key = (str(path.resolve()), info.st_ino, info.st_size, info.st_mtime_ns, limit)
    found = _SCANS.get(key)
    if found is None:
        found = _SCANS[key] = _scan_batch_file(path, limit)
        while len(_SCANS) > _SCANS_KEPT:
            del _SCANS[next(iter(_SCANS))]
    return found


_SCANS: dict[tuple[str, int, int, int, int | None], BatchScan] = {}
_SCANS_KEPT = 8


def _scan_batch_file(path: Path, limit: int | None) -> BatchScan:
    endpoint: str | None = None
    first_url = ""
    first_line = 0
    models: dict[str, None] = {}
    ids = _IdBook()
    rows = 0
    for request in _requests(path, limit):
        kind = _ENDPOINTS[request.url]
        if endpoint is None:
            endpoint, first_url, first_line = kind, request.url, request.line
        elif kind != endpoint:
            raise _problem(
                path,
                request.line,
                f"field `url` is {request.url} but line {first_line} uses {first_url}; "
                "fix it: one batch file holds requests for one endpoint.",
            )
        model = request.body.get("model")
        if isinstance(model, str):
            models.setdefault(model)
        ids.add(request.custom_id, request.line)
        rows += 1
    duplicate = ids.first_duplicate()
    if duplicate is not None:
        first, second = duplicate
        raise _problem(
            path,
            second,
            f"field `custom_id` repeats the id of line {first}; "
            "fix it: every custom_id must be unique.",
        )
    if endpoint is None:
        raise InputError(path, "holds no request; fix it: write one request per line.")
    return BatchScan(path=path, rows=rows, endpoint=endpoint, models=tuple(models))


def iter_batch_records(
    path: Path, *, limit: int | None, batch_rows: int
) -> Iterator[pa.RecordBatch]:
    """Record batches of ``custom_id`` and ``body`` (canonical JSON text), in file order."""
    ids: list[str] = []
    bodies: list[str] = []
    for request in _requests(path, limit):
        try:
            bodies.append(encode_body(request.body).decode())
        except UnicodeEncodeError:
            raise _problem(
                path, request.line, "field `body` holds an unpaired \\uD800-\\uDFFF escape; fix it."
            ) from None
        ids.append(request.custom_id)
        if len(ids) >= batch_rows:
            yield _record_batch(ids, bodies)
            ids, bodies = [], []
    if ids:
        yield _record_batch(ids, bodies)


def _record_batch(ids: list[str], bodies: list[str]) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays(
        [pa.array(ids, type=pa.string()), pa.array(bodies, type=pa.string())], schema=_SCHEMA
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchPlanner:
    """Plans the requests of a batch input file; the interface of :class:`Planner`."""

    url: str
    """The key URL (see :attr:`pipeline.rows.plan.Planner.url`)."""
    model: str | None = None
    """When set, replaces every body's ``model``."""
    params: Mapping[str, Any] = field(default_factory=dict)
    """Body keys set on every request whose line does not set them (e.g. ``max_tokens``)."""

    @property
    def columns(self) -> list[str]:
        """The input columns that planning reads."""
        return list(BATCH_COLUMNS)

    @property
    def fingerprint(self) -> bytes:
        """Everything besides the rows' data that decides their request keys."""
        return json.dumps(
            {
                "source": "openai-batch",
                "url": self.url,
                "model": self.model,
                "params": dict(self.params),
                "columns": self.columns,
            },
            sort_keys=True,
            default=str,
        ).encode()

    def body(self, line_body: Mapping[str, Any]) -> dict[str, Any]:
        """The body sent for one line: its own keys, the defaults, the model override."""
        body = {**self.params, **line_body}
        if self.model is not None:
            body["model"] = self.model
        return body

    def plan(self, batch: pa.RecordBatch, start: int) -> Iterator[PlannedRow]:
        """Planned rows for ``batch``, whose first row is input row ``start``."""
        for planned, _ in self.plan_bodies(batch, start):
            yield planned

    def plan_bodies(
        self, batch: pa.RecordBatch, start: int
    ) -> Iterator[tuple[PlannedRow, dict[str, Any] | None]]:
        """Planned rows with each body as a dict too (None when the row cannot be sent)."""
        ids = batch.column("custom_id").to_pylist()
        bodies = batch.column("body").to_pylist()
        for offset, (custom_id, text) in enumerate(zip(ids, bodies, strict=True)):
            index = start + offset
            row_id = str(index) if custom_id is None else str(custom_id)
            failure = self._unplannable(custom_id, text)
            if failure is not None:
                yield PlannedRow(index, request_key(self.url, b"", row_id), None, failure), None
                continue
            body = self.body(json.loads(text))
            encoded = encode_body(body)
            yield PlannedRow(index, request_key(self.url, encoded, row_id), encoded, None), body

    def _unplannable(self, custom_id: Any, text: Any) -> str | None:
        if custom_id is None:
            return "the request has no custom_id"
        if not isinstance(text, str):
            return "the request has no body"
        try:
            body = json.loads(text)
        except ValueError:
            return "the request body is not valid JSON"
        if not isinstance(body, dict):
            return "the request body is not a JSON object"
        if self.model is None and not isinstance(body.get("model"), str):
            return "the request body names no model; set one in the line or in the job"
        return None


# ---------------------------------------------------------------------------------------------
# Export


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
    name = _ENDPOINTS.get(endpoint, endpoint)
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
            for batch in parquet.iter_batches(batch_size=_EXPORT_BATCH_ROWS, columns=present):
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


def batch_file_job(
    path: Path,
    *,
    model: str | None,
    max_in_flight: int | None,
    api_key_env: str | None,
    limit: int | None = None,
) -> JobSpec:
    """A job that runs an OpenAI batch input file as it is (``pipeline run batch.jsonl``).

    The endpoint comes from the lines' ``url``; the output goes beside the file
    (``<name>.output.parquet``) unless ``--output`` says otherwise. Without ``model``, each
    line keeps its own model; prices are known when the lines share one priced model. The
    file is checked up to ``limit`` requests (the run's ``--limit``), so the run's own check
    of it reuses this pass.
    """
    found = scan_batch_file(path, limit=limit)
    named = model or (found.models[0] if len(found.models) == 1 else DEFAULT_MODEL)
    return JobSpec(
        name=path.name.split(".")[0],
        source=str(path),
        input=InputSpec(path=str(path), id_column="custom_id", format="openai-batch"),
        request=RequestSpec(
            api_key_env=api_key_env,
            model=named,
            endpoint="completions" if found.endpoint == "completions" else "chat/completions",
            model_override=model is not None,
        ),
        limits=LimitsSpec() if max_in_flight is None else LimitsSpec(max_in_flight=max_in_flight),
        output=OutputSpec(path=str(path.with_name(path.name.split(".")[0] + ".output.parquet"))),
    )
