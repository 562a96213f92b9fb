"""The output Parquet file: one row per input row, in input order.

The file is written to a temporary name beside the target (``.NAME.partial``, while the run
goes), fsynced, and renamed into place, so a reader never sees a half-written output.

An output in object storage (``s3://``, ``gs://``, ``az://``) is written the same way to a
temporary file in the job's local state folder, then uploaded under its final name in one
commit (:func:`pipeline.io.remote.upload`): the object appears whole or not at all.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from operator import attrgetter
from pathlib import Path
from types import TracebackType
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import InputError, JobFileError, StateError
from pipeline.io import remote
from pipeline.results import RowResult
from pipeline.rows.schema import OutputSchema

TOOL_CALLS_TYPE = pa.list_(
    pa.struct([("id", pa.string()), ("name", pa.string()), ("arguments", pa.string())])
)
"""Each call's function name and its arguments as the JSON text the model wrote."""

RESULT_SCHEMA = pa.schema(
    [
        ("status", pa.string()),
        ("response", pa.string()),
        ("reasoning", pa.string()),
        ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("cached_tokens", pa.int64()),
        ("reasoning_tokens", pa.int64()),
        ("cost_usd", pa.float64()),
        ("attempts", pa.int64()),
        ("latency_ms", pa.int64()),
        ("error", pa.string()),
        ("http_status", pa.int64()),
        ("model", pa.string()),
        ("reasks", pa.int64()),
        ("tool_calls", TOOL_CALLS_TYPE),
        ("response_id", pa.string()),
    ]
)
RESULT_COLUMNS = tuple(RESULT_SCHEMA.names)


_RESULT_FIELDS = (
    "status",
    "response",
    "reasoning",
    "finish_reason",
    "attempts",
    "latency_ms",
    "error",
    "http_status",
    "model",
    "reasks",
    "response_id",
)
"""Columns that are a :class:`RowResult` field of the same name."""
_USAGE_FIELDS = ("prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens")
"""Columns that are a field of the result's usage of the same name."""


def result_arrays(results: Sequence[RowResult]) -> list[pa.Array]:
    """Columns of :data:`RESULT_SCHEMA` for ``results``, in order (one list per column, each
    made in one pass: half the work of appending every field of every row to its list)."""
    usages = [r.usage for r in results]
    columns: dict[str, list[Any]] = {
        name: list(map(attrgetter(name), results)) for name in _RESULT_FIELDS
    }
    columns.update({name: list(map(attrgetter(name), usages)) for name in _USAGE_FIELDS})
    columns["cost_usd"] = [None if r.cost_usd is None else float(r.cost_usd) for r in results]
    columns["tool_calls"] = [[call.to_dict() for call in r.tool_calls] or None for r in results]
    return [pa.array(columns[field.name], type=field.type) for field in RESULT_SCHEMA]


