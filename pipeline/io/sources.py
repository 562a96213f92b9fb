"""Stream input rows from Parquet and JSONL files, in batches, in a stable order.

An input path is one file, a glob (``data/*.parquet``) or a folder (its ``.parquet``,
``.jsonl``, ``.ndjson`` files, optionally ``.gz``, sorted by name). Rows are numbered from 0
across all files in that order; without an ``id_column`` the row number is the row's id.

Memory is bounded by the batch size: files are read batch by batch and only the columns the
job needs are materialised. :func:`scan_input` is the one full pass made before any request:
it counts rows, checks that the id column is present, non-null and unique (8 bytes a row),
and reports malformed JSON lines with their line number.

An input path may also be a URL: ``s3://``, ``gs://``, ``az://`` or ``hf://datasets/...``
(a file, a glob or a folder, as for local paths), read through :mod:`pipeline.io.remote` in
bounded blocks; such a file's :attr:`InputFile.url` is set. Rows given in Python (the API's
``rows=``) are read the same way from memory (:mod:`pipeline.io.tables`).

JSONL files are UTF-8, with or without a byte-order mark at the start. Each column the job
reads must hold one JSON type in a file (nulls aside); the line whose value breaks that is an
:class:`InputError` naming the line, the column and both types.
"""

from __future__ import annotations

import array
import contextlib
import glob
import gzip
import io
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath, PurePosixPath
from typing import IO, Any, Literal, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import InputError, JobFileError
from pipeline.io import remote, tables

Format = Literal["parquet", "jsonl", "table"]
_SUFFIXES: dict[str, Format] = {".parquet": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}
DEFAULT_BATCH_ROWS = 2048


def _use_a_pool_that_returns_memory() -> None:
    """Allocate Arrow's buffers with the system allocator, unless the environment picks one.

    Arrow's default pool on Linux (mimalloc) keeps the pages of freed batches: streaming a
    1,000,000-row input in batches grew a process by about 60 MiB while the pool never held
    more than 8 MiB at once, so a run's memory grew with its input. The system allocator
    gives them back (a 10 MiB growth for the same read). ``ARROW_DEFAULT_MEMORY_POOL`` set
    in the environment wins.
    """
    if "ARROW_DEFAULT_MEMORY_POOL" not in os.environ:
        pa.set_memory_pool(pa.system_memory_pool())


_use_a_pool_that_returns_memory()
_BOM = "\ufeff"


@dataclass(frozen=True, slots=True, kw_only=True)
class InputFile:
    path: Path
    """A local file; for a file in object storage, its path there (``bucket/key``)."""
    format: Format
    gzipped: bool = False
    url: str | None = None
    """The file's URL when it is in object storage or on the Hub (read from there)."""
    table: pa.Table | None = field(default=None, compare=False, repr=False)
    """Rows held in memory (format ``table``, see :mod:`pipeline.io.tables`); ``path`` is the
    name that stands for them."""

    @property
    def where(self) -> str:
        """The file as messages name it: its URL or its path."""
        return self.url if self.url is not None else str(self.path)


def _format_of(path: PurePath) -> tuple[Format, bool] | None:
    suffixes = [s.lower() for s in path.suffixes]
    gzipped = bool(suffixes) and suffixes[-1] == ".gz"
    if gzipped:
        suffixes = suffixes[:-1]
    if not suffixes or suffixes[-1] not in _SUFFIXES:
        return None
    return _SUFFIXES[suffixes[-1]], gzipped


