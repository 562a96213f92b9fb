"""The counters behind the built-in server's ``GET /_stats`` (of one process)."""

from __future__ import annotations

import math
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pipeline.server.faults import MODEL_NOT_FOUND, ServerOutcome

if TYPE_CHECKING:
    from pipeline.server.simulate import SimulatedReply


SERIES_KEPT_S = 3600
"""Seconds of the per-second series kept (the oldest go)."""


class ServerStats:
    """The counters behind ``GET /_stats`` (of one process), and a per-second series since
    the last reset: requests received, and the average number in flight (what a benchmark
    reads its steady-state throughput and utilisation from)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.in_flight = 0
        self._clock = clock
        self.reset()

    def reset(self) -> None:
        """Zero every counter (requests in flight stay in flight)."""
        self.requests_total = 0
        self.outcomes: Counter[str] = Counter()
        self.max_in_flight_seen = self.in_flight
        self.sends: dict[bytes, int] = {}
        self.histogram: Counter[int] = Counter()
        self.max_sends = 0
        self.unread_bodies = 0
        self.usage: Counter[str] = Counter()
        self.first_request_at: float | None = None
        """``time.monotonic()`` when the first request came (the clock every process on the
        machine shares: benchmarks time a client's start-up with it)."""
        self._origin = self._clock()
        self._mark = self._origin
        self._kept_from = -SERIES_KEPT_S
        self._arrivals: Counter[int] = Counter()
        self._busy: defaultdict[int, float] = defaultdict(float)
        """In-flight seconds in each second since the reset."""

    def _advance(self) -> float:
        """Add the time since the last change, at the current in-flight count, to the series."""
        now = self._clock()
        start = self._mark
        while start < now:
            second = math.floor(start - self._origin)
            end = min(now, self._origin + second + 1)
            if self.in_flight:
                self._busy[second] += self.in_flight * (end - start)
            start = end if end > start else now
        self._mark = now
        oldest = math.floor(now - self._origin) - SERIES_KEPT_S
        if oldest > self._kept_from:  # once a second at most: drop what is over an hour old
            self._kept_from = oldest
            for series in (self._arrivals, self._busy):
                for second in [s for s in series if s < oldest]:
                    del series[second]
        return now

    def record_send(self, key: bytes) -> None:
        """Count one receipt of the body identified by ``key``."""
        now = self._advance()
        self._arrivals[math.floor(now - self._origin)] += 1
        count = self.sends.get(key, 0) + 1
        self.sends[key] = count
        if count > 1:
            self.histogram[count - 1] -= 1
            if not self.histogram[count - 1]:
                del self.histogram[count - 1]
        self.histogram[count] += 1
        self.max_sends = max(self.max_sends, count)

    def try_enter(self, cap: int) -> bool:
        """Start serving a request unless ``cap`` (0 = none) are already being served."""
        if cap and self.in_flight >= cap:
            return False
        self._advance()
        self.in_flight += 1
        self.max_in_flight_seen = max(self.max_in_flight_seen, self.in_flight)
        return True

    def leave(self) -> None:
        self._advance()
        self.in_flight -= 1

    def series(self) -> dict[str, list[float]]:
        """Per second since the reset (the current one included): requests received and the
        average number in flight."""
        now = self._advance()
        last = math.floor(now - self._origin)
        first = max(0, last - SERIES_KEPT_S + 1)
        seconds = range(first, last + 1)
        return {
            "arrivals": [float(self._arrivals.get(second, 0)) for second in seconds],
            "in_flight": [round(self._busy.get(second, 0.0), 3) for second in seconds],
        }

    def record_usage(self, reply: SimulatedReply, prompt_tokens: int, cache_hit: int) -> None:
        self.usage["prompt_tokens_total"] += prompt_tokens
        self.usage["completion_tokens_total"] += reply.completion_tokens
        self.usage["reasoning_tokens_total"] += reply.reasoning_tokens
        self.usage["cache_hit_tokens_total"] += cache_hit

    def snapshot(self) -> dict[str, Any]:
        """The counters as the JSON object ``/_stats`` returns."""
        usage_keys = (
            "prompt_tokens_total",
            "completion_tokens_total",
            "reasoning_tokens_total",
            "cache_hit_tokens_total",
        )
        return {
            "requests_total": self.requests_total,
            **{outcome.value: self.outcomes[outcome.value] for outcome in ServerOutcome},
            MODEL_NOT_FOUND: self.outcomes[MODEL_NOT_FOUND],
            "in_flight": self.in_flight,
            "max_in_flight_seen": self.max_in_flight_seen,
            "distinct_requests": len(self.sends),
            "max_sends_per_request": self.max_sends,
            "sends_histogram": {str(k): v for k, v in sorted(self.histogram.items())},
            "unread_bodies": self.unread_bodies,
            **{key: self.usage[key] for key in usage_keys},
            "first_request_at": self.first_request_at,
            "per_second": self.series(),
        }
