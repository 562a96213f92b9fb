"""A shard's side of the cluster's limiter and budget: leased permits and dollars, used
locally, and a call to the coordinator every few hundred milliseconds (see
:mod:`pipeline.cluster.leases` for the coordinator's side).

:class:`ShardLink` is the :class:`~pipeline.engine.shared.SharedLimits` a shard's
:class:`~pipeline.engine.runner.Runner` runs with. Its limiter lets a request go while the
worker uses fewer permits than it holds; a finished request's permit goes to the next one
at once, and its outcome waits for the next call. A 429 hands its permit back and calls the
coordinator at once, so the cluster's cap is cut (once per congestion epoch, as on one
machine) without waiting for the next round. Its budget reserves each request's worst case
from the dollars the coordinator leased; when they run short, the request waits for the next
call, which the shortage makes happen at once.

The worker calls the coordinator when one of these holds, at most every ``min_interval_s``:
a 429 came back; it waits for permits or dollars and the last answer said some were free;
``batch`` outcomes are waiting; it holds more permits than its share and gave some back;
it could use more permits (and the cap could grow, or some are free), or a larger rate share,
than it holds (*hungry*: after ``HUNGRY_SPARE_S``, doubled after each call that brought nothing
while no permit was free, up to ``HUNGRY_MAX_S``; at least ``HUNGRY_S``
while none is free); or a third of the lease's time-to-live has passed (the lease must not
expire). In steady state that is one call per ``batch`` requests or per ``ttl_s / 3`` seconds.

A job with ``requests_per_minute`` or ``tokens_per_minute`` paces its requests locally at the
share of those budgets its lease carries (:mod:`pipeline.cluster.rates`): a request waits for
the pacer, not for the coordinator, so a rate budget adds no calls.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import TYPE_CHECKING

import anyio
import anyio.lowlevel

from pipeline.cluster.leases import TTL_S, ZERO, Progress, Report, SyncCall, SyncReply
from pipeline.cluster.rates import SharePacer
from pipeline.money.budget import Budget, Decision
from pipeline.provider.limiter import Limiter
from pipeline.provider.limits import (
    Grant,
    LimiterConfig,
    LimiterSnapshot,
    NeverFitsError,
    Outcome,
)
from pipeline.provider.rate_window import RateLimitHeaders, rate_exhausted

if TYPE_CHECKING:
    from pipeline.engine.accounting import Accounts

Call = Callable[[SyncCall], Awaitable[SyncReply]]
BATCH = 256
MIN_INTERVAL_S = 0.2
HUNGRY_S = 2.5
"""How often, at most, a worker that could use more permits than it holds calls while the
coordinator's last answer said none are free..."""
HUNGRY_SPARE_S = 1.0
"""... and at first otherwise (doubled after each such call that brought nothing)..."""
HUNGRY_MAX_S = 5.0
"""... up to this."""


@dataclass(slots=True, eq=False)
class _Waiter:
    tokens: int = 0
    event: anyio.Event = field(default_factory=anyio.Event)
    granted: bool = False


