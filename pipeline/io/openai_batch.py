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
accepted, one per file, and never with ``stream``. The file is UTF-8, with or without a
byte-order mark at its start. :func:`batch_file_job` makes the job that runs such a file as
it is; its output is ``out/<name>.output.parquet`` under the current folder.

**Output.** :mod:`pipeline.io.openai_export` writes a finished job's output as a batch
*output* file.
"""

from __future__ import annotations

import array
import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.errors import InputError
from pipeline.io.sources import json_lines, open_text, resolve_input
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
ENDPOINTS = {  # a batch line's url -> the endpoint it means
    "/v1/chat/completions": "chat/completions",
    "/chat/completions": "chat/completions",
    "/v1/completions": "completions",
    "/completions": "completions",
}
_ACCEPTED_URLS = ", ".join(ENDPOINTS)
OUTPUT_FOLDER = "out"
"""Where a batch file's output goes by default, relative to the current folder."""
_DIGEST_BYTES = 16
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
    if not isinstance(url, str) or url not in ENDPOINTS:
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
        kind = ENDPOINTS[request.url]
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
        self, batch: pa.RecordBatch, start: int, *, keyed: bool = True
    ) -> Iterator[tuple[PlannedRow, dict[str, Any] | None]]:
        """Planned rows with each body as a dict too (None when the row cannot be sent); not
        ``keyed``, as :meth:`pipeline.rows.plan.Planner.plan_bodies`."""
        ids = batch.column("custom_id").to_pylist()
        bodies = batch.column("body").to_pylist()
        for offset, (custom_id, text) in enumerate(zip(ids, bodies, strict=True)):
            index = start + offset
            row_id = str(index) if custom_id is None else str(custom_id)
            failure = self._unplannable(custom_id, text)
            if failure is not None:
                key = request_key(self.url, b"", row_id) if keyed else ""
                yield PlannedRow(index, key, None, failure, id=row_id), None
                continue
            body = self.body(json.loads(text))
            if not keyed:
                yield PlannedRow(index, "", b"", None, id=row_id), body
                continue
            encoded = encode_body(body)
            yield (
                PlannedRow(index, request_key(self.url, encoded, row_id), encoded, None, id=row_id),
                body,
            )

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


def batch_file_job(
    path: Path,
    *,
    model: str | None,
    max_in_flight: int | None,
    api_key_env: str | None,
    limit: int | None = None,
) -> JobSpec:
    """A job that runs an OpenAI batch input file as it is (``pipeline run batch.jsonl``).

    The endpoint comes from the lines' ``url``; the output goes to ``out/<name>.output.parquet``
    relative to the current folder, as a job's output goes under ``out/``, so the input's
    folder gets no new files (``--output`` says otherwise). Without ``model``, each
    line keeps its own model; prices are known when the lines share one priced model. The
    file is checked up to ``limit`` requests (the run's ``--limit``), so the run's own check
    of it reuses this pass.
    """
    found = scan_batch_file(path, limit=limit)
    named = model or (found.models[0] if len(found.models) == 1 else DEFAULT_MODEL)
    stem = path.name.split(".")[0]
    return JobSpec(
        name=stem,
        source=str(path),
        input=InputSpec(path=str(path), id_column="custom_id", format="openai-batch"),
        request=RequestSpec(
            api_key_env=api_key_env,
            model=named,
            endpoint="completions" if found.endpoint == "completions" else "chat/completions",
            model_override=model is not None,
        ),
        limits=LimitsSpec() if max_in_flight is None else LimitsSpec(max_in_flight=max_in_flight),
        output=OutputSpec(path=str(Path(OUTPUT_FOLDER, f"{stem}.output.parquet"))),
    )


def job_models(job: JobSpec) -> tuple[str, ...]:
    """The models a job's requests name: ``[request] model``, and for a batch file whose
    lines keep their own models, each of those (from the pass :func:`scan_batch_file` keeps).

    What the built-in server must serve for a ``--local`` run of the job.
    """
    models = [job.request.model]
    if job.input.format == "openai-batch" and not job.request.model_override:
        files = resolve_input(job.input.path, job.source)
        if len(files) == 1:  # else the run's own check of the input says what is wrong
            models.extend(scan_batch_file(files[0].path, limit=job.input.limit).models)
    return tuple(dict.fromkeys(models))