def resolve_input(pattern: str, job_source: str) -> tuple[InputFile, ...]:
    """The input files a job's ``[input] path`` names, in reading order."""
    key = "[input] path"
    table = tables.lookup(pattern)
    if table is not None:
        return (InputFile(path=Path(pattern), format="table", table=table),)
    if remote.is_url(pattern):
        return _resolve_remote(pattern, job_source)
    path = Path(pattern)
    if any(ch in pattern for ch in "*?["):
        candidates = sorted(Path(p) for p in glob.glob(pattern, recursive=True))
        if not candidates:
            raise JobFileError(job_source, key, f"the pattern {pattern!r} matches no file.")
    elif path.is_dir():
        candidates = sorted(p for p in path.iterdir() if p.is_file())
        candidates = [p for p in candidates if _format_of(p) is not None]
        if not candidates:
            raise JobFileError(
                job_source, key, f"the folder {pattern!r} holds no .parquet or .jsonl file."
            )
    elif path.is_file():
        candidates = [path]
    else:
        raise JobFileError(
            job_source,
            key,
            f"no such file or folder: {pattern!r}.",
            "Paths in a job file are relative to the job file's folder; --input is "
            "relative to the current folder.",
        )
    files = []
    for candidate in candidates:
        kind = _format_of(candidate)
        if kind is None:
            raise JobFileError(
                job_source,
                key,
                f"cannot read {str(candidate)!r}: "
                "use .parquet, .jsonl or .ndjson (optionally .gz).",
            )
        files.append(InputFile(path=candidate, format=kind[0], gzipped=kind[1]))
    return tuple(files)


def _resolve_remote(url: str, job_source: str) -> tuple[InputFile, ...]:
    """:func:`resolve_input` for a URL: the same rules, on object storage or the Hub."""
    key = "[input] path"
    try:
        kind, found = remote.expand(url)
    except remote.StorageError as exc:
        raise JobFileError(job_source, key, str(exc)) from None
    if kind == "missing":
        raise JobFileError(job_source, key, f"no such file or folder: {url!r}.")
    if kind == "glob" and not found:
        raise JobFileError(job_source, key, f"the pattern {url!r} matches no file.")
    if kind == "folder":
        found = [f for f in found if _format_of(PurePosixPath(remote.url_name(f))) is not None]
        if not found:
            raise JobFileError(
                job_source, key, f"the folder {url!r} holds no .parquet or .jsonl file."
            )
    files = []
    for file_url in found:
        kind_of = _format_of(PurePosixPath(remote.url_name(file_url)))
        if kind_of is None:
            raise JobFileError(
                job_source,
                key,
                f"cannot read {file_url!r}: use .parquet, .jsonl or .ndjson (optionally .gz).",
            )
        path = Path(file_url.split("://", 1)[1])
        files.append(InputFile(path=path, format=kind_of[0], gzipped=kind_of[1], url=file_url))
    return tuple(files)


def open_text(path: Path | str, *, gzipped: bool) -> IO[str]:
    """A UTF-8 text file, read through gzip when ``gzipped``; a byte-order mark at the start of
    the file (as Windows tools write) is skipped. ``path`` may be a URL (object storage)."""
    if isinstance(path, str) and remote.is_url(path):
        return remote.open_text(path, gzipped=gzipped)
    if gzipped:
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig")
    return Path(path).open("r", encoding="utf-8-sig")


def _not_json(path: Path | str, number: int, detail: str) -> InputError:
    return InputError(path, f"line {number} is not valid JSON ({detail}). Fix that line.")


_Where = TypeVar("_Where", Path, str)


def json_lines(
    path: _Where,
    *,
    gzipped: bool,
    not_json: Callable[[_Where, int, str], InputError] = _not_json,
) -> Iterator[tuple[int, Any]]:
    """(line number, value) for each non-blank line of a JSON-lines file (``path``, or a URL
    in object storage); a line that is not JSON is the :class:`InputError` ``not_json``
    words (file, line, parser's reason), a file that cannot be read one naming it."""
    try:
        with open_text(path, gzipped=gzipped) as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except (ValueError, RecursionError) as exc:
                    raise not_json(path, number, _json_problem(line, exc)) from None
                yield number, value
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise InputError(path, f"cannot be read ({remote.scrub(str(exc))}).") from None
    except remote.StorageError as exc:
        raise InputError(path, f"cannot be read: {exc}") from None


