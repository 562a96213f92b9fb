"""The output in input order, written while the run goes on.

The producer registers each input batch, in order, as it reaches it. A batch whose rows are
all sent in this run keeps its results in memory as they become durable; once the last one
is durable, and every batch before it is written, it is written too: without reading the
journal back or planning its rows again (about 20 µs a row). So when the last answer
arrives, the output is all but written.

Memory stays bounded, and the run never waits for the output: at most ``max_waiting_rows``
registered rows, holding at most ``max_waiting_bytes`` of input columns and answer text, wait
to be written. The output stops taking batches for the rest of the run when one would pass
those limits (a row of an early batch retrying for minutes), or when a
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

from pipeline.results import RowResult
from pipeline.state.resume import Track

MAX_WAITING_ROWS = 65_536
"""Registered rows that may wait to be written: 32 input batches of 2,048."""
MAX_WAITING_BYTES = 256 * 2**20
"""What they may hold: their input columns (Arrow buffers) and answers (text)."""


@dataclass(slots=True)
class Waiting:
    """A registered input batch on its way to the output."""

    start: int
    batch: pa.RecordBatch
    """The input batch: the planner's columns and the kept ones."""
    results: list[RowResult] | None = None
    """Its results in row order, once every one is durable."""
    nbytes: int = 0
    """What it holds: the batch's buffers, then its answers' text too."""


class OrderedOutput:
    """Registered batches, written in order as they are done."""

    def __init__(
        self, max_waiting_rows: int = MAX_WAITING_ROWS, max_waiting_bytes: int = MAX_WAITING_BYTES
    ) -> None:
        self.max_waiting_rows = max_waiting_rows
        self.max_waiting_bytes = max_waiting_bytes
        self._queue: deque[Waiting] = deque()
        self._by_start: dict[int, Waiting] = {}
        self._waiting_rows = 0
        self._waiting_bytes = 0
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

    def admit(self, batch: pa.RecordBatch, *, sent_whole: bool) -> bool:
        """Whether the output takes ``batch``, the input's next, whose rows are all sent in
        this run when ``sent_whole``. Once it says no, it says no for the rest of the run."""
        if (
            not sent_whole
            or self._waiting_rows + batch.num_rows > self.max_waiting_rows
            or self._waiting_bytes + batch.get_total_buffer_size() > self.max_waiting_bytes
        ):
            self._closed = True
        return not self._closed

    def add(self, batch: pa.RecordBatch, track: Track) -> None:
        """Register the input's next batch and its track, which then collects the results."""
        if self._closed:
            raise RuntimeError("the output takes no more batches")
        track.results = []
        waiting = Waiting(start=track.start, batch=batch, nbytes=batch.get_total_buffer_size())
        self._queue.append(waiting)
        self._by_start[track.start] = waiting
        self._waiting_rows += batch.num_rows
        self._waiting_bytes += waiting.nbytes

    def finish(self, tracks: Sequence[Track]) -> None:
        """The batches of ``tracks`` have every result durable."""
        for track in tracks:
            waiting = self._by_start.pop(track.start, None)
            if waiting is None or track.results is None:
                continue
            waiting.results = sorted(track.results, key=lambda result: result.row)
            track.results = None
            answers = sum(_text_size(result) for result in waiting.results)
            waiting.nbytes += answers
            self._waiting_bytes += answers
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
                self._waiting_bytes -= sum(waiting.nbytes for waiting in ready)
                last = ready[-1]
                self._next_row = last.start + last.batch.num_rows
                continue
            if self._ended:
                return
            await self._wake.wait()
            self._wake = anyio.Event()


def _text_size(result: RowResult) -> int:
    """About what a result's text holds in memory (its answer, reasoning and error)."""
    return len(result.response or "") + len(result.reasoning or "") + len(result.error or "")
