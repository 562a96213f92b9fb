"""The command line of provider batch mode: the batch pass of ``pipeline run``, the batch
list of ``pipeline status`` (and its ``--watch``), and ``pipeline cancel``."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio
import click

from pipeline.api.endpoint import loop_options
from pipeline.engine.status import JobStatus
from pipeline.errors import EXIT_INTERRUPTED, ProviderError
from pipeline.job.spec import JobSpec
from pipeline.money.batch import batch_discount, batch_price
from pipeline.money.pricing import cost_parts, resolve_price
from pipeline.state.batches import BatchBook, BatchEntry
from pipeline.state.runs import StateFolder

if TYPE_CHECKING:  # the batch client (httpx) and rich load only when a batch command needs them:
    # ``pipeline run`` of an online job asks batch_first whether batches are open, nothing more
    from rich.console import Console

    from pipeline.batch.run import BatchOptions, BatchReport

INTERRUPTED = (
    "interrupted: the provider's batches keep running (nothing was cancelled). Run the same "
    "command again, or `pipeline status {job} --watch`, to collect them; `pipeline cancel "
    "{job}` cancels them."
)


def _echo(quiet: bool) -> Callable[[str], None]:
    def notice(message: str) -> None:
        if not quiet:
            click.echo(message, err=True)

    return notice


def batch_pass(
    job: JobSpec,
    job_file: str,
    *,
    api_key: str | None,
    options: BatchOptions,
    quiet: bool = False,
) -> BatchReport:
    """Run the batch side of a job (submit, wait, collect) and print what it did."""
    from pipeline.batch.run import BatchRun

    runner = BatchRun(job, api_key=api_key, options=options, notice=_echo(quiet))
    scan = runner.prepare()
    try:
        report = anyio.run(runner.run, scan, backend_options=loop_options())
    except KeyboardInterrupt:
        click.echo("\n" + INTERRUPTED.format(job=job_file), err=True)
        sys.exit(EXIT_INTERRUPTED)
    if not quiet or report.failed or report.pending:
        for line in describe(report, job_file):
            click.echo(line, err=True)
    return report


def describe(report: BatchReport, job_file: str) -> list[str]:
    """What a batch pass did, for a person."""
    lines = [
        f"{report.job}: batch mode: {report.rows:,} rows: {report.ok:,} ok, {report.failed:,} "
        f"failed, {report.pending:,} pending ({report.held:,} in {report.open_batches} open "
        "batches)",
        f"  this run: {report.submitted_files} batch files submitted ({report.submitted_rows:,} "
        f"rows), {report.collected_rows:,} rows collected",
    ]
    if report.cost_usd is not None and report.collected_rows:
        share = "at the online price (no batch price known)"
        if report.discount is not None:
            share = f"at the batch price ({report.discount * 100:.0f}% of online)"
        online = report.online_cost_usd
        versus = "" if online is None else f"; online it would have cost ${online:.6f}"
        lines.append(f"  cost (this run): ${report.cost_usd:.6f} {share}{versus}")
    if report.freed_rows:
        ended = ", ".join(f"{n} {status}" for status, n in sorted(report.ended.items()))
        again = (
            f"{report.resubmitted_rows:,} were submitted again"
            if report.resubmitted_rows
            else "they are left for the next run (or --fallback online)"
        )
        lines.append(
            f"  {report.freed_rows:,} rows came back unanswered from ended batches ({ended}): "
            f"{again}"
        )
    if report.over_budget:
        lines.append(
            "  stopped submitting at the budget: the next batch file's worst case did not fit; "
            "raise [budget] max_cost_usd (or --max-cost) to submit the rest."
        )
    if report.output is not None:
        lines.append(f"  output: {report.output}")
    elif report.detached and report.open_batches:
        lines.append(
            f"  detached: collect with `pipeline run {job_file}` (again) or `pipeline status "
            f"{job_file} --watch`; the output is written once every row has a result."
        )
    return lines


def print_batches(job: JobSpec, console: Console | None = None) -> list[dict[str, Any]]:
    """The job's batches as a table (nothing when it has none); returns them as dicts."""
    entries = BatchBook(StateFolder(job.state_path).folder).entries()
    found = [_entry_dict(entry) for entry in entries]
    if not entries or console is None:
        return found
    from rich.table import Table

    table = Table(title=f"{job.name}: batches", title_justify="left")
    for name in ("batch", "state", "rows", "done", "failed", "run"):
        table.add_column(name, justify="right" if name in ("rows", "done", "failed") else "left")
    for entry in entries:
        counts = entry.counts
        table.add_row(
            entry.batch_id or f"({entry.id}, not created)",
            entry.status + (" (collected)" if entry.closed else ""),
            f"{entry.requests:,}",
            f"{counts.get('completed', entry.answered):,}",
            f"{counts.get('failed', 0):,}",
            str(entry.run),
        )
    console.print(table)
    return found


