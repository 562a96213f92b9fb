"""Pure: the cluster's requests/min and tokens/min budgets, leased out as *starts*.

A permit (:mod:`pipeline.cluster.leases`) bounds the requests a worker has in flight; it does
not bound how often they start: a worker reuses a permit for its next request without asking.
When the job sets ``requests_per_minute`` or ``tokens_per_minute``, each request also needs a
*start*: the right to send one request of up to ``tokens`` estimated tokens. The coordinator
draws starts from one :class:`~pipeline.provider.rate_window.RateWindow` (the same sliding
60-second window and pacing a single machine uses) and leases them to the workers in small
stocks; a worker spends one per request, sends back the ids of those it did not use (they are
cancelled, as if never granted), and drops those older than :data:`START_TTL_S`.

Since a start may be spent up to ``START_TTL_S`` after it was granted, and the pacer lets a
burst of ``burst_s`` go at once, the window runs at ``60 / (60 + START_TTL_S + burst_s)`` of the
limits (:func:`effective`): then no 60-second window of *sent* requests exceeds the limits.
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict, deque
from dataclasses import dataclass

from pipeline.provider.limits import LimiterConfig
from pipeline.provider.rate_window import WINDOW_S, RateLimitHeaders, RateWindow

START_TTL_S = 1.0
"""How long a worker may hold a start before sending with it."""
LEASE_S = 0.5
"""A worker is lent at most this many seconds' worth of the cluster's rate at once."""


def effective(limit: int | None, burst_s: float) -> int | None:
    """The budget the coordinator's window enforces for a job's ``limit`` per minute."""
    if limit is None:
        return None
    return max(1, math.floor(limit * WINDOW_S / (WINDOW_S + START_TTL_S + burst_s)))


@dataclass(frozen=True, slots=True, kw_only=True)
class Starts:
    """Starts lent in one answer."""

    ids: tuple[int, ...] = ()
    tokens: int = 0
    """The estimated tokens each may carry."""
    ready_in_s: float | None = None
    """When the window allows the next start (None: now, or no budget)."""


class StartBook:
    """The coordinator's rate window and the starts it lent."""

    def __init__(self, config: LimiterConfig) -> None:
        self.requests_per_minute = effective(config.requests_per_minute, config.burst_s)
        self.tokens_per_minute = effective(config.tokens_per_minute, config.burst_s)
        self.window = RateWindow(
            self.requests_per_minute,
            self.tokens_per_minute,
            burst_s=config.burst_s,
            default_hold_s=config.cooldown_s,
        )
        self._ids = itertools.count(1)
        self._lent: OrderedDict[int, str] = OrderedDict()
        """Start id -> the worker it was lent to (until reported, returned or forgotten)."""
        self._now = -math.inf
        self.lent = 0

    def _advance(self, now: float) -> float:
        self._now = max(now, self._now)
        self.window.advance(self._now)
        return self._now

    def lend(self, now: float, worker: str, *, wanted: int, tokens: int, sharers: int) -> Starts:
        """Up to ``wanted`` starts of ``tokens`` each for ``worker``: what the window allows
        now, at most :data:`LEASE_S` of the rate split among ``sharers`` workers."""
        now = self._advance(now)
        rpm = self.requests_per_minute or math.inf
        tpm = self.tokens_per_minute
        if tpm is not None:
            rpm = min(rpm, tpm / max(1, tokens))
        most = max(1, math.ceil(rpm / WINDOW_S * LEASE_S / max(1, sharers)))
        ids: list[int] = []
        while len(ids) < min(wanted, most):
            ready = max(until for until, _ in self.window.blocks(tokens))
            if ready > now:
                break
            start = next(self._ids)
            self.window.record(now, start, tokens)
            self._lent[start] = worker
            ids.append(start)
        self.lent += len(ids)
        ready_at = max(until for until, _ in self.window.blocks(tokens))
        ready_in = None if ready_at <= now else min(WINDOW_S, ready_at - now)
        return Starts(ids=tuple(ids), tokens=tokens, ready_in_s=ready_in)

    def used(self, now: float, start: int, actual_tokens: int | None) -> None:
        """A request sent with ``start`` finished; charge what it really used."""
        now = self._advance(now)
        if self._lent.pop(start, None) is not None and actual_tokens is not None:
            self.window.settle(now, start, actual_tokens)

    def returned(self, now: float, starts: tuple[int, ...]) -> None:
        """Starts a worker did not use: as if they had never been granted."""
        now = self._advance(now)
        for start in starts:
            if self._lent.pop(start, None) is not None:
                self.window.cancel(now, start)

    def forget(self, worker: str) -> None:
        """A worker's lease ended: its starts may have been used, and stay charged."""
        for start in [s for s, holder in self._lent.items() if holder == worker]:
            del self._lent[start]

    def learn(self, now: float, headers: RateLimitHeaders, tokens: int) -> None:
        self.window.learn(self._advance(now), headers, tokens)


class StartStock:
    """A worker's side: the starts it holds (the time passed in)."""

    def __init__(self) -> None:
        self.rated = False
        """The job has a rate budget (else every request may start)."""
        self._held: deque[tuple[int, float]] = deque()
        """Start ids held, with when each must be used by."""
        self.tokens = 0
        """The tokens each start held may carry."""
        self.largest = 0
        """The estimated tokens of the largest request seen."""
        self._returned: list[int] = []
        self.ready_at = -math.inf
        """When the coordinator's window frees the next start."""

    def __len__(self) -> int:
        return len(self._held)

    def can_start(self, now: float, tokens: int) -> bool:
        """Whether a request of ``tokens`` may start as far as the rate budget goes (starts
        too old or too small to use are given back)."""
        if not self.rated:
            return True
        while self._held and self._held[0][1] <= now:
            self._returned.append(self._held.popleft()[0])
        if self._held and tokens > self.tokens:
            self.leave()
        return bool(self._held)

    def take(self) -> int:
        """A start for a request about to go (0: the job has no rate budget)."""
        return self._held.popleft()[0] if self.rated else 0

    def give_back(self, start: int) -> None:
        if start:
            self._returned.append(start)

    def leave(self) -> None:
        """Give back every start held."""
        self._returned.extend(start for start, _ in self._held)
        self._held.clear()

    def returned(self) -> tuple[int, ...]:
        """The starts to give back with the next call (and forget them)."""
        returned, self._returned = tuple(self._returned), []
        return returned

    def add(self, now: float, starts: Starts) -> None:
        """What an answer lent."""
        if starts.ids:
            if starts.tokens != self.tokens:
                self.leave()
            self.tokens = starts.tokens
            self._held.extend((start, now + START_TTL_S) for start in starts.ids)
        wait = starts.ready_in_s
        self.ready_at = -math.inf if wait is None else now + wait
