"""The anyio side of the limiter: :class:`Limiter` makes tasks wait for the pure
:class:`~pipeline.provider.limits.LimiterState`, first come first served, without polling.
The rules it applies are drawn in :mod:`pipeline.provider.limits` and
:mod:`pipeline.provider.rate_window`.

:meth:`LimiterState.try_acquire` answers with a grant, a wait (with the exact time at which
time alone would let the request through, or ``None`` when only a release can), or "never
fits". :class:`Limiter` keeps a FIFO queue of waiters, each with its own
:class:`anyio.Event`; releases hand capacity to the head of the queue directly, and only the
head sleeps, until exactly that time. There is no polling loop. A large request at the head is
not overtaken by smaller ones behind it, so it cannot starve. A waiter cancelled after it was
handed a grant gives the grant back as if it had never been made."""

from __future__ import annotations

import math
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace

import anyio
import anyio.lowlevel

from pipeline.provider.limits import (
    Grant,
    LimiterConfig,
    LimiterSnapshot,
    LimiterState,
    NeverFits,
    NeverFitsError,
    Outcome,
    Wait,
)
from pipeline.provider.rate_window import RateLimitHeaders


@dataclass(slots=True, eq=False)
class _Waiter:
    tokens: int
    wake: anyio.Event
    result: Grant | NeverFits | None = None
    armed: float | None = None
    """The deadline this waiter sleeps until (only the head of the queue has one)."""


class Limiter:
    """Makes tasks wait for :class:`LimiterState`, first come first served, without polling.

    Use ``async with limiter.slot(tokens) as grant:`` and call :meth:`release` with what the
    response said; leaving the block without that releases the grant as an ``"error"``.
    """

    def __init__(
        self,
        config: LimiterConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.state = LimiterState(config, rng=rng or random.Random())
        self._clock = clock
        self._queue: deque[_Waiter] = deque()
        self._head_until: float | None = None
        self.wakeups = 0
        """How often a waiting task woke up (for tests: there is no polling)."""

    def snapshot(self) -> LimiterSnapshot:
        return replace(self.state.snapshot(self._clock()), waiting=len(self._queue))

    async def acquire(self, tokens: int) -> Grant:
        """Wait for a grant. Raises :class:`NeverFitsError` if the request can never go."""
        if tokens < 0:
            raise ValueError(f"tokens must not be negative, not {tokens}")
        if not self._queue:  # nobody waits: a grant free now goes at once, without a yield
            now = self.state.try_acquire(self._clock(), tokens)
            if isinstance(now, Grant):
                return now
            if isinstance(now, NeverFits):
                raise NeverFitsError(now.reason)
        await anyio.lowlevel.checkpoint_if_cancelled()
        waiter = _Waiter(tokens=tokens, wake=anyio.Event())
        self._queue.append(waiter)
        try:
            self._dispatch()
            if waiter.result is not None:
                await anyio.lowlevel.cancel_shielded_checkpoint()
            while waiter.result is None:
                await self._sleep(waiter)
        except BaseException:
            self._abandon(waiter)
            raise
        if isinstance(waiter.result, NeverFits):
            raise NeverFitsError(waiter.result.reason)
        return waiter.result

    def release(
        self,
        grant: Grant,
        *,
        outcome: Outcome,
        actual_tokens: int | None = None,
        headers: RateLimitHeaders | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        """Give ``grant`` back with what its response said (see :meth:`LimiterState.release`)."""
        self.state.release(
            self._clock(),
            grant,
            outcome=outcome,
            actual_tokens=actual_tokens,
            headers=headers,
            retry_after_s=retry_after_s,
        )
        self._dispatch()

    @asynccontextmanager
    async def slot(self, tokens: int) -> AsyncIterator[Grant]:
        """Hold a grant for the block; released as ``"error"`` unless released inside it."""
        grant = await self.acquire(tokens)
        try:
            yield grant
        finally:
            if self.state.holds(grant):
                self.release(grant, outcome="error")

    async def _sleep(self, waiter: _Waiter) -> None:
        """Sleep until woken; the head of the queue also wakes at the next time-based change."""
        head = bool(self._queue) and self._queue[0] is waiter
        waiter.armed = self._head_until if head else None
        waiter.wake = anyio.Event()
        deadline = math.inf
        if waiter.armed is not None:
            left = waiter.armed - self._clock()  # read first: the timer must not fire early
            deadline = anyio.current_time() + max(0.0, left)
        with anyio.CancelScope(deadline=deadline) as scope:
            await waiter.wake.wait()
        self.wakeups += 1
        if scope.cancelled_caught:
            self._dispatch()

    def _dispatch(self) -> None:
        """Hand grants to the queue in order, while the state allows; arm the head's timer."""
        now = self._clock()
        while self._queue:
            head = self._queue[0]
            result = self.state.try_acquire(now, head.tokens)
            if isinstance(result, Wait):
                self._head_until = result.until
                if head.armed != result.until:
                    head.wake.set()  # re-arm with the new deadline
                return
            self._queue.popleft()
            head.result = result
            head.wake.set()
        self._head_until = None

    def _abandon(self, waiter: _Waiter) -> None:
        """A waiter was cancelled: leave the queue, or give back a grant it never used."""
        if isinstance(waiter.result, Grant):
            self.state.cancel(self._clock(), waiter.result)
        elif waiter in self._queue:
            self._queue.remove(waiter)
        self._dispatch()
