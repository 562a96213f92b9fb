"""Pure: one in-flight limiter and one budget for a whole cluster, leased out to its workers.

The coordinator runs the single-machine :class:`~pipeline.provider.limits.LimiterState` and a
:class:`~pipeline.money.budget.Budget`; :class:`LeaseBook` is its bookkeeping, with the time
passed in. A worker does not ask for every request (an actor call costs ~0.8 ms): it holds a
*lease* of permits (each one request in flight) and dollars, uses them locally for as many
requests as it likes, for all the shards it runs, and calls :meth:`LeaseBook.sync` now and
then (:mod:`pipeline.cluster.link` says when: every few hundred requests, after a 429, when
its stock runs low), with what happened since (:class:`Report`: each finished request's
outcome, the congestion epoch it was sent in, its latency, its tokens and the worker's
requests in flight then; the dollars spent).

- **Permits.** Each permit a worker holds is backed by a grant of the coordinator's
  :class:`LimiterState`, so the state's cap bounds the permits of the whole cluster. For each
  reported request the coordinator releases one of the worker's grants with the request's
  outcome (the state adapts exactly as it does on one machine: slow start, 429 cuts once per
  epoch, cool-down) and, if the worker kept the permit, grants it again. A permit the state
  will not grant again right now (its cap was just cut) stays with the worker *unbacked*, and
  counts against the cap until the worker gives it back: new permits go out only while
  backed plus unbacked permits are below the cap, so the cluster never has more requests in
  flight than ``max_in_flight``. The state learns from what was *really* in flight, not from
  the permits out (some sit idle, are not lent yet, or were just lent): its cap grows on a
  success while the cap holds the cluster back (the workers want at least the cap, all of it
  is lent but for a *slack* that reaches them at their next calls, and the reporting worker
  had requests waiting for a permit), and a 429 cuts from the cluster's requests in flight
  when its request was *sent* (the worker's own count; each other worker's as its calls
  before then said, its permits if it had requests waiting: a worker's last call is stale,
  and permits lent since were not in use yet; workers that left since, too), so the ceiling
  it learns is the provider's, not the permits'. Slow start overshoots the provider's limit
  more than on one machine (the workers' 429s reach the coordinator late), so the state cuts
  gently at a 429 above half of that first ceiling. The slack is what keeps a call
  that brings many round trips' outcomes from taking the cap far ahead of the permits out:
  half the cap in slow start, all of it back up to the ceiling of the last cut (the state
  returns there in one round trip, as on one machine), a sixteenth from that ceiling on.
- **Shares.** Workers that want permits share the cap (water-filling: no worker gets more than
  it asks for; the workers the driver runs that have not called yet count as wanting, so the
  first to call does not take it all); a worker holding more than its share gives permits
  back as its requests finish. Once every shard is handed out, each answer says when the
  first other worker is expected to end its shard (at its pace so far) and leave: a worker
  that wants more permits calls then, so the leaver's permits do not sit idle.
- **Dollars.** On every call a worker hands back the dollars it holds unreserved and asks for
  what its next requests may reserve; the coordinator grants from what the cap leaves after
  the spend and the other workers' leases. When even one request's worst case does not fit
  beside what is already spent, the budget is *exhausted* and every worker stops at its next
  call, as one machine would.
- **Leases expire.** A worker that has not called within ``ttl_s`` is presumed dead: its
  grants go back (as errors: they may have reached the provider), and the dollars its
  requests in flight had reserved count as spent (they may be billed). A worker restarted in
  the same *slot* (Ray restarts a dead actor) ends its predecessor's lease the same way at its
  first call, without waiting for the time-to-live.
- **Rates.** When the job sets ``requests_per_minute`` or ``tokens_per_minute``, each lease
  also carries a share of them that the worker paces at (:mod:`pipeline.cluster.rates`); the
  limiter state then bounds only what is in flight.
- **Idempotent calls.** Each call carries an id; a call seen before gets its first answer
  again and changes nothing, so a retried actor call never grants twice.
"""

from __future__ import annotations

import random
from collections import OrderedDict, deque
from dataclasses import dataclass, field, replace
from decimal import Decimal

