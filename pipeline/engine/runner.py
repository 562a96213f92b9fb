"""Orchestration of one run: one anyio task group, bounded streams, one network seam.

::

    producer ──work (bounded)──▶ workers (max_in_flight) ──results (bounded)──▶ writer
       │ reads input batches,      record the intent, send,        group commit to the
       │ plans requests, skips     classify, back off, retry;      results journal, seals,
       └ rows already finished     one result per row              └ counts for the display
         (this module)             (:mod:`~pipeline.engine.sender`)    │ finished batches
                                                                       ▼
                                                    the output, written in input order as the
                                                    run goes (:mod:`~pipeline.engine.writer`)

The parts: :class:`~pipeline.engine.context.JobContext` (the job, its planner, price and state
folder), :class:`~pipeline.engine.accounting.Accounts` (budget, limiter, billing and figures
of every attempt), :class:`~pipeline.engine.control.RunControl` (stops, aborts, signals).
This module wires them into one task group and keeps the run's records.

Before a request is sent, its intent is written (and fsynced in groups soon after, see
:class:`~pipeline.state.intents.IntentLog`); after it finishes, its result is made durable. A run
holds the job's lock, records its start and end in the state folder, and reports the
requests the previous run left in flight. The first SIGINT/SIGTERM stops new requests, waits up to
``grace_s`` for those in flight, writes the finished rows and exits 130; a second one stops at
once. A 401/403 stops the whole job. Memory is bounded by the batch size and the stream
sizes, never by the number of rows.
"""

from __future__ import annotations

import contextlib
import functools
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import anyio.to_thread
from anyio.streams.memory import MemoryObjectSendStream

from pipeline.engine.accounting import Accounts
from pipeline.engine.context import JobContext
from pipeline.engine.control import RunControl
from pipeline.engine.handoff import WorkQueue
from pipeline.engine.report import Reporter, RunReport
from pipeline.engine.sender import RowSender, answer_rules, retry_policy
from pipeline.engine.shared import SharedLimits, forget_cluster_runs, refuse_after_cluster
from pipeline.engine.stats import RunStats
from pipeline.engine.summary import run_summary, write_summary
from pipeline.engine.writer import ResultWriter
from pipeline.errors import PipelineError, StateError
from pipeline.io.ordered import MAX_WAITING_ROWS, OrderedOutput
from pipeline.io.sinks import OutputWriter, output_location
from pipeline.io.sources import InputScan
from pipeline.job.spec import JobSpec
from pipeline.money.budget import Budget
from pipeline.provider.client import ChatClient
from pipeline.provider.limiter import Limiter
from pipeline.provider.limits import LimiterConfig, start_from
from pipeline.results import RowResult
from pipeline.rows.plan import PlannedRow
from pipeline.state.intents import IntentLog
from pipeline.state.runs import FAILED, Unanswered
from pipeline.state.timeline import Timeline

if TYPE_CHECKING:
    import httpx


@dataclass(frozen=True, slots=True, kw_only=True)
class RunOptions:
    fresh: bool = False
    """Forget earlier results and start over."""
    retry_failed: bool = False
    """Send rows again whose earlier result is ``failed``."""
    batch_rows: int = 2048
    tick_s: float = 0.5
    """How often the live display is refreshed."""
    handle_signals: bool = False
    """Stop gracefully on SIGINT/SIGTERM (the CLI sets this; it needs the main thread)."""
    grace_s: float = 30.0
    """After a stop, how long to wait for requests in flight."""
    select_rows: frozenset[int] | None = None
    """Send only these input rows (a calibration sample); the others are left alone."""
    write_output: bool = True
    """Write the output Parquet (a sample run does not)."""
    output_waiting_rows: int = MAX_WAITING_ROWS
    """Rows that may wait in memory for an earlier batch's rows before the output is written
    (see :mod:`pipeline.io.ordered`)."""


