"""What a report shows, read from the job's state folder: the history of runs
(``runs.jsonl``), every recorded result (``results/``) and one run's timeline
(``timeline/``). Nothing is sent and nothing is written; memory stays bounded whatever the
number of rows (see :mod:`pipeline.report.figures`)."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from pipeline.engine.context import JobContext
from pipeline.errors import UsageError
from pipeline.job.spec import JobSpec
from pipeline.money.pricing import MILLION, Price, Usage, cost_parts
from pipeline.report.data import CostKind, ReportData, RunLine
from pipeline.report.figures import (
    Reservoir,
    TimeAggregator,
    TimeFigures,
    failure_reason,
    histogram,
)
from pipeline.results import RowResult
from pipeline.state.journal import Journal, bucket_of
from pipeline.state.runs import RunRecord
from pipeline.state.timeline import read_events, read_head, timeline_path


@dataclass(slots=True)
class _RunTally:
    ok: int = 0
    failed: int = 0
    cost: Decimal | None = field(default_factory=Decimal)


@dataclass(slots=True)
class _Results:
    """One pass over the journal: the last result of each row, and every record by run."""

    ok: int = 0
    failed: int = 0
    tokens: Reservoir = field(default_factory=Reservoir)
    costs: Reservoir = field(default_factory=Reservoir)
    failures: Counter[str] = field(default_factory=Counter)
    runs: dict[int, _RunTally] = field(default_factory=dict)

    def record(self, result: RowResult) -> None:
        """Every record, superseded ones included: what each run recorded and spent."""
        tally = self.runs.get(result.run)
        if tally is None:
            tally = self.runs[result.run] = _RunTally()
        if result.status == "ok":
            tally.ok += 1
        elif result.status == "failed":
            tally.failed += 1
        if tally.cost is not None:
            tally.cost = None if result.cost_usd is None else tally.cost + result.cost_usd

    def last(self, result: RowResult) -> None:
        """A row's last result."""
        if result.status == "ok":
            self.ok += 1
        else:
            self.failed += 1
            self.failures[failure_reason(result.error, result.http_status)] += 1
        if result.attempts:
            self.tokens.add(result.usage.completion_tokens)
            if result.cost_usd is not None:
                self.costs.add(float(result.cost_usd))


def read_results(journal: Journal) -> _Results:
    found = _Results()
    bucket = -1
    last: dict[str, RowResult] = {}
    for result in journal.iter_results():  # bucket by bucket
        found.record(result)
        if bucket_of(result.row) != bucket:
            for kept in last.values():
                found.last(kept)
            last = {}
            bucket = bucket_of(result.row)
        if result.status != "stopped":
            last[result.key] = result
    for kept in last.values():
        found.last(kept)
    return found


def _history(
    records: list[RunRecord], tallies: dict[int, _RunTally], running: bool
) -> list[RunLine]:
    lines = []
    for index, record in enumerate(records):
        summary = record.summary or {}
        tally = tallies.get(record.run, _RunTally())
        how = record.how
        if how is None:
            how = "running" if running and index == len(records) - 1 else "did not end"
        cost: Decimal | None = tally.cost
        if "cost_usd" in summary:
            cost = None if summary["cost_usd"] is None else Decimal(summary["cost_usd"])
        lines.append(
            RunLine(
                run=record.run,
                started_at=record.started_at,
                ended_at=record.ended_at,
                how=how,
                rows_ok=int(summary.get("rows_ok", tally.ok)),
                rows_failed=int(summary.get("rows_failed", tally.failed)),
                requests=summary.get("requests"),
                rate_limited=summary.get("rate_limited"),
                cost_usd=cost,
                fresh=record.fresh,
            )
        )
    return lines