from pipeline.cluster.rates import RateShare, RateShares
from pipeline.money.budget import Budget
from pipeline.provider.limits import (
    Grant,
    LearnedLimit,
    LimiterConfig,
    LimiterSnapshot,
    LimiterState,
    Outcome,
)
from pipeline.provider.rate_window import RateLimitHeaders

ZERO = Decimal(0)
TTL_S = 60.0
"""How long a lease lasts without a call (a worker calls every third of it at least)."""
REMEMBERED_CALLS = 8
"""Answers kept per worker for calls that might be retried."""
MIN_STEP = 4
"""A worker's lease may grow to at least this many permits at once."""
SLOW_START_GROWTH = 4
"""In slow start a lease grows at most this many times per call (a worker calls every few
round trips, in which one machine's slow start would double the cap each)."""
OVERDUE_S = 3.0
"""A shard this late on its pace gives no hint of when its permits come free."""
HISTORY = 16
"""A worker's last calls whose figures the coordinator keeps (to tell what it had in flight
when a 429's request was sent)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Report:
    """One request a worker's permit carried, finished."""

    outcome: Outcome
    epoch: int
    """The coordinator's congestion epoch the worker knew when it sent the request."""
    latency_s: float
    tokens: int
    """Tokens the request reserved from a tokens/min budget."""
    actual_tokens: int | None = None
    headers: RateLimitHeaders | None = None
    retry_after_s: float | None = None
    kept: bool = True
    """The worker keeps the permit for its next request (else it gives it back)."""
    in_flight: int = 1
    """The worker's requests in flight when it finished, this one included."""
    full: bool = False
    """The worker had requests waiting for a permit then (its permits held it back)."""
    finished_at: float = 0.0
    """When it finished, on the worker's clock (as :attr:`SyncCall.sent_at`)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Progress:
    """A worker's figures, for the cluster's display."""

    shard: str | None = None
    rows_done: int = 0
    rows_total: int = 0
    requests: int = 0
    in_flight: int = 0
    rate_limited: int = 0
    cost_usd: Decimal | None = ZERO


@dataclass(frozen=True, slots=True, kw_only=True)
class SyncCall:
    worker: str
    call_id: str
    want: int
    """Permits the worker could use now (those in use plus its waiting requests)."""
    in_use: int
    waiting: int = 0
    """Requests waiting for a permit (the worker uses every permit it holds)."""
    reports: tuple[Report, ...] = ()
    spent: Decimal | None = ZERO
    """Dollars settled since the last call (None: unknown price, counted as reserved)."""
    settled_reserved: Decimal = ZERO
    """What those settled requests had reserved."""
    returned: Decimal = ZERO
    """Dollars the worker held unreserved and gives back."""
    reserved: Decimal = ZERO
    """Dollars its requests in flight hold now."""
    dollars_wanted: Decimal = ZERO
    """Dollars it asks for (its next requests' worst cases)."""
    need: Decimal = ZERO
    """The worst case of the request it waits to send (0: none waits)."""
    leaving: bool = False
    """The worker is done: everything it holds goes back."""
    progress: Progress = Progress()
    slot: str = ""
    """Which of the driver's workers this is: a new worker in a slot ends the lease of the
    one before it (it died and was restarted)."""
    sent_at: float = 0.0
    """When the worker made the call, on its own clock: with a report's ``finished_at`` and
    latency, the coordinator tells how long ago that request was sent."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SyncReply:
    permits: int
    """The permits the worker holds now (given back ones not counted, those of the requests
    it has in flight counted)."""
    share: int
    """Permits the worker may hold: it gives back the rest as their requests finish."""
    epoch: int
    dollars: Decimal
    """Dollars the worker may reserve from now on."""
    exhausted: bool
    snapshot: LimiterSnapshot
    ttl_s: float
    spare: bool
    """Permits are free now for this worker (below its share, and its lease may grow): if it
    wants more it may call again soon."""
    rates: RateShare | None = None
    """The worker's share of the rate budgets (a job with a rate budget)."""
    free_in_s: float | None = None
    """When another worker is expected to end its last shard and leave, freeing its permits
    (seconds from now; None: none is): a worker that wants more permits calls then."""


@dataclass(slots=True)
class _Lease:
    grants: list[Grant] = field(default_factory=list)
    unbacked: int = 0
    dollars: Decimal = ZERO
    """Leased and not yet spent or given back (reserved by requests in flight, or held)."""
    reserved: Decimal = ZERO
    """Of those, what its requests in flight hold (spent if the worker dies)."""
    want: int = 0
    """Permits the worker could use, as its last call said."""
    reach: int = 0
    """Permits it may hold by its next call: ``want``; but in slow start at most
    ``SLOW_START_GROWTH`` times what it held (leases must not run far ahead of what the
    provider has shown it takes, or one call could put the whole ``max_in_flight`` out at
    once; past slow start the cap meters the cluster); at its first call, its share."""
    slot: str = ""
    in_use: int = 0
    full: bool = False
    """As its last call said: requests in use, and whether others waited for permits."""
    expires: float = 0.0
    history: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=HISTORY))
    """After each of its last calls: when (the coordinator's clock), and its :attr:`busy`."""
    answers: OrderedDict[str, SyncReply] = field(default_factory=OrderedDict)
    progress: Progress = Progress()
    since: tuple[float, int] | None = None
    """The first call of its shard: when, and the rows done then (the shard's pace)."""
    called: float = 0.0
    """When its last call came."""

    @property
    def permits(self) -> int:
        return len(self.grants) + self.unbacked

    @property
    def busy(self) -> int:
        """Its requests in flight, as far as the coordinator knows."""
        return self.permits if self.full else min(self.permits, self.in_use)

    def observe(self, now: float, progress: Progress) -> None:
        """A call's progress; the first of a shard starts the shard's pace."""
        if self.since is None or progress.shard != self.progress.shard:
            self.since = (now, progress.rows_done)
        self.progress, self.called = progress, now

    def ends_in(self, now: float) -> float | None:
        """Seconds until its shard ends at the shard's pace so far (None: no pace yet, or
        overdue by more than ``OVERDUE_S``: it is stuck, say on retries)."""
        if self.since is None:
            return None
        start, rows = self.since
        done = self.progress.rows_done - rows
        if done <= 0 or self.called <= start:
            return None
        left = self.progress.rows_total - self.progress.rows_done
        ends = left * (self.called - start) / done - (now - self.called)
        return None if ends < -OVERDUE_S else max(0.0, ends)

    def busy_at(self, when: float) -> int:
        """Its requests in flight at ``when``, as far as the coordinator knows: its
        :attr:`busy` after its last call before then (permits lent later were not in use
        yet), or, before every call it remembers, what it said it used."""
        for called, busy in reversed(self.history):
            if called <= when:
                return busy
        return min(self.permits, self.in_use)


