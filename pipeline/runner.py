"""Orchestration of one run: one anyio task group, bounded streams, one network seam.

::

    producer ──work (bounded)──▶ workers (max_in_flight) ──results (bounded)──▶ writer
       │ reads input batches,        send, classify, back off        group commit to the
       │ plans requests, skips       and retry; one result per       journal, then counts
       └ rows already in the journal row                              └ for the live display

When every row has a result, the output file is assembled from the journal in input order.
A 401/403 stops the whole job at once. Memory is bounded by the batch size and the stream
sizes, never by the number of rows.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.to_thread
import httpx
import pyarrow as pa
from anyio.abc import ObjectReceiveStream, ObjectSendStream
from anyio.streams.memory import MemoryObjectReceiveStream

from pipeline import retry
from pipeline.client import Attempt, ChatClient
from pipeline.errors import AuthError, JobFileError, StateError
from pipeline.jobspec import JobSpec
from pipeline.journal import Journal, bucket_of
from pipeline.plan import PlannedRow, Planner
from pipeline.pricing import ZERO_USAGE, Price, Usage, cost, resolve_price
from pipeline.records import RowResult
from pipeline.redact import redact
from pipeline.sinks import RESULT_COLUMNS, OutputWriter
from pipeline.sources import InputScan, iter_batches, resolve_input, scan_input
from pipeline.stats import RunStats, Snapshot
from pipeline.templating import RequestTemplate

RESULT_BATCH = 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class RunOptions:
    fresh: bool = False
    """Forget earlier results and start over."""
    retry_failed: bool = False
    """Send rows again whose earlier result is ``failed``."""
    batch_rows: int = 2048
    tick_s: float = 0.5
    """How often the live display is refreshed."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RunReport:
    job: str
    output: Path
    final: Snapshot
    price_known: bool

    @property
    def all_ok(self) -> bool:
        return self.final.failed == 0 and self.final.resumed_failed == 0


class Reporter:
    """Receives the run's figures; the default does nothing (see :mod:`pipeline.progress`)."""

    def start(self, job: JobSpec, scan: InputScan) -> None:
        """Called once the input is scanned, before any request."""

    def update(self, snapshot: Snapshot) -> None:
        """Called every ``tick_s`` while the run goes on."""

    def finish(self, report: RunReport) -> None:
        """Called after the output is written."""

    def close(self) -> None:
        """Called last, whatever happened."""


def check_columns(job: JobSpec, scan: InputScan, template: RequestTemplate) -> None:
    """Every column the job names must exist in the input."""

    def missing(column: str, key: str, what: str) -> JobFileError:
        shown = ", ".join(sorted(scan.columns)[:30]) or "none"
        return JobFileError(
            job.source,
            key,
            f"{what} {column!r}, which the input lacks (its columns: {shown}).",
            "Fix the name or the input.",
        )

    key = "[request] messages_column" if job.request.messages_column else "[request] prompt"
    what = "names the column" if job.request.messages_column else "has a placeholder for column"
    for column in template.columns:
        if column not in scan.columns:
            raise missing(column, key, what)
    for column in job.output.keep_columns:
        if column not in scan.columns:
            raise missing(column, "[output] keep_columns", "names the column")
        if column == "id" or column in RESULT_COLUMNS:
            raise JobFileError(
                job.source,
                "[output] keep_columns",
                f"{column!r} would clash with the output column of the same name.",
                "Rename that input column or do not keep it.",
            )