def _json_problem(line: str, exc: ValueError | RecursionError) -> str:
    if line.startswith(_BOM):
        return "it starts with a byte-order mark, which only the start of the file may have"
    return exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)


def _jsonl_records(file: InputFile) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; a bad line is an :class:`InputError`."""
    lines = (
        json_lines(file.path, gzipped=file.gzipped)
        if file.url is None
        else json_lines(file.url, gzipped=file.gzipped)
    )
    for number, record in lines:
        if not isinstance(record, dict):
            raise InputError(file.where, f"line {number} is not a JSON object.")
        yield number, record


LOCAL_READ_BUFFER = 1 << 20
"""Bytes of a local Parquet file read at a time (see :func:`_parquet`)."""


def _parquet(file: InputFile) -> pq.ParquetFile:
    """``file`` open as Parquet (close it with ``close(force=True)``, see :func:`_opened`)."""
    try:
        if file.url is not None:
            return pq.ParquetFile(remote.open_input(file.url))
        # Local: read pages through a 1 MiB buffer instead of pre-buffering whole column
        # chunks, which kept about two row groups of the input in memory (94 MiB of Arrow's
        # pool for 50,000-row groups of 1 KB texts, against 5 MiB), at no cost in speed.
        return pq.ParquetFile(file.path, pre_buffer=False, buffer_size=LOCAL_READ_BUFFER)
    except remote.StorageError as exc:
        raise InputError(file.where, f"cannot be read: {exc}") from None
    except (OSError, pa.ArrowException) as exc:
        problem = remote.scrub(str(exc))
        raise InputError(file.where, f"is not a readable Parquet file ({problem}).") from None


@contextlib.contextmanager
def _opened(file: InputFile) -> Iterator[pq.ParquetFile]:
    """``file`` open as Parquet, and closed (with the object-storage file under it) after."""
    parquet = _parquet(file)
    try:
        yield parquet
    finally:
        parquet.close(force=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class InputScan:
    """What the pre-flight pass learned about the input."""

    files: tuple[InputFile, ...]
    rows: int
    columns: frozenset[str]
    """Columns present in the input (for JSONL: keys seen in any row)."""


def _id_hash(value: Any) -> int:
    # Python's hash is stable within one process, which is all a duplicate check needs.
    return hash(value) if not isinstance(value, (dict, list)) else hash(json.dumps(value))


def scan_input(
    files: Sequence[InputFile], *, id_column: str | None, limit: int | None, job_source: str
) -> InputScan:
    """Count rows, collect column names, and check ids; raises on anything unusable."""
    columns: set[str] = set()
    hashes = array.array("q")
    rows = 0
    for file in files:
        budget = None if limit is None else limit - rows
        if budget is not None and budget <= 0:
            break
        if file.format in ("parquet", "table"):
            rows += _scan_parquet(
                file,
                id_column=id_column,
                budget=budget,
                hashes=hashes,
                columns=columns,
                job_source=job_source,
            )
        else:
            rows += _scan_jsonl(
                file, id_column=id_column, budget=budget, hashes=hashes, columns=columns
            )
    if id_column is not None and hashes:
        _check_unique(files, id_column, hashes, limit)
    return InputScan(files=tuple(files), rows=rows, columns=frozenset(columns))


def _scan_parquet(
    file: InputFile,
    *,
    id_column: str | None,
    budget: int | None,
    hashes: array.array[int],
    columns: set[str],
    job_source: str,
) -> int:
    if file.table is not None:
        names, total = list(file.table.column_names), int(file.table.num_rows)
    else:
        with _opened(file) as parquet:
            names = parquet.schema_arrow.names
            total = int(parquet.metadata.num_rows)
    columns.update(names)
    count = total if budget is None else min(total, budget)
    if id_column is None:
        return count
    if id_column not in names:
        raise _missing_id(job_source, id_column, file.where, names)
    for row, value in enumerate(iter_column([file], id_column, count)):
        if value is None:
            raise InputError(
                file.where,
                f"the id column {id_column!r} is null in row {row} (0-based). "
                "Every row needs an id.",
            )
        hashes.append(_id_hash(value))
    return count


def _scan_jsonl(
    file: InputFile,
    *,
    id_column: str | None,
    budget: int | None,
    hashes: array.array[int],
    columns: set[str],
) -> int:
    count = 0
    for number, record in _jsonl_records(file):
        if budget is not None and count >= budget:
            break
        columns.update(record)
        if id_column is not None:
            value = record.get(id_column)
            if value is None:
                raise InputError(
                    file.where,
                    f"line {number} has no value for the id column {id_column!r}. "
                    "Every row needs an id.",
                )
            hashes.append(_id_hash(value))
        count += 1
    return count


def _missing_id(
    job_source: str, id_column: str, path: Path | str, names: Sequence[str]
) -> JobFileError:
    shown = ", ".join(list(names)[:20])
    return JobFileError(
        job_source,
        "[input] id_column",
        f"{path} has no column {id_column!r} (its columns: {shown}).",
        "Name an existing column, or remove id_column to use row numbers.",
    )


def _repeated(hashes: array.array[int]) -> set[int]:
    """The hashes that occur more than once.

    With numpy (which pyarrow loads when it is installed), not with ``pyarrow.compute``: the
    first compute call, like ``pa.array()`` of a Python object, probes for pandas and imports
    it, 0.1-0.2 s of a run's start-up.
    """
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - pyarrow without numpy
        import pyarrow.compute as pc  # 15-25 ms of start-up: only here

        counts = pc.value_counts(pa.array(hashes, type=pa.int64()))
        repeated = counts.filter(pc.greater(counts.field("counts"), 1))
        return set(repeated.field("values").to_pylist())
    ordered = np.sort(np.frombuffer(hashes, dtype=np.int64))
    return set(ordered[1:][ordered[1:] == ordered[:-1]].tolist())


def _check_unique(
    files: Sequence[InputFile], id_column: str, hashes: array.array[int], limit: int | None
) -> None:
    """Raise naming the first duplicated id, if any (hash first, then exact values)."""
    dup_hashes = _repeated(hashes)
    if not dup_hashes:
        return
    first_seen: dict[Any, int] = {}
    for index, value in enumerate(iter_column(files, id_column, limit)):
        if _id_hash(value) not in dup_hashes:
            continue
        key = json.dumps(value, sort_keys=True, default=str)
        if key in first_seen:
            raise InputError(
                files[0].where if len(files) == 1 else ", ".join(f.where for f in files),
                f"the id {value!r} in column {id_column!r} appears more than once "
                f"(rows {first_seen[key]} and {index}, 0-based). Ids must be unique; "
                "fix the input or remove id_column to use row numbers.",
            )
        first_seen[key] = index


def iter_column(files: Sequence[InputFile], column: str, limit: int | None) -> Iterator[Any]:
    """One column's values across all files, in row order."""
    for batch in iter_batches(files, [column], limit=limit):
        yield from batch.column(0).to_pylist()