def describe_unanswered(unanswered: Unanswered) -> str:
    worst = unanswered.worst_cost_usd
    money = "unknown" if worst is None else f"${worst:.6f}"
    return (
        f"run {unanswered.run} stopped with {unanswered.count:,} request(s) in flight: the "
        f"provider may have billed them, and they are sent again now (worst case {money})."
    )


def _pipeline_error(group: BaseExceptionGroup[BaseException]) -> PipelineError | None:
    """The first :class:`PipelineError` inside a (nested) exception group."""
    for exc in group.exceptions:
        if isinstance(exc, PipelineError):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            found = _pipeline_error(exc)
            if found is not None:
                return found
    return None


async def _hand_on(work: WorkQueue, planned: PlannedRow, *, first: bool) -> bool:
    """Give ``planned`` to the workers; after the run's first row, yield once, so that its
    request goes out (on the connection opened while the first batch was planned) before the
    other workers start. False."""
    await work.put(planned)
    if first:
        await anyio.lowlevel.checkpoint()
    return False


def _limiter(
    job: JobSpec, *, clock: Callable[[], float], rng: random.Random, shared: SharedLimits | None
) -> Limiter:
    """The run's own limiter for the job's ``[limits]``, or the cluster's (``shared``)."""
    limits = job.limits
    config = LimiterConfig(
        max_in_flight=limits.max_in_flight,
        requests_per_minute=limits.requests_per_minute,
        tokens_per_minute=limits.tokens_per_minute,
    )
    if shared is not None:
        return shared.limiter(config)
    return Limiter(config, clock=clock, rng=rng)


