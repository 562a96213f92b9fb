"""OpenAI-style rate limits (pure; the caller passes the time): requests-per-minute and
tokens-per-minute buckets that refill continuously, and the ``x-ratelimit-*`` headers that tell
a client where it stands.

A limit is stated per minute but *enforced* over ``window_s`` seconds: each bucket holds
``window_s`` seconds' worth of its limit (``limit * window_s / 60``, at least one unit) and
refills at ``limit / 60`` per second. With the default 60 s a fresh bucket holds the whole
minute; with 1 s it holds one second's worth, as OpenAI documents for quantized limits
("60,000 requests/minute may be enforced as 1,000 requests/second"), so a client that sends
its minute's budget in bunches is refused even though it stays within the minute.
The headers always state the per-minute limit; ``remaining`` is what the bucket holds now and
``reset`` the time until it is full again."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

WINDOW_S: Final = 60.0


def format_duration(seconds: float) -> str:
    """A duration as OpenAI writes it in ``x-ratelimit-reset-*``: ``120ms``, ``1s``, ``6m0s``."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{max(1, round(seconds * 1000))}ms"
    millis = round(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs = f"{millis / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


@dataclass(slots=True)
class TokenBucket:
    """``limit`` units per 60 s, refilled continuously, holding at most ``capacity`` (the
    ``window_s`` seconds' worth it is enforced over), starting full."""

    limit: int
    level: float
    updated: float
    capacity: float

    @classmethod
    def full(cls, limit: int, now: float, window_s: float = WINDOW_S) -> TokenBucket:
        capacity = max(1.0, limit * window_s / WINDOW_S)
        return cls(limit=limit, level=capacity, updated=now, capacity=capacity)

    def refill(self, now: float) -> None:
        rate = self.limit / WINDOW_S
        self.level = min(self.capacity, self.level + (now - self.updated) * rate)
        self.updated = now

    def wait_for(self, cost: float) -> float:
        """Seconds until ``cost`` units are available (after :meth:`refill`)."""
        missing = min(cost, self.capacity) - self.level
        return max(0.0, missing * WINDOW_S / self.limit)

    def until_full(self) -> float:
        return (self.capacity - self.level) * WINDOW_S / self.limit


@dataclass(frozen=True, slots=True, kw_only=True)
class RateDecision:
    """Whether a request may go ahead, and the headers that say so."""

    allowed: bool
    headers: tuple[tuple[bytes, bytes], ...]
    retry_after_s: int = 0
    limited_by: str = ""
    message: str = ""


class RateLimiter:
    """OpenAI-style requests/min and tokens/min buckets (0 = that limit is off), enforced
    over ``window_s`` seconds (see the module docstring)."""

    def __init__(self, rpm: int, tpm: int, now: float, window_s: float = WINDOW_S) -> None:
        if not 0 < window_s <= WINDOW_S:
            raise ValueError(f"window_s must be in (0, {WINDOW_S:g}], not {window_s}")
        self._buckets = {
            name: TokenBucket.full(limit, now, window_s)
            for name, limit in (("requests", rpm), ("tokens", tpm))
            if limit
        }

    def admit(self, token_cost: int, now: float) -> RateDecision:
        """Take one request and ``token_cost`` tokens if both are available at ``now``."""
        costs = {"requests": 1, "tokens": token_cost}
        waits: dict[str, float] = {}
        for name, bucket in self._buckets.items():
            bucket.refill(now)
            waits[name] = bucket.wait_for(costs[name])
        blocked = [name for name, wait in waits.items() if wait > 0]
        if blocked:
            name = max(blocked, key=waits.__getitem__)
            bucket = self._buckets[name]
            retry = max(1, math.ceil(max(waits.values())))
            label = "requests per min (RPM)" if name == "requests" else "tokens per min (TPM)"
            message = (
                f"Rate limit reached on {label}: Limit {bucket.limit}, "
                f"Used {int(bucket.capacity - bucket.level)}, Requested {costs[name]}. "
                f"Please try again in {retry}s."
            )
            return RateDecision(
                allowed=False,
                headers=self.headers(),
                retry_after_s=retry,
                limited_by=name,
                message=message,
            )
        for name, bucket in self._buckets.items():
            bucket.level -= min(costs[name], bucket.capacity)
        return RateDecision(allowed=True, headers=self.headers())

    def headers(self) -> tuple[tuple[bytes, bytes], ...]:
        headers: list[tuple[bytes, bytes]] = []
        for name, bucket in self._buckets.items():
            headers += [
                (f"x-ratelimit-limit-{name}".encode(), str(bucket.limit).encode()),
                (f"x-ratelimit-remaining-{name}".encode(), str(int(bucket.level)).encode()),
                (
                    f"x-ratelimit-reset-{name}".encode(),
                    format_duration(bucket.until_full()).encode(),
                ),
            ]
        return tuple(headers)
