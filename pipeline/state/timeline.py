"""A run's timeline: when each attempt went out, how long it took and how it ended, and the
limiter's in-flight cap once a second; what ``pipeline report`` draws its charts from.

One small text file per run in the state folder, ``timeline/000003.csv``::

    {"run":3,"t0":1718000000.123,"format":1}     the run's clock zero, as Unix time
    a,1520,203,200                               an attempt: sent at ms, took ms, outcome
    a,1533,4,429
    c,2000,38,40                                 a sample: at ms, the cap, requests in flight

An outcome is the HTTP status of the answer, or a letter when there was none usable:
``M`` a 200 whose body could not be used, ``T`` a timeout, ``C`` a connection error after the
request may have left, ``N`` a connection never made, ``X`` cut off by a hard stop.

Attempts are kept in memory as they settle (one tuple each, nothing formatted) and written
once a second by :meth:`Timeline.run`, with a plain ``write`` and no fsync: the timeline is
for looking at, not for resuming, so a crash may lose its last second. A write that fails
(disk full) turns the timeline off for the rest of the run; the run goes on. Older state
folders have no timeline: the report draws what the journal holds and says so.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio

TIMELINE_DIR = "timeline"
FORMAT = 1
SAMPLE_S = 1.0
"""How often the cap is sampled and the attempts are written."""

ATTEMPT = "a"
SAMPLE = "c"
MALFORMED = "M"
TIMEOUT = "T"
CONNECTION = "C"
NEVER_CONNECTED = "N"
CUT_OFF = "X"


def timeline_path(state_folder: Path, run: int) -> Path:
    return state_folder / TIMELINE_DIR / f"{run:06d}.csv"


class Timeline:
    """Records one run's attempts and cap samples (see the module docstring)."""

    def __init__(
        self,
        state_folder: Path,
        run: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.path = timeline_path(state_folder, run)
        self.now = clock
        """The clock attempts are timed with (the run's)."""
        self._t0 = clock()
        self._attempts: list[tuple[float, float | None, str]] = []
        self._lines: list[str] = []
        self._fd: int | None = None
        self.broken: str | None = None
        """Why the timeline stopped recording, if it did."""
        head = json.dumps(
            {"run": run, "t0": round(wall(), 3), "format": FORMAT}, separators=(",", ":")
        )
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as exc:
            self.broken = f"cannot write {self.path} ({exc.strerror or exc})"
            return
        self._lines.append(head)

    def attempt(self, sent_at: float, latency_s: float | None, outcome: str) -> None:
        """One attempt, sent at ``sent_at`` (on :attr:`now`'s clock); ``latency_s`` None
        when it was cut off (it lasted until now)."""
        self._attempts.append((sent_at, latency_s, outcome))

    def sample(self, cap: int, in_flight: int) -> None:
        """The limiter's cap and the requests in flight, now."""
        self._lines.append(f"{SAMPLE},{round((self.now() - self._t0) * 1000)},{cap},{in_flight}")

    def flush(self) -> None:
        """Write what was recorded since the last flush (no fsync)."""
        attempts, self._attempts = self._attempts, []
        if self._fd is None:
            self._lines.clear()
            return
        t0 = self._t0
        now = self.now()
        lines = self._lines
        for sent_at, latency_s, outcome in attempts:
            took = now - sent_at if latency_s is None else latency_s
            lines.append(f"{ATTEMPT},{round((sent_at - t0) * 1000)},{round(took * 1000)},{outcome}")
        if not lines:
            return
        data = ("\n".join(lines) + "\n").encode()
        lines.clear()
        try:
            os.write(self._fd, data)
        except OSError as exc:
            self.broken = f"cannot write {self.path} ({exc.strerror or exc})"
            self._close()

    async def run(self, sample: Callable[[], tuple[int, int]]) -> None:
        """Sample the cap and write the attempts once a second, until cancelled."""
        while True:
            self.sample(*sample())
            self.flush()
            await anyio.sleep(SAMPLE_S)

    def close(self, sample: tuple[int, int] | None = None) -> None:
        """Write the rest (and a last sample, when given) and close the file."""
        if sample is not None:
            self.sample(*sample)
        self.flush()
        self._close()

    def _close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


@dataclass(frozen=True, slots=True)
class TimelineHead:
    run: int
    t0: float
    """Unix time of the timeline's zero."""


Event = tuple[str, int, int, str]
"""``("a", sent_ms, latency_ms, outcome)`` or ``("c", at_ms, cap, in_flight)`` (the last
field as text, so that one tuple type serves both)."""


def read_head(path: Path) -> TimelineHead | None:
    """The head line of a timeline file; None when there is no readable one."""
    try:
        with path.open("rb") as handle:
            first = handle.readline()
    except OSError:
        return None
    try:
        head = json.loads(first)
        return TimelineHead(run=int(head["run"]), t0=float(head["t0"]))
    except (ValueError, KeyError, TypeError):
        return None


def read_events(path: Path) -> Iterator[Event]:
    """The attempts and samples of a timeline file, in the order written, one line at a
    time (memory does not grow with the file). Damaged or torn lines are skipped."""
    try:
        handle = path.open("rb")
    except OSError:
        return
    with handle:
        handle.readline()  # the head
        for line in handle:
            parts = line.split(b",")
            if len(parts) != 4 or parts[0] not in (b"a", b"c") or not line.endswith(b"\n"):
                continue
            try:
                at, value = int(parts[1]), int(parts[2])
            except ValueError:
                continue
            last = parts[3].strip().decode("ascii", "replace")
            if last:
                yield (parts[0].decode(), at, value, last)