class Runner:
    """Runs one job to completion (or to a stop); one run per runner."""

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
        shared: SharedLimits | None = None,
    ) -> None:
        self.job = job
        self.shared = shared  # a cluster's limiter and budget (None: the run's own)
        self.context = JobContext(job, batch_rows=options.batch_rows)
        self.options = options
        self.reporter = reporter or Reporter()
        self.control = RunControl()
        self._api_key = api_key
        self._transport = transport
        self._rng = rng or random.Random()
        self._clock = clock
        self.pricing = self.context.pricing
        self.limiter = _limiter(job, clock=clock, rng=self._rng, shared=shared)
        self.budget: Budget | None = None
        self._accounts: Accounts | None = None
        self._run_id = 0

    def prepare(self) -> InputScan:
        """Validate the job against its input, and check that the run can write what it
        must and keep its budget; nothing is sent. Raises on any mistake."""
        scan = self.context.scan()
        self.context.check_before_sending(write_output=self.options.write_output)
        if self.shared is None and not self.options.fresh:
            refuse_after_cluster(self.job)
        return scan

    def warnings(self) -> list[str]:
        """What a person should know before the run spends anything."""
        return self.context.warnings()

    def stop(self) -> None:
        """Stop sending new requests; requests in flight may finish."""
        self.control.stop()

    # -- the run ------------------------------------------------------------------------

    async def run(self, scan: InputScan) -> RunReport:
        """Run the job; holds the job's lock and records the run in the state folder."""
        state = self.context.state
        state.acquire()
        try:
            self.context.journal.open(fresh=self.options.fresh)
            if self.options.fresh:
                self.context.seals.clear()
                if self.shared is None:
                    forget_cluster_runs(self.job)
            unanswered = None if self.options.fresh else state.unanswered()
            if unanswered is not None:
                self.reporter.notice(describe_unanswered(unanswered))
            self._run_id = state.begin_run(unanswered, fresh=self.options.fresh)
            self._start_where_the_last_run_left_off()
            self.budget = self._budget()
            how = FAILED
            summary: dict[str, Any] = {}
            try:
                report = await self._run(scan, unanswered)
                how = report.how
                summary = run_summary(report)
                if report.final.limiter is not None:
                    learned = report.final.limiter.learned().to_dict()
                    summary["limiter"] = {"endpoint": self.context.limit_key, **learned}
            finally:
                accounts = self._accounts
                worst = Decimal(0) if accounts is None else accounts.unanswered_worst
                summary["unanswered"] = 0 if accounts is None else accounts.unanswered
                summary["unanswered_worst_usd"] = None if worst is None else str(worst)
                state.end_run(self._run_id, how, summary)
        finally:
            state.release()
        if self.options.write_output:
            write_summary(self.job, report, summary)
        self.reporter.finish(report)
        return report

    def _start_where_the_last_run_left_off(self) -> None:
        """Start the in-flight cap from what the job's last run against this endpoint and
        model learned (see :func:`pipeline.provider.limits.start_from`)."""
        learned = self.context.learned_limit()
        if learned is None or self.shared is not None:  # a cluster's starts from its own
            return
        config = start_from(self.limiter.state.config, learned)
        self.limiter = Limiter(config, clock=self._clock, rng=self._rng)
        where = f"; its 429s came at {learned.ceiling}" if learned.ceiling is not None else ""
        self.reporter.notice(
            f"starting at {config.start_cap} requests in flight, from what the last run "
            f"learned{where}."
        )

    def _budget(self) -> Budget | None:
        """The job's spending cap, less what its earlier runs spent."""
        cap = self.job.budget.max_cost_usd
        if cap is None:
            return None
        self.context.check_priced()
        if self.shared is not None:
            return self.shared.budget_for(cap)
        spent = self.context.state.spent_usd(before=self._run_id)
        if spent is None:
            raise StateError(
                f"the spend of earlier runs in {self.context.state.folder} is unknown (they "
                "ran without a price), so the budget cannot be enforced; run with --fresh."
            )
        return Budget(cap=cap, spent=spent)

    async def _run(self, scan: InputScan, unanswered: Unanswered | None) -> RunReport:
        total = scan.rows
        if self.options.select_rows is not None:
            total = sum(1 for row in self.options.select_rows if 0 <= row < scan.rows)
        stats = RunStats(total_rows=total, clock=self._clock, limiter=self.limiter)
        self.reporter.start(self.job, scan)
        sink: OutputWriter | None = None
        output: OrderedOutput | None = None
        if self.options.write_output:
            sink = OutputWriter(
                self.job.output.path, self.job.output.schema, staging=self.job.state_path
            )
            if self.options.select_rows is None:
                output = OrderedOutput(self.options.output_waiting_rows)
        group = None if self.shared is None else self.shared.commit_group
        writer = ResultWriter(self.context, stats=stats, sink=sink, output=output, group=group)
        with sink or contextlib.nullcontext():
            await self._send_all(scan, stats, writer)
            control = self.control
            rows = await writer.write_rest(
                scan, hard_stop=control.hard_stop, partial=control.stopping
            )
            return self._report(stats, rows, unanswered)

    async def _send_all(self, scan: InputScan, stats: RunStats, writer: ResultWriter) -> None:
        """Send every row to send and make its result durable (and written, with an output)."""
        size = self.job.limits.max_in_flight
        work_queue = WorkQueue(size)
        result_send, result_recv = anyio.create_memory_object_stream[RowResult](size)
        intents = IntentLog(self.context.journal)
        timeline = Timeline(self.context.state.folder, self._run_id, clock=self._clock)
        self._accounts = accounts = Accounts(
            pricing=self.pricing,
            budget=self.budget,
            limiter=self.limiter,
            stats=stats,
            intents=intents,
            control=self.control,
            run=self._run_id,
            timeline=timeline,
        )
        if self.shared is not None:
            self.shared.bind(accounts)
        client = ChatClient(
            self.context.url,
            api_key=self._api_key,
            timeout_s=self.job.limits.timeout_s,
            max_connections=size,
            transport=self._transport,
        )
        sender = RowSender(
            self.job,
            client=client,
            accounts=accounts,
            stats=stats,
            control=self.control,
            rules=answer_rules(self.job),
            policy=retry_policy(self.job),
            api_key=self._api_key,
            run=self._run_id,
            url=self.context.url,
            rng=self._rng,
            clock=self._clock,
            event=self.reporter.event,
        )
        output = writer.output
        try:
            async with client, anyio.create_task_group() as outer:
                outer.start_soon(client.warm)  # while the first batch is planned
                outer.start_soon(self._tick, stats)
                outer.start_soon(timeline.run, functools.partial(self._sample, stats))
                if self.options.handle_signals:
                    outer.start_soon(
                        functools.partial(
                            self.control.watch_signals,
                            grace_s=self.options.grace_s,
                            notice=self.reporter.notice,
                            in_flight=lambda: stats.in_flight,
                        )
                    )
                async with anyio.create_task_group() as durable:
                    durable.start_soon(writer.run, result_recv)
                    durable.start_soon(intents.run)
                    if output is not None and writer.sink is not None:
                        durable.start_soon(output.run, writer.write_done)
                    async with result_send, anyio.create_task_group() as work:
                        self.control.bind(work=work.cancel_scope)
                        work.start_soon(
                            functools.partial(
                                self._produce,
                                scan,
                                stats=stats,
                                writer=writer,
                                sender=sender,
                                work=work_queue,
                                results=result_send.clone(),
                            )
                        )
                        for _ in range(size):
                            work.start_soon(sender.work, work_queue, result_send.clone())
                    intents.close()
                outer.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            found = _pipeline_error(group)
            if found is None:
                raise
            raise found from None
        finally:
            timeline.close(self._sample(stats))
        if self.control.fatal is not None:
            raise self.control.fatal

    async def _produce(
        self,
        scan: InputScan,
        *,
        stats: RunStats,
        writer: ResultWriter,
        sender: RowSender,
        work: WorkQueue,
        results: MemoryObjectSendStream[RowResult],
    ) -> None:
        """Read the input, skip rows earlier runs finished, and hand the rest to the workers
        (a row whose request cannot be made goes straight to the writer, failed)."""
        async with work, results:
            with anyio.CancelScope() as scope:
                self.control.bind(producer=scope)
                if self.control.stopping:
                    return
                output = writer.output
                keep = () if output is None else self.job.output.keep_columns
                batches = self.context.input_batches(scan, keep)
                cursor = self.context.resume_cursor(
                    retry_failed=self.options.retry_failed, select_rows=self.options.select_rows
                )
                first = True
                while True:
                    found = await anyio.to_thread.run_sync(cursor.next_batch, batches)
                    if found is None:
                        return
                    step, batch = found
                    stats.add_resumed(ok=step.resumed_ok, failed=step.resumed_failed)
                    track = step.track
                    if track is not None:
                        writer.tracks.add(track)
                    sent_whole = track is not None and track.remaining == step.rows
                    if output is not None and output.admit(batch, sent_whole=sent_whole):
                        assert track is not None
                        output.add(batch, track)
                    for planned in step.pending:
                        if planned.failure is not None:
                            await results.send(sender.unrenderable(planned))
                        else:
                            first = await _hand_on(work, planned, first=first)

    def _sample(self, stats: RunStats) -> tuple[int, int]:
        """The in-flight cap and the requests in flight, for the run's timeline."""
        return self.limiter.snapshot().cap, stats.in_flight

    async def _tick(self, stats: RunStats) -> None:
        while True:
            self.reporter.update(stats.snapshot())
            await anyio.sleep(self.options.tick_s)

    def _report(
        self, stats: RunStats, output_rows: int, unanswered: Unanswered | None
    ) -> RunReport:
        return RunReport(
            job=self.job.name,
            run=self._run_id,
            output=output_location(self.job.output.path),
            final=stats.snapshot(),
            price_known=self.context.price is not None,
            interrupted=self.control.interrupted,
            over_budget=self.control.over_budget,
            budget=self.budget,
            output_rows=output_rows,
            unanswered=unanswered,
            state_dir=self.context.state.folder,
        )
