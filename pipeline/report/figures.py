"""Pure: the figures the report draws, from a run's timeline events and the journal's results.

Memory stays bounded whatever the size of the job: a run's attempts are summed into at most
about :data:`MAX_BINS` time bins, each bin's latencies into a log-scale histogram (its
percentiles are within :data:`LATENCY_RATIO` of the exact ones), and the per-row
distributions are drawn from a uniform sample of at most :data:`SAMPLE_ROWS` rows.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

MAX_BINS = 150
"""Time bins a chart over time has, about (fewer for short runs)."""
BIN_WIDTHS_S = (0.25, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200)
LATENCY_RATIO = 1.02
"""Width of a latency histogram's bucket: each bucket spans 2 % of its value."""
SAMPLE_ROWS = 200_000
"""Rows the per-row distributions are drawn from, at most (a uniform sample beyond)."""

OUTCOME_KINDS = (
    "ok",
    "429 rate limited",
    "5xx server error",
    "other HTTP error",
    "unusable answer",
    "timeout",
    "connection error",
    "cut off by a stop",
)
"""How an attempt ended, in the order the report lists them."""


def outcome_kind(code: str) -> str:
    """The kind of a timeline outcome code (see :mod:`pipeline.state.timeline`)."""
    if code.isdigit():
        status = int(code)
        if status == 200:
            return "ok"
        if status == 429:
            return "429 rate limited"
        return "5xx server error" if status >= 500 else "other HTTP error"
    return {
        "M": "unusable answer",
        "T": "timeout",
        "C": "connection error",
        "N": "connection error",
        "X": "cut off by a stop",
    }.get(code, "other HTTP error")


class LatencyHistogram:
    """Latencies in log-scale buckets: bounded memory, percentiles within 2 %."""

    __slots__ = ("buckets", "count")

    def __init__(self) -> None:
        self.buckets: Counter[int] = Counter()
        self.count = 0

    def add(self, ms: float) -> None:
        self.buckets[_bucket(ms)] += 1
        self.count += 1

    def quantile(self, q: float) -> float | None:
        """The ``q`` quantile (0 < q <= 1) in ms, as the middle of its bucket; None when
        empty. The nearest-rank definition: the smallest value with ``q`` of the values at
        or below it."""
        if self.count == 0:
            return None
        rank = max(1, math.ceil(q * self.count))
        seen = 0
        for bucket in sorted(self.buckets):
            seen += self.buckets[bucket]
            if seen >= rank:
                return _middle(bucket)
        return _middle(max(self.buckets))  # pragma: no cover - rank <= count


def _bucket(ms: float) -> int:
    if ms < 1:
        return -1  # below a millisecond: one bucket
    return math.floor(math.log(ms) / math.log(LATENCY_RATIO))


def _middle(bucket: int) -> float:
    if bucket < 0:
        return 0.5
    return float(LATENCY_RATIO ** (bucket + 0.5))


def bin_width(duration_s: float, max_bins: int = MAX_BINS) -> float:
    """The narrowest of :data:`BIN_WIDTHS_S` that covers ``duration_s`` in ``max_bins``."""
    for width in BIN_WIDTHS_S:
        if duration_s / width <= max_bins:
            return float(width)
    return float(math.ceil(duration_s / max_bins))


@dataclass(frozen=True, slots=True, kw_only=True)
class TimeBin:
    """One slice of a run: attempts by the time they were sent."""

    start_s: float
    sent_per_s: float
    ok_per_s: float
    rate_limited: int
    """429 answers to the attempts sent in this bin."""
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    """Latency percentiles of the bin's attempts answered 200 (None: none were)."""
    cap: int | None
    """The limiter's in-flight cap: its last sample in the bin, else the one before."""
    in_flight: float | None
    """Requests in flight: the mean of the bin's samples, else the last one before."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TimeFigures:
    """A run's attempts over time."""

    bin_s: float
    bins: tuple[TimeBin, ...]
    attempts: int
    outcomes: tuple[tuple[str, int], ...]
    """Attempts by how they ended (:data:`OUTCOME_KINDS`), those that happened only."""
    latency: tuple[float | None, float | None, float | None]
    """p50, p90, p99 over the whole run (answered 200)."""

    @property
    def duration_s(self) -> float:
        return len(self.bins) * self.bin_s


@dataclass(slots=True)
class _Slice:
    sent: int = 0
    ok: int = 0
    rate_limited: int = 0
    latency: LatencyHistogram | None = None
    cap: int | None = None
    in_flight_sum: int = 0
    samples: int = 0


