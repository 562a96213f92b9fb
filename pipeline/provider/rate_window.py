"""The requests/min and tokens/min limits of the limiter: a sliding 60 s window, pacing, and
the limits a provider advertises in its headers.

Pure, like :class:`~pipeline.provider.limits.LimiterState`, which owns one
:class:`RateWindow` and asks it, for every request, when the rate limits let it go: no I/O,
no event loop, the time is passed in as ``now`` and never runs backwards (the state sees to
that).

**Requests/min and tokens/min budgets (optional).** Every grant is written to a log of the last
60 s; a request is granted only if, counting it, the grants in the last 60 s number at most
``requests_per_minute`` and their tokens sum to at most ``tokens_per_minute``. Hence, in *any*
sliding 60-second window, at most ``requests_per_minute`` requests are granted and the tokens
charged at grant time are at most ``tokens_per_minute``. A request reserves its estimated
tokens; :meth:`~pipeline.provider.limits.LimiterState.settle` replaces the reservation by the
real usage. Lowering frees budget at once; raising can push a window past the budget after the
fact (the tokens were spent), and the limiter then holds new grants until the window is back
under it. So the guarantee, exactly: in any window, the sum over grants of
``min(reserved, actual)`` is within the budget, and with no underestimates the actual usage is
too. A request whose estimate exceeds ``tokens_per_minute`` can never fit and gets
:class:`~pipeline.provider.limits.NeverFits` at once. The log holds one entry per grant of the
last 60 s and nothing older.

**Pacing, with a margin.** So that a fresh limiter does not send the whole minute's budget in
its first instant, each budget also drives a GCRA pacer (a token bucket written as a
"theoretical arrival time"): it holds ``burst_s`` seconds' worth of budget (default 0.5 s, and
at least one request) and refills at ``pace_fraction`` (0.99) of ``limit / 60`` per second. A
request larger than the burst goes when the bucket is full and leaves it in debt. Providers may
enforce a per-minute limit over a much shorter window ("60,000 requests/minute may be enforced
as 1,000 requests/second", OpenAI): a bucket holding one second of the limit. A pacer at
exactly that rate with a full second of burst overflows such a bucket, because requests granted
evenly arrive bunched (an event loop runs them in turns, connections open in groups); half a
second of burst and 1% under the rate leave that jitter room.

**Learning a shorter window.** A 429 that comes while every budget of the sliding minute still
has room says the provider enforces its limit over a shorter window than the minute, so
:meth:`RateWindow.tighten` tightens the pacers: it halves the burst (down to one
request), and once the burst is one request it paces 2% slower (down to 80% of the limit).
At most one tightening per burst of such 429s: a 429 for a request granted before the last
tightening says nothing new. The tightening lasts for the run.

**Headers.** When a provider sends ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``
(:func:`~pipeline.provider.limits.parse_rate_limit_headers`), a limit lower than the configured
one (or any limit, when none is configured) is adopted; ``remaining-requests`` of 0, or
``remaining-tokens`` smaller than the request that just came back, holds every new grant until
that header's reset time (:func:`rate_exhausted`). A 429 that such headers explain (the budget,
not concurrency, ran out) does not cut the in-flight cap.
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass

WINDOW_S = 60.0
"""The length of the sliding window the per-minute budgets apply to."""
DEFAULT_PACE_FRACTION = 0.99
"""The pacers refill at this fraction of a budget's rate (see the module docstring)."""
SLOWEST_PACE_FRACTION = 0.8
"""Tightening never paces slower than this fraction of a budget."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RateLimitHeaders:
    """What a provider said about its rate limits; every field is optional."""

    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests_s: float | None = None
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_tokens_s: float | None = None
    retry_after_s: float | None = None


def rate_exhausted(headers: RateLimitHeaders | None, tokens: int) -> bool:
    """Whether ``headers`` show the request or token budget used up for a request of
    ``tokens``, so that a 429 with them is explained by the rate, not by concurrency."""
    if headers is None:
        return False
    requests_gone = headers.remaining_requests == 0
    left = headers.remaining_tokens
    return requests_gone or (left is not None and left < max(1, tokens))


_CUT_AT = 4096
"""Dropped log entries are cut off only once there are this many (a cut moves the rest)."""


class _Log:
    """The grants of the last 60 s, oldest first: for each, when it leaves the window and
    the requests (1, or 0 once cancelled) and tokens it charges.

    Grant ids only grow, so the log is three flat arrays indexed by ``grant_id - first``
    (a skipped id is an entry that charges nothing). Dropped entries are cut off the front
    once they are a quarter of the arrays (and at least :data:`_CUT_AT`): the arrays hold at
    most a third more than the window, where cutting at half let them reach twice the window
    (at 6,300 grants a second, 13 MB instead of 6.4: most of what a 1M-row run's peak RSS
    had above a 100k-row run's, bench/throughput.py (m)). 60 s of grants at 3,000 a second
    take 3-4 MiB here, against 32 MiB as one object and one dict entry per grant.
    """

    __slots__ = ("_expires", "_first", "_head", "_requests", "_tokens")

    def __init__(self) -> None:
        self._first = 0
        """The grant id at index 0 of the arrays."""
        self._head = 0
        """The index of the oldest entry still in the window."""
        self._expires = array("d")
        self._requests = array("b")
        self._tokens = array("q")

    def append(self, grant_id: int, expires_at: float, tokens: int) -> None:
        if not self._expires:  # empty: nothing yet, or everything left and was cut off
            self._first = grant_id
        index = grant_id - self._first
        if index < len(self._expires):
            raise ValueError(f"grant {grant_id} is not newer than every grant in the log")
        for _ in range(index - len(self._expires)):  # skipped ids charge nothing
            self._expires.append(expires_at)
            self._requests.append(0)
            self._tokens.append(0)
        self._expires.append(expires_at)
        self._requests.append(1)
        self._tokens.append(tokens)

    def settle(self, grant_id: int, tokens: int) -> int:
        """Charge ``tokens`` for ``grant_id`` instead of what it charged; the change (0 when
        the grant has left the window or was cancelled)."""
        index = self._index(grant_id)
        if index is None or not self._requests[index]:
            return 0
        delta = tokens - self._tokens[index]
        self._tokens[index] = tokens
        return delta

    def cancel(self, grant_id: int) -> int | None:
        """Make ``grant_id`` charge nothing; the tokens it charged (None when it had left
        the window or was cancelled already)."""
        index = self._index(grant_id)
        if index is None or not self._requests[index]:
            return None
        tokens = self._tokens[index]
        self._requests[index] = 0
        self._tokens[index] = 0
        return tokens

    def _index(self, grant_id: int) -> int | None:
        index = grant_id - self._first
        return index if self._head <= index < len(self._expires) else None

    def pop_expired(self, now: float) -> tuple[int, int]:
        """Drop the entries that have left the window by ``now``; the requests and tokens
        they charged."""
        head, end = self._head, len(self._expires)
        expires = self._expires
        requests = tokens = 0
        while head < end and now >= expires[head]:
            requests += self._requests[head]
            tokens += self._tokens[head]
            head += 1
        self._head = head
        if head >= _CUT_AT and head * 4 >= end:
            del self._expires[:head], self._requests[:head], self._tokens[:head]
            self._first += head
            self._head = 0
        return requests, tokens

    def frees_at(self, excess: int, *, tokens: bool) -> float:
        """When the oldest entries that together free ``excess`` units leave the window."""
        units = self._tokens if tokens else self._requests
        freed = 0
        for index in range(self._head, len(self._expires)):
            freed += units[index]
            if freed >= excess:
                return self._expires[index]
        return math.inf


class _Pacer:
    """GCRA: ``limit * fraction`` units per 60 s, at most ``burst_s`` seconds' worth at once."""

    __slots__ = ("burst_s", "fraction", "interval", "tat", "tolerance")

    def __init__(self, limit: int, burst_s: float, now: float, fraction: float = 1.0) -> None:
        self.burst_s = burst_s
        self.fraction = fraction
        self.interval = WINDOW_S / (limit * fraction)
        self.tolerance = max(burst_s, self.interval)
        self.tat = now
        """Theoretical arrival time: when the bucket would be full again."""

    def ready_at(self, units: int) -> float:
        return self.tat - self.tolerance + min(units * self.interval, self.tolerance)

    def take(self, now: float, units: int) -> None:
        """Charge ``units`` (negative: give them back)."""
        self.tat = max(now, max(self.tat, now) + units * self.interval)

    def resize(self, limit: int, now: float) -> None:
        backlog = max(0.0, self.tat - now) / self.interval
        self.interval = WINDOW_S / (limit * self.fraction)
        self.tolerance = max(self.burst_s, self.interval)
        self.tat = now + backlog * self.interval

    def tighten(self, limit: int, now: float) -> None:
        """Halve the burst; once it is one unit, pace 2% slower (see the module docstring)."""
        if self.burst_s > self.interval:
            self.burst_s = max(self.interval, self.burst_s / 2)
            self.tolerance = max(self.burst_s, self.interval)
        elif self.fraction > SLOWEST_PACE_FRACTION:
            self.fraction = max(SLOWEST_PACE_FRACTION, self.fraction - 0.02)
            self.resize(limit, now)


def _lower(configured: int | None, server: int | None) -> int | None:
    if configured is None:
        return server
    return configured if server is None else min(configured, server)


class RateWindow:
    """The requests/min and tokens/min budgets: the grants of the last 60 s, a pacer per
    budget, and the limits and holds the server's headers set."""

    def __init__(
        self,
        requests_per_minute: int | None,
        tokens_per_minute: int | None,
        *,
        burst_s: float,
        default_hold_s: float,
        pace_fraction: float = DEFAULT_PACE_FRACTION,
    ) -> None:
        self._configured_rpm = requests_per_minute
        self._configured_tpm = tokens_per_minute
        self._burst_s = burst_s
        self._pace_fraction = pace_fraction
        self._last_grant_id = 0
        self._tightened_upto = 0
        """The last grant made before the latest tightening."""
        self.tightenings = 0
        """How often a 429 with room left in the window tightened the pacing."""
        self._default_hold_s = default_hold_s
        """How long an empty budget holds grants when the headers give no reset time."""
        self.requests_per_minute = requests_per_minute
        """The budget in force: configured, or lower when the server said so (kept, not
        worked out on each of the several reads every request makes)."""
        self.tokens_per_minute = tokens_per_minute
        self._log = _Log()
        self.requests_in_window = 0
        self.tokens_in_window = 0
        self._request_pacer: _Pacer | None = None
        self._token_pacer: _Pacer | None = None
        self._hold_requests_until = -math.inf
        self._hold_tokens_until = -math.inf

    def advance(self, now: float) -> None:
        """Drop log entries older than the window; start the pacers of budgets now known."""
        requests, tokens = self._log.pop_expired(now)
        self.requests_in_window -= requests
        self.tokens_in_window -= tokens
        if self._request_pacer is None and self.requests_per_minute is not None:
            self._request_pacer = _Pacer(
                self.requests_per_minute, self._burst_s, now, self._pace_fraction
            )
        if self._token_pacer is None and self.tokens_per_minute is not None:
            self._token_pacer = _Pacer(
                self.tokens_per_minute, self._burst_s, now, self._pace_fraction
            )

    def blocks(self, tokens: int) -> list[tuple[float, str]]:
        """Until when each rule of the window holds back a request of ``tokens``, and why."""
        blocks = [
            (self._hold_requests_until, "the server's request budget is used up until reset"),
            (self._hold_tokens_until, "the server's token budget is used up until reset"),
        ]
        rpm, tpm = self.requests_per_minute, self.tokens_per_minute
        if rpm is not None and self._request_pacer is not None:
            excess = self.requests_in_window + 1 - rpm
            if excess > 0:
                frees = self._window_frees_at(excess, tokens=False)
                blocks.append((frees, f"{rpm} requests in the last minute"))
            blocks.append((self._request_pacer.ready_at(1), "pacing requests per minute"))
        if tpm is not None and self._token_pacer is not None:
            excess = self.tokens_in_window + tokens - tpm
            if excess > 0:
                frees = self._window_frees_at(excess, tokens=True)
                blocks.append((frees, f"{tpm} tokens in the last minute"))
            blocks.append((self._token_pacer.ready_at(tokens), "pacing tokens per minute"))
        return blocks

    def ready_at(self, tokens: int) -> float:
        """The latest time of :meth:`blocks`, without the reasons' text (a request that
        goes needs none); with no budget known, only the holds can block."""
        if self._request_pacer is None and self._token_pacer is None:
            return max(self._hold_requests_until, self._hold_tokens_until)
        return max(until for until, _ in self.blocks(tokens))

    def record(self, now: float, grant_id: int, tokens: int) -> None:
        """Charge a grant made now that reserves ``tokens``."""
        self._last_grant_id = max(self._last_grant_id, grant_id)
        self._log.append(grant_id, now + WINDOW_S, tokens)
        self.requests_in_window += 1
        self.tokens_in_window += tokens
        if self._request_pacer is not None:
            self._request_pacer.take(now, 1)
        if self._token_pacer is not None:
            self._token_pacer.take(now, tokens)

    def settle(self, now: float, grant_id: int, actual_tokens: int) -> None:
        """Charge ``actual_tokens`` instead of what the grant reserved (or last settled);
        nothing changes for a grant that has left the window."""
        delta = self._log.settle(grant_id, actual_tokens)
        if not delta:
            return
        self.tokens_in_window += delta
        if self._token_pacer is not None:
            self._token_pacer.take(now, delta)

    def cancel(self, now: float, grant_id: int) -> None:
        """Give back a grant whose request was never sent, as if it had not been made."""
        tokens = self._log.cancel(grant_id)
        if tokens is not None:
            self.requests_in_window -= 1
            self.tokens_in_window -= tokens
            if self._request_pacer is not None:
                self._request_pacer.take(now, -1)
            if self._token_pacer is not None:
                self._token_pacer.take(now, -tokens)

    def learn(self, now: float, headers: RateLimitHeaders, tokens: int) -> None:
        """Adopt the limits ``headers`` advertise, and hold grants while they show a budget
        used up by a request of ``tokens`` that just came back."""
        if headers.limit_requests:
            self.requests_per_minute = _lower(self._configured_rpm, headers.limit_requests)
            if self._request_pacer is not None and self.requests_per_minute is not None:
                self._request_pacer.resize(self.requests_per_minute, now)
        if headers.limit_tokens:
            self.tokens_per_minute = _lower(self._configured_tpm, headers.limit_tokens)
            if self._token_pacer is not None and self.tokens_per_minute is not None:
                self._token_pacer.resize(self.tokens_per_minute, now)
        self.advance(now)  # creates pacers for budgets learned just now
        default = self._default_hold_s
        if headers.remaining_requests == 0:
            reset = headers.reset_requests_s
            until = now + (default if reset is None else reset)
            self._hold_requests_until = max(self._hold_requests_until, until)
        left = headers.remaining_tokens
        if left is not None and left < max(1, tokens):
            reset = headers.reset_tokens_s
            until = now + (default if reset is None else reset)
            self._hold_tokens_until = max(self._hold_tokens_until, until)

    def has_room(self, tokens: int) -> bool:
        """Whether some budget is set and every budget of the minute still has room for a
        request of ``tokens`` beside the grants already in it (its own included)."""
        rpm, tpm = self.requests_per_minute, self.tokens_per_minute
        if rpm is None and tpm is None:
            return False
        requests_room = rpm is None or self.requests_in_window < rpm
        tokens_room = tpm is None or self.tokens_in_window + tokens <= tpm
        return requests_room and tokens_room

    def tighten(self, now: float, grant_id: int) -> bool:
        """A 429 came for grant ``grant_id`` while the window had room: the provider enforces
        a shorter window, so tighten the pacers (see the module docstring). Returns whether it
        did: once per burst of such 429s, not again for a grant made before the last time."""
        if grant_id <= self._tightened_upto:
            return False
        self._tightened_upto = self._last_grant_id
        self.tightenings += 1
        if self._request_pacer is not None and self.requests_per_minute is not None:
            self._request_pacer.tighten(self.requests_per_minute, now)
        if self._token_pacer is not None and self.tokens_per_minute is not None:
            self._token_pacer.tighten(self.tokens_per_minute, now)
        return True

    def _window_frees_at(self, excess: int, *, tokens: bool) -> float:
        """When the oldest entries that together free ``excess`` units leave the window."""
        return self._log.frees_at(excess, tokens=tokens)  # inf: unreachable while it fits
