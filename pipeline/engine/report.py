"""What a run reports: the :class:`RunReport` at its end, and the :class:`Reporter` that
receives its figures as it goes."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from pipeline.engine.stats import Snapshot
from pipeline.io.sources import InputScan
from pipeline.job.spec import JobSpec
from pipeline.money.budget import Budget
from pipeline.state.runs import COMPLETED, INTERRUPTED, OVER_BUDGET, Unanswered

SPARE = Decimal("1.1")
"""The cap suggested after a budget stop covers the rest of the job with 10% to spare."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RunReport:
    job: str
    run: int
    output: Path | str
    """The output file, or its URL in object storage."""
    final: Snapshot
    price_known: bool
    interrupted: bool = False
    over_budget: bool = False
    """The run stopped because the next request could have passed the budget's cap."""
    budget: Budget | None = None
    output_rows: int = 0
    unanswered: Unanswered | None = None
    """Requests the previous run left in flight (possibly billed twice)."""
    state_dir: Path | None = None

    @property
    def rows_left(self) -> int:
        """Input rows with no result yet (to send in a later run)."""
        return max(0, self.final.total_rows - self.final.done)

    def cost_of_the_rest(self) -> Decimal | None:
        """What the rows left would cost at this run's average cost per finished row (None
        when this run finished none, or the price is unknown)."""
        finished = self.final.ok + self.final.failed
        cost = self.final.cost_usd
        if cost is None or finished == 0:
            return None
        return cost / finished * self.rows_left

    def cap_to_finish(self) -> Decimal | None:
        """The budget cap that finishes the job: what is spent, plus the rest of the job at
        this run's cost per row with :data:`SPARE` to spare (None when the rest's cost is not
        known)."""
        rest = self.cost_of_the_rest()
        if rest is None or self.budget is None:
            return None
        return self.budget.spent + rest * SPARE

    @property
    def all_ok(self) -> bool:
        return self.final.failed == 0 and self.final.resumed_failed == 0

    @property
    def how(self) -> str:
        """How the run ended: ``completed``, ``interrupted`` or ``over_budget``."""
        if self.interrupted:
            return INTERRUPTED
        return OVER_BUDGET if self.over_budget else COMPLETED


class Reporter:
    """Receives the run's figures; the default does nothing (see :mod:`pipeline.cli.display`)."""

    def start(self, job: JobSpec, scan: InputScan) -> None:
        """Called once the input is scanned, before any request."""

    def notice(self, message: str) -> None:
        """Something a person should read now (a stop, requests left in flight)."""

    def event(self, message: str) -> None:
        """One row's retry, re-ask or failure, naming the row (for --verbose and log files)."""

    def update(self, snapshot: Snapshot) -> None:
        """Called every ``tick_s`` while the run goes on."""

    def finish(self, report: RunReport) -> None:
        """Called after the output is written."""

    def close(self) -> None:
        """Called last, whatever happened."""