class LeasedLimiter(Limiter):
    """A limiter whose permits are leased from the cluster's coordinator."""

    def __init__(self, config: LimiterConfig, link: ShardLink) -> None:
        super().__init__(config)
        self._link = link

    def snapshot(self) -> LimiterSnapshot:
        return self._link.snapshot()

    async def acquire(self, tokens: int) -> Grant:
        return await self._link.acquire(tokens)

    def release(
        self,
        grant: Grant,
        *,
        outcome: Outcome,
        actual_tokens: int | None = None,
        headers: RateLimitHeaders | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        self._link.release(
            grant,
            outcome=outcome,
            actual_tokens=actual_tokens,
            headers=headers,
            retry_after_s=retry_after_s,
        )


class LeasedBudget(Budget):
    """A budget that reserves from dollars leased from the cluster's coordinator."""

    def __init__(self, cap: Decimal, link: ShardLink) -> None:
        super().__init__(cap=cap)
        self.link = link

    def reserve(self, worst: Decimal) -> Decision:
        return self.link.reserve(worst)

    def settle(self, reserved: Decimal, actual: Decimal | None) -> None:
        self.link.settle(reserved, actual)


class _Dollars:
    """The dollars a worker holds, leased from the coordinator."""

    def __init__(self) -> None:
        self.budget: LeasedBudget | None = None
        self.stock = ZERO
        self.reserved = ZERO
        self._spent: Decimal | None = ZERO
        self._settled_reserved = ZERO
        self._need = ZERO
        self._largest = ZERO
        self.exhausted = False

    def _wake(self) -> None:
        """Call the coordinator soon."""
        raise NotImplementedError

    def reserve(self, worst: Decimal) -> Decision:
        self._largest = max(self._largest, worst)
        if self.exhausted:
            return "exhausted"
        if worst <= self.stock:
            self.stock -= worst
            self.reserved += worst
            if self.budget is not None:
                self.budget.reserved = self.reserved
            return "reserved"
        self._need = max(self._need, worst)
        self._wake()
        return "wait"

    def settle(self, reserved: Decimal, actual: Decimal | None) -> None:
        self.reserved -= reserved
        self._settled_reserved += reserved
        spent = reserved if actual is None else actual
        if self._spent is not None and actual is not None:
            self._spent += actual
        elif actual is None:
            self._spent = None
        # What the request did not spend goes back with the next call (as part of
        # ``settled_reserved``), not to the stock: the coordinator lends it anew.
        if self.budget is not None:
            self.budget.reserved = self.reserved
            self.budget.spent += spent


class ShardLink(_Dollars):
    """The leases of one worker, and its calls to the coordinator."""

    def __init__(
        self,
        call: Call,
        *,
        worker: str,
        slot: str = "",
        batch: int = BATCH,
        min_interval_s: float = MIN_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self._call = call
        self.worker = worker
        self.slot = slot
        """The driver's worker this is (a restarted one takes its predecessor's slot)."""
        self._batch = batch
        self._min_interval_s = min_interval_s
        self._clock = clock
        self._ids = itertools.count(1)
        self._grant_ids = itertools.count(1)
        # Permits.
        self.held = 0
        self.in_use = 0
        self._given_back = 0
        """Permits given back so far (those given back during a call are not in its answer)."""
        self._queue: deque[_Waiter] = deque()
        self.share = 0
        self.epoch = 0
        self.spare = True
        self._reports: list[Report] = []
        self._wake_sync = anyio.Event()
        self._urgent = False
        self._snapshot: LimiterSnapshot | None = None
        self._config: LimiterConfig | None = None
        self._last_call = -math.inf
        self._starved_wait_s = min_interval_s
        """How long a worker waiting for permits waits between calls: doubled while calls
        bring none (the cap is all out), back to ``min_interval_s`` when one does."""
        self._hungry_wait_s = HUNGRY_SPARE_S
        """How long a hungry worker waits between calls: doubled while they bring nothing."""
        self._ttl_s = TTL_S
        self._accounts: Accounts | None = None
        self.progress = Progress()
        self.calls = 0
        self._rates = SharePacer()
        """Paces requests at the worker's share of the rate budgets (a job with one)."""

    # -- SharedLimits -------------------------------------------------------------------------

    def limiter(self, config: LimiterConfig) -> Limiter:
        self._config = config
        self._rates.configure(config)
        return LeasedLimiter(config, self)

    def budget_for(self, cap: Decimal) -> LeasedBudget:
        self.budget = LeasedBudget(cap, self)
        return self.budget

    def bind(self, accounts: Accounts) -> None:
        self._accounts = accounts

    def commit_group(self) -> int:
        return max(1, self.held // 2)

    # -- permits -------------------------------------------------------------------------------

    async def acquire(self, tokens: int) -> Grant:
        await anyio.lowlevel.checkpoint_if_cancelled()
        tpm = self._rates.tokens_per_minute
        if tpm is not None and tokens > tpm:
            raise NeverFitsError(
                f"the request needs an estimated {tokens} tokens, more than the limit of {tpm} "
                "tokens per minute; it can never be sent"
            )
        now = self._clock()
        if self.in_use < self.held and not self._queue and self._rates.ready_at(tokens) <= now:
            self.in_use += 1
            self._rates.take(now, tokens)
        else:
            waiter = _Waiter(tokens=tokens)
            self._queue.append(waiter)
            if self.held < max(1, self.share) or self._rates.rated:
                self._wake()  # a call, or the pacer's wake-up, is due
            try:
                await waiter.event.wait()
            except BaseException:
                if waiter.granted:
                    self.in_use -= 1
                    self._rates.give_back(self._clock(), tokens)
                    self._dispatch()
                else:
                    self._queue.remove(waiter)
                raise
        return Grant(
            id=next(self._grant_ids),
            tokens=tokens,
            granted_at=self._clock(),
            epoch=self.epoch,
        )

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def _dispatch(self) -> None:
        """Hand free permits to the waiting requests, first come first served, as fast as the
        rate share lets them go."""
        now = self._clock()
        while (
            self._queue
            and self.in_use < self.held
            and self._rates.ready_at(self._queue[0].tokens) <= now
        ):
            waiter = self._queue.popleft()
            waiter.granted = True
            self._rates.take(now, waiter.tokens)
            self.in_use += 1
            waiter.event.set()

    def _paced_in(self) -> float:
        """Seconds until the pacer lets the first waiting request go (``inf``: nothing to
        wake for: no waiter, no free permit, or no share yet)."""
        if not self._rates.rated or not self._queue or self.in_use >= self.held:
            return math.inf
        return max(0.0, self._rates.ready_at(self._queue[0].tokens) - self._clock())

    def release(
        self,
        grant: Grant,
        *,
        outcome: Outcome,
        actual_tokens: int | None = None,
        headers: RateLimitHeaders | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        in_flight, full = self.in_use, bool(self._queue) and self.in_use >= self.held
        self.in_use -= 1
        if self._rates.rated:
            now = self._clock()
            if actual_tokens is not None:
                self._rates.settle(now, grant.tokens, actual_tokens)
            exhausted = rate_exhausted(headers, grant.tokens)
            if exhausted and headers is not None:
                reset = headers.reset_requests_s or headers.reset_tokens_s or retry_after_s
                self._rates.hold(now + (1.0 if reset is None else reset))
            elif outcome == "rate_limited":
                self._rates.tighten(now)
        give_back = outcome == "rate_limited" or self.held > self.share
        if give_back:
            self.held -= 1
            self._given_back += 1
        self._reports.append(
            Report(
                outcome=outcome,
                epoch=grant.epoch,
                latency_s=self._clock() - grant.granted_at,
                tokens=grant.tokens,
                actual_tokens=actual_tokens,
                headers=headers,
                retry_after_s=retry_after_s,
                kept=not give_back,
                in_flight=in_flight,
                full=full,
            )
        )
        if give_back:
            self._urgent = True  # the coordinator can lend it to a worker that waits for it
            self._wake()
        elif len(self._reports) >= self._batch:
            self._wake()
        self._dispatch()

    def snapshot(self) -> LimiterSnapshot:
        return _snapshot(self._snapshot, self._config, in_flight=self.in_use, waiting=self.waiting)

    # -- the calls --------------------------------------------------------------------------------

    async def run(self) -> None:
        """Call the coordinator whenever it is due, and let paced requests go when their
        time comes (until cancelled)."""
        while True:
            self._dispatch()
            due = self._due_in()
            if due > 0:
                with anyio.move_on_after(min(due, self._paced_in())):
                    await self._wake_sync.wait()
                self._wake_sync = anyio.Event()
                continue
            await self.sync()

    def _due_in(self) -> float:
        """Seconds until the next call is due (0: now)."""
        since = self._clock() - self._last_call
        if since >= self._ttl_s / 3:
            return 0.0
        wants = self._urgent or len(self._reports) >= self._batch or self._need > ZERO
        if wants:
            return max(0.0, self._min_interval_s - since)
        starved = self.waiting > 0 and self.in_use >= self.held and self.held < max(1, self.share)
        if starved:
            return max(0.0, self._starved_wait_s - since)
        permits = (
            self.waiting > 0
            and self.in_use >= self.held
            and self.held < self.demand()
            and self._may_grow()
        )
        rate = self.waiting > 0 and not self._rates.full
        if permits or rate:
            # Hungry: the cluster's cap may have grown, or another worker's shard ended.
            hungry_s = self._hungry_wait_s
            if permits and not rate and not self.spare:
                hungry_s = max(hungry_s, HUNGRY_S)
            return max(0.0, min(self._ttl_s / 3, hungry_s) - since)
        return self._ttl_s / 3 - since

    def _may_grow(self) -> bool:
        """Whether a call could bring more permits: some were free at the last answer, or
        the cluster's cap is below ``max_in_flight`` (at it, with every permit lent, only
        another worker's leaving frees one, and the next call finds that)."""
        snapshot = self._snapshot
        return self.spare or snapshot is None or snapshot.cap < snapshot.max_in_flight

    async def sync(self, *, leaving: bool = False) -> SyncReply:
        """One call: the outcomes and dollars since the last one, for new leases."""
        reports, self._reports = tuple(self._reports), []
        returned, self.stock = self.stock, ZERO
        spent, self._spent = self._spent, ZERO
        settled, self._settled_reserved = self._settled_reserved, ZERO
        need, self._need = self._need, ZERO
        self._urgent = False
        want = 0 if leaving else self.demand()
        per_request = max(self._largest, need)
        call = SyncCall(
            worker=self.worker,
            call_id=f"{self.worker}/{next(self._ids)}",
            want=want,
            in_use=self.in_use,
            waiting=self.waiting,
            reports=reports,
            spent=spent,
            settled_reserved=settled,
            returned=returned,
            reserved=self.reserved,
            dollars_wanted=ZERO if leaving else per_request * max(1, want) * 2,
            need=need,
            leaving=leaving,
            progress=self.progress,
            slot=self.slot,
        )
        self._last_call = self._clock()
        given_back = self._given_back
        reply = await self._call(call)
        self.calls += 1
        self._apply(reply, given_back=self._given_back - given_back)
        return reply

    def demand(self) -> int:
        """Permits this worker could use: its job's ``max_in_flight``, or fewer when fewer
        rows are left (a worker near the end of its shard leaves the rest to the others)."""
        top = self._config.max_in_flight if self._config is not None else 1
        progress = self.progress
        if progress.rows_total:
            top = min(top, max(0, progress.rows_total - progress.rows_done))
        return max(top, self.in_use + self.waiting) if self.waiting else top

    def _apply(self, reply: SyncReply, *, given_back: int) -> None:
        held = max(0, reply.permits - given_back)
        if held > self.held or held >= reply.share:
            self._starved_wait_s = self._min_interval_s
        else:
            self._starved_wait_s = min(self._ttl_s / 3, self._starved_wait_s * 2)
        before = self._rates.share
        more_rate = reply.rates is not None and (
            before is None or reply.rates.fraction > before.fraction
        )
        if held > self.held or more_rate:
            self._hungry_wait_s = HUNGRY_SPARE_S
        elif self.waiting and not reply.spare:  # it brought nothing: the cap is all lent
            self._hungry_wait_s = min(HUNGRY_MAX_S, self._hungry_wait_s * 2)
        self.held = held
        self.share = reply.share
        self.epoch = reply.epoch
        self.spare = reply.spare
        self._snapshot = reply.snapshot
        self._ttl_s = reply.ttl_s
        self.stock += reply.dollars
        if reply.rates is not None:
            self._rates.apply(self._clock(), reply.rates)
        if reply.exhausted:
            self.exhausted = True
        if self._accounts is not None:
            self._accounts.budget_changed()
        self._dispatch()

    def _wake(self) -> None:
        self._wake_sync.set()


def _snapshot(
    snapshot: LimiterSnapshot | None,
    config: LimiterConfig | None,
    *,
    in_flight: int,
    waiting: int,
) -> LimiterSnapshot:
    """The cluster's cap, what the coordinator learned (nothing before its first answer); a
    worker's in flight."""
    if snapshot is None:
        assert config is not None
        return LimiterSnapshot(
            cap=0,
            max_in_flight=config.max_in_flight,
            in_flight=in_flight,
            waiting=waiting,
            requests_last_minute=0,
            tokens_last_minute=0,
            requests_per_minute=config.requests_per_minute,
            tokens_per_minute=config.tokens_per_minute,
            rate_limited=0,
            cuts=0,
            cooling_until=None,
        )
    return replace(snapshot, in_flight=in_flight, waiting=waiting)
