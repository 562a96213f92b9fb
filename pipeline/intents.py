"""Group commit of "about to send" records: many workers, one fsync per group.

A worker calls :meth:`IntentLog.record` before sending a request and waits until the record
is durable; the :meth:`IntentLog.run` task writes whatever has accumulated in one append and
one fsync, then wakes every worker of that group. At hundreds of requests in flight this
costs one fsync per group, not one per request.
"""

from __future__ import annotations

import anyio
import anyio.to_thread

from pipeline.journal import Intent, Journal


class IntentLog:
    def __init__(self, journal: Journal) -> None:
        self._journal = journal
        self._pending: list[Intent] = []
        self._group_done = anyio.Event()
        self._wake = anyio.Event()
        self._closed = False
        self.written = 0

    async def record(self, intent: Intent) -> None:
        """Return once ``intent`` is on disk."""
        self._pending.append(intent)
        done = self._group_done
        self._wake.set()
        await done.wait()

    def close(self) -> None:
        """Let :meth:`run` return once everything recorded so far is written."""
        self._closed = True
        self._wake.set()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            if self._pending:
                group, done = self._pending, self._group_done
                self._pending, self._group_done = [], anyio.Event()
                await anyio.to_thread.run_sync(self._journal.append_intents, group)
                self.written += len(group)
                done.set()
            elif self._closed:
                return
            if self._pending or self._closed:
                self._wake.set()
