"""Orchestration of one run: one anyio task group, bounded streams, one network seam.

::

    producer ──work (bounded)──▶ workers (max_in_flight) ──results (bounded)──▶ writer
       │ reads input batches,      record the intent, send,        group commit to the
       │ plans requests, skips     classify, back off, retry;      results journal, seals,
       └ rows already finished     one result per row              └ counts for the display
                                                                       │ finished batches
                                                                       ▼
                                                    the output, written in input order as the
                                                    run goes (:mod:`pipeline.io.ordered`)

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
import hashlib
import random
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread
import pyarrow as pa
from anyio import CancelScope
from anyio.abc import ObjectReceiveStream, ObjectSendStream
from anyio.streams.memory import MemoryObjectReceiveStream

from pipeline.engine.report import Reporter, RunReport
from pipeline.engine.stats import RunStats
from pipeline.engine.summary import run_summary, write_summary
from pipeline.errors import AuthError, JobFileError, PipelineError, ProviderError, StateError
from pipeline.io.openai_batch import (
    BATCH_COLUMNS,
    BatchPlanner,
    iter_batch_records,
    scan_batch_file,
)
from pipeline.io.ordered import MAX_WAITING_ROWS, OrderedOutput, Waiting
from pipeline.io.sinks import RESULT_COLUMNS, OutputWriter
from pipeline.io.sources import InputScan, iter_batches, resolve_input, scan_input
from pipeline.job.models import model_facts
from pipeline.job.spec import JobSpec
from pipeline.money.budget import Budget
from pipeline.money.pricing import (
    ZERO_USAGE,
    CostParts,
    Price,
    Usage,
    cost,
    cost_parts,
    price_at,
    resolve_price,
)
from pipeline.provider import retry
from pipeline.provider.client import Attempt, ChatClient
from pipeline.provider.limiter import Limiter
from pipeline.provider.limits import (
    LearnedLimit,
    LimiterConfig,
    NeverFitsError,
    Outcome,
    parse_rate_limit_headers,
    start_from,
)
from pipeline.provider.redact import redact
from pipeline.results import RowResult
from pipeline.rows.plan import PlannedRow, Planner
from pipeline.rows.templating import RequestTemplate
from pipeline.rows.verdict import AnswerRules, AskAgain, Fail, judge
from pipeline.state.intents import IntentLog
from pipeline.state.journal import Intent, bucket_of
from pipeline.state.resume import ResumeCursor, Track, Tracks
from pipeline.state.runs import FAILED, JobState, Suspects
from pipeline.state.seals import SealBook

if TYPE_CHECKING:
    import httpx

RESULT_BATCH = 1024
THINKING_MIN_TOKENS = 1024
"""Below this ``max_tokens``, thinking mode often leaves no room for the answer."""
UNREACHABLE_AFTER = 10
"""Connection failures, with no answer ever received, after which the job stops."""


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
    schema = job.output.schema
    for column in schema.columns if schema is not None else ():
        if column == "id" or column in RESULT_COLUMNS or column in job.output.keep_columns:
            raise JobFileError(
                job.source,
                "[output] schema",
                f"its property {column!r} would clash with the output column of the same name.",
                "Rename the property, or do not keep that input column.",
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


def describe_suspects(suspects: Suspects) -> str:
    worst = suspects.worst_cost_usd
    money = "unknown" if worst is None else f"${worst:.6f}"
    return (
        f"run {suspects.run} stopped with {suspects.count:,} request(s) in flight: the provider "
        f"may have billed them, and they are sent again now (worst case {money})."
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
        schema = job.output.schema
        self.template = RequestTemplate(
            model=job.request.model,
            system=job.request.system,
            prompt=job.request.prompt,
            messages_column=job.request.messages_column,
            params=job.request.params,
            suffix=job.request.suffix,
            completions=job.request.endpoint == "completions",
            instruction=(
                schema.instruction()
                if schema is not None and job.output.schema_from_tool is None
                else None
            ),
        )
        self.url = f"{job.request.base_url}/{job.request.endpoint}"
        key_url = f"{job.request.key_base}/{job.request.endpoint}"
        whose = f"{key_url} {job.request.model}".encode()
        self._limit_key = hashlib.blake2b(whose, digest_size=8).hexdigest()
        """Whose in-flight limit a run learns: the endpoint's and the model's (a digest, so
        that no URL is written to the state folder)."""
        self.planner: Planner | BatchPlanner = Planner(
            template=self.template, url=key_url, id_column=job.input.id_column
        )
        if job.input.format == "openai-batch":
            self.planner = BatchPlanner(
                url=key_url,
                model=job.request.model if job.request.model_override else None,
                params=job.request.params,
            )
        self.price: Price | None = resolve_price(
            job.request.base_url, job.request.model, job.pricing
        )
        self.policy = retry.RetryPolicy(
            max_attempts=job.limits.max_attempts,
            max_wait_s=job.limits.max_retry_wait_s,
            deadline_s=job.limits.row_deadline_s,
        )
        limits = job.limits
        self.limiter = Limiter(
            LimiterConfig(
                max_in_flight=limits.max_in_flight,
                requests_per_minute=limits.requests_per_minute,
                tokens_per_minute=limits.tokens_per_minute,
            ),
            clock=clock,
            rng=self._rng,
        )
        facts = model_facts(job.request.model)
        self._max_output = job.request.max_tokens or (facts.max_output if facts else None)
        self.rules = AnswerRules(
            schema=job.output.schema,
            schema_from_tool=job.output.schema_from_tool,
            max_reasks=job.output.max_reasks,
            max_tokens=job.request.max_tokens,
            thinking=job.request.thinking,
        )
        self.budget: Budget | None = None
        self._settled: anyio.Event | None = None
        """Set (and replaced) whenever a reservation settles: budget waiters look again."""
        self.state = JobState(job.output.state_path)
        self.journal = self.state.journal
        self.seals = SealBook(self.state.folder)
        self._tracks = Tracks()
        self._run_id = 0
        self._fatal: PipelineError | None = None
        self._answered = False
        self._unreachable = 0
        self._unanswered = 0
        self._unanswered_worst: Decimal | None = Decimal(0)
        self._stopping = False
        self._over_budget = False
        self._hard_stop = False
        self._producer_scope: CancelScope | None = None
        self._work_scope: CancelScope | None = None

    # -- preparation --------------------------------------------------------------------

    def prepare(self) -> InputScan:
        """Validate the job against its input; nothing is sent. Raises on any mistake."""
        if self.job.input.format == "openai-batch":
            return self._prepare_batch_file()
        files = resolve_input(self.job.input.path, self.job.source)
        scan = scan_input(
            files,
            id_column=self.job.input.id_column,
            limit=self.job.input.limit,
            job_source=self.job.source,
        )
        check_columns(self.job, scan, self.template)
        return scan

    def _prepare_batch_file(self) -> InputScan:
        files = resolve_input(self.job.input.path, self.job.source)
        if len(files) != 1:
            raise JobFileError(
                self.job.source, "[input] path", "an OpenAI batch input is one .jsonl file."
            )
        found = scan_batch_file(files[0].path, limit=self.job.input.limit)
        if found.endpoint != self.job.request.endpoint:
            raise JobFileError(
                self.job.source,
                "[request] endpoint",
                f"is {self.job.request.endpoint!r}, but {files[0].path} holds requests for "
                f"{found.endpoint!r}.",
                f'Set endpoint = "{found.endpoint}".',
            )
        return InputScan(files=files, rows=found.rows, columns=frozenset(BATCH_COLUMNS))

    def input_batches(
        self, scan: InputScan, extra: tuple[str, ...] = ()
    ) -> Iterator[pa.RecordBatch]:
        """The input in record batches of the columns planning needs (and ``extra``)."""
        if self.job.input.format == "openai-batch":
            return iter_batch_records(
                scan.files[0].path, limit=self.job.input.limit, batch_rows=self.options.batch_rows
            )
        columns = [*self.planner.columns, *extra]
        return iter_batches(
            scan.files, columns, limit=self.job.input.limit, batch_rows=self.options.batch_rows
        )

    def resume_cursor(self) -> ResumeCursor:
        """A cursor over the input that knows which rows earlier runs finished."""
        return ResumeCursor(
            planner=self.planner,
            journal=self.journal,
            seals=self.seals,
            retry_failed=self.options.retry_failed,
            select_rows=self.options.select_rows,
            by_prefix=self.job.request.order == "prefix",
        )

    # -- the run ------------------------------------------------------------------------

    async def run(self, scan: InputScan) -> RunReport:
        """Run the job; holds the job's lock and records the run in the state folder."""
        self.state.acquire()
        try:
            self.journal.open(fresh=self.options.fresh)
            if self.options.fresh:
                self.seals.clear()
            suspects = None if self.options.fresh else self.state.suspects()
            if suspects is not None:
                self.reporter.notice(describe_suspects(suspects))
            self._run_id = self.state.begin_run(suspects, fresh=self.options.fresh)
            self._start_where_the_last_run_left_off()
            self.budget = self._budget()
            how = FAILED
            summary: dict[str, Any] = {}
            try:
                report = await self._run(scan, suspects)
                how = report.how
                summary = run_summary(report)
                if report.final.limiter is not None:
                    learned = report.final.limiter.learned().to_dict()
                    summary["limiter"] = {"endpoint": self._limit_key, **learned}
            finally:
                worst = self._unanswered_worst
                summary["unanswered"] = self._unanswered
                summary["unanswered_worst_usd"] = None if worst is None else str(worst)
                self.state.end_run(self._run_id, how, summary)
        finally:
            self.state.release()
        if self.options.write_output:
            write_summary(self.job, report, summary)
        self.reporter.finish(report)
        return report

    def _start_where_the_last_run_left_off(self) -> None:
        """Start the in-flight cap from what the job's last run against this endpoint and
        model learned (see :func:`pipeline.provider.limits.start_from`)."""
        learned: LearnedLimit | None = None
        for record in reversed(self.state.history()):
            entry = (record.summary or {}).get("limiter")
            if isinstance(entry, dict) and entry.get("endpoint") == self._limit_key:
                learned = LearnedLimit.from_dict(entry)
                break
        if learned is None:
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
        key = "[budget] max_cost_usd"
        if self.price is None:
            raise JobFileError(
                self.job.source,
                key,
                f"needs a price, and {self.job.request.model} at {self.job.request.base_url} "
                "has none built in.",
                "Add [pricing] input and output (USD per million tokens).",
            )
        spent = self.state.spent_usd(before=self._run_id)
        if spent is None:
            raise StateError(
                f"the spend of earlier runs in {self.state.folder} is unknown (they ran "
                "without a price), so the budget cannot be enforced; run with --fresh."
            )
        return Budget(cap=cap, spent=spent)

    def warnings(self) -> list[str]:
        """What a person should know before the run spends anything."""
        found: list[str] = []
        request = self.job.request
        if self.job.budget.max_cost_usd is not None and request.max_tokens is None:
            worst = self._worst_cost(0)
            found.append(
                f"a budget is set but max_tokens is not: every request reserves the model's "
                f"longest answer ({self._max_output or 'unknown':,} tokens, "
                f"${worst or 0:.4f} of output) until it is answered. Set max_tokens."
            )
        if request.thinking and (request.max_tokens or 0) < THINKING_MIN_TOKENS:
            found.append(
                f"thinking is on and max_tokens is {request.max_tokens or 'unset'}: reasoning "
                f"tokens come out of max_tokens, so answers below ~{THINKING_MIN_TOKENS:,} "
                'tokens are often cut off (finish_reason "length"; JSON arrives broken). '
                "Such rows are marked failed as truncated. Raise max_tokens or set "
                'thinking = "disabled".'
            )
        return found

    async def _run(self, scan: InputScan, suspects: Suspects | None) -> RunReport:
        total = scan.rows
        if self.options.select_rows is not None:
            total = sum(1 for row in self.options.select_rows if 0 <= row < scan.rows)
        stats = RunStats(total_rows=total, clock=self._clock, limiter=self.limiter)
        self.reporter.start(self.job, scan)
        writer: OutputWriter | None = None
        output: OrderedOutput | None = None
        if self.options.write_output:
            writer = OutputWriter(Path(self.job.output.path), self.job.output.schema)
            if self.options.select_rows is None:
                output = OrderedOutput(self.options.output_waiting_rows)
        with writer or contextlib.nullcontext():
            await self._send_all(scan, stats, writer, output)
            return self._report(stats, await self._write_rest(scan, writer, output), suspects)

    async def _send_all(
        self,
        scan: InputScan,
        stats: RunStats,
        writer: OutputWriter | None,
        output: OrderedOutput | None,
    ) -> None:
        """Send every row to send and make its result durable (and written, with ``output``)."""
        size = self.job.limits.max_in_flight
        work_send, work_recv = anyio.create_memory_object_stream[PlannedRow](size)
        result_send, result_recv = anyio.create_memory_object_stream[RowResult](size)
        intents = IntentLog(self.journal)
        client = ChatClient(
            self.url,
            api_key=self._api_key,
            timeout_s=self.job.limits.timeout_s,
            max_connections=size,
            transport=self._transport,
        )
        try:
            async with client, anyio.create_task_group() as outer:
                outer.start_soon(self._tick, stats)
                if self.options.handle_signals:
                    outer.start_soon(self._watch_signals, stats)
                async with anyio.create_task_group() as durable:
                    durable.start_soon(self._write, stats, result_recv, output)
                    durable.start_soon(intents.run)
                    if output is not None and writer is not None:
                        durable.start_soon(output.run, functools.partial(self._write_done, writer))
                    async with result_send, anyio.create_task_group() as work:
                        self._work_scope = work.cancel_scope
                        work.start_soon(
                            self._produce, scan, stats, work_send, result_send.clone(), output
                        )
                        for _ in range(size):
                            work.start_soon(
                                self._work,
                                client,
                                stats,
                                intents,
                                work_recv.clone(),
                                result_send.clone(),
                            )
                        work_recv.close()
                    intents.close()
                outer.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            found = _pipeline_error(group)
            if found is None:
                raise
            raise found from None
        if self._fatal is not None:
            raise self._fatal

    async def _write_rest(
        self, scan: InputScan, writer: OutputWriter | None, output: OrderedOutput | None
    ) -> int:
        """Write what the run did not write as it went; the number of output rows."""
        if writer is None:
            return 0
        if self._hard_stop:
            writer.abort()
            return 0
        start = 0 if output is None else output.next_row
        return await anyio.to_thread.run_sync(self._assemble, scan, writer, start, self._stopping)

    def _report(self, stats: RunStats, output_rows: int, suspects: Suspects | None) -> RunReport:
        return RunReport(
            job=self.job.name,
            run=self._run_id,
            output=Path(self.job.output.path),
            final=stats.snapshot(),
            price_known=self.price is not None,
            interrupted=self._stopping and not self._over_budget,
            over_budget=self._over_budget,
            budget=self.budget,
            output_rows=output_rows,
            suspects=suspects,
            state_dir=self.state.folder,
        )

    async def _tick(self, stats: RunStats) -> None:
        while True:
            self.reporter.update(stats.snapshot())
            await anyio.sleep(self.options.tick_s)

    async def _watch_signals(self, stats: RunStats) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                if self._stopping:
                    self.reporter.notice("stopping now; finished rows are kept.")
                    self._hard_stop = True
                    if self._work_scope is not None:
                        self._work_scope.cancel()
                    return
                self.stop()
                self.reporter.notice(
                    f"stopping: no new requests; waiting up to {self.options.grace_s:g} s for "
                    f"{stats.in_flight} in flight. Press Ctrl-C again to stop at once."
                )
                with anyio.move_on_after(self.options.grace_s):
                    async for _ in signals:
                        self.reporter.notice("stopping now; finished rows are kept.")
                        self._hard_stop = True
                        break
                if self._work_scope is not None:
                    self._work_scope.cancel()
                return

    def stop(self) -> None:
        """Stop sending new requests; requests in flight may finish."""
        self._stopping = True
        if self._producer_scope is not None:
            self._producer_scope.cancel()

    async def _produce(
        self,
        scan: InputScan,
        stats: RunStats,
        work: ObjectSendStream[PlannedRow],
        results: ObjectSendStream[RowResult],
        output: OrderedOutput | None,
    ) -> None:
        async with work, results:
            with anyio.CancelScope() as scope:
                self._producer_scope = scope
                if self._stopping:
                    return
                await self._produce_rows(scan, stats, work, results, output)

    async def _produce_rows(
        self,
        scan: InputScan,
        stats: RunStats,
        work: ObjectSendStream[PlannedRow],
        results: ObjectSendStream[RowResult],
        output: OrderedOutput | None,
    ) -> None:
        batches = self.input_batches(scan, () if output is None else self.job.output.keep_columns)
        cursor = self.resume_cursor()
        while True:
            found = await anyio.to_thread.run_sync(cursor.next_batch, batches)
            if found is None:
                return
            step, batch = found
            stats.add_resumed(ok=step.resumed_ok, failed=step.resumed_failed)
            track = step.track
            if track is not None:
                self._tracks.add(track)
            sent_whole = track is not None and track.remaining == step.rows
            if output is not None and output.admit(batch, sent_whole=sent_whole):
                assert track is not None
                output.add(batch, track)
            for planned in step.pending:
                if planned.failure is not None:
                    await results.send(self._unrenderable(planned))
                else:
                    await work.send(planned)

    def _unrenderable(self, planned: PlannedRow) -> RowResult:
        return RowResult(
            key=planned.key,
            row=planned.row,
            status="failed",
            cost_usd=cost(ZERO_USAGE, self.price),
            error=f"not sent: {planned.failure}",
            run=self._run_id,
        )

    def _worst_cost(self, prompt_tokens: int | None) -> Decimal | None:
        """What one request can cost at most: its prompt and ``max_tokens`` of output."""
        max_tokens = self._max_output
        if prompt_tokens is None or max_tokens is None:
            return None
        usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=max_tokens)
        return cost(usage, self._price_now())

    def _price_now(self) -> Price | None:
        """The price in effect for a request sent now (prices may have time windows)."""
        if self.price is None or self.price.off_peak is None:
            return self.price
        return price_at(self.price, datetime.now(UTC))

    async def _work(
        self,
        client: ChatClient,
        stats: RunStats,
        intents: IntentLog,
        work: ObjectReceiveStream[PlannedRow],
        results: ObjectSendStream[RowResult],
    ) -> None:
        async with work, results:
            async for planned in work:
                if self._stopping:
                    continue  # drain what was queued without sending it
                intent = self._intent(planned)
                result = await self._send_row(client, stats, intents, planned, intent)
                if result is None:
                    continue
                await results.send(result)
                if result.attempts:
                    self._count_unanswered(intent.worst_cost_usd, -1)

    def _estimate(self, row: _RowProgress) -> int:
        """Tokens a request reserves from a tokens/min budget: its prompt and ``max_tokens``."""
        return row.prompt_tokens + (self.job.request.max_tokens or 0)

    def _metered(self, estimate: int, attempt: Attempt) -> int | None:
        """What an answered attempt counts against a tokens/min budget.

        Providers meter ``prompt + max_tokens`` when a request arrives, so with ``max_tokens``
        set the reservation stands unless the real usage is larger; without it, the real usage
        replaces the estimate. A 429 was not served and counts nothing; an error without usage
        keeps its reservation (the provider may have counted it).
        """
        if attempt.failure is retry.Failure.RATE_LIMITED:
            return 0
        if attempt.usage is None:
            return None
        used = attempt.usage.prompt_tokens + attempt.usage.completion_tokens
        if self.job.request.max_tokens is None:
            return used
        return max(used, estimate)

    async def _send_row(
        self,
        client: ChatClient,
        stats: RunStats,
        intents: IntentLog,
        planned: PlannedRow,
        intent: Intent,
    ) -> RowResult | None:
        """Send one row until it succeeds or fails for good; None if the job stops first."""
        assert planned.body is not None
        row = _RowProgress(body=planned.body, prompt_tokens=planned.prompt_tokens or 0)
        started = self._clock()
        while True:
            try:
                attempt = await self._attempt(
                    client, stats, intents, row, intent=intent if row.attempts == 0 else None
                )
            except NeverFitsError as exc:
                return self._finish(planned, row, None, error=f"not sent: {exc.reason}")
            except _OverBudget:
                return self._abandon(planned, row)
            row.attempts += 1
            if attempt.ok:
                result = self._judge(planned, row, attempt, stats)
                if result is not None:
                    return result
                continue  # asked again: the answer failed the output schema
            assert attempt.failure is not None
            if attempt.failure is retry.Failure.RATE_LIMITED:
                stats.rate_limited += 1
            detail = redact(attempt.error or attempt.failure.value, self._api_key)
            if self._never_reached(attempt, detail):
                return None
            decision = retry.decide(
                attempt.failure,
                attempt=row.attempts,
                elapsed_s=self._clock() - started,
                retry_after_s=attempt.retry_after_s,
                policy=self.policy,
                rng=self._rng,
                detail=detail,
            )
            if isinstance(decision, retry.StopJob):
                self._stop_for_auth(decision.reason)
                return self._abandon(planned, row)
            if isinstance(decision, retry.GiveUp):
                return self._finish(planned, row, attempt, error=decision.reason)
            stats.retries += 1
            await anyio.sleep(decision.after_s)
            if self._stopping:
                return self._abandon(planned, row)

    def _abandon(self, planned: PlannedRow, row: _RowProgress) -> RowResult | None:
        """A row the job stops before it is done: nothing to record unless attempts were
        billed; then a ``stopped`` record keeps their cost (the row is sent again later)."""
        if row.usage == ZERO_USAGE:
            return None
        return RowResult(
            key=planned.key,
            row=planned.row,
            status="stopped",
            usage=row.usage,
            cost_usd=row.cost if self.price is not None else None,
            attempts=row.attempts,
            error="stopped before it finished; the next run sends it again",
            reasks=row.reasks,
            run=self._run_id,
        )

    def _judge(
        self, planned: PlannedRow, row: _RowProgress, attempt: Attempt, stats: RunStats
    ) -> RowResult | None:
        """The row's result from an answer; None after preparing a re-ask of a bad answer."""
        reply = attempt.reply
        assert reply is not None
        output = 0 if attempt.usage is None else attempt.usage.completion_tokens
        verdict = judge(
            reply, body=row.body, reasks=row.reasks, output_tokens=output, rules=self.rules
        )
        if isinstance(verdict, AskAgain):
            row.reasks += 1
            stats.reasks += 1
            row.body = verdict.body
            row.prompt_tokens += verdict.added_tokens
            return None
        if isinstance(verdict, Fail):
            return self._finish(planned, row, attempt, error=verdict.error)
        return self._finish(planned, row, attempt, error=None, structured=verdict.structured)

    async def _attempt(
        self,
        client: ChatClient,
        stats: RunStats,
        intents: IntentLog,
        row: _RowProgress,
        *,
        intent: Intent | None,
    ) -> Attempt:
        """One attempt: reserve its worst case from the budget, wait for the limiter, record
        ``intent`` (given on the first attempt only), send, release, and account its cost."""
        estimate = self._estimate(row)
        worst = await self._reserve(row)
        price = self._price_now()
        spent: Decimal | None = None
        try:
            grant = await self.limiter.acquire(estimate)
        except BaseException:
            self._settle(worst, Decimal(0))
            raise
        outcome: Outcome = "error"
        metered: int | None = None
        headers = None
        retry_after = None
        try:
            if intent is not None:
                intents.record(intent)
                self._count_unanswered(intent.worst_cost_usd, +1)
            stats.requests += 1
            stats.in_flight += 1
            try:
                attempt = await client.send(row.body)
            finally:
                stats.in_flight -= 1
            if attempt.status is not None:
                self._answered = True
                spent = Decimal(0)
            if attempt.usage is not None:
                parts = None if price is None else cost_parts(attempt.usage, price)
                spent = row.bill(attempt.usage, parts)
                stats.add_billed(parts)
            if attempt.ok:
                outcome = "ok"
            elif attempt.failure is retry.Failure.RATE_LIMITED:
                outcome = "rate_limited"
            metered = self._metered(estimate, attempt)
            if attempt.rate_headers:
                headers = parse_rate_limit_headers(attempt.rate_headers)
            retry_after = attempt.retry_after_s
            return attempt
        finally:
            self._settle(worst, spent)
            self.limiter.release(
                grant,
                outcome=outcome,
                actual_tokens=metered,
                headers=headers,
                retry_after_s=retry_after,
            )

    async def _reserve(self, row: _RowProgress) -> Decimal:
        """Reserve an attempt's worst-case cost from the budget, waiting while requests in
        flight hold the room it needs; raise if it cannot fit at all."""
        if self.budget is None:
            return Decimal(0)
        worst = self._worst_cost(row.prompt_tokens) or Decimal(0)
        while True:
            decision = self.budget.reserve(worst)
            if decision == "reserved":
                return worst
            if decision == "exhausted":
                self._stop_for_budget()
            if self._stopping:
                raise _OverBudget
            if self._settled is None:
                self._settled = anyio.Event()
            await self._settled.wait()

    def _settle(self, worst: Decimal, spent: Decimal | None) -> None:
        if self.budget is not None:
            self.budget.settle(worst, spent)
            if self._settled is not None:
                self._settled.set()
                self._settled = None

    def _count_unanswered(self, worst: Decimal | None, sign: int) -> None:
        """Requests recorded as sent whose result is not recorded (yet)."""
        self._unanswered += sign
        if worst is None or self._unanswered_worst is None:
            self._unanswered_worst = None
        else:
            self._unanswered_worst += sign * worst

    def _intent(self, planned: PlannedRow) -> Intent:
        worst = self._worst_cost(planned.prompt_tokens)
        if worst is not None:
            worst *= 1 + self.job.output.max_reasks if self.job.output.schema else 1
        return Intent(key=planned.key, row=planned.row, run=self._run_id, worst_cost_usd=worst)

    def _finish(
        self,
        planned: PlannedRow,
        row: _RowProgress,
        attempt: Attempt | None,
        *,
        error: str | None,
        structured: Mapping[str, Any] | None = None,
    ) -> RowResult:
        reply = attempt.reply if attempt is not None else None
        return RowResult(
            key=planned.key,
            row=planned.row,
            status="ok" if error is None else "failed",
            response=reply.content if reply else None,
            reasoning=reply.reasoning if reply else None,
            finish_reason=reply.finish_reason if reply else None,
            usage=row.usage,
            cost_usd=row.cost if self.price is not None else None,
            attempts=row.attempts,
            latency_ms=None if attempt is None else round(attempt.latency_s * 1000),
            error=error,
            response_id=reply.response_id if reply else None,
            tool_calls=reply.tool_calls if reply else (),
            structured=structured,
            reasks=row.reasks,
            model=(reply.model if reply else None) or self.job.request.model,
            http_status=None if attempt is None else attempt.status,
            run=self._run_id,
        )

    def _never_reached(self, attempt: Attempt, detail: str) -> bool:
        """Stop the job if the endpoint has never answered and keeps refusing connections."""
        if self._answered or attempt.failure is not retry.Failure.CONNECTION:
            return False
        self._unreachable += 1
        if self._unreachable < UNREACHABLE_AFTER:
            return False
        self._abort(
            ProviderError(
                f"cannot reach {self.url} ({detail}); {self._unreachable} attempts failed and "
                "none was answered. Check [request] base_url (or --base-url) and the network; "
                "run the job again once the endpoint is up."
            )
        )
        return True

    def _abort(self, error: PipelineError) -> None:
        """Stop the whole job at once; the first error is the one the run raises."""
        if self._fatal is None:
            self._fatal = error
        self._stopping = True
        if self._work_scope is not None:
            self._work_scope.cancel()

    def _stop_for_budget(self) -> None:
        """The next request would take the spend past the cap: send nothing new."""
        if not self._over_budget:
            self._over_budget = True
            self.stop()

    def _stop_for_auth(self, reason: str) -> None:
        variable = self.job.request.api_key_env
        where = f"the key in ${variable}" if variable else "the request (no API key was set)"
        self._abort(
            AuthError(
                f"the provider at {self.job.request.base_url} refused {where}: {reason}. "
                "The job stopped; no further requests were sent. Fix the key and run the job "
                "again: finished rows are kept."
            )
        )

    async def _write(
        self,
        stats: RunStats,
        results: MemoryObjectReceiveStream[RowResult],
        output: OrderedOutput | None,
    ) -> None:
        async with results:
            while True:
                try:
                    batch = [await results.receive()]
                except anyio.EndOfStream:
                    break
                while len(batch) < RESULT_BATCH:
                    try:
                        batch.append(results.receive_nowait())
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                finished = self._tracks.finish(batch)
                await anyio.to_thread.run_sync(self._commit, batch, finished)
                if output is not None:
                    output.finish(finished)
                for result in batch:
                    stats.add_result(result)
        if output is not None:
            output.end()

    def _commit(self, results: list[RowResult], finished: list[Track]) -> None:
        """Make results durable, then seal the batches they finished."""
        self.journal.append_results(results)
        self.seals.append([track.seal() for track in finished])

    # -- the output ---------------------------------------------------------------------

    def _matched(
        self, batch: pa.RecordBatch, start: int, buckets: dict[int, dict[str, RowResult]]
    ) -> list[RowResult | None]:
        """Each row's current result (or None): the journal's last result for the row's
        request key, so a result recorded for an older prompt or parameter does not count.
        ``buckets`` caches the journal bucket last read."""
        matched: list[RowResult | None] = []
        for planned in self.planner.plan(batch.select(self.planner.columns), start):
            bucket = bucket_of(planned.row)
            results = buckets.get(bucket)
            if results is None:
                buckets.clear()
                results = buckets[bucket] = self.journal.read_bucket(bucket)
            matched.append(results.get(planned.key))
        return matched

    def _write_done(self, writer: OutputWriter, done: list[Waiting]) -> None:
        """Write batches this run finished, in order (in a worker thread, during the run)."""
        for waiting in done:
            assert waiting.results is not None
            matched: list[RowResult | None] = list(waiting.results)
            self._write_rows(writer, waiting.batch, waiting.start, matched, partial=False)

    def _assemble(self, scan: InputScan, writer: OutputWriter, first: int, partial: bool) -> int:
        """Write the output from row ``first`` on, from the journal (in a worker thread).

        With ``partial`` (after a stop) rows without a result are left out; otherwise every
        row must have one. Returns the number of rows the output holds.
        """
        start = 0
        buckets: dict[int, dict[str, RowResult]] = {}
        for batch in self.input_batches(scan, self.job.output.keep_columns):
            rows = batch.num_rows
            if start + rows > first:
                part = batch.slice(first - start) if start < first else batch
                at = max(start, first)
                self._write_rows(writer, part, at, self._matched(part, at, buckets), partial)
            start += rows
        return writer.rows

    def _write_rows(
        self,
        writer: OutputWriter,
        batch: pa.RecordBatch,
        start: int,
        matched: list[RowResult | None],
        partial: bool,
    ) -> None:
        """Write the rows of ``batch`` that have a result (all must, unless ``partial``)."""
        positions = [i for i, found in enumerate(matched) if found is not None]
        if len(positions) < len(matched) and not partial:
            row = start + matched.index(None)
            raise StateError(
                f"row {row} has no result in {self.journal.folder}; run the job again to finish it."
            )
        if not positions:
            return
        chosen = batch
        if len(positions) < batch.num_rows:
            chosen = batch.take(pa.array(positions, type=pa.int64()))
        names = chosen.schema.names
        id_column = self.job.input.id_column
        if id_column is not None:
            ids = chosen.column(names.index(id_column))
        else:
            ids = pa.array([start + p for p in positions], type=pa.int64())
        kept = [(c, chosen.column(names.index(c))) for c in self.job.output.keep_columns]
        ordered = [found for found in matched if found is not None]
        writer.write(ids, kept, ordered)


class _OverBudget(Exception):
    """The budget cannot cover the next request: the run stops sending."""


@dataclass(slots=True)
class _RowProgress:
    """One row on its way: what it sends now, and what its attempts have cost so far."""

    body: bytes
    prompt_tokens: int
    attempts: int = 0
    reasks: int = 0
    usage: Usage = ZERO_USAGE
    cost: Decimal = Decimal(0)

    def bill(self, usage: Usage, parts: CostParts | None) -> Decimal | None:
        """Count one billed answer costing ``parts``; returns its cost (None when the price
        is unknown)."""
        self.usage = self.usage + usage
        if parts is None:
            return None
        self.cost += parts.total
        return parts.total