def time_figures(
    folder: Path, records: list[RunRecord], run: int | None
) -> tuple[int | None, TimeFigures | None, str | None]:
    """The chosen run's attempts over time; by default the last run that sent requests
    (else the last one with a timeline)."""
    known = {record.run: record for record in records}
    if run is not None and run not in known:
        listed = ", ".join(str(r) for r in sorted(known))
        raise UsageError(f"the job has no run {run} in {folder} (its runs: {listed}).")
    chosen: tuple[int, TimeFigures] | None = None
    for number in [run] if run is not None else sorted(known, reverse=True):
        figures = _run_figures(folder, known[number])
        if figures is None:
            continue
        if chosen is None:
            chosen = (number, figures)
        if figures.attempts or run is not None:
            chosen = (number, figures)
            break
    last = records[-1].run
    if chosen is None:
        which = f"run {run} has no timeline" if run is not None else "no run has a timeline"
        note = (
            f"{which}: it ran before pipeline kept one (or the state folder's timeline/ was "
            "removed), so there are no charts over time."
        )
        return None, None, note
    number, figures = chosen
    if run is None and number != last:
        return (
            number,
            figures,
            (
                f"Run {last} sent no request (or kept no timeline); the charts over time show "
                f"run {number}, the last that did."
            ),
        )
    return number, figures, None


def _run_figures(folder: Path, record: RunRecord) -> TimeFigures | None:
    path = timeline_path(folder, record.run)
    head = read_head(path)
    if head is None:
        return None
    try:
        until = record.ended_at or path.stat().st_mtime
    except OSError:
        return None
    aggregator = TimeAggregator(max(1.0, until - head.t0))
    aggregator.add(read_events(path))
    return aggregator.figures()


def cost_by_kind(usage: Usage, price: Price | None) -> tuple[CostKind, ...]:
    """Tokens and dollars by kind; reasoning tokens are billed as output."""
    parts = None if price is None else cost_parts(usage, price)
    reasoning_usd = None if price is None else usage.reasoning_tokens * price.output / MILLION
    return (
        CostKind(
            name="input",
            tokens=usage.prompt_tokens - usage.cached_tokens,
            usd=None if parts is None else parts.uncached_input,
        ),
        CostKind(
            name="cached input",
            tokens=usage.cached_tokens,
            usd=None if parts is None else parts.cached_input,
        ),
        CostKind(
            name="output",
            tokens=usage.completion_tokens - usage.reasoning_tokens,
            usd=None if parts is None or reasoning_usd is None else parts.output - reasoning_usd,
        ),
        CostKind(name="reasoning", tokens=usage.reasoning_tokens, usd=reasoning_usd),
    )


def _shown(job: JobSpec) -> str:
    """The endpoint as the page shows it: no user, password or query (where keys hide)."""
    url = urlsplit(job.request.base_url)
    host = url.hostname or ""
    if url.port is not None:
        host = f"{host}:{url.port}"
    return urlunsplit((url.scheme, host, url.path, "", ""))


def gather(job: JobSpec, *, run: int | None = None, now: float | None = None) -> ReportData:
    """Read what the report shows; raises :class:`UsageError` when the job has no run yet
    (or no run ``run``)."""
    context = JobContext(job)
    state = context.state
    records = state.history()
    if not records:
        raise UsageError(
            f"{job.source}: the job has no runs yet (nothing in {state.folder}); run it "
            "first with `pipeline run`, then make its report."
        )
    time_run, figures, note = time_figures(state.folder, records, run)
    results = read_results(state.journal)
    spent, spent_usd = state.journal.spent()
    price = context.price
    where = "at the job's current price" if price is not None else "no price is known"
    return ReportData(
        job=job.name,
        model=job.request.model,
        endpoint="the built-in server (--local)" if job.request.local else _shown(job),
        state_dir=str(state.folder),
        made_at=time.time() if now is None else now,
        rows_ok=results.ok,
        rows_failed=results.failed,
        spent_usd=spent_usd,
        history=tuple(_history(records, results.runs, state.locked_by_other() is not None)),
        time_run=time_run,
        time=figures,
        time_note=note,
        output_tokens=histogram(results.tokens.values, integers=True, seen=results.tokens.seen),
        row_cost=None
        if price is None
        else histogram(results.costs.values, seen=results.costs.seen),
        cost_by_kind=cost_by_kind(spent, price),
        price_note=where,
        failures=tuple(results.failures.most_common()),
    )