def iter_batches(
    files: Sequence[InputFile],
    columns: Sequence[str],
    *,
    limit: int | None = None,
    batch_rows: int = DEFAULT_BATCH_ROWS,
) -> Iterator[pa.RecordBatch]:
    """Record batches holding ``columns`` (null where a row lacks one), in row order."""
    wanted = list(dict.fromkeys(columns))
    remaining = limit
    for file in files:
        if remaining is not None and remaining <= 0:
            return
        for batch in _file_batches(file, wanted, batch_rows):
            if remaining is None:
                yield batch
                continue
            if remaining <= 0:
                return
            kept = batch if batch.num_rows <= remaining else batch.slice(0, remaining)
            remaining -= kept.num_rows
            yield kept


def _file_batches(file: InputFile, columns: list[str], batch_rows: int) -> Iterator[pa.RecordBatch]:
    if file.table is not None:
        for batch in tables.table_batches(file.table, columns, batch_rows):
            yield _with_all_columns(batch, columns)
        return
    if file.format == "parquet":
        with _opened(file) as parquet:
            present = [c for c in columns if c in parquet.schema_arrow.names]
            try:
                for batch in parquet.iter_batches(batch_size=batch_rows, columns=present):
                    yield _with_all_columns(batch, columns)
            except (OSError, pa.ArrowException) as exc:
                problem = remote.scrub(str(exc))
                raise InputError(file.where, f"cannot be read ({problem}).") from None
        return
    yield from _jsonl_batches(file, columns, batch_rows)


