"""The output in input order, written while the run goes on.

The producer registers each input batch, in order, as it reaches it. A batch whose rows are
all sent in this run keeps its results in memory as they become durable; once the last one
is durable, and every batch before it is written, it is written too: without reading the
journal back or planning its rows again (about 20 µs a row). So when the last answer
arrives, the output is all but written.

Memory stays bounded, and the run never waits for the output: at most ``max_waiting_rows``
registered rows wait to be written. The output stops taking batches for the rest of the run
when one would pass that limit (a row of an early batch retrying for minutes), or when a
batch is not sent whole in this run (earlier runs finished some of its rows: resuming). The
end of the run then writes the rest from the journal, as it does after a stop: batches not
done by then are written from the journal, the rows without a result left out.

The bookkeeping here runs on the event loop; ``write`` (given to :meth:`OrderedOutput.run`)
runs in a worker thread, one call at a time.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import anyio
import pyarrow as pa

from pipeline.records import RowResult
from pipeline.resume import Track

MAX_WAITING_ROWS = 65_536
"""Registered rows that may wait to be written: 32 input batches of 2,048."""


@dataclass(slots=True)
class Waiting:
    """A registered input batch on its way to the output."""

    start: int
    batch: pa.RecordBatch
    """The input batch: the planner's columns and the kept ones."""
    results: list[RowResult] | None = None
    """Its results in row order, once every one is durable."""


class OrderedOutput:
    """Registered batches, written in order as they are done."""

    def __init__(self, max_waiting_rows: int = MAX_WAITING_ROWS) -> None:
        self.max_waiting_rows = max_waiting_rows
        self._queue: deque[Waiting] = deque()
        self._by_start: dict[int, Waiting] = {}
        self._waiting_rows = 0
        self._next_row = 0
        self._closed = False
        self._ended = False
        self._wake = anyio.Event()

    @property
    def next_row(self) -> int:
        """The first row not handed to ``write``: where the end of the run takes over."""
        return self._next_row

    @property
    def closed(self) -> bool:
        """Whether the output stopped taking batches (the rest is written at the end)."""
        return self._closed

    def admit(self, rows: int, *, sent_whole: bool) -> bool:
        """Whether the output takes the next batch, of ``rows`` rows, all of them sent in this
        run when ``sent_whole``. Once it says no, it says no for the rest of the run."""
        if not sent_whole or self._waiting_rows + rows > self.max_waiting_rows:
            self._closed = True
        return not self._closed

    def add(self, batch: pa.RecordBatch, track: Track) -> None:
        """Register the input's next batch and its track, which then collects the results."""
        if self._closed:
            raise RuntimeError("the output takes no more batches")
        track.results = []
        waiting = Waiting(start=track.start, batch=batch)
        self._queue.append(waiting)
        self._by_start[track.start] = waiting
        self._waiting_rows += batch.num_rows

    def finish(self, tracks: Sequence[Track]) -> None:
        """The batches of ``tracks`` have every result durable."""
        for track in tracks:
            waiting = self._by_start.pop(track.start, None)
            if waiting is None or track.results is None:
                continue
            waiting.results = sorted(track.results, key=lambda result: result.row)
            track.results = None
            self._wake.set()

    def end(self) -> None:
        """No more results will come: :meth:`run` returns once the done batches are written."""
        self._ended = True
        self._wake.set()

    async def run(self, write: Callable[[list[Waiting]], None]) -> None:
        """Hand the done batches at the head to ``write`` (in a worker thread) until
        :meth:`end`."""
        while True:
            ready: list[Waiting] = []
            while self._queue and self._queue[0].results is not None:
                ready.append(self._queue.popleft())
            if ready:
                await anyio.to_thread.run_sync(write, ready)
                self._waiting_rows -= sum(waiting.batch.num_rows for waiting in ready)
                last = ready[-1]
                self._next_row = last.start + last.batch.num_rows
                continue
            if self._ended:
                return
            await self._wake.wait()
            self._wake = anyio.Event()
