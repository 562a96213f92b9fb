"""The counters behind the built-in server's ``GET /_stats`` (of one process)."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

from pipeline.server.faults import MODEL_NOT_FOUND, ServerOutcome

if TYPE_CHECKING:
    from pipeline.server.simulate import SimulatedReply


class ServerStats:
    """The counters behind ``GET /_stats`` (of one process)."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.reset()

    def reset(self) -> None:
        """Zero every counter (requests in flight stay in flight)."""
        self.requests_total = 0
        self.outcomes: Counter[str] = Counter()
        self.max_in_flight_seen = self.in_flight
        self.sends: dict[bytes, int] = {}
        self.histogram: Counter[int] = Counter()
        self.max_sends = 0
        self.usage: Counter[str] = Counter()
        self.first_request_at: float | None = None
        """``time.monotonic()`` when the first request came (the clock every process on the
        machine shares: benchmarks time a client's start-up with it)."""

    def record_send(self, key: bytes) -> None:
        """Count one receipt of the body identified by ``key``."""
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
        self.in_flight += 1
        self.max_in_flight_seen = max(self.max_in_flight_seen, self.in_flight)
        return True

    def leave(self) -> None:
        self.in_flight -= 1

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
            **{key: self.usage[key] for key in usage_keys},
            "first_request_at": self.first_request_at,
        }
