"""Live run figures: counters updated as results arrive, and frozen snapshots for display."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal

from pipeline.money.budget import ZERO
from pipeline.money.pricing import ZERO_USAGE, CostParts, Usage
from pipeline.provider.limiter import Limiter
from pipeline.provider.limits import LimiterSnapshot
from pipeline.results import RowResult


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    """The figures of a run at one moment."""

    total_rows: int
    resumed_rows: int
    """Rows whose result an earlier run already recorded."""
    resumed_failed: int
    ok: int
    failed: int
    requests: int
    retries: int
    rate_limited: int
    in_flight: int
    usage: Usage
    cost_usd: Decimal | None
    """What this run's billed answers cost (None: price unknown): ``cost_parts.total``."""
    elapsed_s: float
    limiter: LimiterSnapshot | None = None
    """The limiter's cap and budgets, when the run has a limiter."""
    reasks: int = 0
    truncated: int = 0
    cost_parts: CostParts | None = None
    """What this run's billed answers cost, by kind of token (None: price unknown)."""

    @property
    def done(self) -> int:
        return self.resumed_rows + self.ok + self.failed

    @property
    def rows_per_s(self) -> float:
        return (self.ok + self.failed) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        tokens = self.usage.prompt_tokens + self.usage.completion_tokens
        return tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        rate = self.rows_per_s
        remaining = self.total_rows - self.done
        if remaining <= 0:
            return 0.0
        return remaining / rate if rate > 0 else None


@dataclass(slots=True)
class RunStats:
    """Mutable counters; touched only from the event loop's tasks."""

    total_rows: int
    clock: Callable[[], float] = time.monotonic
    limiter: Limiter | None = None
    resumed_rows: int = 0
    resumed_failed: int = 0
    ok: int = 0
    failed: int = 0
    requests: int = 0
    retries: int = 0
    rate_limited: int = 0
    in_flight: int = 0
    cost_unknown: bool = False
    reasks: int = 0
    truncated: int = 0
    started: float = field(default=0.0)
    _tokens: list[int] = field(default_factory=lambda: [0, 0, 0, 0], init=False, repr=False)
    """The results' prompt, completion, cached and reasoning tokens, summed as they come
    (a new :class:`Usage` per result cost a microsecond of each request)."""
    _dollars: list[Decimal] = field(default_factory=lambda: [ZERO] * 3, init=False, repr=False)
    """The billed answers' uncached input, cached input and output dollars, likewise."""

    def __post_init__(self) -> None:
        self.started = self.clock()

    @property
    def usage(self) -> Usage:
        """The tokens of every result so far."""
        prompt, completion, cached, reasoning = self._tokens
        return Usage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            cached_tokens=cached,
            reasoning_tokens=reasoning,
        )

    @property
    def parts(self) -> CostParts:
        """The cost of every billed answer so far, by what is billed."""
        uncached, cached, output = self._dollars
        return CostParts(uncached_input=uncached, cached_input=cached, output=output)

    def add_result(self, result: RowResult) -> None:
        if result.status == "ok":
            self.ok += 1
        elif result.status == "failed":
            self.failed += 1
            if result.finish_reason == "length":
                self.truncated += 1
        usage, tokens = result.usage, self._tokens
        if usage is not ZERO_USAGE:
            tokens[0] += usage.prompt_tokens
            tokens[1] += usage.completion_tokens
            tokens[2] += usage.cached_tokens
            tokens[3] += usage.reasoning_tokens
        if result.cost_usd is None:
            self.cost_unknown = True

    def add_billed(self, parts: CostParts | None) -> None:
        """One billed answer's cost, at the price in effect when it was sent (None: the
        price is unknown). The run's cost is the sum of these, counted as answers arrive,
        so it includes the attempts of rows still on their way (or cut off by a hard stop)."""
        if parts is None:
            self.cost_unknown = True
        else:
            dollars = self._dollars
            dollars[0] += parts.uncached_input
            dollars[1] += parts.cached_input
            dollars[2] += parts.output

    def add_resumed(self, *, ok: int, failed: int) -> None:
        """Rows that earlier runs finished (ok or failed), skipped by this run."""
        self.resumed_rows += ok + failed
        self.resumed_failed += failed

    def snapshot(self) -> Snapshot:
        return Snapshot(
            total_rows=self.total_rows,
            resumed_rows=self.resumed_rows,
            resumed_failed=self.resumed_failed,
            ok=self.ok,
            failed=self.failed,
            requests=self.requests,
            retries=self.retries,
            rate_limited=self.rate_limited,
            in_flight=self.in_flight,
            usage=self.usage,
            cost_usd=None if self.cost_unknown else self.parts.total,
            elapsed_s=self.clock() - self.started,
            limiter=None if self.limiter is None else self.limiter.snapshot(),
            reasks=self.reasks,
            truncated=self.truncated,
            cost_parts=None if self.cost_unknown else self.parts,
        )
