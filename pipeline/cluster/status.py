"""``pipeline status`` and ``pipeline estimate`` of a job that ran on a cluster: its shards'
states added up."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

from pipeline.cluster.driver import shard_job
from pipeline.cluster.plan import PLAN_FILE, SHARDS, ShardPlan
from pipeline.engine.context import JobContext
from pipeline.engine.status import JobStatus, job_status
from pipeline.job.spec import JobSpec
from pipeline.money.pricing import ZERO_USAGE, cost_parts
from pipeline.results import RowResult
from pipeline.state.journal import BUCKET_ROWS, Journal, bucket_of
from pipeline.state.runs import Unanswered


def cluster_root(job: JobSpec) -> Path:
    """Where the job's shards are: ``[cluster] state_root``, else its state folder."""
    root = job.cluster.state_root
    return Path(root) if root is not None else job.state_path


def shard_plan(job: JobSpec) -> ShardPlan | None:
    """The job's shard plan, if it ran (or runs) on a cluster."""
    path = cluster_root(job) / SHARDS / PLAN_FILE
    return ShardPlan.from_json(path.read_text()) if path.exists() else None


def cluster_status(job: JobSpec, plan: ShardPlan) -> JobStatus:
    """The shards' statuses added up, as one job's."""
    root = cluster_root(job)
    ok = failed = pending = 0
    spent = ZERO_USAGE
    spent_usd: Decimal | None = Decimal(0)
    last = None
    running = None
    unanswered: Unanswered | None = None
    for shard in plan.shards:
        if not shard.state_path(root).exists():
            pending += shard.rows
            continue
        context = JobContext(shard_job(job, shard, root))
        found = job_status(context, context.scan())
        ok, failed, pending = ok + found.ok, failed + found.failed, pending + found.pending
        spent = spent + found.spent
        spent_usd = (
            None if spent_usd is None or found.spent_usd is None else spent_usd + found.spent_usd
        )
        run = found.last_run
        if run is not None and (last is None or run.started_at > last.started_at):
            last = run
        running = running or found.running
        if found.unanswered is not None:
            count = found.unanswered.count + (0 if unanswered is None else unanswered.count)
            unanswered = Unanswered(run=found.unanswered.run, count=count, worst_cost_usd=None)
    context = JobContext(job)
    price = context.price
    return JobStatus(
        job=job.name,
        endpoint="local" if job.request.local else job.request.base_url,
        state_dir=str(root / SHARDS),
        rows=plan.rows,
        ok=ok,
        failed=failed,
        pending=pending,
        spent=spent,
        spent_usd=spent_usd,
        spent_parts=None if price is None else cost_parts(spent, price),
        last_run=last,
        running=running,
        unanswered=unanswered,
    )


class ShardedJournal(Journal):
    """The shards' journals read as one job's (for ``pipeline estimate``): results by global
    row number and request key, and every shard's results in turn."""

    def __init__(self, job: JobSpec, plan: ShardPlan) -> None:
        root = cluster_root(job)
        super().__init__(root / SHARDS)
        self._parts = [
            (shard, Journal(shard.state_path(root)))
            for shard in plan.shards
            if shard.state_path(root).exists()
        ]

    def has_results(self) -> bool:
        return any(journal.has_results() for _, journal in self._parts)

    def iter_results(self) -> Iterator[RowResult]:
        for _, journal in self._parts:
            yield from journal.iter_results()

    def read_bucket(self, bucket: int) -> dict[str, RowResult]:
        """The results of the rows of global ``bucket``, from the shards that hold them."""
        first, end = bucket * BUCKET_ROWS, (bucket + 1) * BUCKET_ROWS
        found: dict[str, RowResult] = {}
        for shard, journal in self._parts:
            low, high = max(first, shard.start), min(end, shard.start + shard.rows)
            if low >= high:
                continue
            local = range(bucket_of(low - shard.start), bucket_of(high - 1 - shard.start) + 1)
            for part in local:
                found.update(journal.read_bucket(part))
        return found
