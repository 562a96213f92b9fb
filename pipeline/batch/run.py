"""A run in provider batch mode (``[request] mode = "batch"``): submit, wait, collect, output.

::

    re-attach: finish the upload/create steps a killed run left (found at the provider first)
    submit:    rows without a result that no open batch holds -> batch files within the
               limits -> reserve, write, intent, upload, create  (pipeline.batch.submit)
    wait:      look at the open batches with backoff; collect the ended ones into the
               journal, priced at the batch price  (pipeline.batch.collect)
    again:     rows of batches that expired or failed are submitted again (up to
               MAX_ROUNDS rounds), or left for an online run (--fallback online)
    output:    once every row has a result, the output Parquet, written as an online run
               writes it (pipeline.engine.writer)

The run holds the job's lock and records its start and end, like an online run. ``detach``
returns once the batches are submitted; a later run (or ``pipeline status --watch``)
collects them. Nothing here ever cancels a provider batch: an interrupted wait leaves them
running (``pipeline cancel`` cancels them).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import anyio.to_thread
import httpx

from pipeline.batch.client import BatchClient
from pipeline.batch.collect import Collector
from pipeline.batch.submit import Session, Submitter
from pipeline.engine.context import JobContext
from pipeline.engine.stats import RunStats
from pipeline.engine.writer import ResultWriter
from pipeline.errors import JobFileError, StateError
from pipeline.io.sinks import OutputWriter, output_location
from pipeline.io.sources import InputScan
from pipeline.job.spec import JobSpec
from pipeline.money.batch import batch_discount, batch_price
from pipeline.money.budget import Budget
from pipeline.state.batches import BatchBook
from pipeline.state.runs import COMPLETED, FAILED, INTERRUPTED

MAX_ROUNDS = 3
"""Times the rows of expired or failed batches are submitted again within one run."""


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchOptions:
    fresh: bool = False
    retry_failed: bool = False
    detach: bool = False
    """Submit and return; a later run collects."""
    submit: bool = True
    """False: only collect what open batches bring (``status --watch``, an online run)."""
    wait: bool = True
    """False: look at the open batches once instead of waiting for them to end."""
    fallback_online: bool = False
    """Rows of expired or failed batches are left for an online run, not resubmitted."""
    write_output: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchReport:
    job: str
    run: int
    rows: int
    ok: int
    failed: int
    pending: int
    held: int
    """Rows in open batches."""
    open_batches: int
    submitted_files: int
    submitted_rows: int
    resubmitted_rows: int
    collected_rows: int
    freed_rows: int
    """Rows of batches that ended without answering them."""
    ended: dict[str, int]
    cost_usd: Decimal | None
    """This run's collected results, at the batch price."""
    online_cost_usd: Decimal | None
    """The same tokens at the online price."""
    discount: Decimal | None
    over_budget: bool
    detached: bool
    output: str | None
    state_dir: str

    @property
    def all_ok(self) -> bool:
        return self.pending == 0 and self.failed == 0

    def to_dict(self) -> dict[str, Any]:
        found = dataclasses.asdict(self)
        for name in ("cost_usd", "online_cost_usd", "discount"):
            value = found[name]
            found[name] = None if value is None else str(value)
        return found


