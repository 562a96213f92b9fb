"""Pure: the cluster's requests/min and tokens/min budgets, split into shares that the workers
pace locally.

A permit (:mod:`pipeline.cluster.leases`) bounds the requests a worker has in flight, not how
often they start. When the job sets ``requests_per_minute`` or ``tokens_per_minute``, each
worker's lease also carries a *share*: a fraction of both limits. The worker paces its own
requests at its share (:class:`SharePacer`, the pacer of a single machine's rate window: half a
second of burst, 1% under the rate), so it calls the coordinator as often as it would without
a rate budget: the calls scale with the work, not with the rate.

:class:`RateShares` is the coordinator's side. The shares of all workers sum to at most 1:

- every worker that wants to send is due an even share, ``1 / max(active, expected)``
  (``expected``: the workers the driver runs, so that the first worker to call does not take
  the whole rate from those about to start; the driver lowers it when workers run out of
  shards);
- a share falls at its own worker's call, which applies it at once, and a share grows only
  from what is free, so rate one worker gives up goes to another only once the first stopped
  using it: the sum of the rates in use never passes the limits, not even while shares move;
- a worker that leaves gives its share back; a dead worker's comes back when its lease
  expires, or when its restarted successor first calls.

Why a pacer and not a 60-second window per worker: a window sized to a share would stop a
worker whose share was just lowered for most of a minute (its window still holds what it sent
at the old share). Pacers whose rates sum to 99% of the limits, with half a second of burst
each, put at most the limits' rate over ``w`` seconds plus half a second of it into any window
of ``w`` seconds: within the limits for a 60-second window, and within a second's bunching
for a provider that enforces its minute per second.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.provider.limits import LimiterConfig
from pipeline.provider.rate_window import DEFAULT_PACE_FRACTION, WINDOW_S, RateLimitHeaders

TIGHTEN_EVERY_S = 1.0
"""A worker tightens its pacing at most once per this many seconds (once per burst of 429s)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RateShare:
    """A worker's share of the cluster's rate budgets, lent by one answer."""

    requests_per_minute: float | None
    tokens_per_minute: float | None
    fraction: float
    """Of the cluster's budgets (0: nothing yet)."""
    full: bool
    """The worker holds its even share, and some (False: more may come; it asks again)."""


class RateShares:
    """The coordinator's books: each worker's share of the cluster's rate budgets."""

    def __init__(self, config: LimiterConfig, *, workers: int = 1) -> None:
        self.requests_per_minute = config.requests_per_minute
        self.tokens_per_minute = config.tokens_per_minute
        self.expected = max(1, workers)
        self.held: dict[str, float] = {}
        """Worker -> the fraction its last answer gave it (it paces at that now)."""

    def expect(self, workers: int) -> None:
        """The driver runs ``workers`` workers from now on (fewer once shards run out)."""
        self.expected = max(1, workers)

    def assign(self, worker: str, *, wants: bool, active: int) -> RateShare:
        """The share ``worker`` paces at from this answer on: its even share among ``active``
        workers that want to send, as far as the others' shares leave free."""
        mine = self.held.get(worker, 0.0)
        target = 1.0 / max(active, self.expected) if wants else 0.0
        free = max(0.0, 1.0 - (sum(self.held.values()) - mine))
        share = min(target, free)
        self.held[worker] = share
        return self._share(share, full=share > 0 and share >= target * (1 - 1e-9))

    def forget(self, worker: str) -> None:
        """``worker`` left, or its lease ended: its share is free."""
        self.held.pop(worker, None)

    def learn(self, headers: RateLimitHeaders) -> None:
        """Adopt lower limits the provider advertises (shares apply at the workers' calls)."""
        if headers.limit_requests and self.requests_per_minute is not None:
            self.requests_per_minute = min(self.requests_per_minute, headers.limit_requests)
        if headers.limit_tokens and self.tokens_per_minute is not None:
            self.tokens_per_minute = min(self.tokens_per_minute, headers.limit_tokens)

    def _share(self, fraction: float, *, full: bool) -> RateShare:
        rpm, tpm = self.requests_per_minute, self.tokens_per_minute
        return RateShare(
            requests_per_minute=None if rpm is None else rpm * fraction,
            tokens_per_minute=None if tpm is None else tpm * fraction,
            fraction=fraction,
            full=full,
        )