class Runner:
    """Runs one job to completion (or to a stop)."""

    def __init__(
        self,
        job: JobSpec,
        *,
        api_key: str | None,
        options: RunOptions = RunOptions(),
        reporter: Reporter | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.job = job
        self._api_key = api_key
        self.options = options
        self.reporter = reporter or Reporter()
        self._transport = transport
        self._rng = rng or random.Random()
        self._clock = clock
        self.template = RequestTemplate(
            model=job.request.model,
            system=job.request.system,
            prompt=job.request.prompt,
            messages_column=job.request.messages_column,
            params=job.request.params,
        )
        self.url = f"{job.request.base_url}/{job.request.endpoint}"
        self.planner = Planner(template=self.template, url=self.url, id_column=job.input.id_column)
        self.price: Price | None = resolve_price(
            job.request.base_url, job.request.model, job.pricing
        )
        self.policy = retry.RetryPolicy(
            max_attempts=job.limits.max_attempts,
            max_wait_s=job.limits.max_retry_wait_s,
            deadline_s=job.limits.row_deadline_s,
        )
        self.journal = Journal(job.output.state_path)
        self._fatal: AuthError | None = None

    # -- preparation --------------------------------------------------------------------

    def prepare(self) -> InputScan:
        """Validate the job against its input; nothing is sent. Raises on any mistake."""
        files = resolve_input(self.job.input.path, self.job.source)
        scan = scan_input(
            files,
            id_column=self.job.input.id_column,
            limit=self.job.input.limit,
            job_source=self.job.source,
        )
        check_columns(self.job, scan, self.template)
        return scan

    def _input_batches(
        self, scan: InputScan, extra: tuple[str, ...] = ()
    ) -> Iterator[pa.RecordBatch]:
        columns = [*self.planner.columns, *extra]
        return iter_batches(
            scan.files, columns, limit=self.job.input.limit, batch_rows=self.options.batch_rows
        )

    # -- the run ------------------------------------------------------------------------

    async def run(self, scan: InputScan) -> RunReport:
        self.journal.open(fresh=self.options.fresh)
        stats = RunStats(total_rows=scan.rows, clock=self._clock)
        self.reporter.start(self.job, scan)
        size = self.job.limits.max_in_flight
        work_send, work_recv = anyio.create_memory_object_stream[PlannedRow](size)
        result_send, result_recv = anyio.create_memory_object_stream[RowResult](size)
        client = ChatClient(
            self.url,
            api_key=self._api_key,
            timeout_s=self.job.limits.timeout_s,
            max_connections=size,
            transport=self._transport,
        )
        async with client, anyio.create_task_group() as outer:
            outer.start_soon(self._tick, stats)
            async with anyio.create_task_group() as tg:
                self._cancel = tg.cancel_scope.cancel
                tg.start_soon(self._produce, scan, stats, work_send, result_send.clone())
                for _ in range(size):
                    tg.start_soon(self._work, client, stats, work_recv.clone(), result_send.clone())
                work_recv.close()
                result_send.close()
                tg.start_soon(self._write, stats, result_recv)
            outer.cancel_scope.cancel()
        if self._fatal is not None:
            raise self._fatal
        await anyio.to_thread.run_sync(self._assemble, scan)
        report = RunReport(
            job=self.job.name,
            output=Path(self.job.output.path),
            final=stats.snapshot(),
            price_known=self.price is not None,
        )
        self.reporter.finish(report)
        return report

    async def _tick(self, stats: RunStats) -> None:
        while True:
            self.reporter.update(stats.snapshot())
            await anyio.sleep(self.options.tick_s)

    async def _produce(
        self,
        scan: InputScan,
        stats: RunStats,
        work: ObjectSendStream[PlannedRow],
        results: ObjectSendStream[RowResult],
    ) -> None:
        async with work, results:
            batches = self._input_batches(scan)
            start = 0
            bucket = -1
            earlier: dict[str, RowResult] = {}
            while True:
                batch = await anyio.to_thread.run_sync(next, batches, None)
                if batch is None:
                    return
                for planned in self.planner.plan(batch, start):
                    if bucket_of(planned.row) != bucket:
                        bucket = bucket_of(planned.row)
                        earlier = await anyio.to_thread.run_sync(self.journal.read_bucket, bucket)
                    previous = earlier.get(planned.key)
                    if previous is not None and (
                        previous.status == "ok" or not self.options.retry_failed
                    ):
                        stats.add_resumed(previous)
                        continue
                    if planned.failure is not None:
                        await results.send(self._unrenderable(planned))
                    else:
                        await work.send(planned)
                start += batch.num_rows

    def _unrenderable(self, planned: PlannedRow) -> RowResult:
        return RowResult(
            key=planned.key,
            row=planned.row,
            status="failed",
            cost_usd=cost(ZERO_USAGE, self.price),
            error=f"not sent: {planned.failure}",
        )

    async def _work(
        self,
        client: ChatClient,
        stats: RunStats,
        work: ObjectReceiveStream[PlannedRow],
        results: ObjectSendStream[RowResult],
    ) -> None:
        async with work, results:
            async for planned in work:
                result = await self._send_row(client, stats, planned)
                if result is None:
                    return
                await results.send(result)

    async def _send_row(
        self, client: ChatClient, stats: RunStats, planned: PlannedRow
    ) -> RowResult | None:
        assert planned.body is not None
        usage = ZERO_USAGE
        started = self._clock()
        attempts = 0
        while True:
            attempts += 1
            stats.requests += 1
            stats.in_flight += 1
            try:
                attempt = await client.send(planned.body)
            finally:
                stats.in_flight -= 1
            if attempt.usage is not None:
                usage = usage + attempt.usage
            if attempt.ok:
                return self._result(
                    planned=planned, attempt=attempt, usage=usage, attempts=attempts, error=None
                )
            assert attempt.failure is not None
            if attempt.failure is retry.Failure.RATE_LIMITED:
                stats.rate_limited += 1
            detail = redact(attempt.error or attempt.failure.value, self._api_key)
            decision = retry.decide(
                attempt.failure,
                attempt=attempts,
                elapsed_s=self._clock() - started,
                retry_after_s=attempt.retry_after_s,
                policy=self.policy,
                rng=self._rng,
                detail=detail,
            )
            if isinstance(decision, retry.StopJob):
                self._stop_for_auth(decision.reason)
                return None
            if isinstance(decision, retry.GiveUp):
                return self._result(
                    planned=planned,
                    attempt=attempt,
                    usage=usage,
                    attempts=attempts,
                    error=decision.reason,
                )
            stats.retries += 1
            await anyio.sleep(decision.after_s)

    def _result(
        self,
        *,
        planned: PlannedRow,
        attempt: Attempt,
        usage: Usage,
        attempts: int,
        error: str | None,
    ) -> RowResult:
        reply = attempt.reply
        return RowResult(
            key=planned.key,
            row=planned.row,
            status="ok" if error is None else "failed",
            response=reply.content if reply else None,
            reasoning=reply.reasoning if reply else None,
            finish_reason=reply.finish_reason if reply else None,
            usage=usage,
            cost_usd=cost(usage, self.price),
            attempts=attempts,
            latency_ms=round(attempt.latency_s * 1000),
            error=error,
            model=(reply.model if reply else None) or self.job.request.model,
        )

    def _stop_for_auth(self, reason: str) -> None:
        if self._fatal is None:
            variable = self.job.request.api_key_env
            where = f"the key in ${variable}" if variable else "the request (no API key was set)"
            self._fatal = AuthError(
                f"the provider at {self.job.request.base_url} refused {where}: {reason}. "
                "The job stopped; no further requests were sent. Fix the key and run the job "
                "again: finished rows are kept."
            )
        self._cancel()

    async def _write(self, stats: RunStats, results: MemoryObjectReceiveStream[RowResult]) -> None:
        async with results:
            while True:
                try:
                    batch = [await results.receive()]
                except anyio.EndOfStream:
                    return
                while len(batch) < RESULT_BATCH:
                    try:
                        batch.append(results.receive_nowait())
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                await anyio.to_thread.run_sync(self.journal.append, batch)
                for result in batch:
                    stats.add_result(result)

    # -- the output ---------------------------------------------------------------------

    def _assemble(self, scan: InputScan) -> None:
        """Write the output in input order from the journal (runs in a worker thread)."""
        keep = self.job.output.keep_columns
        id_column = self.job.input.id_column
        start = 0
        bucket = -1
        results: dict[str, RowResult] = {}
        with OutputWriter(Path(self.job.output.path)) as writer:
            for batch in self._input_batches(scan, keep):
                ordered: list[RowResult] = []
                for planned in self.planner.plan(batch, start):
                    if bucket_of(planned.row) != bucket:
                        bucket = bucket_of(planned.row)
                        results = self.journal.read_bucket(bucket)
                    found = results.get(planned.key)
                    if found is None:
                        raise StateError(
                            f"row {planned.row} has no result in {self.journal.folder}; "
                            "run the job again to finish it."
                        )
                    ordered.append(found)
                names = batch.schema.names
                if id_column is not None:
                    ids = batch.column(names.index(id_column))
                else:
                    ids = pa.array(range(start, start + batch.num_rows), type=pa.int64())
                kept = [(c, batch.column(names.index(c))) for c in keep]
                writer.write(ids, kept, ordered)
                start += batch.num_rows
