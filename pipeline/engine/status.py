"""``pipeline status``: where a job stands, read from its state folder; nothing is sent."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from pipeline.engine.context import JobContext
from pipeline.io.sources import InputScan
from pipeline.money.pricing import CostParts, Usage, cost_parts
from pipeline.state.runs import RunRecord, Unanswered


@dataclass(frozen=True, slots=True, kw_only=True)
class JobStatus:
    job: str
    endpoint: str
    """Whose results these are: the base URL, or ``local`` for the built-in server's side
    (``--local``), which is kept apart from the real endpoint's."""
    state_dir: str
    rows: int
    ok: int
    failed: int
    pending: int
    spent: Usage
    """Tokens of every result ever recorded for this job (every billed attempt)."""
    spent_usd: Decimal | None
    spent_parts: CostParts | None
    """``spent`` by kind of token, at the job's current price."""
    last_run: RunRecord | None
    running: str | None
    """Who holds the job's lock, if a run is in progress."""
    unanswered: Unanswered | None

    def to_dict(self) -> dict[str, Any]:
        last = self.last_run
        unanswered = self.unanswered
        return {
            "job": self.job,
            "endpoint": self.endpoint,
            "state_dir": self.state_dir,
            "rows": {
                "total": self.rows,
                "ok": self.ok,
                "failed": self.failed,
                "pending": self.pending,
            },
            "spent": {
                "prompt_tokens": self.spent.prompt_tokens,
                "cached_tokens": self.spent.cached_tokens,
                "completion_tokens": self.spent.completion_tokens,
                "reasoning_tokens": self.spent.reasoning_tokens,
                "cost_usd": None if self.spent_usd is None else str(self.spent_usd),
                "cost_by_kind_usd": None
                if self.spent_parts is None
                else self.spent_parts.to_dict(),
            },
            "last_run": None
            if last is None
            else {
                "run": last.run,
                "started_at": last.started_at,
                "ended_at": last.ended_at,
                "how": last.how or ("running" if self.running else "did not end"),
                "summary": last.summary,
            },
            "running": self.running,
            "double_spend_suspects": None
            if unanswered is None
            else {
                "run": unanswered.run,
                "count": unanswered.count,
                "worst_cost_usd": None
                if unanswered.worst_cost_usd is None
                else str(unanswered.worst_cost_usd),
            },
        }


def job_status(context: JobContext, scan: InputScan) -> JobStatus:
    """Count rows by their current result and sum what the journal says was spent.

    A batch sealed by a run, and unchanged since, is counted from its seal without planning
    its rows (as a resume skips it); the others are planned and matched by request key.
    """
    ok = failed = pending = 0
    cursor = context.resume_cursor()
    for batch in context.input_batches(scan):
        batch_ok, batch_failed, batch_pending = cursor.tally(batch)
        ok += batch_ok
        failed += batch_failed
        pending += batch_pending
    spent, spent_usd = context.journal.spent()
    state = context.state
    history = state.history()
    running = state.locked_by_other()
    price = context.price
    return JobStatus(
        job=context.job.name,
        endpoint="local" if context.job.request.local else context.job.request.base_url,
        state_dir=str(state.folder),
        rows=scan.rows,
        ok=ok,
        failed=failed,
        pending=pending,
        spent=spent,
        spent_usd=spent_usd,
        spent_parts=None if price is None else cost_parts(spent, price),
        last_run=history[-1] if history else None,
        running=running,
        unanswered=None if running else state.unanswered(),
    )
