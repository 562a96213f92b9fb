"""How many requests may be sent, and when: an adaptive in-flight cap plus optional rate budgets.

:class:`LimiterState` is pure: no I/O, no event loop, the time is passed in as ``now``
(seconds) and randomness comes from an injected :class:`random.Random`, so tests drive it with
a fake clock; :mod:`pipeline.provider.limiter` makes tasks wait on it. In plain words:

**In-flight cap (adapts on 429).** At most ``cap`` requests are in flight, ``1 <= cap <=
max_in_flight``. The cap starts at ``initial_in_flight`` (default ``min(max_in_flight, 16)``:
small enough not to flood an unknown provider, and slow start doubles it every round trip, so
2,500 is reached in about 8 round trips). It grows on successes that came back while exactly
``cap`` requests were in flight, i.e. while the cap was what held the job back (not when the
input or a rate budget did, and not while the in-flight count drains down to a cap just cut):

- before the first 429 ("slow start") by 1 per success, so it doubles every round trip;
- after a 429, by ``step / cap`` per success, i.e. about ``step`` per round trip: below the
  ceiling (the cap at which the last 429 came) ``step`` is the distance back to one under it
  (at least 1), a fast return; within one of the ceiling, 1/8, so the cap holds just under
  the provider's limit and probes it by one request every 8 round trips, twice as long after
  each probe that met a 429 there (up to 64 round trips: a limit that holds is rarely hit);
  once more than one past it, ``step`` is the distance above it (the limit rose).

A 429 cuts the cap by ``decrease_factor`` (0.5; never below 1), at most once per *congestion
epoch*: each cut starts a new epoch, and a 429 for a request that was sent before the cut says
nothing new, so a burst of 429s halves the cap once instead of collapsing it to 1. A 429 that
comes where the last one did (the cap within 10% of that ceiling, or above half the ceiling
where slow start ended, up to it; and at least 4) cuts the cap by one request only, with no
cool-down: the provider's limit is known to be there, the cap itself meters the requests, and
halving again (or pausing) would idle part of it while the cap climbs back. This finds a
provider's hidden concurrency limit (DeepSeek answers 429 without any headers) unaided:
against a hidden limit of 40 the simulation in the tests keeps all of it in flight on average
(halving at every 429 kept 87%; plain additive increase would average 75%).

**Memory across runs.** A run records what it learned (:class:`LearnedLimit`: the cap it
ended with and the ceiling where its last cut came) and the next run of the job against the
same endpoint and model starts from it (:func:`start_from`) instead of slow-starting from 16:
at 90% of that ceiling, with the ceiling known (so its first 429 there cuts gently), or, when
the run saw no 429, at the cap it reached. A nightly job against a provider with a hidden
limit is at that limit from its first seconds.

**Requests/min and tokens/min budgets (optional).** In any sliding 60-second window, at most
``requests_per_minute`` requests are granted and at most ``tokens_per_minute`` tokens charged,
paced with a margin (half a second of burst, 1% under the rate) so that a provider that
enforces the minute per second is not overflowed by bunched arrivals, and lowered or held when
the provider's ``x-ratelimit-*`` headers say so. A 429 while the minute has room means a
shorter window is enforced: the pacing tightens (a smaller burst, then a slower rate).
:class:`RateWindow` (:mod:`pipeline.provider.rate_window`) keeps them and draws the rules. A
429 that such headers explain (the budget ran out, not concurrency) does not cut the cap.

**Cool-down.** A 429 stops all new grants until its ``Retry-After`` has passed when the server
sent one (always honoured, even for a 429 that does not cut the cap), else, on a cut, for
``cooldown_s`` (1 s) or half the smoothed round-trip time if that is shorter (the requests in
flight need about that long to drain to the halved cap anyway, so a fast provider is not left
idle), doubling on each further cut that comes before any success, up to ``max_cooldown_s``
(30 s). When a cool-down ends the waiters do not all go at the same instant: the window of
``ramp`` = ``ramp_s`` seconds after it (1 s, or half a round trip if shorter) is cut into
``cap`` equal slots, and grant ``k`` of the next ``cap`` may go no earlier than a random point
of slot ``k`` (drawn from the injected random source). Grants that come later anyway, because
the cap, just cut, meters them, lose nothing.

**Waiting.** :meth:`LimiterState.try_acquire` answers with a :class:`Grant`, a :class:`Wait`
(when time alone would let the request through; ``None``: only a release can), or
:class:`NeverFits`; :mod:`pipeline.provider.limiter` makes tasks wait on that.
"""