def _entry_dict(entry: BatchEntry) -> dict[str, Any]:
    return {
        "id": entry.id,
        "batch_id": entry.batch_id,
        "file_id": entry.file_id,
        "status": entry.status,
        "collected": entry.closed,
        "requests": entry.requests,
        "rows": [entry.first_row, entry.last_row],
        "request_counts": entry.counts,
        "run": entry.run,
    }


def cancel_batches(job: JobSpec, *, api_key: str | None) -> tuple[int, int]:
    """Ask the provider to cancel every open batch of the job; (batches, rows)."""
    from pipeline.batch.client import BatchClient, NotFound

    book = BatchBook(StateFolder(job.state_path).folder)

    async def cancel() -> tuple[int, int]:
        batches = rows = 0
        async with BatchClient(job.request.base_url, api_key=api_key) as client:
            for entry in book.open_entries():
                batch_id = entry.batch_id
                if batch_id is None and entry.file_id is not None:
                    batch_id = await client.find_batch(entry.id, entry.file_id)
                    if batch_id is not None:
                        book.record("created", entry.id, batch_id=batch_id)
                if batch_id is None:  # never created: nothing runs at the provider
                    book.record("closed", entry.id, status="cancelled", unanswered=entry.requests)
                    continue
                try:
                    info = await client.cancel(batch_id)
                except (NotFound, ProviderError):
                    continue  # unknown to the provider, or already ended
                book.record("state", entry.id, status=info.get("status"), counts=entry.counts)
                batches, rows = batches + 1, rows + entry.requests
        return batches, rows

    return anyio.run(cancel, backend_options=loop_options())


def batch_first(
    job: JobSpec,
    job_file: str,
    *,
    api_key: str | None,
    fresh: bool,
    retry_failed: bool,
    detach: bool,
    fallback: bool,
    quiet: bool,
) -> bool:
    """The batch side of ``pipeline run``, before any online run. In batch mode: submit,
    wait and collect, then exit with the run's code, unless ``fallback`` leaves rows for an
    online run (True). In online mode, batches an earlier batch run left open are collected
    first (their rows are never sent online while a batch holds them; True); False when
    there is none and the run is online only."""
    batch_mode = job.request.mode == "batch"
    if not batch_mode:
        if detach or fallback:
            raise click.UsageError("--detach and --fallback are for batch mode (--mode batch).")
        if fresh or not BatchBook(StateFolder(job.state_path).folder).open_entries():
            return False
    from pipeline.batch.run import BatchOptions

    if not batch_mode:
        click.echo("collecting the batches earlier batch runs left open first.", err=True)
        options = BatchOptions(submit=False)
    else:
        if detach and job.request.local:
            raise click.UsageError(
                "--detach needs a server that outlives the run; --local's stops with it. Start "
                "`pipeline serve` and pass --base-url instead."
            )
        options = BatchOptions(
            fresh=fresh, retry_failed=retry_failed, detach=detach, fallback_online=fallback
        )
    report = batch_pass(job, job_file, api_key=api_key, options=options, quiet=quiet)
    if not batch_mode:
        return True
    if fallback and report.pending > report.held and not report.over_budget:
        click.echo(
            f"sending the {report.pending - report.held:,} rows of ended batches online "
            "(--fallback online).",
            err=True,
        )
        return True
    from pipeline.errors import EXIT_OK, EXIT_OVER_BUDGET, EXIT_ROWS_FAILED

    if report.over_budget:
        sys.exit(EXIT_OVER_BUDGET)
    sys.exit(EXIT_OK if report.all_ok or report.detached else EXIT_ROWS_FAILED)


def at_batch_price(status: JobStatus, job: JobSpec) -> JobStatus:
    """``status`` with its spend by kind at the job's batch price (batch mode)."""
    price = batch_price(
        resolve_price(job.request.base_url, job.request.model, job.pricing),
        batch_discount(job.request.base_url, job.pricing),
    )
    parts = None if price is None else cost_parts(status.spent, price)
    return dataclasses.replace(status, spent_parts=parts)