def check_writable(where: str | Path, *, job_source: str, key: str, folder: bool = False) -> None:
    """Fail now, before anything is sent, when ``path`` cannot be written: an existing folder
    where a file is wanted (or a file where a folder is), or a place whose folder cannot be
    made or written; for an output in object storage, what :func:`remote.check_output`
    checks (a folder, the state, must be local). ``key`` names the setting (``[output]
    path``); nothing is left behind when the check fails."""
    text = str(where)  # before Path(), which folds "s3://b" into "s3:/b"
    path = Path(where)
    if remote.is_url(text):
        if folder:
            raise JobFileError(
                job_source,
                key,
                f"{text} is a URL; the state folder needs a local (or shared POSIX) disk, for "
                "its appends and fsync.",
                "Give a local folder, or leave state_dir out to use .pipeline/state/<job name>.",
            )
        try:
            remote.check_output(text)
        except remote.StorageError as exc:
            raise JobFileError(job_source, key, str(exc)) from None
        return
    if folder and path.exists() and not path.is_dir():
        raise JobFileError(job_source, key, f"{text} is a file, not a folder.", "Give a folder.")
    if not folder and path.is_dir():
        raise JobFileError(
            job_source,
            key,
            f"{text} is a folder; the output is one Parquet file.",
            f"Give a file path, for example {path / 'output.parquet'}.",
        )
    parent = path if folder else path.parent
    existing = parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise JobFileError(
            job_source, key, f"cannot create {parent}: {existing} is a file.", "Fix the path."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise JobFileError(
            job_source,
            key,
            f"cannot write in {existing} (permission denied).",
            "Choose a folder you can write to, or fix its permissions.",
        )


def output_location(path: str) -> Path | str:
    """An ``[output] path`` as a place: a local :class:`Path`, or a URL kept as text."""
    return path if remote.is_url(path) else Path(path)


class OutputWriter:
    """Writes output batches to ``path`` atomically: a local path, or a URL in object
    storage whose temporary file is kept in ``staging`` (the job's local state folder)."""

    def __init__(
        self, path: Path | str, schema: OutputSchema | None = None, *, staging: Path | None = None
    ) -> None:
        self.url = str(path) if remote.is_url(str(path)) else None
        self.path: Path | str = self.url or Path(path)
        self._answer = schema
        if self.url is None:
            self._tmp = Path(path).with_name(f".{Path(path).name}.partial")
        else:
            self._tmp = (staging or Path(".")) / f".{remote.url_name(self.url)}.partial"
        self._writer: pq.ParquetWriter | None = None
        self._schema: pa.Schema | None = None
        self.rows = 0

    def __enter__(self) -> OutputWriter:
        try:
            self._tmp.parent.mkdir(parents=True, exist_ok=True)
            self._tmp.unlink(missing_ok=True)  # left by a run that was killed
        except OSError as exc:
            raise StateError(
                f"cannot create the output folder {self._tmp.parent} ({exc})."
            ) from None
        return self

    def write(
        self,
        id_array: pa.Array,
        kept: Sequence[tuple[str, pa.Array]],
        results: Sequence[RowResult],
    ) -> None:
        names = ["id", *(name for name, _ in kept)]
        arrays = [id_array, *(array for _, array in kept)]
        if self._answer is not None:
            names.extend(self._answer.columns)
            arrays.extend(self._answer.column_arrays([r.structured for r in results]))
        names.extend(RESULT_COLUMNS)
        arrays.extend(result_arrays(results))
        batch = pa.RecordBatch.from_arrays(arrays, names=names)
        if self._schema is None:
            self._schema = pa.schema(
                [
                    f if not pa.types.is_null(f.type) else f.with_type(pa.string())
                    for f in batch.schema
                ]
            )
            try:
                self._writer = pq.ParquetWriter(self._tmp, self._schema, compression="zstd")
            except OSError as exc:
                raise self._cannot_write(exc) from None
        try:  # cast only when needed: its first call imports pyarrow.compute (50-100 ms)
            if not batch.schema.equals(self._schema):
                batch = batch.cast(self._schema)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
            raise InputError(
                self.path,
                f"an input column changes type between rows ({exc}). "
                "Give each kept column and the id column one type.",
            ) from None
        assert self._writer is not None
        try:
            self._writer.write_batch(batch)
        except OSError as exc:
            raise self._cannot_write(exc) from None
        self.rows += batch.num_rows

    def _cannot_write(self, exc: OSError) -> StateError:
        return StateError(
            f"cannot write the output {self.path} ({exc.strerror or exc}). Every finished row "
            "is kept in the state folder: free disk space or fix the folder's permissions, "
            "then run the job again to write the output without sending them again."
        )

    def _cannot_upload(self, exc: remote.StorageError) -> StateError:
        return StateError(
            f"cannot upload the output to {self.path}: {exc} Nothing is left under that name, "
            "and every finished row is kept in the state folder: fix that, then run the job "
            "again to write the output without sending them again."
        )

    def abort(self) -> None:
        """Drop what was written: an output file already in place stays as it was."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._tmp.unlink(missing_ok=True)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.abort()
            return
        if self._writer is None:
            return
        try:
            self._writer.close()
            self._writer = None
            with self._tmp.open("rb") as handle:
                os.fsync(handle.fileno())
            if self.url is None:
                self._tmp.replace(self.path)
                return
        except OSError as exc_:
            raise self._cannot_write(exc_) from None
        try:
            remote.upload(self._tmp, self.url)
        except remote.StorageError as exc_:
            raise self._cannot_upload(exc_) from None
        finally:
            self._tmp.unlink(missing_ok=True)