class TimeAggregator:
    """Sums timeline events into time bins; :meth:`figures` gives the result."""

    def __init__(self, duration_s: float, max_bins: int = MAX_BINS) -> None:
        self.bin_s = bin_width(max(duration_s, 0.001), max_bins)
        self._slices: dict[int, _Slice] = {}
        self._outcomes: Counter[str] = Counter()
        self._overall = LatencyHistogram()
        self.attempts = 0

    def _slice(self, at_ms: int) -> _Slice:
        index = max(0, int(at_ms / 1000 / self.bin_s))
        found = self._slices.get(index)
        if found is None:
            found = self._slices[index] = _Slice()
        return found

    def add_attempt(self, sent_ms: int, latency_ms: int, code: str) -> None:
        part = self._slice(sent_ms)
        part.sent += 1
        self.attempts += 1
        kind = outcome_kind(code)
        self._outcomes[kind] += 1
        if kind == "ok":
            part.ok += 1
            if part.latency is None:
                part.latency = LatencyHistogram()
            part.latency.add(latency_ms)
            self._overall.add(latency_ms)
        elif code == "429":
            part.rate_limited += 1

    def add_sample(self, at_ms: int, cap: int, in_flight: int) -> None:
        part = self._slice(at_ms)
        part.cap = cap
        part.in_flight_sum += in_flight
        part.samples += 1

    def add(self, events: Iterable[tuple[str, int, int, str]]) -> None:
        """Timeline events as :func:`pipeline.state.timeline.read_events` gives them."""
        for kind, at, value, last in events:
            if kind == "a":
                self.add_attempt(at, value, last)
            elif last.isdigit():
                self.add_sample(at, value, int(last))

    def figures(self) -> TimeFigures:
        count = max(self._slices) + 1 if self._slices else 0
        bins: list[TimeBin] = []
        cap: int | None = None
        in_flight: float | None = None
        width = self.bin_s
        for index in range(count):
            part = self._slices.get(index) or _Slice()
            if part.cap is not None:
                cap = part.cap
            if part.samples:
                in_flight = part.in_flight_sum / part.samples
            latency = part.latency or LatencyHistogram()
            bins.append(
                TimeBin(
                    start_s=index * width,
                    sent_per_s=part.sent / width,
                    ok_per_s=part.ok / width,
                    rate_limited=part.rate_limited,
                    p50_ms=latency.quantile(0.5),
                    p90_ms=latency.quantile(0.9),
                    p99_ms=latency.quantile(0.99),
                    cap=cap,
                    in_flight=in_flight,
                )
            )
        overall = self._overall
        return TimeFigures(
            bin_s=width,
            bins=tuple(bins),
            attempts=self.attempts,
            outcomes=tuple((k, self._outcomes[k]) for k in OUTCOME_KINDS if self._outcomes[k]),
            latency=(overall.quantile(0.5), overall.quantile(0.9), overall.quantile(0.99)),
        )


class Reservoir:
    """A uniform sample of at most ``size`` values from a stream (Vitter's algorithm R)."""

    __slots__ = ("_rng", "seen", "size", "values")

    def __init__(self, size: int = SAMPLE_ROWS, rng: random.Random | None = None) -> None:
        self.size = size
        self.values: list[float] = []
        self.seen = 0
        self._rng = rng or random.Random(0)

    def add(self, value: float) -> None:
        self.seen += 1
        if len(self.values) < self.size:
            self.values.append(value)
            return
        slot = self._rng.randrange(self.seen)
        if slot < self.size:
            self.values[slot] = value


@dataclass(frozen=True, slots=True, kw_only=True)
class Histogram:
    """Counts of values in equal bins from ``edges[i]`` to ``edges[i + 1]``."""

    edges: tuple[float, ...]
    counts: tuple[int, ...]
    seen: int
    """Values the histogram stands for (more than it counts when it counts a sample)."""

    @property
    def sampled(self) -> bool:
        return self.seen > sum(self.counts)


def nice_step(raw: float) -> float:
    """The smallest of 1, 2, 2.5, 5 times a power of ten that is at least ``raw`` (> 0)."""
    power = 10.0 ** math.floor(math.log10(raw))
    for factor in (1.0, 2.0, 2.5, 5.0, 10.0):
        if factor * power >= raw * (1 - 1e-9):
            return factor * power
    return 10 * power  # pragma: no cover - factor 10 always fits


def histogram(
    values: Sequence[float], *, bins: int = 30, integers: bool = False, seen: int | None = None
) -> Histogram:
    """Bin ``values`` into at most about ``bins`` equal bins with round edges; ``integers``
    keeps bins at least 1 wide (token counts). Empty values give an empty histogram."""
    total = len(values) if seen is None else seen
    if not values:
        return Histogram(edges=(), counts=(), seen=total)
    low, high = min(values), max(values)
    step = nice_step((high - low) / bins) if high > low else (1.0 if integers else 0.0)
    if integers:
        step = max(1.0, math.ceil(step))
    if step == 0:  # every value the same, and not integers: one bin around it
        step = abs(low) / 10 or 1.0
    start = math.floor(low / step) * step
    count = max(1, math.floor((high - start) / step) + 1)
    counts = [0] * count
    for value in values:
        counts[min(count - 1, int((value - start) / step))] += 1
    edges = tuple(start + i * step for i in range(count + 1))
    return Histogram(edges=edges, counts=tuple(counts), seen=total)


def failure_reason(error: str | None, http_status: int | None) -> str:
    """A short reason a row failed, to count rows by (from its error and last status)."""
    text = error or ""
    if text.startswith("not sent"):
        return "not sent (request could not be made)"
    if text.startswith("truncated"):
        return "truncated (max_tokens reached)"
    if text.startswith("invalid answer"):
        return "answer broke the output schema"
    if http_status is not None and http_status != 200:
        return f"HTTP {http_status}"
    if text.startswith("no answer within"):
        return "timeout"
    if text.startswith("connection error"):
        return "connection error"
    if http_status == 200:
        return "unusable answer"
    head = text.split(":", 1)[0].strip()
    return head[:40] or "unknown"
