"""Which rows a run sends, and when a batch of them is finished.

:class:`ResumeCursor` walks the input batch by batch (in a worker thread): it plans each batch
and splits it into the rows to send (their prompts counted) and the rows an earlier run
already finished. A batch sealed by an earlier run, and unchanged since, is skipped without
planning (see :mod:`pipeline.state.seals`). :class:`Tracks` counts the results of the batches on
their way and says which are finished, so that they can be sealed for the next resume.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import pyarrow as pa

from pipeline.results import RowResult
from pipeline.rows.plan import PlannedRow, RowPlanner, with_prompt_tokens
from pipeline.state.journal import Journal
from pipeline.state.seals import Seal, SealBook, batch_digest


@dataclass(slots=True)
class Track:
    """A batch whose rows are on their way; sealed once each has a durable result."""

    start: int
    rows: int
    digest: str
    remaining: int
    ok: int
    failed: int
    results: list[RowResult] | None = None
    """The batch's results as they come, when the output wants them (see
    :class:`pipeline.io.ordered.OrderedOutput`)."""

    def seal(self) -> Seal:
        return Seal(
            start=self.start, rows=self.rows, digest=self.digest, ok=self.ok, failed=self.failed
        )


@dataclass(frozen=True, slots=True)
class Step:
    """One batch: the rows to send, the rows earlier runs finished, and its track (None
    when nothing of it is on its way, or it is never to be sealed)."""

    start: int
    rows: int
    pending: list[PlannedRow]
    resumed_ok: int
    resumed_failed: int
    track: Track | None


class ResumeCursor:
    """Walks the input: each batch's rows to send and the rows already finished."""

    def __init__(
        self,
        *,
        planner: RowPlanner,
        journal: Journal,
        seals: SealBook,
        retry_failed: bool,
        select_rows: frozenset[int] | None = None,
        by_prefix: bool = False,
        count: Callable[[list[PlannedRow]], list[PlannedRow]] = with_prompt_tokens,
    ) -> None:
        self._planner = planner
        self._count = count
        """Fills in the prompt tokens of the rows to send (exact, or upper bounds)."""
        self._journal = journal
        self._book = seals
        self._retry_failed = retry_failed
        self._select = select_rows
        self._by_prefix = by_prefix
        self._start = 0
        self._earlier = journal.results_for("status")
        self._seals: dict[int, Seal] | None = None
        self._fingerprint = planner.fingerprint

    def next_batch(self, batches: Iterator[pa.RecordBatch]) -> tuple[Step, pa.RecordBatch] | None:
        """The next batch's step and the batch itself; None at the end of the input.

        The batches may hold more columns than planning reads (the output's kept columns):
        only the planner's columns are planned and digested.
        """
        batch = next(batches, None)
        if batch is None:
            return None
        return self.step(self._planned_columns(batch)), batch

    def _planned_columns(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        wanted = self._planner.columns
        if batch.schema.names == wanted:
            return batch
        return batch.select(wanted)

    def step(self, batch: pa.RecordBatch) -> Step:
        """The step of ``batch``, the input's next batch (holding the planner's columns)."""
        start, rows = self._start, batch.num_rows
        self._start += rows
        if self._select is not None:
            return self._selected(batch, start, self._select)
        digest = batch_digest(self._fingerprint, batch)
        seal = self._sealed(start, rows, digest)
        if seal is not None:
            return Step(start, rows, [], seal.ok, seal.failed, None)
        pending, resumed_ok, resumed_failed = self._split(self._planner.plan(batch, start))
        if not pending:
            # Every row already has a durable result: seal it for the next resume.
            done = Seal(start=start, rows=rows, digest=digest, ok=resumed_ok, failed=resumed_failed)
            self._book.append([done])
            return Step(start, rows, [], resumed_ok, resumed_failed, None)
        track = Track(
            start=start,
            rows=rows,
            digest=digest,
            remaining=len(pending),
            ok=resumed_ok,
            failed=resumed_failed,
        )
        return Step(start, rows, self._count(pending), resumed_ok, resumed_failed, track)

    def tally(self, batch: pa.RecordBatch) -> tuple[int, int, int]:
        """How many rows of ``batch``, the input's next, are ok, failed and pending; like
        :meth:`step` but read-only (no seal written, no prompt counted)."""
        start, rows = self._start, batch.num_rows
        self._start += rows
        seal = self._sealed(start, rows, batch_digest(self._fingerprint, batch))
        if seal is not None:
            return seal.ok, seal.failed, rows - seal.ok - seal.failed
        pending, ok, failed = self._split(self._planner.plan(batch, start))
        return ok, failed, len(pending)

    def _sealed(self, start: int, rows: int, digest: str) -> Seal | None:
        """The batch's seal, if an earlier run sealed it unchanged (and it is to be skipped)."""
        if self._seals is None:
            self._seals = self._book.read()
        seal = self._seals.get(start)
        if seal is None or seal.rows != rows or seal.digest != digest:
            return None
        if seal.failed and self._retry_failed:
            return None
        return seal

    def _selected(self, batch: pa.RecordBatch, start: int, select: frozenset[int]) -> Step:
        """Only the selected rows of a batch; never sealed, since the others stay unsent."""
        rows = batch.num_rows
        if not any(row in select for row in range(start, start + rows)):
            return Step(start, rows, [], 0, 0, None)
        planned = self._planner.plan(batch, start)
        pending, resumed_ok, resumed_failed = self._split(p for p in planned if p.row in select)
        return Step(start, rows, self._count(pending), resumed_ok, resumed_failed, None)

    def _split(self, planned: Iterable[PlannedRow]) -> tuple[list[PlannedRow], int, int]:
        """The rows to send, and how many an earlier run finished ok / failed."""
        pending: list[PlannedRow] = []
        resumed_ok = resumed_failed = 0
        for row in planned:
            status = self._earlier.get(row.row, row.key)
            if status == "ok":
                resumed_ok += 1
            elif status is not None and not self._retry_failed:
                resumed_failed += 1
            else:
                pending.append(row)
        if self._by_prefix:
            # Bodies are canonical JSON whose messages come in order, so sorting them puts
            # rows that share a system prompt and prompt prefix next to each other: the
            # provider's prefix cache then serves the shared part (bounded by one batch).
            pending.sort(key=lambda planned: planned.body or b"")
        return pending, resumed_ok, resumed_failed


class Tracks:
    """The batches on their way, by first row; touched only from the event loop."""

    def __init__(self) -> None:
        self._tracks: dict[int, Track] = {}
        self._starts: list[int] = []

    def add(self, track: Track) -> None:
        self._tracks[track.start] = track
        self._starts.append(track.start)

    def finish(self, results: Sequence[RowResult]) -> list[Track]:
        """Count ``results`` into their batches' tracks; the tracks now finished, in the order
        they finished."""
        finished: list[Track] = []
        for result in results:
            if result.status == "stopped":
                continue  # not finished: its batch is not sealed
            index = bisect.bisect_right(self._starts, result.row) - 1
            if index < 0:
                continue
            track = self._tracks.get(self._starts[index])
            if track is None or result.row >= track.start + track.rows:
                continue
            track.remaining -= 1
            if result.status == "ok":
                track.ok += 1
            else:
                track.failed += 1
            if track.results is not None:
                track.results.append(result)
            if track.remaining == 0:
                finished.append(track)
                del self._tracks[track.start]
                self._starts.remove(track.start)
        return finished