@dataclass(frozen=True, slots=True, kw_only=True)
class Figures:
    """The cluster's figures: the coordinator's calls, limiter and budget, and each worker's."""

    calls: int
    reports: int
    snapshot: LimiterSnapshot
    spent_usd: Decimal | None
    cap_usd: Decimal | None
    exhausted: bool
    workers: dict[str, Progress]
    permits: dict[str, int]
    expired: int
    last_call_s: dict[str, float] = field(default_factory=dict)
    """Seconds since each worker's last call."""


class LeaseBook:
    """The coordinator's state: one limiter, one budget, the workers' leases."""

    def __init__(
        self,
        config: LimiterConfig,
        *,
        cap_usd: Decimal | None = None,
        spent_usd: Decimal = ZERO,
        ttl_s: float = TTL_S,
        rng: random.Random | None = None,
        workers: int = 1,
    ) -> None:
        rated = config.requests_per_minute or config.tokens_per_minute
        self.rates = RateShares(config, workers=workers) if rated else None
        self.expected = workers
        """Workers the driver runs: those that have not called yet get a share too."""
        self.ending = False
        """No shard is left to hand out: each worker leaves when the shard it runs ends (its
        answers say when the first of the others is expected to)."""
        # The rate budgets are the workers' shares; the state bounds what is in flight.
        unrated = replace(config, requests_per_minute=None, tokens_per_minute=None)
        self.state = LimiterState(unrated, rng=rng or random.Random())
        self.budget = None if cap_usd is None else Budget(cap=cap_usd, spent=spent_usd)
        self.unknown_spend = False
        self.ttl_s = ttl_s
        self.leases: dict[str, _Lease] = {}
        self.gone: deque[tuple[float, _Lease]] = deque()
        """Leases that ended (when, and the lease) within the last ``ttl_s``: a 429 reported
        later may have been sent while their requests were still in flight."""
        self.calls = 0
        self.reports = 0
        self.expired = 0

    # -- the call ---------------------------------------------------------------------------

    def sync(self, now: float, call: SyncCall) -> SyncReply:
        """Apply a worker's call and answer it (a call seen before: its first answer)."""
        lease = self.leases.get(call.worker)
        if lease is not None and call.call_id in lease.answers:
            return lease.answers[call.call_id]
        self.calls += 1
        self.expire(now)
        new = lease is None
        if lease is None:
            # A new worker, or one whose lease expired: what it has in flight stays its own.
            self._succeed(now, call.slot)
            lease = self.leases[call.worker] = _Lease(unbacked=call.in_use, slot=call.slot)
        lease.expires = now + self.ttl_s
        lease.observe(now, call.progress)
        lease.want = call.want
        lease.reach = self._reach(lease, call.want, new=new)
        lease.in_use, lease.full = call.in_use, call.waiting > 0
        for report in call.reports:
            self._report(now, lease, report, age_s=call.sent_at - report.finished_at)
        self._rebalance(now, lease)
        if self.budget is not None:
            self.unknown_spend |= _settle(self.budget, lease, call)
        if call.leaving:
            self._close(now, lease, spend_reserved=False)
            if self.rates is not None:
                self.rates.forget(call.worker)
            lease.want = 0
            reply = self._reply(now, permits=0, share=0, dollars=ZERO)
            self._forget(now, call.worker)
            return reply
        share = self.share(call.worker)
        while lease.permits < min(share, lease.reach):
            grant = self._take(now)
            if grant is None:
                break
            lease.grants.append(grant)
        dollars = ZERO if self.budget is None else _lend(self.budget, lease, call)
        reply = self._reply(now, permits=lease.permits, share=share, dollars=dollars)
        if lease.permits >= min(share, lease.reach):
            # Free permits, but none for this worker until its next call: it holds its share,
            # or as many as it may hold now (in slow start a lease grows by steps).
            reply = replace(reply, spare=False)
        if self.ending:
            reply = replace(reply, free_in_s=self._free_in(now, call.worker))
        if self.rates is not None:
            active = sum(1 for other in self.leases.values() if other.want > 0)
            rates = self.rates.assign(call.worker, wants=call.want > 0, active=active)
            reply = replace(reply, rates=rates)
        lease.history.append((now, lease.busy))
        lease.answers[call.call_id] = reply
        while len(lease.answers) > REMEMBERED_CALLS:
            lease.answers.popitem(last=False)
        return reply

    def _reach(self, lease: _Lease, want: int, *, new: bool) -> int:
        """Permits a lease may hold by its next call (see :attr:`_Lease.reach`)."""
        if new or self.state.ceiling is not None:
            return want
        return min(want, max(MIN_STEP, SLOW_START_GROWTH * lease.permits))

    def _free_in(self, now: float, worker: str) -> float | None:
        """When the first of the other workers is expected to leave (all shards handed out)."""
        ends = [other.ends_in(now) for name, other in self.leases.items() if name != worker]
        return min((end for end in ends if end is not None), default=None)

    def expire(self, now: float) -> None:
        """Take back the leases of workers that stopped calling."""
        for worker, lease in list(self.leases.items()):
            if lease.expires < now:
                self._end(now, worker)

    def expect(self, workers: int) -> None:
        """The driver runs ``workers`` workers from now on (the rate shares' divisor)."""
        self.expected = workers
        if self.rates is not None:
            self.rates.expect(workers)

    def _succeed(self, now: float, slot: str) -> None:
        """A new worker in ``slot``: the worker it replaces died, its lease ends now."""
        if slot:
            for worker, lease in list(self.leases.items()):
                if lease.slot == slot:
                    self._end(now, worker)

    def _end(self, now: float, worker: str) -> None:
        """A dead worker's lease: everything back, its reserved dollars spent."""
        self._close(now, self.leases[worker], spend_reserved=True)
        self._forget(now, worker)
        if self.rates is not None:
            self.rates.forget(worker)
        self.expired += 1

    def _forget(self, now: float, worker: str) -> None:
        self.gone.append((now, self.leases.pop(worker)))
        while self.gone and self.gone[0][0] < now - self.ttl_s:
            self.gone.popleft()

    def share(self, worker: str) -> int:
        """The permits ``worker`` may hold: the cap shared among the workers that want
        permits, and those the driver runs that have not called yet (a share each is kept for
        them, so the first to call does not take it all), none getting more than it wants
        (water-filling)."""
        wants = {name: lease.want for name, lease in self.leases.items() if lease.want > 0}
        if worker not in wants:
            return 0
        for n in range(self.expected - len(self.leases)):
            wants[f"\0{n}"] = self.state.cap  # not called yet
        left, shares = self.state.cap, dict.fromkeys(wants, 0)
        pending = sorted(wants, key=lambda name: wants[name])
        while pending and left > 0:
            even = max(1, left // len(pending))
            name = pending.pop(0)
            shares[name] = min(wants[name], even)
            left -= shares[name]
        return shares[worker]

    def figures(self, now: float) -> Figures:
        budget = self.budget
        return Figures(
            calls=self.calls,
            reports=self.reports,
            snapshot=self.state.snapshot(now),
            spent_usd=None if budget is None or self.unknown_spend else budget.spent,
            cap_usd=None if budget is None else budget.cap,
            exhausted=budget is not None and budget.exhausted,
            workers={name: lease.progress for name, lease in self.leases.items()},
            permits={name: lease.permits for name, lease in self.leases.items()},
            expired=self.expired,
            last_call_s={name: max(0.0, now - lease.called) for name, lease in self.leases.items()},
        )

    def learned(self, now: float) -> LearnedLimit:
        return self.state.snapshot(now).learned()

    # -- permits ------------------------------------------------------------------------------

    def _unbacked(self) -> int:
        return sum(lease.unbacked for lease in self.leases.values())

    def _room(self) -> bool:
        """Whether one more permit fits under the cap beside every permit out."""
        return self.state.in_flight + self._unbacked() < self.state.cap

    def _limited(self) -> bool:
        """Whether the cap holds the cluster back: the workers want at least the cap, and all
        of it is lent but for a little (:meth:`slack`: permits the state just freed or let
        the cap grow by, which reach the workers at their next calls). Idle permits of
        workers that want no more do not raise the cap (those workers want less than they
        hold)."""
        cap = self.state.cap
        wanted = sum(min(lease.want, cap) for lease in self.leases.values())
        out = sum(lease.permits for lease in self.leases.values())
        return wanted >= cap and out >= cap - self.slack()

    def slack(self) -> int:
        """How far the cap may run ahead of the permits lent and still grow (see the module's
        docstring): half of it in slow start, all of it back up to the ceiling of the last
        cut, a sixteenth from there (at least ``MIN_STEP``, 2 at the ceiling)."""
        cap, ceiling = self.state.cap, self.state.ceiling
        if ceiling is None:
            return max(MIN_STEP, cap // 2)
        if cap < ceiling - 1:
            return cap
        return max(2, cap // 16)

    def _in_flight(self, lease: _Lease, report: Report, sent: float) -> int:
        """What the cluster had in flight when ``report``'s request finished, for the state:
        the cap on a success while the cap holds the cluster back (:meth:`_limited`, checked
        per outcome) and this worker's permits held it back, so the cap grows; for a 429, the
        requests in flight when it was ``sent`` (this worker's count, the others' as their
        calls before then said: :meth:`_Lease.busy_at`)."""
        cap = self.state.cap
        out = sum(other.permits for other in self.leases.values())
        if report.outcome == "rate_limited":
            # Permits lent after the request went were not in use when the provider said no
            # (in slow start the cap doubles per round trip), and those lent before were, if
            # their worker had requests waiting: its last call's count alone is stale.
            used = sum(other.busy_at(sent) for other in self.leases.values() if other is not lease)
            ended = sum(gone.busy_at(sent) for left, gone in self.gone if sent < left)
            return used + ended + report.in_flight
        others = sum(other.busy for other in self.leases.values() if other is not lease)
        if out > cap:
            return out  # draining to a cap just cut
        if report.full and self._limited():
            return cap
        return min(cap - 1, others + report.in_flight)

    def _report(self, now: float, lease: _Lease, report: Report, *, age_s: float) -> None:
        """Let the state learn from one finished request (``age_s`` ago); the permit it used
        stays with the worker (backed again if the state allows) unless the worker gave it
        back."""
        self.reports += 1
        if self.rates is not None and report.headers is not None:
            self.rates.learn(report.headers)
        if lease.grants:
            grant = lease.grants.pop(0)
            latency = max(0.0, report.latency_s)
            sent = now - max(0.0, age_s) - latency
            self.state.release(
                now,
                replace(grant, granted_at=now - latency, epoch=report.epoch),
                outcome=report.outcome,
                actual_tokens=report.actual_tokens,
                headers=report.headers,
                retry_after_s=report.retry_after_s,
                in_flight=self._in_flight(lease, report, sent),
            )
            lease.unbacked += 1  # the permit is the worker's until it is backed again
        if not report.kept:
            lease.unbacked = max(0, lease.unbacked - 1)
        self._rebalance(now, lease)

    def _rebalance(self, now: float, lease: _Lease) -> None:
        """Back the worker's unbacked permits with grants, while the state allows."""
        while lease.unbacked > 0:
            grant = self._take(now, backing=True)
            if grant is None:
                return
            lease.grants.append(grant)
            lease.unbacked -= 1

    def _take(self, now: float, *, backing: bool = False) -> Grant | None:
        """A grant for a permit, if the cap has room (``backing``: for a permit already out,
        which needs no room of its own)."""
        if not backing and not self._room():
            return None
        grant = self.state.try_acquire(now, 0)
        return grant if isinstance(grant, Grant) else None

    def _close(self, now: float, lease: _Lease, *, spend_reserved: bool) -> None:
        """Give back everything a lease holds; a dead worker's reserved dollars are spent."""
        for grant in lease.grants:
            self.state.release(now, grant, outcome="error")
        lease.grants.clear()
        lease.unbacked = 0
        if self.budget is not None:
            self.budget.reserved -= lease.dollars
            if spend_reserved:
                self.budget.spent += lease.reserved
        lease.dollars = lease.reserved = ZERO

    def _reply(self, now: float, *, permits: int, share: int, dollars: Decimal) -> SyncReply:
        snapshot = self.state.snapshot(now)
        return SyncReply(
            permits=permits,
            share=share,
            epoch=snapshot.cuts,
            dollars=dollars,
            exhausted=self.budget is not None and self.budget.exhausted,
            snapshot=snapshot,
            ttl_s=self.ttl_s,
            spare=self._room() and snapshot.cooling_until is None,
        )


# -- dollars ------------------------------------------------------------------------------------


def _settle(budget: Budget, lease: _Lease, call: SyncCall) -> bool:
    """The dollars a call settled and gave back; whether a spend in it is unknown."""
    spent = call.settled_reserved if call.spent is None else call.spent
    # What the worker settled and gave back leaves its lease; what was spent is spent.
    budget.reserved -= call.settled_reserved + call.returned
    budget.spent += spent
    lease.dollars -= call.settled_reserved + call.returned
    lease.reserved = call.reserved
    return call.spent is None


def _lend(budget: Budget, lease: _Lease, call: SyncCall) -> Decimal:
    """Dollars for the worker's next requests; exhausts the budget when one request's worst
    case no longer fits beside what is spent."""
    if call.need > ZERO and budget.spent + call.need > budget.cap:
        budget.exhausted = True
    if budget.exhausted:
        return ZERO
    free = budget.cap - budget.spent - budget.reserved
    lent = max(ZERO, min(call.dollars_wanted, free))
    if lent < call.need:
        return ZERO  # the worker waits for requests in flight to settle, holding nothing
    budget.reserved += lent
    lease.dollars += lent
    return lent
