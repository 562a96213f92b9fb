"""The live display of a run across a Ray cluster, on a terminal: the cluster's figures (rows,
requests per second, in flight against the cluster's cap, 429s, spend) above one line per
worker (its shard and rows, requests in flight, permits held, and how long ago it last called
the coordinator: a worker that has not called for longer than its lease is dead or
restarting). Elsewhere :class:`~pipeline.cli.cluster.ClusterLines` prints plain lines."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from pipeline.cluster.driver import ClusterReport, ClusterReporter
from pipeline.cluster.leases import TTL_S, ZERO, Figures
from pipeline.cluster.plan import ShardPlan
from pipeline.job.spec import JobSpec


@dataclass(frozen=True, slots=True)
class Totals:
    """The cluster's figures added up: the finished shards' (``report``) and each worker's."""

    done: int
    """Rows with a result."""
    requests_per_s: float
    """Requests sent per second since ``started``."""
    in_flight: int
    rate_limited: int

    @classmethod
    def of(cls, figures: Figures, report: ClusterReport, started: float) -> Totals:
        elapsed = max(1e-9, time.monotonic() - started)
        workers = figures.workers.values()
        requests = report.requests + sum(p.requests for p in workers)
        return cls(
            done=report.ok + report.failed + sum(p.rows_done for p in workers),
            requests_per_s=requests / elapsed,
            in_flight=sum(p.in_flight for p in workers),
            rate_limited=sum(p.rate_limited for p in workers),
        )


class ClusterLive(ClusterReporter):
    """A rich live display of the cluster's figures and its workers' health."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.console = Console(file=stream or sys.stderr, highlight=False)
        self._live: Live | None = None
        self._started = time.monotonic()
        self._rows = 0

    def start(self, job: JobSpec, plan: ShardPlan, workers: int, skipped: int) -> None:
        self._rows = plan.rows
        done = f", {skipped} finished earlier" if skipped else ""
        self.console.print(
            f"[bold]{escape(job.name)}[/bold]: {plan.rows:,} rows in {len(plan.shards)} shards"
            f"{done}; {workers} Ray workers, up to {job.limits.max_in_flight} in flight"
        )
        self._live = Live(console=self.console, refresh_per_second=4, transient=True)
        self._live.start()

    def notice(self, message: str) -> None:
        console = self._live.console if self._live is not None else self.console
        console.print(message, style="yellow", markup=False)

    def update(self, figures: Figures, report: ClusterReport) -> None:
        if self._live is not None:
            self._live.update(self.render(figures, report))

    def render(self, figures: Figures, report: ClusterReport) -> Group:
        totals = Totals.of(figures, report, self._started)
        workers = figures.workers.values()
        done = totals.done
        total = max(self._rows, 1)
        head = Table.grid(padding=(0, 1))
        head.add_row(
            ProgressBar(total=total, completed=done, width=40),
            Text(f"{done:,}/{self._rows:,} rows ({100 * done / total:.1f}%)"),
        )
        spent = figures.spent_usd
        if figures.cap_usd is None:  # no budget: the shards' own figures
            costs = [report.cost_usd, *(p.cost_usd for p in workers)]
            spent = None if None in costs else sum((c for c in costs if c is not None), ZERO)
        spend = "$ unknown" if spent is None else f"${spent:.6f}"
        cap = "" if figures.cap_usd is None else f" of ${figures.cap_usd}"
        line = (
            f"{totals.requests_per_s:,.0f} req/s · in flight {totals.in_flight}/"
            f"{figures.snapshot.cap} · 429s {totals.rate_limited} · {spend}{cap} · "
            f"coordinator calls {figures.calls:,}"
        )
        table = Table(box=None, padding=(0, 1), header_style="dim")
        for column in ("worker", "shard", "rows", "in flight", "permits", "last call"):
            table.add_column(column, justify="left" if column in ("worker", "shard") else "right")
        for name, progress in sorted(figures.workers.items()):
            age = figures.last_call_s.get(name)
            late = age is not None and age > TTL_S / 2  # it missed a renewal
            table.add_row(
                escape(name),
                progress.shard or "(starting)",
                f"{progress.rows_done:,}/{progress.rows_total:,}",
                str(progress.in_flight),
                str(figures.permits.get(name, 0)),
                Text("-" if age is None else f"{age:.1f} s ago", style="red" if late else ""),
            )
        parts: list[Table | Text] = [head, Text(line, style="dim"), table]
        if figures.expired:
            parts.append(Text(f"{figures.expired} lease(s) expired (a worker died)", style="red"))
        return Group(*parts)

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
