"""Sending one row until it has its result: reserve, acquire, send, settle, judge, retry.

Each attempt is opened and settled in the run's books (:class:`~pipeline.engine.accounting.
Accounts`: budget, limiter, billing, figures); the first one written to a connection records
the row's intent right before the write. An answer is judged
(:func:`pipeline.rows.verdict.judge`): good, failed for good, or asked again with the reason
(a structured answer that broke its schema). A failed attempt is retried or given up by the
retry policy (:func:`pipeline.provider.retry.decide`). A 401/403 aborts the job, as does an
endpoint that refuses every connection before ever answering.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from typing import Any

import anyio
import anyio.lowlevel
from anyio.streams.memory import MemoryObjectSendStream

from pipeline.engine.accounting import Accounts, OverBudget, RowProgress
from pipeline.engine.control import RunControl
from pipeline.engine.handoff import WorkQueue
from pipeline.engine.stats import RunStats
from pipeline.errors import AuthError, ProviderError
from pipeline.job.spec import JobSpec
from pipeline.money.pricing import ZERO_USAGE, cost
from pipeline.provider import retry
from pipeline.provider.client import Attempt, ChatClient
from pipeline.provider.limits import NeverFitsError
from pipeline.provider.redact import redact
from pipeline.results import RowResult
from pipeline.rows.plan import PlannedRow
from pipeline.rows.verdict import AnswerRules, AskAgain, Fail, judge
from pipeline.state.journal import Intent

UNREACHABLE_AFTER = 10
"""Connection failures, with no answer ever received, after which the job stops."""


def answer_rules(job: JobSpec) -> AnswerRules:
    """How the job's answers are judged."""
    return AnswerRules(
        schema=job.output.schema,
        schema_from_tool=job.output.schema_from_tool,
        max_reasks=job.output.max_reasks,
        max_tokens=job.request.max_tokens,
        thinking=job.request.thinking,
    )


def retry_policy(job: JobSpec) -> retry.RetryPolicy:
    """When the job's failed attempts are tried again."""
    return retry.RetryPolicy(
        max_attempts=job.limits.max_attempts,
        max_wait_s=job.limits.max_retry_wait_s,
        deadline_s=job.limits.row_deadline_s,
    )