from __future__ import annotations

import itertools
import math
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Literal, TypeGuard

from pipeline.provider.rate_window import (
    DEFAULT_PACE_FRACTION,
    RateLimitHeaders,
    RateWindow,
    rate_exhausted,
)
from pipeline.provider.wire import parse_retry_after

DEFAULT_INITIAL_IN_FLIGHT = 16

Outcome = Literal["ok", "rate_limited", "error"]


# ---------------------------------------------------------------------------------------------
# Values


GENTLE_MIN_CAP = 4.0
"""Below this cap, one request less is no gentle cut: a 429 there halves the cap."""
PROBE_ROUND_TRIPS = 8
"""At the ceiling where the last 429 came, the cap grows by one per this many round trips,
twice as many after each probe that met a 429 there, up to ``2**PROBE_BACKOFF`` times."""
PROBE_BACKOFF = 3


@dataclass(frozen=True, slots=True, kw_only=True)
class LimiterConfig:
    """What the user set; everything else the limiter learns."""

    max_in_flight: int
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    initial_in_flight: int | None = None
    """Where the adaptive cap starts; ``None`` means ``min(max_in_flight, 16)``."""
    known_ceiling: int | None = None
    """Where an earlier run's last 429 cut came (:func:`start_from`); None: slow start."""
    decrease_factor: float = 0.5
    """The cap is multiplied by this on a 429 (once per congestion epoch)."""
    burst_s: float = 0.5
    """Seconds' worth of a per-minute budget that may go at once: under one, so that bunched
    arrivals fit a provider's bucket of one second."""
    pace_fraction: float = DEFAULT_PACE_FRACTION
    """Per-minute budgets are paced at this fraction of their rate: a hair under the limit."""
    cooldown_s: float = 1.0
    """Pause after a 429 that has no ``Retry-After``; doubles on repeated cuts."""
    max_cooldown_s: float = 30.0
    ramp_s: float = 1.0
    """After a cool-down, grants are spread over about this many seconds."""

    def __post_init__(self) -> None:
        if self.max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, not {self.max_in_flight}")
        for name in (
            "requests_per_minute",
            "tokens_per_minute",
            "initial_in_flight",
            "known_ceiling",
        ):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1 (or None), not {value}")
        if not 0.0 < self.pace_fraction <= 1.0:
            raise ValueError(f"pace_fraction must be in (0, 1], not {self.pace_fraction}")
        if not 0.0 < self.decrease_factor < 1.0:
            raise ValueError(f"decrease_factor must be in (0, 1), not {self.decrease_factor}")
        for name in ("burst_s", "cooldown_s", "max_cooldown_s", "ramp_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")

    @property
    def start_cap(self) -> int:
        start = self.initial_in_flight or DEFAULT_INITIAL_IN_FLIGHT
        return min(self.max_in_flight, start)


@dataclass(frozen=True, slots=True, kw_only=True)
class Grant:
    """Permission to send one request; give it back with ``release`` exactly once."""

    id: int
    tokens: int
    """The tokens reserved for it (the estimate)."""
    granted_at: float
    epoch: int
    """The congestion epoch it was sent in (see the module docstring)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Wait:
    """Not now. ``until`` is when time alone would allow it; ``None``: wait for a release."""

    until: float | None
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class NeverFits:
    """The request can never be granted (its estimate exceeds the tokens-per-minute budget)."""

    reason: str


class NeverFitsError(Exception):
    """Raised by :meth:`Limiter.acquire` for a request that can never be granted."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True, kw_only=True)
