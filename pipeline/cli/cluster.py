"""``pipeline run JOB --ray [ADDRESS]``: the run across a Ray cluster, and its live lines.

Every ``tick`` the driver prints one line with the cluster's figures (rows, requests per
second, requests in flight against the cluster's cap, 429s, spend) and one short line per
worker (its shard, rows, requests in flight, permits, and how long ago it last called the
coordinator: longer than its lease means a worker that died and is being restarted).
"""

from __future__ import annotations

import sys
import time
from decimal import Decimal
from pathlib import Path

import click

from pipeline.api.endpoint import endpoint
from pipeline.cli.cluster_display import ClusterLive, Totals
from pipeline.cluster.driver import ClusterReport, ClusterReporter, cluster_options, run_cluster
from pipeline.cluster.leases import Figures
from pipeline.cluster.plan import ShardPlan
from pipeline.errors import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_OVER_BUDGET,
    EXIT_ROWS_FAILED,
    UsageError,
)
from pipeline.job.spec import JobSpec

RAY_EXTRA = "pip install 'pipeline[ray]'"


class ClusterLines(ClusterReporter):
    """The cluster's figures as plain lines on stderr."""

    def __init__(self, *, quiet: bool = False) -> None:
        self.quiet = quiet
        self._started = time.monotonic()
        self._rows = 0

    def start(self, job: JobSpec, plan: ShardPlan, workers: int, skipped: int) -> None:
        self._rows = plan.rows
        if not self.quiet:
            done = f", {skipped} finished earlier" if skipped else ""
            click.echo(
                f"{job.name}: {plan.rows:,} rows in {len(plan.shards)} shards{done}; "
                f"{workers} workers",
                err=True,
            )

    def notice(self, message: str) -> None:
        click.echo(message, err=True)

    def close(self) -> None:
        """Nothing stays on screen."""

    def update(self, figures: Figures, report: ClusterReport) -> None:
        if self.quiet:
            return
        totals = Totals.of(figures, report, self._started)
        spend = "" if figures.spent_usd is None else f" · ${figures.spent_usd:.6f}"
        cap = "" if figures.cap_usd is None else f" of ${figures.cap_usd}"
        click.echo(
            f"rows {totals.done:,}/{self._rows:,} · {totals.requests_per_s:,.0f} req/s · in "
            f"flight {totals.in_flight}/{figures.snapshot.cap} · 429s {totals.rate_limited}"
            f"{spend}{cap} · "
            f"coordinator calls {figures.calls:,}",
            err=True,
        )
        for name, progress in sorted(figures.workers.items()):
            age = figures.last_call_s.get(name)
            called = "" if age is None else f", last call {age:.1f} s ago"
            click.echo(
                f"  {name}: shard {progress.shard or '(starting)'} {progress.rows_done:,}/"
                f"{progress.rows_total:,} rows, {progress.in_flight} in flight, "
                f"{figures.permits.get(name, 0)} permits{called}",
                err=True,
            )
        if figures.expired:
            click.echo(f"  {figures.expired} lease(s) expired (a worker died)", err=True)


def cluster_reporter(*, quiet: bool) -> ClusterLines | ClusterLive:
    """A live display on a terminal, plain lines elsewhere (or with ``-q``)."""
    from rich.console import Console

    if not quiet and Console(file=sys.stderr).is_terminal:
        return ClusterLive()
    return ClusterLines(quiet=quiet)


def require_ray() -> None:
    """Refuse, before anything starts, when Ray is not installed."""
    try:
        import ray  # noqa: F401
    except ImportError:
        raise UsageError(f'--ray (or [cluster] engine = "ray") needs Ray: {RAY_EXTRA}') from None


def run_on_cluster(
    job: JobSpec,
    *,
    address: str | None,
    workers: int | None,
    fresh: bool,
    retry_failed: bool,
    quiet: bool,
) -> None:
    """Run ``job`` across a Ray cluster (at its endpoint) and exit with the run's code."""
    if workers is not None and address is None and job.cluster.engine != "ray":
        raise UsageError("--workers is for a run on a Ray cluster: add --ray.")
    require_ray()
    with endpoint(job) as target:
        _run(
            target,
            address=address,
            workers=workers,
            fresh=fresh,
            retry_failed=retry_failed,
            quiet=quiet,
        )


def _run(
    job: JobSpec,
    *,
    address: str | None,
    workers: int | None,
    fresh: bool,
    retry_failed: bool,
    quiet: bool,
) -> None:
    options = cluster_options(
        job,
        address=address or None,
        workers=workers,
        fresh=fresh or None,
        retry_failed=retry_failed or None,
    )
    reporter = cluster_reporter(quiet=quiet)
    try:
        report = run_cluster(job, options, reporter=reporter)
    except KeyboardInterrupt:
        reporter.close()
        click.echo(
            "\ninterrupted: finished rows are saved in the shards' state folders. Run the same "
            "command again to resume.",
            err=True,
        )
        sys.exit(EXIT_INTERRUPTED)
    finally:
        reporter.close()
    click.echo(summary(report), err=True)
    if report.over_budget:
        figures = report.figures
        spent = Decimal(0) if figures is None or figures.spent_usd is None else figures.spent_usd
        click.echo(
            f"stopped at the budget: ${spent:.6f} spent of the ${job.budget.max_cost_usd} cap. "
            "Finished rows are kept; raise [budget] max_cost_usd (or --max-cost) and run the "
            "same command again: finished rows are not sent again.",
            err=True,
        )
        sys.exit(EXIT_OVER_BUDGET)
    if not report.output_written:
        click.echo("some shards did not finish: run the same command again.", err=True)
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(EXIT_OK if report.all_ok else EXIT_ROWS_FAILED)


def summary(report: ClusterReport) -> str:
    money = "unknown" if report.cost_usd is None else f"${report.cost_usd:.6f}"
    written = f"; output {Path(report.output)}" if report.output_written else ""
    resent = (
        f"; {report.resent} request(s) left in flight by a killed run were sent again"
        if report.resent
        else ""
    )
    return (
        f"{report.ok:,} ok, {report.failed:,} failed of {report.rows:,} rows in "
        f"{report.shards} shards ({report.skipped} finished earlier); {report.requests:,} "
        f"requests, {report.calls:,} coordinator calls, this run cost {money}{resent}{written}"
    )
