"""What a person sees: a live bar on a terminal, plain log lines elsewhere, a summary."""

from __future__ import annotations

import sys
import time
from decimal import Decimal
from typing import TYPE_CHECKING, TextIO

from pipeline.engine.report import Reporter, RunReport
from pipeline.engine.stats import Snapshot
from pipeline.engine.status import JobStatus
from pipeline.engine.summary import summary_path
from pipeline.io.sources import InputScan
from pipeline.job.spec import JobSpec
from pipeline.money.pricing import CostParts

if TYPE_CHECKING:  # rich is loaded once the first requests are out (~25 ms of start-up)
    from rich.console import Console, Group
    from rich.live import Live

LOG_EVERY_S = 10.0
HEADER_WAIT_S = 0.5
"""The header waits for the first request, at most this long."""


def by_kind(parts: CostParts) -> str:
    """Dollars by kind of token, for display."""
    return (
        f"input {money(parts.uncached_input)}, cached input {money(parts.cached_input)}, "
        f"output {money(parts.output)}"
    )


def money(value: Decimal | None, *, known: bool = True) -> str:
    """Dollars for display; an unknown price shows as unknown, never as $0."""
    if value is None or not known:
        return "unknown (no price for this model)"
    if not value:
        return "$0"  # exactly nothing: not $0.0000 beside figures of six decimals
    if abs(value) < Decimal("0.01"):
        return f"${value:.6f}"
    return f"${value:,.4f}"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def figures(s: Snapshot, *, price_known: bool) -> str:
    """One line of live figures."""
    parts = [
        f"ok {s.ok + s.resumed_rows - s.resumed_failed:,}",
        f"failed {s.failed + s.resumed_failed:,}",
        f"{s.requests_per_s:,.1f} req/s",
        f"{s.tokens_per_s:,.0f} tok/s",
        money(s.cost_usd, known=price_known) if price_known else "cost unknown",
        f"ETA {duration(s.eta_s)}",
        f"in flight {s.in_flight}",
    ]
    limiter = s.limiter
    if limiter is not None:
        parts.append(f"cap {limiter.cap}/{limiter.max_in_flight}")
        rpm = f"/{limiter.requests_per_minute:,}" if limiter.requests_per_minute else ""
        parts.append(f"{limiter.requests_last_minute:,}{rpm} req/min")
        tpm = f"/{limiter.tokens_per_minute:,}" if limiter.tokens_per_minute else ""
        parts.append(f"{limiter.tokens_last_minute:,}{tpm} tok/min")
    if s.retries:
        parts.append(f"retries {s.retries:,}")
    if s.rate_limited:
        parts.append(f"429s {s.rate_limited:,}")
    return " · ".join(parts)