class RowSender:
    """Sends rows through one client; many workers share it."""

    def __init__(
        self,
        job: JobSpec,
        *,
        client: ChatClient,
        accounts: Accounts,
        stats: RunStats,
        control: RunControl,
        rules: AnswerRules,
        policy: retry.RetryPolicy,
        api_key: str | None,
        run: int,
        url: str,
        rng: random.Random,
        clock: Callable[[], float] = time.monotonic,
        event: Callable[[str], None] = lambda message: None,
    ) -> None:
        self._job = job
        self._event = event
        """Told of every retry, re-ask and failure, with the row (never of successes)."""
        self._client = client
        self._accounts = accounts
        self._stats = stats
        self._control = control
        self._rules = rules
        self._policy = policy
        self._api_key = api_key
        self._run = run
        self._url = url
        self._rng = rng
        self._clock = clock
        self._priced = accounts.pricing.price is not None
        self._answered = False
        self._unreachable = 0

    async def work(self, rows: WorkQueue, results: MemoryObjectSendStream[RowResult]) -> None:
        """One worker: send the rows it takes, one at a time, and pass on their results.

        A row waiting is taken (:meth:`WorkQueue.take`), and a result handed on, without the
        extra yield to the event loop that a stream's ``receive()`` and ``send()`` make first
        (two task steps a row, some 5% of a run's CPU at 256 in flight). The take checks for
        a cancellation (a cancelled run starts no request); handing on a result does not (it
        is paid for: the writer keeps it if it still can; the check cost ~1% of the CPU)."""
        async with results:
            while True:
                planned = await rows.take()
                if planned is None:
                    return
                if self._control.stopping:
                    continue  # drain what was queued without sending it
                intent = self._accounts.intent(planned)
                row = RowProgress(
                    body=planned.body or b"", prompt_tokens=planned.prompt_tokens or 0
                )
                result: RowResult | None = None
                try:
                    result = await self.send_row(planned, intent, row)
                finally:  # also when a stop cancels the row
                    if result is None and row.recorded and not (row.reached or row.sending):
                        self._accounts.answered(intent)  # never left this machine: not billed
                if result is None:
                    continue
                try:
                    results.send_nowait(result)
                except (anyio.WouldBlock, anyio.BrokenResourceError):
                    await results.send(result)  # waits for room, or fails as it always did
                if row.recorded:
                    self._accounts.answered(intent)

    def unrenderable(self, planned: PlannedRow) -> RowResult:
        """The result of a row whose request could not be made (nothing is sent)."""
        self._event(f"{planned.describe()}: not sent: {planned.failure}")
        return RowResult(
            key=planned.key,
            row=planned.row,
            status="failed",
            cost_usd=cost(ZERO_USAGE, self._accounts.pricing.price),
            error=f"not sent: {planned.failure}",
            run=self._run,
        )

    async def send_row(
        self, planned: PlannedRow, intent: Intent, row: RowProgress
    ) -> RowResult | None:
        """Send one row (``row`` follows its progress) until it succeeds or fails for good;
        None if the job stops first."""
        assert planned.body is not None
        started = self._clock()
        while True:
            try:
                attempt = await self._attempt(row, intent)
            except NeverFitsError as exc:
                self._event(f"{planned.describe()}: not sent: {exc.reason}")
                return self._finish(planned, row, None, error=f"not sent: {exc.reason}")
            except OverBudget:
                return self._abandon(planned, row)
            row.attempts += 1
            if attempt.ok:
                result = self._judge(planned, row, attempt)
                if result is not None:
                    return result
                continue  # asked again: the answer failed the output schema
            assert attempt.failure is not None
            if attempt.failure is retry.Failure.RATE_LIMITED:
                self._stats.rate_limited += 1
            detail = redact(attempt.error or attempt.failure.value, self._api_key)
            if self._never_reached(attempt, detail):
                return None
            decision = retry.decide(
                attempt.failure,
                attempt=row.attempts,
                elapsed_s=self._clock() - started,
                retry_after_s=attempt.retry_after_s,
                policy=self._policy,
                rng=self._rng,
                detail=detail,
            )
            if isinstance(decision, retry.StopJob):
                self._stop_for_auth(decision.reason)
                return self._abandon(planned, row)
            if isinstance(decision, retry.GiveUp):
                self._event(
                    f"{planned.describe()}: failed after {row.attempts} attempt(s): "
                    f"{decision.reason}"
                )
                return self._finish(planned, row, attempt, error=decision.reason)
            self._event(
                f"{planned.describe()}: attempt {row.attempts} failed ({detail}); trying again in "
                f"{decision.after_s:.1f} s"
            )
            self._stats.retries += 1
            await anyio.sleep(decision.after_s)
            if self._control.stopping:
                return self._abandon(planned, row)

    async def _attempt(self, row: RowProgress, intent: Intent) -> Attempt:
        """One attempt: opened in the books (budget, then limiter), sent (the row's intent
        recorded right before its first request is written), and settled in the books."""
        ticket = await self._accounts.open(row)
        attempt: Attempt | None = None
        try:
            self._accounts.sending()
            row.sending = True  # stays set if the attempt is cut off: it may have reached
            try:
                attempt = await self._client.send(
                    row.body, before_send=lambda: self._accounts.record(intent, row)
                )
            finally:
                self._accounts.returned()
            row.sending = False
            if attempt.status is not None:
                self._answered = True
            if attempt.reached:
                row.reached = True
            return attempt
        finally:
            self._accounts.settle(ticket, row, attempt)

    def _judge(self, planned: PlannedRow, row: RowProgress, attempt: Attempt) -> RowResult | None:
        """The row's result from an answer; None after preparing a re-ask of a bad answer."""
        reply = attempt.reply
        assert reply is not None
        output = 0 if attempt.usage is None else attempt.usage.completion_tokens
        verdict = judge(
            reply, body=row.body, reasks=row.reasks, output_tokens=output, rules=self._rules
        )
        if isinstance(verdict, AskAgain):
            self._event(f"{planned.describe()}: the answer broke the output schema; asking again")
            row.reasks += 1
            self._stats.reasks += 1
            row.body = verdict.body
            row.prompt_tokens += verdict.added_tokens
            return None
        if isinstance(verdict, Fail):
            self._event(f"{planned.describe()}: failed: {verdict.error}")
            return self._finish(planned, row, attempt, error=verdict.error)
        return self._finish(planned, row, attempt, error=None, structured=verdict.structured)

    def _abandon(self, planned: PlannedRow, row: RowProgress) -> RowResult | None:
        """A row the job stops before it is done: nothing to record unless attempts were
        billed; then a ``stopped`` record keeps their cost (the row is sent again later)."""
        if row.usage == ZERO_USAGE:
            return None
        return RowResult(
            key=planned.key,
            row=planned.row,
            status="stopped",
            usage=row.usage,
            cost_usd=row.cost if self._priced else None,
            attempts=row.attempts,
            error="stopped before it finished; the next run sends it again",
            reasks=row.reasks,
            run=self._run,
        )

    def _finish(
        self,
        planned: PlannedRow,
        row: RowProgress,
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
            cost_usd=row.cost if self._priced else None,
            attempts=row.attempts,
            latency_ms=None if attempt is None else round(attempt.latency_s * 1000),
            error=error,
            response_id=reply.response_id if reply else None,
            tool_calls=reply.tool_calls if reply else (),
            structured=structured,
            reasks=row.reasks,
            model=(reply.model if reply else None) or self._job.request.model,
            http_status=None if attempt is None else attempt.status,
            run=self._run,
        )

    def _never_reached(self, attempt: Attempt, detail: str) -> bool:
        """Stop the job if the endpoint has never answered and keeps refusing connections."""
        if self._answered or attempt.failure is not retry.Failure.CONNECTION:
            return False
        self._unreachable += 1
        if self._unreachable < UNREACHABLE_AFTER:
            return False
        self._control.abort(
            ProviderError(
                f"cannot reach {self._url} ({detail}); {self._unreachable} attempts failed and "
                "none was answered. Check [request] base_url (or --base-url) and the network; "
                "run the job again once the endpoint is up."
            )
        )
        return True

    def _stop_for_auth(self, reason: str) -> None:
        variable = self._job.request.api_key_env
        where = f"the key in ${variable}" if variable else "the request (no API key was set)"
        self._control.abort(
            AuthError(
                f"the provider at {self._job.request.base_url} refused {where}: {reason}. "
                "The job stopped; no further requests were sent. Fix the key and run the job "
                "again: finished rows are kept."
            )
        )