class BatchRun:
    """One run of a job in batch mode (see the module docstring)."""

    def __init__(
        self,
        job: JobSpec,
        *,
        api_key: str | None,
        options: BatchOptions = BatchOptions(),
        notice: Callable[[str], None] = lambda message: None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.job = job
        self.context = JobContext(job)
        self.options = options
        self.notice = notice
        self.book = BatchBook(self.context.state.folder)
        self._api_key = api_key
        self._transport = transport
        self.discount = batch_discount(job.request.base_url, job.pricing)
        price = batch_price(self.context.price, self.discount)
        self.pricing = dataclasses.replace(self.context.pricing, price=price)

    def prepare(self) -> InputScan:
        scan = self.context.scan()
        self.context.check_before_sending(write_output=self.options.write_output)
        return scan

    async def run(self, scan: InputScan) -> BatchReport:
        state = self.context.state
        state.acquire()
        how, summary = FAILED, {}
        try:
            self.context.journal.open(fresh=self.options.fresh)
            if self.options.fresh:
                self.context.seals.clear()
                self.book.clear()
            run = state.begin_run(None, fresh=self.options.fresh)
            try:
                report = await self._run(scan, run)
                how = COMPLETED
                summary = {
                    "mode": "batch",
                    "cost_usd": None if report.cost_usd is None else str(report.cost_usd),
                    "unanswered": 0,
                    "batches_submitted": report.submitted_files,
                    "rows_collected": report.collected_rows,
                }
            except (KeyboardInterrupt, anyio.get_cancelled_exc_class()):
                how = INTERRUPTED
                raise
            finally:
                state.end_run(run, how, summary)
        finally:
            state.release()
        return report

    def _budget(self, run: int) -> Budget | None:
        cap = self.job.budget.max_cost_usd
        if cap is None:
            return None
        self.context.check_priced()
        spent = self.context.state.spent_usd(before=run)
        if spent is None:
            raise StateError(
                f"the spend of earlier runs in {self.context.state.folder} is unknown (they "
                "ran without a price), so the budget cannot be enforced; run with --fresh."
            )
        return Budget(cap=cap, spent=spent)

    async def _run(self, scan: InputScan, run: int) -> BatchReport:
        options = self.options
        job = self.job
        async with BatchClient(
            job.request.base_url, api_key=self._api_key, transport=self._transport
        ) as client:
            session = Session(
                context=self.context,
                book=self.book,
                client=client,
                run=run,
                pricing=self.pricing,
                budget=self._budget(run),
                notice=self.notice,
            )
            opened = self.book.open_entries()
            if (options.submit or opened) and not await client.has_batch_api():
                raise JobFileError(
                    job.source,
                    "[request] mode",
                    f'is "batch", but {job.request.base_url} has no Batch API (404 on '
                    "/batches); nothing was submitted.",
                    'Set mode = "online" (or run with --mode online).',
                )
            for entry in opened:  # open batches of earlier runs hold their worst case
                if session.budget is not None and entry.worst_usd is not None:
                    session.budget.reserved += entry.worst_usd
                    session.reserved[entry.id] = entry.worst_usd
            submitter = Submitter(session)
            collector = Collector(session, self.context.pricing.now())
            resubmitted = 0
            for round_number in range(MAX_ROUNDS + 1):
                for entry in self.book.open_entries():
                    if entry.batch_id is None:
                        await submitter.advance(entry)
                if options.submit:
                    before = session.submitted_rows
                    await submitter.submit(
                        scan, retry_failed=options.retry_failed and round_number == 0
                    )
                    if round_number:
                        resubmitted += session.submitted_rows - before
                if options.detach:
                    break
                freed = collector.collected.freed
                await collector.wait(once=not options.wait)
                again = collector.collected.freed > freed
                if not (options.wait and options.submit and again) or options.fallback_online:
                    break
                if session.over_budget:
                    break
        return await self._report(scan, session, collector, resubmitted)

    async def _report(
        self, scan: InputScan, session: Session, collector: Collector, resubmitted: int
    ) -> BatchReport:
        ok, failed, pending = await anyio.to_thread.run_sync(self._tally, scan)
        entries = self.book.entries()
        opened = [entry for entry in entries if not entry.closed]
        output = None
        if self.options.write_output and pending == 0 and scan.rows:
            output = await self._write_output(scan)
        collected = collector.collected
        return BatchReport(
            job=self.job.name,
            run=session.run,
            rows=scan.rows,
            ok=ok,
            failed=failed,
            pending=pending,
            held=sum(entry.requests for entry in opened),
            open_batches=len(opened),
            submitted_files=session.submitted_files,
            submitted_rows=session.submitted_rows,
            resubmitted_rows=resubmitted,
            collected_rows=collected.rows,
            freed_rows=collected.freed,
            ended=dict(Counter(collected.ended)),
            cost_usd=collected.cost_usd,
            online_cost_usd=collected.online_cost_usd,
            discount=self.discount,
            over_budget=session.over_budget,
            detached=self.options.detach,
            output=output,
            state_dir=str(self.context.state.folder),
        )

    def _tally(self, scan: InputScan) -> tuple[int, int, int]:
        ok = failed = pending = 0
        cursor = self.context.resume_cursor()
        for batch in self.context.input_batches(scan):
            batch_ok, batch_failed, batch_pending = cursor.tally(batch)
            ok, failed, pending = ok + batch_ok, failed + batch_failed, pending + batch_pending
        return ok, failed, pending

    async def _write_output(self, scan: InputScan) -> str:
        """The output Parquet, from the journal, as an online run writes it."""
        job = self.job
        sink = OutputWriter(job.output.path, job.output.schema, staging=job.state_path)
        writer = ResultWriter(
            self.context, stats=RunStats(total_rows=scan.rows), sink=sink, output=None
        )
        with sink or contextlib.nullcontext():
            await writer.write_rest(scan, hard_stop=False, partial=False)
        return str(output_location(job.output.path))