class LimiterSnapshot:
    """What a display needs, at one instant."""

    cap: int
    max_in_flight: int
    in_flight: int
    waiting: int
    """Tasks queued in :class:`Limiter` (always 0 from :class:`LimiterState`)."""
    requests_last_minute: int
    tokens_last_minute: int
    requests_per_minute: int | None
    """The budget in force: configured, or lower when the server said so."""
    tokens_per_minute: int | None
    rate_limited: int
    """429s seen so far."""
    cuts: int
    """Times the cap was cut (at most one per burst of 429s)."""
    cooling_until: float | None
    """End of the cool-down after a 429, if one is running."""
    ceiling: int | None = None
    """The cap at which the last cut came (None: no cut yet, nor one known from a run)."""
    tightenings: int = 0
    """Times a 429 with room left in the minute tightened the pacing (a shorter window)."""

    def learned(self) -> LearnedLimit:
        return LearnedLimit(cap=self.cap, ceiling=self.ceiling)


@dataclass(frozen=True, slots=True, kw_only=True)
class LearnedLimit:
    """What a run learned of the provider's in-flight limit, for the next run to start from."""

    cap: int
    ceiling: int | None

    def to_dict(self) -> dict[str, int | None]:
        return {"cap": self.cap, "ceiling": self.ceiling}

    @classmethod
    def from_dict(cls, data: object) -> LearnedLimit | None:
        """The record written by :meth:`to_dict`; None when it is not one."""
        if not isinstance(data, Mapping):
            return None
        cap, ceiling = data.get("cap"), data.get("ceiling")
        if not _positive_int(cap) or not (ceiling is None or _positive_int(ceiling)):
            return None
        return cls(cap=cap, ceiling=ceiling)


def _positive_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


LEARNED_START = 0.9
"""A run that knows the ceiling starts at this fraction of it: near it, so that a 429 there
cuts gently."""


def start_from(config: LimiterConfig, learned: LearnedLimit) -> LimiterConfig:
    """``config`` starting where an earlier run left off: 90% of its ceiling (known, so the
    first 429 there cuts gently), or the cap it reached without a 429 (never below the
    default start)."""
    if learned.ceiling is not None:
        start = max(1, math.floor(LEARNED_START * learned.ceiling))
        return replace(config, initial_in_flight=start, known_ceiling=learned.ceiling)
    return replace(config, initial_in_flight=max(learned.cap, config.start_cap))


