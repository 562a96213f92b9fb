"""The rows waiting for a worker: the producer adds them, the workers take them one by one.

An anyio memory stream of ``max_in_flight`` rows did this before, and cost a task step per
row: the producer plans faster than requests finish, so the stream was always full, and every
row a worker took woke the waiting producer for that one row (an event, a task step and two
refused sends each time: some 3% of a run's CPU at 256 in flight, bench/throughput.py (t)).
Here the producer, once ``size`` rows wait, sleeps until half of them are taken, then adds
the next half in one step. The bound on what waits is the stream's: ``size`` rows.
"""

from __future__ import annotations

from collections import deque

import anyio
import anyio.lowlevel

from pipeline.rows.plan import PlannedRow


class WorkQueue:
    """Planned rows on their way from the producer (:meth:`put`, :meth:`close`) to the
    workers (:meth:`take`); touched only from the event loop's tasks."""

    def __init__(self, size: int) -> None:
        self._rows: deque[PlannedRow] = deque()
        self._size = max(1, size)
        self._refill_at = self._size // 2
        """The producer is woken once no more than this many rows wait."""
        self._room: anyio.Event | None = None
        """Set when the producer, waiting for room, may add rows again."""
        self._more: anyio.Event | None = None
        """Set when workers waiting for a row may look again (a row came, or the end)."""
        self._closed = False

    async def put(self, planned: PlannedRow) -> None:
        """Add a row for the workers; waits while ``size`` rows wait, until half of them are
        taken. No check for a cancellation when there is room (a stream's ``send()`` makes
        one): a cancelled producer adds at most ``size`` rows before its next wait or input
        read raises, and no worker takes them (:meth:`take` checks)."""
        while len(self._rows) >= self._size:
            self._room = anyio.Event()
            await self._room.wait()
        self._rows.append(planned)
        self._wake_workers()

    def close(self) -> None:
        """No more rows will come: workers return once every row is taken."""
        self._closed = True
        self._wake_workers()

    async def __aenter__(self) -> WorkQueue:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """The producer is done, however it ended: :meth:`close`."""
        self.close()

    async def take(self) -> PlannedRow | None:
        """The next row, or None once the producer is done and every row is taken.

        A waiting row is taken without a yield to the event loop, but with a check for a
        cancellation (a cancelled run starts no request); with none waiting, the worker
        sleeps until one comes."""
        rows = self._rows
        while not rows:
            if self._closed:
                return None
            if self._more is None:
                self._more = anyio.Event()
            await self._more.wait()
        planned = rows.popleft()
        if self._room is not None and len(rows) <= self._refill_at:
            self._room.set()
            self._room = None
        await anyio.lowlevel.checkpoint_if_cancelled()
        return planned

    def _wake_workers(self) -> None:
        if self._more is not None:
            self._more.set()
            self._more = None
