"""Making results durable, and the output: journal commits, seals, rows in input order.

Results arrive from the workers in completion order. The writer takes them in groups (up to
:data:`RESULT_BATCH` at a time), appends them to the journal and fsyncs (in a worker thread,
off the event loop), then seals the input batches they finished, so a resume can skip a sealed
batch without planning its rows. With an :class:`~pipeline.io.ordered.OrderedOutput`, batches
this run sent whole are written to the output Parquet as soon as every earlier batch is;
whatever the run did not write as it went is written at the end from the journal, each row
matched to its result by request key (so a result recorded for an older prompt never counts).
"""

from __future__ import annotations

from collections.abc import Callable

import anyio
import anyio.to_thread
import pyarrow as pa
from anyio.streams.memory import MemoryObjectReceiveStream

from pipeline.engine.context import JobContext
from pipeline.engine.stats import RunStats
from pipeline.errors import StateError
from pipeline.io.ordered import OrderedOutput, Waiting
from pipeline.io.sinks import OutputWriter
from pipeline.io.sources import InputScan
from pipeline.results import RowResult
from pipeline.state.resume import Track, Tracks

RESULT_BATCH = 1024
"""Results committed to the journal together, at most."""
COMMIT_WINDOW_S = 0.05
"""A group of results is committed once it holds half the in-flight cap (a cluster shard's:
half the permits its worker holds), or this long after its first result, whichever comes
first: at 1,200 results/s that is about 20 hops to the worker thread (and fsyncs) a second
instead of one per few results (that hop was the writer's largest cost). A result is durable
at most this long (plus the fsync) after it arrives, and a crash leaves unanswered at most the
requests in flight plus half as many."""
COMMIT_TICK_S = 0.005
"""While a group fills, the writer looks for more results this often."""


class ResultWriter:
    """Commits results and seals, and writes the output in input order."""

    def __init__(
        self,
        context: JobContext,
        *,
        stats: RunStats,
        sink: OutputWriter | None,
        output: OrderedOutput | None,
        group: Callable[[], int] | None = None,
    ) -> None:
        self._context = context
        self._group = group
        """Results committed together at most (None: half the job's ``max_in_flight``)."""
        self._journal = context.journal
        self._seals = context.seals
        self._stats = stats
        self.sink = sink
        self.output = output
        self.tracks = Tracks()

    async def run(self, results: MemoryObjectReceiveStream[RowResult]) -> None:
        """Commit results as they arrive, until the workers are done."""
        output = self.output
        half = self._context.job.limits.max_in_flight // 2
        async with results:
            while True:
                try:
                    batch = [await results.receive()]
                except anyio.EndOfStream:
                    break
                group = half if self._group is None else self._group()
                await self._fill(results, batch, max(1, min(RESULT_BATCH, group)))
                finished = self.tracks.finish(batch)
                await anyio.to_thread.run_sync(self._commit, batch, finished)
                if output is not None:
                    output.finish(finished)
                for result in batch:
                    self._stats.add_result(result)
        if output is not None:
            output.end()

    @staticmethod
    async def _fill(
        results: MemoryObjectReceiveStream[RowResult], batch: list[RowResult], group: int
    ) -> None:
        """Add what arrives to ``batch`` until it holds ``group`` results or
        :data:`COMMIT_WINDOW_S` has passed since its first one (or the stream ends).

        Between looks it sleeps :data:`COMMIT_TICK_S`, or longer when the results come too
        slowly to fill the group sooner: half the time the rest of the group would take at
        the rate seen so far (never past the window). At 1,200 results/s and a group of 128
        that is two looks a window instead of ten (each a timer and a task step)."""
        first = anyio.current_time()
        deadline = first + COMMIT_WINDOW_S
        while len(batch) < group:
            try:
                batch.append(results.receive_nowait())
                continue
            except anyio.EndOfStream:
                return
            except anyio.WouldBlock:
                now = anyio.current_time()
                left = deadline - now
                if left <= 0:
                    return
            wait = COMMIT_TICK_S
            if len(batch) > 1 and now > first:  # the rate of those after the first
                wait = max(wait, (group - len(batch)) * (now - first) / (len(batch) - 1) / 2)
            await anyio.sleep(min(left, wait))

    def _commit(self, results: list[RowResult], finished: list[Track]) -> None:
        """Make results durable, then seal the batches they finished."""
        self._journal.append_results(results)
        self._seals.append([track.seal() for track in finished])

    def write_done(self, done: list[Waiting]) -> None:
        """Write batches this run finished, in order (in a worker thread, during the run)."""
        assert self.sink is not None
        for waiting in done:
            assert waiting.results is not None
            matched: list[RowResult | None] = list(waiting.results)
            self._write_rows(waiting.batch, waiting.start, matched, partial=False)

    async def write_rest(self, scan: InputScan, *, hard_stop: bool, partial: bool) -> int:
        """Write what the run did not write as it went; the number of output rows. After a
        hard stop nothing more is written (the output is dropped); after a stop
        (``partial``) rows without a result are left out."""
        if self.sink is None:
            return 0
        if hard_stop:
            self.sink.abort()
            return 0
        first = 0 if self.output is None else self.output.next_row
        return await anyio.to_thread.run_sync(self._assemble, scan, first, partial)

    def _assemble(self, scan: InputScan, first: int, partial: bool) -> int:
        """Write the output from row ``first`` on, from the journal (in a worker thread).

        With ``partial`` (after a stop) rows without a result are left out; otherwise every
        row must have one. Returns the number of rows the output holds.
        """
        assert self.sink is not None
        if first >= scan.rows:  # the run wrote every row as it went: nothing to read again
            return self.sink.rows
        context = self._context
        planner = context.planner
        known = self._journal.results_for("result")
        start = 0
        for batch in context.input_batches(scan, context.job.output.keep_columns):
            rows = batch.num_rows
            if start + rows > first:
                part = batch.slice(first - start) if start < first else batch
                at = max(start, first)
                matched = [
                    known.get(planned.row, planned.key)
                    for planned in planner.plan(part.select(planner.columns), at)
                ]
                self._write_rows(part, at, matched, partial)
            start += rows
        return self.sink.rows

    def _write_rows(
        self,
        batch: pa.RecordBatch,
        start: int,
        matched: list[RowResult | None],
        partial: bool,
    ) -> None:
        """Write the rows of ``batch`` that have a result (all must, unless ``partial``)."""
        assert self.sink is not None
        positions = [i for i, found in enumerate(matched) if found is not None]
        if len(positions) < len(matched) and not partial:
            row = start + matched.index(None)
            raise StateError(
                f"row {row} has no result in {self._journal.folder}; run the job again to "
                "finish it."
            )
        if not positions:
            return
        chosen = batch
        if len(positions) < batch.num_rows:
            chosen = batch.take(pa.array(positions, type=pa.int64()))
        names = chosen.schema.names
        job = self._context.job
        id_column = job.input.id_column
        if id_column is not None:
            ids = chosen.column(names.index(id_column))
        else:
            offset = start + job.input.row_offset
            ids = pa.array([offset + p for p in positions], type=pa.int64())
        kept = [(c, chosen.column(names.index(c))) for c in job.output.keep_columns]
        ordered = [found for found in matched if found is not None]
        self.sink.write(ids, kept, ordered)
