"""Pure: what a report shows, gathered once (:mod:`pipeline.report.gather`) and drawn by
:mod:`pipeline.report.page`."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from pipeline.report.figures import Histogram, TimeFigures


@dataclass(frozen=True, slots=True, kw_only=True)
class RunLine:
    """One run of the job's history."""

    run: int
    started_at: float
    ended_at: float | None
    how: str
    """``completed``, ``interrupted``, ``over_budget``, ``failed``, ``running`` or
    ``did not end`` (killed or crashed)."""
    rows_ok: int
    rows_failed: int
    requests: int | None
    """Requests sent (None: the run did not end, so it recorded none)."""
    rate_limited: int | None
    cost_usd: Decimal | None
    """What the run's billed answers cost (None: the price is unknown)."""
    fresh: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class CostKind:
    """Tokens of one kind over every billed answer, and what they cost."""

    name: str
    tokens: int
    usd: Decimal | None


@dataclass(frozen=True, slots=True, kw_only=True)
class ReportData:
    job: str
    model: str
    endpoint: str
    state_dir: str
    made_at: float
    """Unix time the report was made."""
    rows_ok: int
    rows_failed: int
    """Rows by their last recorded result."""
    spent_usd: Decimal | None
    """Every billed answer of every run since the last fresh start (None: price unknown)."""
    history: tuple[RunLine, ...]
    time_run: int | None
    """The run the charts over time show (None: no run has a timeline)."""
    time: TimeFigures | None
    time_note: str | None = None
    """Why there are no charts over time, or what limits them."""
    output_tokens: Histogram
    row_cost: Histogram | None
    """None: the price is unknown."""
    cost_by_kind: tuple[CostKind, ...]
    price_note: str
    """Where the split by kind comes from (or that no price is known)."""
    failures: tuple[tuple[str, int], ...]
    """Failed rows by reason, most first."""