def _jsonl_batches(
    file: InputFile, columns: list[str], batch_rows: int
) -> Iterator[pa.RecordBatch]:
    kinds: dict[str, str] = {}  # column -> the kind of its first non-null value in the file
    pending: list[dict[str, Any]] = []
    lines: list[int] = []
    for number, record in _jsonl_records(file):
        row = {c: record.get(c) for c in columns}
        _check_kinds(file.where, number, row, kinds)
        pending.append(row)
        lines.append(number)
        if len(pending) >= batch_rows:
            yield _jsonl_batch(file, pending, columns, lines)
            pending, lines = [], []
    if pending:
        yield _jsonl_batch(file, pending, columns, lines)


def _with_all_columns(batch: pa.RecordBatch, columns: list[str]) -> pa.RecordBatch:
    if batch.schema.names == columns:
        return batch
    arrays = [
        batch.column(c) if c in batch.schema.names else pa.nulls(batch.num_rows) for c in columns
    ]
    return pa.RecordBatch.from_arrays(arrays, names=columns)


def _kind(value: Any) -> str | None:
    """The JSON type of ``value`` as a person names it (None for null)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "text"
    return "an object" if isinstance(value, dict) else "a list"


def _check_kinds(path: Path | str, number: int, row: dict[str, Any], kinds: dict[str, str]) -> None:
    """Raise naming the column and line when a value's type differs from the column's type
    on earlier lines (``kinds``, which this updates)."""
    for column, value in row.items():
        kind = _kind(value)
        if kind is None:
            continue
        before = kinds.setdefault(column, kind)
        if kind != before:
            raise _mixed(path, number, column, f"is {kind} here but {before} on earlier lines")


def _mixed(
    path: Path | str, number: int, column: str, problem: str, fix: str = "make the column one type."
) -> InputError:
    return InputError(path, f"line {number}: column {json.dumps(column)} {problem}; {fix}")


_CONVERSION_ERRORS = (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError)


def _jsonl_batch(
    file: InputFile, rows: list[dict[str, Any]], columns: list[str], lines: list[int]
) -> pa.RecordBatch:
    arrays = []
    for column in columns:
        values = [row[column] for row in rows]
        try:
            arrays.append(pa.array(values))
        except _CONVERSION_ERRORS:
            raise _unconvertible(file.where, column, values, lines) from None
    return pa.RecordBatch.from_arrays(arrays, names=columns)


def _unconvertible(
    path: Path | str, column: str, values: list[Any], lines: list[int]
) -> InputError:
    """The error for a column Arrow cannot convert although its values share one JSON type
    (their contents differ, or a number is too large): it names the first line that fails."""

    def failure(count: int) -> Exception | None:
        try:
            pa.array(values[:count])
        except _CONVERSION_ERRORS as exc:
            return exc
        return None

    low, high = 1, len(values)  # the shortest failing prefix, by bisection
    while low < high:
        middle = (low + high) // 2
        if failure(middle) is None:
            low = middle + 1
        else:
            high = middle
    exc = failure(low)
    if isinstance(exc, OverflowError) or "too large" in str(exc):
        fix = "make it smaller, or write the column's values in quotes, as text."
        return _mixed(path, lines[low - 1], column, "holds a number too large for 64 bits", fix)
    problem = f"holds values whose contents differ in type from earlier lines ({exc})"
    return _mixed(path, lines[low - 1], column, problem)
