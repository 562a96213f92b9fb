"""The books of a run's attempts: one object that every attempt opens and settles.

An attempt goes through the books twice. :meth:`Accounts.open` reserves the attempt's worst
case from the budget (waiting while requests in flight hold the room it needs) and then a
grant from the limiter (an in-flight slot, and its tokens from a tokens/min budget).
:meth:`Accounts.settle` closes it: the row is billed what the provider reported, at the price
in effect when it was sent; the run's figures count it; the budget's reservation is replaced by
what was spent; the limiter learns how it went (429, headers, tokens used); and the run's
:class:`~pipeline.state.timeline.Timeline`, when it has one, records when the attempt went out,
how long it took and how it ended. Between the two, :meth:`Accounts.record` records the row's
intent right before its first request is written to a connection (the client calls it in the
same step as the write), so a crash can never lose a request that may be billed, nor report
one that never left; it counts as unanswered until its result is recorded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TypeVar

import anyio

from pipeline.engine.control import RunControl
from pipeline.engine.stats import RunStats
from pipeline.money.budget import ZERO, Budget
from pipeline.money.pricing import ZERO_USAGE, CostParts, Price, Usage, cost, cost_parts, price_now
from pipeline.provider.client import Attempt
from pipeline.provider.limiter import Limiter
from pipeline.provider.limits import Grant, Outcome, parse_rate_limit_headers
from pipeline.provider.retry import Failure
from pipeline.rows.plan import PlannedRow
from pipeline.state.intents import IntentLog
from pipeline.state.journal import Intent
from pipeline.state.timeline import (
    CONNECTION,
    CUT_OFF,
    MALFORMED,
    NEVER_CONNECTED,
    TIMEOUT,
    Timeline,
)

WORST_COSTS_KEPT = 4096
"""Costs remembered, at most: a :class:`Pricing`'s worst costs (one per distinct prompt
length), and :class:`Accounts`' costs of answers (one per distinct usage)."""


K = TypeVar("K")
V = TypeVar("V")


def _remember(kept: dict[K, V], key: K, value: V) -> V:
    """Keep ``value`` under ``key``; ``kept`` is emptied first when it holds
    ``WORST_COSTS_KEPT`` (bounded, whatever the keys)."""
    if len(kept) >= WORST_COSTS_KEPT:
        kept.clear()
    kept[key] = value
    return value


class OverBudget(Exception):
    """The budget cannot cover the next request: the run stops sending."""


@dataclass(slots=True)
class RowProgress:
    """One row on its way: what it sends now, and what its attempts have cost so far."""

    body: bytes
    prompt_tokens: int
    attempts: int = 0
    reasks: int = 0
    usage: Usage = ZERO_USAGE
    cost: Decimal = Decimal(0)
    reached: bool = False
    """Some attempt reached a server (a row none of whose attempts did was never billed)."""
    sending: bool = False
    """An attempt is on its way now (whether it reached a server is not known yet)."""
    recorded: bool = False
    """The row's intent is recorded: one of its requests was written to a connection."""

    def bill(self, usage: Usage, parts: CostParts | None) -> Decimal | None:
        """Count one billed answer costing ``parts``; returns its cost (None when the price
        is unknown)."""
        self.usage = usage if self.usage is ZERO_USAGE else self.usage + usage
        if parts is None:
            return None
        total = parts.total
        self.cost += total
        return total