class LiveReporter(Reporter):
    """A rich live display on a terminal, or a log line every few seconds elsewhere.

    ``verbose`` also prints every retry, re-ask and failure with its row; ``quiet`` prints
    only notices (a stop, requests left unanswered) and the errors the command reports.

    Nothing is printed before the run's first requests are out: the header :meth:`start`
    makes waits for the first update after them (or anything else printed), so loading rich
    (~25 ms) does not delay the first request.
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        live: bool | None = None,
        verbose: bool = False,
        quiet: bool = False,
    ) -> None:
        self.stream = stream or sys.stderr
        self.verbose = verbose and not quiet
        self.quiet = quiet
        self._live_wanted = live
        self._console: Console | None = None
        self.live_mode = False
        """Whether the output is a live display (known once the console is made)."""
        self._live: Live | None = None
        self._last_log = time.monotonic()
        self._job = ""
        self._price_known = True
        self._header: list[tuple[str, str | None]] = []
        """What :meth:`start` prints (after the job's name), each line with its style."""
        self._started_at: float | None = None

    @property
    def console(self) -> Console:
        """The console (made on first use: rich is imported then)."""
        if self._console is None:
            from rich.console import Console

            probe = Console(file=self.stream)
            self.live_mode = probe.is_terminal if self._live_wanted is None else self._live_wanted
            # Log lines are never wrapped when the output is not a terminal.
            width = None if probe.is_terminal else 200
            self._console = Console(
                file=self.stream, highlight=False, width=width, quiet=self.quiet
            )
        return self._console

    def start(self, job: JobSpec, scan: InputScan) -> None:
        from pipeline.money.pricing import resolve_price

        self._job = job.name
        self._price_known = (
            resolve_price(job.request.base_url, job.request.model, job.pricing) is not None
        )
        files = len(scan.files)
        self._header = [
            (
                f": {scan.rows:,} rows from {files} file{'s' if files != 1 else ''} -> "
                f"{job.request.base_url} ({job.request.model}), up to "
                f"{job.limits.max_in_flight} in flight",
                None,
            )
        ]
        if not self._price_known:
            self._header.append(
                (
                    f"No price is known for {job.request.model} at {job.request.base_url}: "
                    "costs will show as unknown. Add a [pricing] table to the job to track "
                    "spend.",
                    "yellow",
                )
            )
        self._started_at = time.monotonic()

    def _show_header(self) -> None:
        """Print the header :meth:`start` made, then start the live display (on a terminal)."""
        if self._started_at is None:
            return
        self._started_at = None
        from rich.text import Text

        console = self.console
        (first, _), *rest = self._header
        console.print(Text.assemble((self._job, "bold"), first))
        for text, style in rest:
            console.print(text, style=style, markup=False)
        if self.live_mode and not self.quiet:
            from rich.live import Live

            self._live = Live(console=console, refresh_per_second=4, transient=True)
            self._live.start()

    def _render(self, s: Snapshot) -> Group:
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        total = max(s.total_rows, 1)
        bar = ProgressBar(total=total, completed=s.done, width=40)
        head = Text(f"{s.done:,}/{s.total_rows:,} rows ({100 * s.done / total:.1f}%)  ")
        line = Table.grid(padding=(0, 1))
        line.add_row(bar, head)
        return Group(line, Text(figures(s, price_known=self._price_known), style="dim"))

    def update(self, snapshot: Snapshot) -> None:
        if self._started_at is not None:
            if not snapshot.requests and time.monotonic() - self._started_at < HEADER_WAIT_S:
                return  # the first requests are not out yet
            self._show_header()
        if self._live is not None:
            self._live.update(self._render(snapshot))
            return
        now = time.monotonic()
        if now - self._last_log < LOG_EVERY_S:
            return
        self._last_log = now
        s = snapshot
        pct = 100 * s.done / max(s.total_rows, 1)
        self.console.print(
            f"[{self._job}] {s.done:,}/{s.total_rows:,} rows ({pct:.1f}%) · "
            + figures(s, price_known=self._price_known),
            markup=False,
        )

    def notice(self, message: str) -> None:
        self._show_header()
        console = self._live.console if self._live is not None else self.console
        if self.quiet:
            from rich.console import Console

            console = Console(file=self.stream, highlight=False)
        console.print(message, style="yellow", markup=False)

    def event(self, message: str) -> None:
        if self.verbose:
            self._show_header()
            console = self._live.console if self._live is not None else self.console
            console.print(message, style="dim", markup=False)

    def finish(self, report: RunReport) -> None:
        self._show_header()
        self.close()
        print_summary(self.console, report)

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None


def print_summary(console: Console, report: RunReport) -> None:
    from rich.table import Table

    s = report.final
    table = Table(title=f"{report.job}: summary", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("rows ok", f"{s.ok + s.resumed_rows - s.resumed_failed:,}")
    table.add_row("rows failed", f"{s.failed + s.resumed_failed:,}")
    if s.truncated:
        table.add_row("  of them truncated", f"{s.truncated:,} (finish_reason length)")
    if s.reasks:
        table.add_row("re-asks", f"{s.reasks:,} (answers that failed the schema, billed)")
    if s.resumed_rows:
        table.add_row("from earlier runs", f"{s.resumed_rows:,}")
    table.add_row(
        "requests sent", f"{s.requests:,} ({s.retries:,} retries, {s.rate_limited:,} 429s)"
    )
    table.add_row("input tokens", f"{s.usage.prompt_tokens:,} ({s.usage.cached_tokens:,} cached)")
    table.add_row(
        "output tokens",
        f"{s.usage.completion_tokens:,} ({s.usage.reasoning_tokens:,} reasoning)",
    )
    table.add_row("cost (this run)", money(s.cost_usd, known=report.price_known))
    parts = s.cost_parts
    if parts is not None and report.price_known and parts.total:
        table.add_row("  by kind", by_kind(parts))
    if report.budget is not None:
        budget = report.budget
        stopped = " (stopped: the next request could pass it)" if report.over_budget else ""
        table.add_row("budget", f"{money(budget.spent)} spent of {money(budget.cap)}{stopped}")
    table.add_row("wall time", f"{s.elapsed_s:.1f} s ({s.requests_per_s:,.1f} req/s)")
    if report.unanswered is not None:
        worst = report.unanswered.worst_cost_usd
        table.add_row(
            "possibly billed twice",
            f"{report.unanswered.count:,} (worst case {money(worst)})",
        )
    if report.interrupted or report.over_budget:
        pending = s.total_rows - s.done
        table.add_row("output", f"{report.output} ({report.output_rows:,} finished rows so far)")
        how = (
            "raise the budget's cap (see below), then run the same command again"
            if report.over_budget
            else "run the same command again to resume"
        )
        table.add_row("pending", f"{pending:,} rows: {how}")
    else:
        table.add_row("output", str(report.output))
    where = summary_path(report.output, report.state_dir)
    table.add_row("run summary", f"{where} (tokens and dollars by kind)")
    console.print(table)


def report_hint(job_file: str, *, local: bool, output: str | None) -> str:
    """The line after a run's summary that names the command making its report."""
    import shlex

    words = ["pipeline", "report", shlex.quote(job_file)]
    if local:
        words.append("--local")
    if output is not None:
        words += ["--output", shlex.quote(output)]
    return f"report: {' '.join(words)}"


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def print_status(status: JobStatus, console: Console | None = None) -> None:
    """``pipeline status`` for a person."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(highlight=False)
    table = Table(title=f"{status.job}: status", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    if status.endpoint == "local":
        side = "the built-in server (--local runs; the real endpoint's are apart)"
    else:
        side = f"{status.endpoint} (--local runs are apart: add --local to see them)"
    table.add_row("results of", side)
    table.add_row("state folder", status.state_dir)
    table.add_row(
        "rows",
        f"{status.rows:,} total: {status.ok:,} ok, {status.failed:,} failed, "
        f"{status.pending:,} pending",
    )
    spent = status.spent
    table.add_row(
        "tokens so far",
        f"{spent.prompt_tokens:,} in ({spent.cached_tokens:,} cached), "
        f"{spent.completion_tokens:,} out ({spent.reasoning_tokens:,} reasoning)",
    )
    table.add_row("cost so far", money(status.spent_usd))
    parts = status.spent_parts
    if parts is not None and parts.total:
        table.add_row("  by kind", f"{by_kind(parts)} (at today's price)")
    last = status.last_run
    if last is None:
        table.add_row("last run", "none yet")
    else:
        if last.how is not None:
            ended = f"ended {_when(last.ended_at)} ({last.how})"
        elif status.running:
            ended = f"running now ({status.running})"
        else:
            ended = "did not end: the process was killed or crashed"
        table.add_row("last run", f"#{last.run}, started {_when(last.started_at)}, {ended}")
    unanswered = status.unanswered
    if unanswered is None:
        table.add_row("double-spend suspects", "none")
    else:
        table.add_row(
            "double-spend suspects",
            f"{unanswered.count:,} requests of run {unanswered.run} were in flight when it stopped "
            f"(worst case {money(unanswered.worst_cost_usd)}); the next run sends them again",
        )
    console.print(table)