# ---------------------------------------------------------------------------------------------
# Header parsing (pure)

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|us|µs|ns|h|m|s)")
_DURATION = re.compile(rf"(?:{_DURATION_PART.pattern})+")
_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def parse_duration(text: str | None) -> float | None:
    """Seconds from an OpenAI-style duration (``1s``, ``6m0s``, ``120ms``, ``1h2m3.5s``) or a
    plain number of seconds; ``None`` when it is neither."""
    if text is None:
        return None
    text = text.strip()
    try:
        seconds = float(text)
    except ValueError:
        if not _DURATION.fullmatch(text):
            return None
        return sum(float(n) * _UNIT_S[unit] for n, unit in _DURATION_PART.findall(text))
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _count(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        value = float(text.strip())
    except ValueError:
        return None
    return int(value) if math.isfinite(value) and value >= 0 else None


def parse_rate_limit_headers(
    headers: Mapping[str, str], *, wall_now: float | None = None
) -> RateLimitHeaders:
    """Read ``x-ratelimit-*``, ``retry-after-ms`` and ``retry-after`` (names in any case).

    ``wall_now`` is the Unix time used to turn an HTTP-date ``Retry-After`` into seconds.
    """
    lower = {name.lower(): value for name, value in headers.items()}
    retry_after_ms = _count(lower.get("retry-after-ms"))
    retry_after = (
        retry_after_ms / 1000
        if retry_after_ms is not None
        else parse_retry_after(lower.get("retry-after"), now=wall_now)
    )
    return RateLimitHeaders(
        limit_requests=_count(lower.get("x-ratelimit-limit-requests")),
        remaining_requests=_count(lower.get("x-ratelimit-remaining-requests")),
        reset_requests_s=parse_duration(lower.get("x-ratelimit-reset-requests")),
        limit_tokens=_count(lower.get("x-ratelimit-limit-tokens")),
        remaining_tokens=_count(lower.get("x-ratelimit-remaining-tokens")),
        reset_tokens_s=parse_duration(lower.get("x-ratelimit-reset-tokens")),
        retry_after_s=retry_after,
    )


# ---------------------------------------------------------------------------------------------
# The pure state


class LimiterState:
    """The limiter's decisions, with no I/O: the caller passes the time as ``now``."""

    def __init__(self, config: LimiterConfig, *, rng: random.Random) -> None:
        self.config = config
        self._rng = rng
        self._now = -math.inf
        self._ids = itertools.count(1)
        # In-flight cap.
        self._cap = float(config.start_cap)
        known = config.known_ceiling  # the cap at the last cut; None: still in slow start
        self._ceiling: float | None = None if known is None else float(known)
        self._overshot = False  # the ceiling is slow start's (see _near_ceiling)
        self._epoch = 0
        self._open: set[int] = set()
        # Requests/min and tokens/min budgets.
        self._rates = RateWindow(
            config.requests_per_minute,
            config.tokens_per_minute,
            burst_s=config.burst_s,
            default_hold_s=config.cooldown_s,
            pace_fraction=config.pace_fraction,
        )
        # Pauses.
        self._cool_until = -math.inf
        self._ramp_start = 0.0  # after a cool-down, grant k of the next `slots` waits for
        self._ramp_span = 0.0  # start + span * (k + u) / slots, u uniform in [0, 1)
        self._ramp_slots = 0
        self._ramp_done = 0
        self._ramp_next = -math.inf
        self._cut_streak = 0
        self._failed_probes = 0  # probes in a row that met a 429 at the ceiling
        self._latency_s: float | None = None  # smoothed round trip of successful requests
        # Counters.
        self._rate_limited = 0
        self._cuts = 0

    # -- what is in force ---------------------------------------------------------------

    @property
    def cap(self) -> int:
        return max(1, min(self.config.max_in_flight, math.floor(self._cap)))

    @property
    def ceiling(self) -> int | None:  # as LimiterSnapshot.ceiling
        return None if self._ceiling is None else max(1, math.floor(self._ceiling))

    @property
    def in_flight(self) -> int:
        return len(self._open)

    @property
    def requests_per_minute(self) -> int | None:
        return self._rates.requests_per_minute

    @property
    def tokens_per_minute(self) -> int | None:
        return self._rates.tokens_per_minute

    def holds(self, grant: Grant) -> bool:
        """Whether ``grant`` is still out (not yet released or cancelled)."""
        return grant.id in self._open

    # -- the public decisions -------------------------------------------------------------

    def try_acquire(self, now: float, tokens: int) -> Grant | Wait | NeverFits:
        """Grant a request that reserves ``tokens`` now, or say why not and until when."""
        if tokens < 0:
            raise ValueError(f"tokens must not be negative, not {tokens}")
        now = self._advance(now)
        tpm = self.tokens_per_minute
        if tpm is not None and tokens > tpm:
            return NeverFits(
                reason=f"the request needs an estimated {tokens} tokens, more than the limit "
                f"of {tpm} tokens per minute; it can never be sent"
            )
        if self.in_flight >= self.cap:
            return Wait(until=None, reason=f"{self.in_flight} in flight, the cap is {self.cap}")
        ready = max(self._cool_until, self._ramp_next, self._rates.ready_at(tokens))
        if ready > now:  # the reason's text only now: a grant needs none
            return Wait(until=ready, reason=self._ready_at(tokens)[1])
        return self._grant(now, tokens)

    def next_change(self, now: float, tokens: int = 0) -> float | None:
        """When time alone would unblock a request of ``tokens``; None if time blocks nothing."""
        now = self._advance(now)
        ready, _ = self._ready_at(tokens)
        return ready if ready > now else None

    def release(
        self,
        now: float,
        grant: Grant,
        *,
        outcome: Outcome,
        actual_tokens: int | None = None,
        headers: RateLimitHeaders | None = None,
        retry_after_s: float | None = None,
        in_flight: int | None = None,
    ) -> None:
        """The request behind ``grant`` finished with ``outcome``; adapt to what it said.

        ``actual_tokens`` (the billed usage) settles the reservation; without it the estimate
        stays charged (pass 0 for a 429 that cost nothing). ``retry_after_s`` defaults to
        ``headers.retry_after_s``; a Retry-After on any outcome starts a cool-down.
        ``in_flight`` is how many requests were really in flight when it finished (this one
        included); by default the grants out, which they are when every grant is a request.
        A caller whose grants may sit idle (the cluster's coordinator lends them out) passes
        the real figure: the cap grows only when that is the cap, and a cut starts from it.
        """
        now = self._advance(now)
        self._close(grant)
        in_flight_before = self.in_flight + 1 if in_flight is None else in_flight
        if actual_tokens is not None:
            self.settle(now, grant, actual_tokens)
        if headers is not None:
            self._rates.learn(now, headers, grant.tokens)
            if retry_after_s is None:
                retry_after_s = headers.retry_after_s
        if outcome == "ok":
            self._measure(now - grant.granted_at)
            self._on_success(grant, in_flight_before)
        elif outcome == "rate_limited":
            level = self._cap if in_flight is None else max(1.0, min(self._cap, in_flight))
            self._on_rate_limited(now, grant, headers, retry_after_s, level)
        elif retry_after_s is not None:
            self._cool_down(now, retry_after_s)

    def settle(self, now: float, grant: Grant, actual_tokens: int) -> None:
        """Charge ``actual_tokens`` instead of what ``grant`` reserved (or last settled).

        A grant that has left the 60-second window is past caring: nothing changes.
        """
        if actual_tokens < 0:
            raise ValueError(f"actual_tokens must not be negative, not {actual_tokens}")
        now = self._advance(now)
        self._rates.settle(now, grant.id, actual_tokens)

    def cancel(self, now: float, grant: Grant) -> None:
        """Give back a grant whose request was never sent, as if it had not been made."""
        now = self._advance(now)
        self._close(grant)
        self._rates.cancel(now, grant.id)

    def snapshot(self, now: float) -> LimiterSnapshot:
        now = self._advance(now)
        return LimiterSnapshot(
            cap=self.cap,
            max_in_flight=self.config.max_in_flight,
            in_flight=self.in_flight,
            waiting=0,
            requests_last_minute=self._rates.requests_in_window,
            tokens_last_minute=self._rates.tokens_in_window,
            requests_per_minute=self.requests_per_minute,
            tokens_per_minute=self.tokens_per_minute,
            rate_limited=self._rate_limited,
            cuts=self._cuts,
            cooling_until=self._cool_until if self._cool_until > now else None,
            ceiling=self.ceiling,
            tightenings=self._rates.tightenings,
        )

    # -- time and what holds a request back ----------------------------------------------------

    def _advance(self, now: float) -> float:
        """Never let time run backwards; let the rate window drop what has left it."""
        now = max(now, self._now)
        self._now = now
        self._rates.advance(now)
        return now

    def _ready_at(self, tokens: int) -> tuple[float, str]:
        """The earliest time every time-based rule lets a request of ``tokens`` go."""
        candidates = [
            (self._cool_until, "cooling down after a 429"),
            (self._ramp_next, "spreading requests after a cool-down"),
            *self._rates.blocks(tokens),
        ]
        return max(candidates, key=lambda candidate: candidate[0])

    def _grant(self, now: float, tokens: int) -> Grant:
        grant = Grant(id=next(self._ids), tokens=tokens, granted_at=now, epoch=self._epoch)
        self._open.add(grant.id)
        self._rates.record(now, grant.id, tokens)
        if self._ramp_done < self._ramp_slots:
            self._ramp_done += 1
            self._ramp_next = self._ramp_slot(self._ramp_done)
        return grant

    def _ramp_slot(self, k: int) -> float:
        """The earliest time for grant ``k`` after a cool-down: a random point of slot ``k``."""
        if k >= self._ramp_slots:
            return -math.inf
        fraction = (k + self._rng.random()) / self._ramp_slots
        return self._ramp_start + self._ramp_span * fraction

    def _close(self, grant: Grant) -> None:
        if grant.id not in self._open:
            raise ValueError(f"grant {grant.id} was already given back")
        self._open.remove(grant.id)

    # -- adapting ------------------------------------------------------------------------------

    def _on_success(self, grant: Grant, in_flight_before: int) -> None:
        if grant.epoch == self._epoch:
            self._cut_streak = 0
        if in_flight_before != self.cap:
            return  # below: the cap did not hold the job back; above: draining after a cut
        ceiling = self._ceiling
        if ceiling is None:
            step = self._cap  # slow start: +1 per success, doubling per round trip
        elif self._cap < ceiling - 1:
            step = max(1.0, ceiling - 1 - self._cap)  # back to just under the ceiling, fast
        elif self._cap < ceiling + 1:
            step = 1 / (PROBE_ROUND_TRIPS << self._failed_probes)  # at it: probe slowly
        else:
            self._failed_probes = 0
            step = max(1.0, self._cap - ceiling)  # past it: the limit rose, speed up
        self._cap = min(float(self.config.max_in_flight), self._cap + step / self._cap)

    def _on_rate_limited(
        self,
        now: float,
        grant: Grant,
        headers: RateLimitHeaders | None,
        retry_after_s: float | None,
        level: float,
    ) -> None:
        """A 429 that came with ``level`` requests in flight (the cap, or fewer)."""
        self._rate_limited += 1
        if self._rates.has_room(0):
            self._rates.tighten(now, grant.id)
        cut = grant.epoch == self._epoch and not rate_exhausted(headers, grant.tokens)
        gentle = cut and level >= GENTLE_MIN_CAP and self._near_ceiling(level)
        if cut:
            probed = gentle and self._ceiling is not None and level >= self._ceiling - 1
            self._failed_probes = min(PROBE_BACKOFF, self._failed_probes + 1) if probed else 0
            self._overshot = self._ceiling is None
            self._ceiling = level
            self._cap = max(1.0, level - 1.0 if gentle else level * self.config.decrease_factor)
            self._epoch += 1
            self._cuts += 1
        if retry_after_s is not None:
            self._cool_down(now, retry_after_s)
        elif cut and not gentle:
            pause = self._scaled(self.config.cooldown_s) * 2.0**self._cut_streak
            self._cool_down(now, min(self.config.max_cooldown_s, pause))
        if cut:
            self._cut_streak += 1

    def _near_ceiling(self, level: float) -> bool:
        """Whether ``level`` (in flight) is where the last 429 came (within 10%, or 2), or, after
        slow start's cut, above half that ceiling up to it (slow start overshoots, more so in a
        cluster): the provider's limit is known there, so a gentle cut suffices."""
        ceiling = self._ceiling
        if ceiling is None:
            return False
        return abs(level - ceiling) <= max(2.0, 0.1 * ceiling) or (
            self._overshot and ceiling / 2 < level <= ceiling
        )

    def _measure(self, latency_s: float) -> None:
        """Smooth the round-trip time like TCP does (weight 1/8 for each new sample)."""
        old = self._latency_s
        self._latency_s = latency_s if old is None else old + (latency_s - old) / 8

    def _scaled(self, seconds: float) -> float:
        """``seconds``, or half the smoothed round trip if shorter. After a cut the requests in
        flight need about that long to drain to the new cap anyway; longer pauses and ramps
        would only idle a provider that answers fast."""
        if self._latency_s is None:
            return seconds
        return min(seconds, self._latency_s / 2)

    def _cool_down(self, now: float, seconds: float) -> None:
        until = now + max(0.0, seconds)
        if until <= self._cool_until:
            return
        self._cool_until = until
        self._ramp_start = until
        self._ramp_span = self._scaled(self.config.ramp_s)
        self._ramp_slots = self.cap
        self._ramp_done = 0
        self._ramp_next = self._ramp_slot(0)