@dataclass(frozen=True, slots=True)
class Ticket:
    """An open attempt: what it reserved from the budget and the limiter, and its price."""

    worst: Decimal
    tokens: int
    grant: Grant
    price: Price | None
    at: float = 0.0
    """When the grant came, on the timeline's clock: the attempt goes out now."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Pricing:
    """What a row can cost: the job's price and the longest answer it allows."""

    price: Price | None
    max_output: int | None
    """The most output tokens an answer can have (``max_tokens``, else the model's)."""
    max_tokens: int | None
    """The job's ``max_tokens``: what a tokens/min budget reserves for each answer."""
    attempts_per_row: int = 1
    """How many answers one row may be billed for (1 + the re-asks of a structured job)."""
    _worst: dict[int, Decimal | None] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    """:meth:`worst_cost` by prompt tokens, for a price without an off-peak window: every
    request computed it again (Decimal arithmetic, some 2 us of each request's CPU), and a
    job's prompts have few distinct lengths."""

    def now(self) -> Price | None:
        """The price in effect for a request sent now (prices may have time windows)."""
        if self.price is None or self.price.off_peak is None:
            return self.price
        return price_now(self.price)

    def worst_cost(self, prompt_tokens: int | None) -> Decimal | None:
        """What one request can cost at most: its prompt and the longest answer."""
        if prompt_tokens is None or self.max_output is None:
            return None
        fixed = self.price is None or self.price.off_peak is None  # the same at any hour
        if fixed and prompt_tokens in self._worst:
            return self._worst[prompt_tokens]
        usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=self.max_output)
        worst = cost(usage, self.now())
        return _remember(self._worst, prompt_tokens, worst) if fixed else worst

    def worst_cost_of(self, body: bytes, prompt_tokens: int) -> Decimal | None:
        """What one request can cost at most, its longest answer read from its own body when
        the job sets none (an OpenAI batch file's lines carry their own ``max_tokens``)."""
        worst = self.worst_cost(prompt_tokens)
        if worst is not None or self.price is None:
            return worst
        try:
            params = json.loads(body)
        except ValueError:
            return None
        longest = params.get("max_completion_tokens", params.get("max_tokens"))
        if not isinstance(longest, int) or isinstance(longest, bool):
            return None
        return cost(Usage(prompt_tokens=prompt_tokens, completion_tokens=longest), self.now())

    def tokens(self, row: RowProgress) -> int:
        """Tokens a request reserves from a tokens/min budget: its prompt and ``max_tokens``."""
        return row.prompt_tokens + (self.max_tokens or 0)

    def metered(self, reserved: int, attempt: Attempt) -> int | None:
        """What an answered attempt counts against a tokens/min budget.

        Providers meter ``prompt + max_tokens`` when a request arrives, so with ``max_tokens``
        set the reservation stands unless the real usage is larger; without it, the real usage
        replaces the estimate. A 429 was not served and counts nothing; an error without usage
        keeps its reservation (the provider may have counted it).
        """
        if attempt.failure is Failure.RATE_LIMITED:
            return 0
        if attempt.usage is None:
            return None
        used = attempt.usage.prompt_tokens + attempt.usage.completion_tokens
        if self.max_tokens is None:
            return used
        return max(used, reserved)


