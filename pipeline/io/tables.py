"""Input rows held in memory: a table given in Python instead of ``[input] path``.

The Python API's ``rows=`` (a polars or pandas DataFrame, a pyarrow Table) becomes one
:class:`pyarrow.Table` (:func:`as_table`), registered while the call lasts
(:func:`registered`) under a name that stands in for the job's ``[input] path`` and that
messages about its rows use (``rows= (call 1)``). :func:`pipeline.io.sources.resolve_input`
finds it by that name, and from there the engine reads it as it reads a file: scanned once
(row count, columns, ids), then streamed in batches of the columns the job needs. Rows are
numbered from 0 and, without an ``id_column``, the row number is the row's id, as in a file;
so the same rows make the same request keys, and a second call with the same rows and output
resumes the first.

Once the rows are a table, nothing more is copied: the batches are slices of its buffers.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from pipeline.errors import UsageError

_lock = threading.Lock()
_tables: dict[str, pa.Table] = {}
_numbers = itertools.count(1)
PREFIX = "rows= (call "
"""How the name of a registered table begins; messages about its rows name it."""


def as_table(rows: Any, *, argument: str = "rows") -> pa.Table:
    """``rows`` as a pyarrow Table: a pyarrow Table or RecordBatch as it is, a polars
    DataFrame through ``to_arrow()``, a pandas DataFrame without its index (call
    ``reset_index()`` first to keep it as a column), or anything that offers the Arrow
    PyCapsule stream interface. Anything else is a :class:`UsageError` naming ``argument``."""
    if isinstance(rows, pa.Table):
        return rows
    if isinstance(rows, pa.RecordBatch):
        return pa.Table.from_batches([rows])
    library = type(rows).__module__.partition(".")[0]
    if library == "polars" and hasattr(rows, "to_arrow"):
        table = rows.to_arrow()
        if isinstance(table, pa.Table):
            return table
    if library == "pandas" and hasattr(rows, "columns"):
        return pa.Table.from_pandas(rows, preserve_index=False)
    if hasattr(rows, "__arrow_c_stream__"):
        return pa.table(rows)
    raise UsageError(
        f"{argument}= takes a polars or pandas DataFrame or a pyarrow Table, not "
        f"{type(rows).__module__}.{type(rows).__qualname__}."
    )


@contextlib.contextmanager
def registered(table: pa.Table) -> Iterator[str]:
    """Register ``table`` for the block; yields the name that stands for it as an input path."""
    name = f"{PREFIX}{next(_numbers)})"
    with _lock:
        _tables[name] = table
    try:
        yield name
    finally:
        with _lock:
            _tables.pop(name, None)


def lookup(name: str) -> pa.Table | None:
    """The table registered under ``name``, if any (``name`` is an input path)."""
    if not name.startswith(PREFIX):
        return None
    with _lock:
        return _tables.get(name)


def table_batches(table: pa.Table, columns: list[str], batch_rows: int) -> Iterator[pa.RecordBatch]:
    """Record batches of ``table``'s ``columns`` that it has (at most ``batch_rows`` rows each),
    in row order."""
    present = [c for c in columns if c in table.column_names]
    for batch in table.select(present).to_batches(max_chunksize=batch_rows):
        if batch.num_rows:
            yield batch
