"""A worker's side of the cluster's limiter and budget: leased permits and dollars, used
locally, and a call to the coordinator now and then (see :mod:`pipeline.cluster.leases` for
the coordinator's side).

:class:`ShardLink` is the :class:`~pipeline.engine.shared.SharedLimits` a shard's
:class:`~pipeline.engine.runner.Runner` runs with. A worker has one link for its process's
life: the lease (permits, dollars, rate share) and the outcomes not yet reported carry from
one shard to the next (:meth:`ShardLink.begin_shard`), so a shard's start and end cost no call;
the worker gives the lease back (a ``leaving`` call) after the last shard the driver has for
it. Its limiter lets a request go while the worker uses fewer permits than it holds; a
finished request's permit goes to the next one at once, and its outcome waits for the next
call. A 429 hands its permit back (what the worker sends falls at once) and makes a call due
within ``GIVE_BACK_S``, which tells the coordinator (its cap is cut once per congestion
epoch, as on one machine); the 429s of a burst go in that one call. In slow start (no 429
yet) the call goes at once: the other workers' leases grow at every call until it does. Its
budget reserves each request's worst case from the dollars the coordinator leased; when they
run short, the request waits for the next call, which the shortage makes happen at once.

The worker calls the coordinator when one of these holds, at most every ``min_interval_s``:
it waits for dollars; ``batch`` outcomes are waiting; it gave permits back (a 429, or it holds
more than its share), within ``GIVE_BACK_S``; it holds no permit, or fewer than its share
(by more than an eighth) while the last answer said some are free for it (at once, then less
often while such calls bring nothing); it could use more permits than it holds while the
cluster's cap climbs (slow start, or back up to the ceiling of the last cut), or fewer than its
share (by more than an eighth), or a larger rate share (*hungry*: once it finished
``HUNGRY_ROUND_TRIPS`` round trips of its own requests, at least ``HUNGRY_MIN_REPORTS``, and
after ``HUNGRY_SPARE_S``, doubled after each call that brought nothing, up to
``HUNGRY_MAX_S``; at least ``HUNGRY_S`` while none is free, but for slow start, in which each
call brings more); or a third of the lease's time-to-live has passed (the lease must not
expire). At the cap's ceiling a
worker that wants more does not call for it: the cap only probes there, and the permit it
grows by goes out with the next batch; but when the last answer said another worker is about
to leave, it calls ``LEAVE_S`` after that (at least ``HUNGRY_SPARE_S`` after its last call).
In steady state that is one call per ``batch`` requests or per ``ttl_s / 3`` seconds.

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
BATCH = 400
MIN_INTERVAL_S = 0.2
HUNGRY_S = 2.5
"""How often, at most, a worker that could use more permits than it holds calls while the
coordinator's last answer said none are free..."""
HUNGRY_SPARE_S = 1.0
"""... and at first otherwise (doubled after each such call that brought nothing)..."""
HUNGRY_MAX_S = 5.0
"""... up to this."""
LEAVE_S = 0.5
"""A worker whose last shard ends leaves (gives its permits back) about this much later: a
worker that wants more calls then (the coordinator says when the shard should end)."""
HUNGRY_ROUND_TRIPS = 4
"""A hungry call also waits for this many round trips of the worker's own requests (its
permits' worth of finished requests each), at least ``HUNGRY_MIN_REPORTS``..."""
HUNGRY_MIN_REPORTS = 32
"""... so that hungry calls cost at most one per that many requests (a slow worker calls
less)."""
GIVE_BACK_S = 2.0
"""Permits a worker gives back (after a 429, or its share fell) go back with a call within
this (the coordinator learns of the 429s, and can lend the permits to a worker that waits)."""


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


class _Permits(_Dollars):
    """The permits a worker holds, and its requests waiting for one (paced at its share of the
    rate budgets)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        super().__init__()
        self._clock = clock
        self._grant_ids = itertools.count(1)
        self.held = 0
        self.in_use = 0
        self.share = 0
        self.epoch = 0
        self._queue: deque[_Waiter] = deque()
        self._rates = SharePacer()
        """Paces requests at the worker's share of the rate budgets (a job with one)."""

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