class Accounts:
    """Budget, limiter, billing, figures and unanswered requests, kept for every attempt."""

    def __init__(
        self,
        *,
        pricing: Pricing,
        budget: Budget | None,
        limiter: Limiter,
        stats: RunStats,
        intents: IntentLog,
        control: RunControl,
        run: int,
        timeline: Timeline | None = None,
    ) -> None:
        self.pricing = pricing
        self.budget = budget
        self._limiter = limiter
        self._stats = stats
        self._intents = intents
        self._control = control
        self._run = run
        self._timeline = timeline
        self._settled: anyio.Event | None = None
        """Set (and replaced) whenever a reservation settles: budget waiters look again."""
        self.unanswered = 0
        """Requests recorded as sent whose result is not recorded (yet)."""
        self.unanswered_worst: Decimal | None = Decimal(0)
        """What they can cost at most (None: unknown)."""
        self._parts: dict[Usage, CostParts] = {}
        """Costs of usages at the job's price (see :meth:`_cost_parts`)."""

    def intent(self, planned: PlannedRow) -> Intent:
        """What is recorded before a row's first request goes out."""
        worst = (
            None
            if planned.body is None or planned.prompt_tokens is None
            else self.pricing.worst_cost_of(planned.body, planned.prompt_tokens)
        )
        if worst is not None:
            worst *= self.pricing.attempts_per_row
        return Intent(key=planned.key, row=planned.row, run=self._run, worst_cost_usd=worst)

    async def open(self, row: RowProgress) -> Ticket:
        """Reserve an attempt's worst case from the budget, then a grant from the limiter.
        Raises :class:`OverBudget` when the run stops at the budget, and
        :class:`~pipeline.provider.limits.NeverFitsError` when the request can never fit."""
        tokens = self.pricing.tokens(row)
        budget = self.budget
        worst = ZERO if budget is None else await self._reserve(budget, row)
        price = self.pricing.now()
        try:
            grant = await self._limiter.acquire(tokens)
        except BaseException:
            self._settle_budget(worst, Decimal(0))
            raise
        at = 0.0 if self._timeline is None else self._timeline.now()
        return Ticket(worst=worst, tokens=tokens, grant=grant, price=price, at=at)

    def sending(self) -> None:
        """A request is on its way out. Call :meth:`returned` when it is back."""
        self._stats.requests += 1
        self._stats.in_flight += 1

    def record(self, intent: Intent, row: RowProgress) -> None:
        """The row's request is written to the connection right after this (the client calls
        it then): its intent is recorded first, once per row."""
        if row.recorded:
            return
        self._intents.record(intent)
        row.recorded = True
        self._count_unanswered(intent, +1)

    def returned(self) -> None:
        """The request of :meth:`sent` is back (answered, failed or cut off)."""
        self._stats.in_flight -= 1

    def answered(self, intent: Intent) -> None:
        """The row of ``intent`` has its result, to be recorded: it is no longer unanswered."""
        self._count_unanswered(intent, -1)

    def _count_unanswered(self, intent: Intent, sign: int) -> None:
        self.unanswered += sign
        worst = intent.worst_cost_usd
        if worst is None or self.unanswered_worst is None:
            self.unanswered_worst = None
        else:
            self.unanswered_worst += sign * worst

    def settle(self, ticket: Ticket, row: RowProgress, attempt: Attempt | None) -> None:
        """Close an attempt: bill the row, count the figures, settle the budget and release
        the limiter's grant. ``attempt`` is None when the request was cut off (a hard stop)."""
        spent: Decimal | None = None
        outcome: Outcome = "error"
        metered: int | None = None
        try:
            if attempt is None:
                return
            if attempt.status is not None:
                spent = Decimal(0)
            if attempt.usage is not None:
                parts = self._cost_parts(attempt.usage, ticket.price)
                spent = row.bill(attempt.usage, parts)
                self._stats.add_billed(parts)
            if attempt.ok:
                outcome = "ok"
            elif attempt.failure is Failure.RATE_LIMITED:
                outcome = "rate_limited"
            metered = self.pricing.metered(ticket.tokens, attempt)
        finally:
            if self._timeline is not None:
                latency = None if attempt is None else attempt.latency_s
                self._timeline.attempt(ticket.at, latency, outcome_code(attempt))
            self._settle_budget(ticket.worst, spent)
            self._limiter.release(
                ticket.grant,
                outcome=outcome,
                actual_tokens=metered,
                headers=(
                    parse_rate_limit_headers(attempt.rate_headers)
                    if attempt is not None and attempt.rate_headers
                    else None
                ),
                retry_after_s=None if attempt is None else attempt.retry_after_s,
            )

    def _cost_parts(self, usage: Usage, price: Price | None) -> CostParts | None:
        """What ``usage`` costs at ``price``; remembered for the job's own price (a price
        without an off-peak window, the same object every time), since answers repeat a few
        token counts and the Decimal arithmetic was a microsecond of every answer."""
        if price is None:
            return None
        if price is not self.pricing.price:
            return cost_parts(usage, price)
        parts = self._parts.get(usage)
        return _remember(self._parts, usage, cost_parts(usage, price)) if parts is None else parts

    async def _reserve(self, budget: Budget, row: RowProgress) -> Decimal:
        """Reserve an attempt's worst-case cost from ``budget``, waiting while requests in
        flight hold the room it needs; raise if it cannot fit at all."""
        worst = self.pricing.worst_cost_of(row.body, row.prompt_tokens) or Decimal(0)
        while True:
            decision = budget.reserve(worst)
            if decision == "reserved":
                return worst
            if decision == "exhausted":
                self._control.stop_for_budget()
            if self._control.stopping:
                raise OverBudget
            if self._settled is None:
                self._settled = anyio.Event()
            await self._settled.wait()

    def _settle_budget(self, worst: Decimal, spent: Decimal | None) -> None:
        if self.budget is not None:
            self.budget.settle(worst, spent)
            self.budget_changed()

    def budget_changed(self) -> None:
        """The budget may have room now: requests waiting for it look again (a budget shared
        by a cluster calls this when its coordinator grants more)."""
        if self._settled is not None:
            self._settled.set()
            self._settled = None


def outcome_code(attempt: Attempt | None) -> str:
    """How an attempt ended, as the timeline writes it (see :mod:`pipeline.state.timeline`)."""
    if attempt is None:
        return CUT_OFF
    status = attempt.status
    if status is not None:
        return MALFORMED if status == 200 and not attempt.ok else str(status)
    if attempt.failure is Failure.TIMEOUT:
        return TIMEOUT
    return CONNECTION if attempt.reached else NEVER_CONNECTED
