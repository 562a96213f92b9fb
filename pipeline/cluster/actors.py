"""The two Ray actors of a cluster run: the coordinator and the shard workers.

Both are plain classes here, made actors by :mod:`pipeline.cluster.driver` with
``ray.remote(...)`` so that importing this module does not import Ray.

- :class:`Coordinator` (one, named after the job): the :class:`~pipeline.cluster.leases.LeaseBook`
  behind the cluster's limiter and budget; its clock is its own process's monotonic clock.
- :class:`ShardWorker` (``workers`` of them, restarted when their process dies): runs one shard
  at a time with this project's engine, the shard's limiter and budget leased from the
  coordinator through the worker's :class:`~pipeline.cluster.link.ShardLink`: one link, and
  one lease, for the worker process's life, carried from shard to shard (a shard's start and
  end cost no call); the worker gives its lease back when the driver says no shard is left
  for it (:meth:`ShardWorker.leave`), or at the end of a shard the driver marked its last.
  When its process dies mid-shard, Ray restarts it and retries the shard, which resumes from
  its journal: the requests it had in flight are reported as unanswered and sent again, as on
  one machine; the restarted worker's first call ends its predecessor's lease.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import anyio
import anyio.to_thread

from pipeline.cluster.leases import Figures, LeaseBook, Progress, SyncCall, SyncReply
from pipeline.cluster.link import ShardLink
from pipeline.engine.report import Reporter, RunReport
from pipeline.engine.stats import Snapshot
from pipeline.job.spec import JobSpec
from pipeline.provider.limits import LearnedLimit, LimiterConfig


class Coordinator:
    """The cluster's limiter and budget (one actor per cluster run)."""

    def __init__(
        self,
        config: LimiterConfig,
        cap_usd: Decimal | None,
        spent_usd: Decimal,
        ttl_s: float,
        workers: int = 1,
    ) -> None:
        self.book = LeaseBook(
            config, cap_usd=cap_usd, spent_usd=spent_usd, ttl_s=ttl_s, workers=workers
        )

    def sync(self, call: SyncCall) -> SyncReply:
        return self.book.sync(time.monotonic(), call)

    def expect(self, workers: int) -> None:
        """The driver runs ``workers`` workers from now on."""
        self.book.expect(workers)

    def ending(self) -> None:
        """Every shard is handed out: each worker leaves when the one it runs ends."""
        self.book.ending = True

    def figures(self) -> Figures:
        now = time.monotonic()
        self.book.expire(now)
        return self.book.figures(now)

    def learned(self) -> LearnedLimit:
        return self.book.learned(time.monotonic())


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardTask:
    shard: str
    job: JobSpec
    retry_failed: bool = False
    fresh: bool = False
    last: bool = True
    """No shard was left to hand out when this one was: the worker gives its lease back at
    its end (near the end, it leaves permits to the others)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardResult:
    shard: str
    worker: str
    ok: int
    failed: int
    total: int
    requests: int
    resent: int
    """Requests the shard's previous run left in flight, sent again by this run."""
    cost_usd: Decimal | None
    over_budget: bool
    interrupted: bool
    calls: int
    """Calls to the coordinator while the shard ran (its end's, when it was the worker's
    last)."""
    elapsed_s: float = 0.0

    @property
    def complete(self) -> bool:
        return self.ok + self.failed >= self.total and not self.over_budget


class _ProgressReporter(Reporter):
    """Hands the shard's figures to its link, which sends them with its next call."""

    def __init__(self, link: ShardLink, shard: str) -> None:
        self._link = link
        self._shard = shard

    def update(self, snapshot: Snapshot) -> None:
        self._link.progress = Progress(
            shard=self._shard,
            rows_done=snapshot.done,
            rows_total=snapshot.total_rows,
            requests=snapshot.requests,
            in_flight=snapshot.in_flight,
            rate_limited=snapshot.rate_limited,
            cost_usd=snapshot.cost_usd,
        )


class ShardWorker:
    """Runs shards with this project's engine, one at a time."""

    def __init__(self, index: int, coordinator: str, namespace: str) -> None:
        import ray

        self.index = index
        self.coordinator = ray.get_actor(coordinator, namespace=namespace)
        self.worker = f"w{index}:{os.getpid()}"
        self.link: ShardLink | None = None
        """Made by the first shard (in the thread that runs shards, not in Ray's)."""
        self.leased = False
        """The link holds a lease (it called, and has not left since)."""

    def pid(self) -> int:
        return os.getpid()

    def run_shard(self, task: ShardTask) -> ShardResult:
        from pipeline.engine.runner import Runner, RunOptions

        worker, link = self.worker, self.link
        if link is None:
            link = self.link = ShardLink(
                _caller(self.coordinator), worker=worker, slot=f"w{self.index}"
            )
        link.begin_shard(last=task.last)
        calls = link.calls
        job = task.job
        runner = Runner(
            job,
            api_key=job.api_key(),
            options=RunOptions(fresh=task.fresh, retry_failed=task.retry_failed, tick_s=0.25),
            reporter=_ProgressReporter(link, task.shard),
            shared=link,
        )
        scan = runner.prepare()

        async def main() -> RunReport:
            if link.stale:  # between shards for long: the lease may have expired
                await link.sync()
            self.leased = True
            async with anyio.create_task_group() as group:
                group.start_soon(link.run)
                try:
                    report = await runner.run(scan)
                finally:
                    if task.last:
                        with anyio.CancelScope(shield=True):
                            await link.sync(leaving=True)
                        self.leased = False
                    group.cancel_scope.cancel()
            return report

        report = anyio.run(main, backend_options=loop_options())
        final = report.final
        return ShardResult(
            shard=task.shard,
            worker=worker,
            ok=final.resumed_rows - final.resumed_failed + final.ok,
            failed=final.resumed_failed + final.failed,
            total=final.total_rows,
            requests=final.requests,
            resent=0 if report.unanswered is None else report.unanswered.count,
            cost_usd=final.cost_usd,
            over_budget=report.over_budget,
            interrupted=report.interrupted,
            calls=link.calls - calls,
            elapsed_s=final.elapsed_s,
        )

    def leave(self) -> int:
        """No shard is left for this worker: give its lease back (its permits, dollars and
        rate share go to the others). Returns the calls it made (0: it held no lease)."""
        if not self.leased or self.link is None:
            return 0
        anyio.run(_leave, self.link, backend_options=loop_options())
        self.leased = False
        return 1


async def _leave(link: ShardLink) -> None:
    """A function, not a method (an ``async def`` method makes Ray run an async actor)."""
    await link.sync(leaving=True)


def loop_options() -> dict[str, Any]:
    """uvloop when it is installed (as :func:`pipeline.api.endpoint.loop_options`)."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return {}
    return {"use_uvloop": True}


def _caller(coordinator: Any) -> Callable[[SyncCall], Awaitable[SyncReply]]:
    """The coordinator's ``sync``, awaited without blocking the event loop (a function, not a
    method: an ``async def`` method would make Ray run the worker as an async actor)."""
    import ray

    async def call(request: SyncCall) -> SyncReply:
        ref = coordinator.sync.remote(request)
        reply: SyncReply = await anyio.to_thread.run_sync(ray.get, ref)
        return reply

    return call