class ShardLink(_Permits):
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
        super().__init__(clock)
        self._call = call
        self.worker = worker
        self.slot = slot
        """The driver's worker this is (a restarted one takes its predecessor's slot)."""
        self._batch = batch
        self._min_interval_s = min_interval_s
        self._ids = itertools.count(1)
        self._given_back = 0
        """Permits given back so far (those given back during a call are not in its answer)."""
        self.spare = True
        self._reports: list[Report] = []
        self._wake_sync = anyio.Event()
        self._snapshot: LimiterSnapshot | None = None
        self._config: LimiterConfig | None = None
        self._last_call = -math.inf
        self._starved_wait_s = min_interval_s
        """How long a worker waiting for permits waits between calls: doubled while calls
        bring none (the cap is all out), back to ``min_interval_s`` when one does."""
        self._hungry_wait_s = HUNGRY_SPARE_S
        """How long a hungry worker waits between calls: doubled while they bring nothing."""
        self._free_at: float | None = None
        """When another worker's last shard is expected to end (the last answer said)."""
        self._ttl_s = TTL_S
        self._accounts: Accounts | None = None
        self.progress = Progress()
        self.last = True
        """No shard follows this one for the worker (near its end, it wants fewer permits)."""
        self.calls = 0
        self._give_back_s = math.inf
        """Permits were given back: a call is due this long after the last one."""

    def begin_shard(self, *, last: bool) -> None:
        """A new shard starts on this worker (with its own event loop): its figures start
        over; the lease (permits, dollars, rate share) and the outcomes not yet reported carry
        over, so a worker pays no call for a shard's start or end."""
        self._queue.clear()  # empty, unless the last shard ended with an error
        self.in_use = 0
        self.progress = Progress()
        self.last = last
        self._wake_sync = anyio.Event()
        self._accounts = None
        self.budget = None

    @property
    def stale(self) -> bool:
        """The lease may be near its end (no call for a third of its time-to-live): the
        worker calls before it sends anything."""
        return self._clock() - self._last_call >= self._ttl_s / 3

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
        finished = self._clock()
        self._reports.append(
            Report(
                outcome=outcome,
                epoch=grant.epoch,
                latency_s=finished - grant.granted_at,
                tokens=grant.tokens,
                actual_tokens=actual_tokens,
                headers=headers,
                retry_after_s=retry_after_s,
                kept=not give_back,
                in_flight=in_flight,
                full=full,
                finished_at=finished,
            )
        )
        if give_back:
            # The 429 (which may cut the cluster's cap, once per epoch) and the permit go back
            # with a call within GIVE_BACK_S: the permit given back already lowered what this
            # worker sends, and the 429s of a burst go in one call. The first 429s of a run
            # go at once: in slow start the other workers' leases grow at every call.
            news = outcome == "rate_limited" and self._slow_start()
            self._give_back_s = min(self._give_back_s, 0.0 if news else GIVE_BACK_S)
            self._wake()
        elif len(self._reports) in (self._batch, self._hungry_reports()):
            self._wake()  # a batch to report, or a hungry call may be due
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
        wants = len(self._reports) >= self._batch or self._need > ZERO
        if wants:
            return max(0.0, self._min_interval_s - since)
        # Each way below gives when the call is due, in seconds after the last one.
        soon = max(self._min_interval_s, self._give_back_s)
        # A share moves by one as the cap probes its ceiling, and a 429 takes a permit: within
        # an eighth of its share, a worker does not call for more (such calls would cost more
        # than they bring; the next call for another reason brings it).
        busy = self.waiting > 0 and self.in_use >= self.held  # requests wait for a permit
        starved = busy and self.held < max(1, self.share - self.share // 8)
        if starved and (self.held == 0 or self.spare):
            return max(0.0, min(soon, self._starved_wait_s) - since)
        wanting = busy and self.held < self.demand()
        permits = wanting and (starved or self._may_grow())
        rate = self.waiting > 0 and not self._rates.full
        if rate or (permits and len(self._reports) >= self._hungry_reports()):
            # Hungry: the cluster's cap may have grown, or another worker's shard ended.
            hungry_s = self._hungry_wait_s
            if permits and not rate and not self.spare and not self._slow_start():
                hungry_s = max(hungry_s, HUNGRY_S)
            return max(0.0, min(soon, self._ttl_s / 3, hungry_s) - since)
        if wanting and self._free_at is not None:
            # Another worker's last shard is expected to end then (and it to leave a little
            # later), freeing its permits.
            free = max(self._free_at + LEAVE_S - self._last_call, HUNGRY_SPARE_S)
            return max(0.0, min(soon, self._ttl_s / 3, free) - since)
        return max(0.0, min(soon, self._ttl_s / 3) - since)

    def _hungry_reports(self) -> int:
        """Requests a hungry worker finishes between calls (at least)."""
        return max(HUNGRY_MIN_REPORTS, HUNGRY_ROUND_TRIPS * self.held)

    def _slow_start(self) -> bool:
        """Whether the cluster's cap is in slow start (no 429 yet, below ``max_in_flight``):
        it doubles per round trip as the workers report, so the next call brings more."""
        snapshot = self._snapshot
        return (
            snapshot is not None
            and snapshot.ceiling is None
            and snapshot.cap < snapshot.max_in_flight
        )

    def _may_grow(self) -> bool:
        """Whether a call could bring more permits: some were free at the last answer, or
        the cluster's cap is still climbing: in slow start below ``max_in_flight``, or after
        a cut below the ceiling where it came. At that ceiling the cap only probes (one
        request per 8 round trips), and at ``max_in_flight`` only another worker's leaving
        frees a permit: the worker's next call for other reasons finds those."""
        snapshot = self._snapshot
        if self.spare or snapshot is None:
            return True
        if snapshot.ceiling is None:
            return self._slow_start()
        return snapshot.cap < min(snapshot.max_in_flight, snapshot.ceiling - 1)

    async def sync(self, *, leaving: bool = False) -> SyncReply:
        """One call: the outcomes and dollars since the last one, for new leases."""
        reports, self._reports = tuple(self._reports), []
        returned, self.stock = self.stock, ZERO
        spent, self._spent = self._spent, ZERO
        settled, self._settled_reserved = self._settled_reserved, ZERO
        need, self._need = self._need, ZERO
        self._give_back_s = math.inf
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
            sent_at=self._clock(),
        )
        self._last_call = call.sent_at
        given_back = self._given_back
        reply = await self._call(call)
        self.calls += 1
        self._apply(reply, given_back=self._given_back - given_back)
        return reply

    def demand(self) -> int:
        """Permits this worker could use: its job's ``max_in_flight``, or, in its last shard,
        fewer when fewer rows are left (a worker near the end of its last shard leaves the
        rest to the others; one with a shard to follow keeps its permits for it)."""
        top = self._config.max_in_flight if self._config is not None else 1
        progress = self.progress
        if progress.rows_total and self.last:
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
        free_in = reply.free_in_s
        self._free_at = None if free_in is None else self._clock() + free_in
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
