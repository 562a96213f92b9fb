"""``pipeline run --log-file PATH``: a run's plain log, for cron jobs and later reading.

One line per event, each stamped with the local time: the header (rows, endpoint, model), the
live figures every few seconds (the same as the display: rows, req/s, tok/s, dollars, ETA, in
flight, the limiter), every notice, every retry, re-ask and failure with its input row, and
the summary at the end. Lines are appended, so the log of a job's nightly runs accumulates;
the API key never appears (messages are redacted where they are made).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TextIO

from pipeline.cli.display import figures, money
from pipeline.engine.report import Reporter, RunReport
from pipeline.engine.stats import Snapshot
from pipeline.errors import UsageError
from pipeline.io.sources import InputScan
from pipeline.job.spec import JobSpec

LOG_EVERY_S = 10.0


class PlainLog(Reporter):
    """Appends the run's events to a file as plain, time-stamped lines."""

    def __init__(self, path: Path, *, every_s: float = LOG_EVERY_S) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file: TextIO = path.open("a", encoding="utf-8")
        except OSError as exc:
            raise UsageError(
                f"--log-file {path}: cannot write it ({exc.strerror or exc}). Choose a file in "
                "a folder you can write to."
            ) from None
        self._every_s = every_s
        self._last = 0.0
        self._price_known = True

    def _line(self, text: str) -> None:
        self._file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")
        self._file.flush()

    def start(self, job: JobSpec, scan: InputScan) -> None:
        from pipeline.money.pricing import resolve_price

        self._price_known = (
            resolve_price(job.request.base_url, job.request.model, job.pricing) is not None
        )
        self._line(
            f"{job.name}: {scan.rows:,} rows -> {job.request.base_url} ({job.request.model}), "
            f"up to {job.limits.max_in_flight} in flight"
        )
        self._last = time.monotonic()

    def update(self, snapshot: Snapshot) -> None:
        now = time.monotonic()
        if now - self._last < self._every_s:
            return
        self._last = now
        self._line(self._progress(snapshot))

    def _progress(self, s: Snapshot) -> str:
        pct = 100 * s.done / max(s.total_rows, 1)
        return (
            f"{s.done:,}/{s.total_rows:,} rows ({pct:.1f}%) · "
            f"{figures(s, price_known=self._price_known)}"
        )

    def notice(self, message: str) -> None:
        self._line(f"notice: {message}")

    def event(self, message: str) -> None:
        self._line(message)

    def finish(self, report: RunReport) -> None:
        s = report.final
        self._line(self._progress(s))
        self._line(
            f"{report.job}: run {report.run} ended {report.how}: "
            f"{s.ok + s.resumed_rows - s.resumed_failed:,} ok, "
            f"{s.failed + s.resumed_failed:,} failed, {s.requests:,} requests "
            f"({s.retries:,} retries, {s.rate_limited:,} 429s), "
            f"{s.usage.prompt_tokens:,} input and {s.usage.completion_tokens:,} output tokens, "
            f"{money(s.cost_usd, known=report.price_known)}, {s.elapsed_s:.1f} s; output "
            f"{report.output}"
        )

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


class Fanout(Reporter):
    """Tells several reporters the same things (the display and a log file)."""

    def __init__(self, *reporters: Reporter) -> None:
        self._reporters = reporters

    def start(self, job: JobSpec, scan: InputScan) -> None:
        for reporter in self._reporters:
            reporter.start(job, scan)

    def notice(self, message: str) -> None:
        for reporter in self._reporters:
            reporter.notice(message)

    def event(self, message: str) -> None:
        for reporter in self._reporters:
            reporter.event(message)

    def update(self, snapshot: Snapshot) -> None:
        for reporter in self._reporters:
            reporter.update(snapshot)

    def finish(self, report: RunReport) -> None:
        for reporter in self._reporters:
            reporter.finish(report)

    def close(self) -> None:
        for reporter in self._reporters:
            reporter.close()
