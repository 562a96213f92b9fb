"""Submitting rows as provider batches, each step durable before the next one starts.

For each batch file: the rows' worst case is reserved from the budget, the file is written
and fsynced in the state folder, the *intent* is recorded (which rows, which file), then the
file is uploaded and its id recorded, then the batch is created and its id recorded
(:mod:`pipeline.state.batches`). :meth:`Submitter.advance` finishes whatever a killed run left
between two steps: it looks the file up by name, and the batch by its metadata, at the
provider before uploading or creating anything, so nothing is ever uploaded or created twice.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from decimal import Decimal

import anyio.to_thread

from pipeline.batch.client import BatchClient
from pipeline.batch.plan import BATCH_URLS, FileSplitter, batch_line, too_big
from pipeline.engine.accounting import Pricing
from pipeline.engine.context import JobContext
from pipeline.io.sources import InputScan
from pipeline.money.budget import Budget
from pipeline.money.pricing import ZERO_USAGE, cost
from pipeline.results import RowResult
from pipeline.rows.plan import PlannedRow
from pipeline.state.batches import BatchBook, BatchEntry, new_batch_id

CRASH_ENV = "PIPELINE_TEST_CRASH_AT"
"""For tests: the name of a step (``after_intent``, ``after_upload``, ``after_create``,
``while_polling``, ``while_downloading``) at which the process exits at once, as kill -9
would leave it."""


def crash_point(name: str) -> None:
    if os.environ.get(CRASH_ENV) == name:
        os._exit(137)


@dataclass(slots=True, kw_only=True)
class Session:
    """What submitting and collecting share during one batch run."""

    context: JobContext
    book: BatchBook
    client: BatchClient
    run: int
    pricing: Pricing
    """At the batch price."""
    budget: Budget | None
    notice: Callable[[str], None]
    reserved: dict[str, Decimal] = field(default_factory=dict)
    """Budget held by each open batch, by local id."""
    submitted_files: int = 0
    submitted_rows: int = 0
    over_budget: bool = False


class Submitter:
    def __init__(self, session: Session) -> None:
        self.s = session
        job = session.context.job
        self._url = BATCH_URLS[job.request.endpoint]
        self._window = job.batch.completion_window

    async def advance(self, entry: BatchEntry) -> BatchEntry:
        """Upload and create what the entry still lacks (finding it first, if a killed run
        did the step without recording it)."""
        s = self.s
        if entry.file_id is None:
            file_id = await s.client.find_file(entry.upload_name)
            if file_id is None:
                data = await anyio.to_thread.run_sync(s.book.read_input, entry.id)
                file_id = await s.client.upload(entry.upload_name, data)
                crash_point("after_upload")
            s.book.record("uploaded", entry.id, file_id=file_id)
            entry = replace(entry, file_id=file_id)
        if entry.batch_id is None:
            assert entry.file_id is not None
            batch_id = await s.client.find_batch(entry.id, entry.file_id)
            if batch_id is None:
                batch_id = await s.client.create(entry.file_id, self._url, self._window, entry.id)
                crash_point("after_create")
            s.book.record("created", entry.id, batch_id=batch_id)
            entry = replace(entry, batch_id=batch_id)
        return entry

    async def submit(self, scan: InputScan, *, retry_failed: bool) -> list[BatchEntry]:
        """Submit every row that has no result and that no open batch holds; unrenderable
        rows are recorded failed at once. Stops early when the budget cannot hold a file."""
        s = self.s
        job = s.context.job
        held = await anyio.to_thread.run_sync(s.book.held_keys)
        cursor = s.context.resume_cursor(retry_failed=retry_failed)
        batches = s.context.input_batches(scan)
        splitter = FileSplitter(job.batch.max_requests_per_file, job.batch.max_bytes_per_file)
        made: list[BatchEntry] = []
        while not s.over_budget:
            found = await anyio.to_thread.run_sync(cursor.next_batch, batches)
            if found is None:
                break
            failed: list[RowResult] = []
            for planned in found[0].pending:
                if planned.key in held:
                    continue
                if planned.body is None:
                    failed.append(self._failed(planned, f"not sent: {planned.failure}"))
                    continue
                line = batch_line(planned, self._url)
                if too_big(line, job.batch.max_bytes_per_file):
                    why = f"not sent: the request is over {job.batch.max_bytes_per_file:,} bytes"
                    failed.append(self._failed(planned, why))
                    continue
                full = splitter.add(planned, line)
                if full is not None:
                    made.append(await self._file(full))
                    if s.over_budget:
                        break
            if failed:
                await anyio.to_thread.run_sync(s.context.journal.append_results, failed)
        if splitter.rows and not s.over_budget:
            made.append(await self._file(splitter.take()))
        return [entry for entry in made if entry.requests]

    def _failed(self, planned: PlannedRow, error: str) -> RowResult:
        return RowResult(
            key=planned.key,
            row=planned.row,
            status="failed",
            cost_usd=cost(ZERO_USAGE, self.s.pricing.price),
            error=error,
            run=self.s.run,
        )

    async def _file(self, rows: list[PlannedRow]) -> BatchEntry:
        """Reserve, write, record the intent, upload, create: one batch file."""
        s = self.s
        worst: Decimal | None = Decimal(0)
        for planned in rows:
            one = s.pricing.worst_cost_of(planned.body or b"", planned.prompt_tokens or 0)
            worst = None if worst is None or one is None else worst + one
        if s.budget is not None and (worst is None or s.budget.reserve(worst) != "reserved"):
            s.over_budget = True
            return _empty()
        ident = new_batch_id()
        lines = [batch_line(planned, self._url) for planned in rows]
        await anyio.to_thread.run_sync(s.book.write_input, ident, lines)
        entry = BatchEntry(
            id=ident,
            requests=len(rows),
            bytes=sum(len(line) for line in lines),
            first_row=rows[0].row,
            last_row=rows[-1].row,
            worst_usd=worst,
            run=s.run,
        )
        s.book.record(
            "intent",
            ident,
            requests=entry.requests,
            bytes=entry.bytes,
            first_row=entry.first_row,
            last_row=entry.last_row,
            worst_usd=None if worst is None else str(worst),
            run=s.run,
        )
        if worst is not None:
            s.reserved[ident] = worst
        crash_point("after_intent")
        s.submitted_files += 1
        s.submitted_rows += len(rows)
        return await self.advance(entry)


def _empty() -> BatchEntry:
    return BatchEntry(id="", requests=0, bytes=0, first_row=0, last_row=0, worst_usd=None, run=0)
