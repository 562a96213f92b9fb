"""The "about to send" records: written before each request goes out, synced soon after.

A worker calls :meth:`IntentLog.record` right before it sends a request. The intent is
appended with a single ``write()`` to its bucket's file in ``sent/`` (opened once with
``O_APPEND`` and kept open), so it is in the operating system's hands before the request
leaves: a crash, a SIGKILL or Ctrl-C of this process cannot lose it, and the next run finds
every request that was in flight. The :meth:`IntentLog.run` task fsyncs the files written
since its last pass, in groups, so that a power cut loses at most the last fraction of a
second of intents: the same window as the results' group commit.

Why not wait for the fsync before sending: at 256 requests in flight, a thread hop per
group commit put 40-60 ms of waiting in front of every request (bench/throughput.py
scenario (a)), a sixth of the time a request takes and a cap on throughput.
"""

from __future__ import annotations

import os

import anyio
import anyio.to_thread

from pipeline.errors import StateError
from pipeline.state.journal import Intent, Journal, bucket_of

SYNC_INTERVAL_S = 0.05
"""How long written intents may wait for their fsync, at most (plus the fsync itself)."""


class IntentLog:
    def __init__(self, journal: Journal) -> None:
        self._journal = journal
        self._files: dict[int, int] = {}
        """Open file descriptors by bucket."""
        self._dirty: set[int] = set()
        self._syncing: set[int] = set()
        """Descriptors a worker thread is syncing now: closed only after it is done."""
        self._retired: list[int] = []
        self._wake = anyio.Event()
        self._closed = False
        self.written = 0

    def record(self, intent: Intent) -> None:
        """Write ``intent`` to the operating system; it is fsynced shortly after."""
        bucket = bucket_of(intent.row)
        descriptor = self._files.get(bucket)
        if descriptor is None:
            descriptor = self._open(bucket)
        data = (intent.to_json() + "\n").encode()
        try:
            os.write(descriptor, data)
        except OSError as exc:
            raise self._error(bucket, exc) from None
        self.written += 1
        self._dirty.add(descriptor)
        self._wake.set()

    def _open(self, bucket: int) -> int:
        """Open a bucket's file for appending; a torn tail left by a crash is closed off."""
        try:
            descriptor = os.open(
                self._journal.intents_path(bucket), os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644
            )
            size = os.fstat(descriptor).st_size
            if size and os.pread(descriptor, 1, size - 1) != b"\n":
                os.write(descriptor, b"\n")  # the torn line stays a damaged line of its own
        except OSError as exc:
            raise self._error(bucket, exc) from None
        self._files[bucket] = descriptor
        # Rows arrive in input order, give or take the requests in flight: a bucket two
        # behind the newest is finished, so its file is synced and closed.
        for old in [b for b in self._files if b < bucket - 1]:
            self._retire(old)
        return descriptor

    def _retire(self, bucket: int) -> None:
        descriptor = self._files.pop(bucket)
        if descriptor in self._dirty:
            self._dirty.discard(descriptor)
            self._sync([descriptor])
        if descriptor in self._syncing:
            self._retired.append(descriptor)
        else:
            os.close(descriptor)

    def _error(self, bucket: int, exc: OSError) -> StateError:
        path = self._journal.intents_path(bucket)
        return StateError(
            f"cannot write {path} ({exc.strerror or exc}). Every row finished so far is kept: "
            "free disk space or fix the folder's permissions, then run the job again to resume."
        )

    def _sync(self, descriptors: list[int]) -> None:
        for descriptor in descriptors:
            try:
                os.fsync(descriptor)
            except OSError as exc:
                raise StateError(
                    f"cannot sync {self._journal.sent_dir} ({exc.strerror or exc}); run the job "
                    "again to resume."
                ) from None

    def close(self) -> None:
        """Let :meth:`run` return once everything recorded so far is synced."""
        self._closed = True
        self._wake.set()

    async def run(self) -> None:
        """Fsync what was written, in groups, until :meth:`close`; then close the files."""
        try:
            while True:
                await self._wake.wait()
                self._wake = anyio.Event()
                if self._dirty:
                    group, self._dirty = list(self._dirty), set()
                    self._syncing.update(group)
                    try:
                        await anyio.to_thread.run_sync(self._sync, group)
                    finally:
                        self._syncing.clear()
                        for descriptor in self._retired:
                            os.close(descriptor)
                        self._retired.clear()
                if self._closed and not self._dirty:
                    return
                await anyio.sleep(SYNC_INTERVAL_S)
        finally:
            with anyio.CancelScope(shield=True):
                for bucket in list(self._files):
                    self._retire(bucket)