class _Pacer:
    """GCRA: ``per_minute`` units per 60 s (at :data:`DEFAULT_PACE_FRACTION`), at most
    ``burst_s`` seconds' worth at once; a unit larger than the burst goes when the bucket is
    full and leaves it in debt."""

    __slots__ = ("burst_s", "interval", "tat")

    def __init__(self, per_minute: float, burst_s: float, now: float) -> None:
        self.burst_s = burst_s
        self.interval = WINDOW_S / (per_minute * DEFAULT_PACE_FRACTION)
        self.tat = now

    @property
    def tolerance(self) -> float:
        return max(self.burst_s, self.interval)

    def ready_at(self, units: int) -> float:
        return self.tat - self.tolerance + min(units * self.interval, self.tolerance)

    def take(self, now: float, units: int) -> None:
        """Charge ``units`` (negative: give them back)."""
        self.tat = max(now, max(self.tat, now) + units * self.interval)

    def resize(self, per_minute: float, now: float) -> None:
        """A new rate; what is owed keeps its units."""
        backlog = max(0.0, self.tat - now) / self.interval
        self.interval = WINDOW_S / (per_minute * DEFAULT_PACE_FRACTION)
        self.tat = now + backlog * self.interval

    def tighten(self) -> None:
        """Halve the burst (down to one unit): the provider enforces a shorter window."""
        self.burst_s = max(self.interval, self.burst_s / 2)


class SharePacer:
    """A worker's side: its requests paced at its share (the time passed in)."""

    def __init__(self) -> None:
        self.rated = False
        """The job has a rate budget (else every request may start)."""
        self.tokens_per_minute: int | None = None
        """The cluster's tokens/min budget: a request above it can never go."""
        self.burst_s = 0.5
        self.share: RateShare | None = None
        self._requests: _Pacer | None = None
        self._tokens: _Pacer | None = None
        self._hold_until = -math.inf
        self._tightened_at = -math.inf

    def configure(self, config: LimiterConfig) -> None:
        self.rated = bool(config.requests_per_minute or config.tokens_per_minute)
        self.tokens_per_minute = config.tokens_per_minute
        self.burst_s = config.burst_s

    @property
    def full(self) -> bool:
        """Whether the worker holds its even share (or the job has no rate budget)."""
        return not self.rated or (self.share is not None and self.share.full)

    def ready_at(self, tokens: int) -> float:
        """When a request of ``tokens`` may start (``inf``: not until a share comes)."""
        if not self.rated:
            return -math.inf
        share = self.share
        if share is None or share.fraction <= 0:
            return math.inf
        ready = self._hold_until
        if self._requests is not None:
            ready = max(ready, self._requests.ready_at(1))
        if self._tokens is not None:
            ready = max(ready, self._tokens.ready_at(tokens))
        return ready

    def take(self, now: float, tokens: int) -> None:
        """A request of ``tokens`` starts now."""
        if self._requests is not None:
            self._requests.take(now, 1)
        if self._tokens is not None:
            self._tokens.take(now, tokens)

    def give_back(self, now: float, tokens: int) -> None:
        """A request charged by :meth:`take` did not go."""
        if self._requests is not None:
            self._requests.take(now, -1)
        if self._tokens is not None:
            self._tokens.take(now, -tokens)

    def settle(self, now: float, reserved: int, actual: int) -> None:
        """A request that reserved ``reserved`` tokens used ``actual``."""
        if self._tokens is not None:
            self._tokens.take(now, actual - reserved)

    def hold(self, until: float) -> None:
        """The provider said its budget is used up until ``until``."""
        self._hold_until = max(self._hold_until, until)

    def tighten(self, now: float) -> None:
        """A 429 the budgets do not explain: pace with a smaller burst (once per burst)."""
        if now - self._tightened_at < TIGHTEN_EVERY_S:
            return
        self._tightened_at = now
        for pacer in (self._requests, self._tokens):
            if pacer is not None:
                pacer.tighten()

    def apply(self, now: float, share: RateShare) -> None:
        """The share an answer lent: pace at it from now on."""
        self.share = share
        self._requests = self._pace(self._requests, share.requests_per_minute, now)
        self._tokens = self._pace(self._tokens, share.tokens_per_minute, now)

    def _pace(self, pacer: _Pacer | None, per_minute: float | None, now: float) -> _Pacer | None:
        if per_minute is None or per_minute <= 0:
            return pacer  # nothing to pace at: ready_at waits for a share
        if pacer is None:
            return _Pacer(per_minute, self.burst_s, now)
        pacer.resize(per_minute, now)
        return pacer
