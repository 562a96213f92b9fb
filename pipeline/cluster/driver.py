"""The driver of a cluster run: plan the shards, start the coordinator and the workers, hand
out the shards, show the cluster's figures, and write the output in input order.

::

    driver ── plan.json + input slices ──▶ <state_root>/shards/<id>/   (once; kept for reruns)
      │ starts
      ├─▶ Coordinator (named actor): the cluster's limiter and budget (pipeline.cluster.leases)
      └─▶ ShardWorker x N (restarted when they die): one shard at a time, this project's engine,
            each writing its journal under shards/<id>/state and its part atomically
      ◀── results; the output = the parts in shard order (input order), each row exactly once

A rerun of the same command finds the plan, skips the shards that finished (their folders hold
a ``done.json``), resumes the others from their journals, and writes the output again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.cluster.actors import Coordinator, ShardResult, ShardTask, ShardWorker
from pipeline.cluster.leases import TTL_S, Figures
from pipeline.cluster.plan import PLAN_FILE, SHARDS, Shard, ShardPlan, plan_shards, shard_rows_for
from pipeline.cluster.seed import seed_shards, seeded
from pipeline.engine.context import JobContext
from pipeline.errors import JobFileError, PipelineError, StateError
from pipeline.io.remote import is_url
from pipeline.io.sources import InputScan
from pipeline.job.spec import ClusterSpec, JobSpec
from pipeline.provider.limits import LimiterConfig, start_from
from pipeline.state.runs import StateFolder

NAMESPACE = "pipeline"
DONE_FILE = "done.json"
WORKER_CPUS = 0.5


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterOptions:
    address: str | None = None
    """``None``: start a local Ray instance (or use the one this process started);
    ``auto``: the running cluster; else a Ray address."""
    workers: int = 4
    shard_rows: int | None = None
    state_root: Path | None = None
    fresh: bool = False
    retry_failed: bool = False
    ttl_s: float = TTL_S
    tick_s: float = 1.0
    num_cpus: int | None = None
    """CPUs of a local Ray instance started here (None: Ray's default)."""


@dataclass(slots=True)
class ClusterReport:
    job: str
    output: Path
    rows: int
    shards: int
    ok: int = 0
    failed: int = 0
    requests: int = 0
    resent: int = 0
    """Requests left in flight by killed runs (of a worker or the driver), sent again."""
    skipped: int = 0
    """Shards that had finished in an earlier run (nothing sent)."""
    cost_usd: Decimal | None = Decimal(0)
    over_budget: bool = False
    output_written: bool = False
    figures: Figures | None = None
    results: list[ShardResult] = field(default_factory=list)
    leave_calls: int = 0
    """Calls of workers giving their lease back after their last shard."""

    @property
    def calls(self) -> int:
        return sum(result.calls for result in self.results) + self.leave_calls

    @property
    def all_ok(self) -> bool:
        return self.output_written and self.failed == 0


class ClusterReporter:
    """What a cluster run tells a person; the default says nothing."""

    def start(self, job: JobSpec, plan: ShardPlan, workers: int, skipped: int) -> None:
        """The plan is known and the workers start."""

    def notice(self, message: str) -> None:
        """Something to read now."""

    def update(self, figures: Figures, report: ClusterReport) -> None:
        """Every ``tick_s``: the coordinator's figures and the shards finished so far."""


def cluster_options(job: JobSpec, **overrides: Any) -> ClusterOptions:
    """The job's ``[cluster]`` table, with the given options (those not None) over it."""
    spec: ClusterSpec = job.cluster
    values: dict[str, Any] = {
        "address": spec.address,
        "workers": spec.workers,
        "shard_rows": spec.shard_rows,
        "state_root": None if spec.state_root is None else Path(spec.state_root),
    }
    values.update({key: value for key, value in overrides.items() if value is not None})
    return ClusterOptions(**values)


def state_root_of(job: JobSpec, options: ClusterOptions) -> Path:
    return options.state_root if options.state_root is not None else job.state_path


def plan_for(job: JobSpec, options: ClusterOptions) -> tuple[JobContext, InputScan, ShardPlan]:
    """Check the job, and load its shard plan (or make it, with the shards' input slices)."""
    if job.input.format == "openai-batch":
        raise JobFileError(
            job.source, "[input] format", "an OpenAI batch file cannot run on a cluster yet."
        )
    if job.request.mode == "batch":
        raise JobFileError(
            job.source,
            "[request] mode",
            "batch mode submits files to the provider's Batch API from one machine; run it "
            'without --ray (or [cluster] engine = "ray"), or with --mode online on the cluster.',
        )
    if is_url(job.output.path):
        raise JobFileError(
            job.source,
            "[output] path",
            "a cluster run writes its output to a local (or shared) path, not a URL.",
        )
    context = JobContext(job)
    scan = context.scan()
    root = state_root_of(job, options)
    fingerprint = hashlib.blake2b(
        context.planner.fingerprint + json.dumps(sorted(scan.columns)).encode(), digest_size=16
    ).hexdigest()
    folder = root / SHARDS
    if options.fresh and folder.exists():
        shutil.rmtree(folder)
    plan_file = folder / PLAN_FILE
    if plan_file.exists():
        plan = ShardPlan.from_json(plan_file.read_text())
        why = plan.mismatch(scan.rows, fingerprint)
        if why is not None:
            raise StateError(
                f"the shard plan {plan_file} does not fit this job: {why}. Run with --fresh to "
                "start over (finished rows would be sent again)."
            )
        return context, scan, plan
    shard_rows = options.shard_rows or shard_rows_for(scan.rows, options.workers)
    plan = plan_shards(scan.rows, shard_rows, fingerprint)
    _write_slices(context, scan, plan, root)
    if not options.fresh:  # rows the job answered on one machine count as answered
        seed_shards(job, plan, root)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = plan_file.with_name(PLAN_FILE + ".partial")
    tmp.write_text(plan.to_json())
    os.replace(tmp, plan_file)  # the plan is written last: it commits the slices
    return context, scan, plan


def _write_slices(context: JobContext, scan: InputScan, plan: ShardPlan, root: Path) -> None:
    """Write each shard's rows (the columns the job reads) to its input slice."""
    columns = tuple(c for c in context.job.output.keep_columns if c not in context.planner.columns)
    batches = _rows(context.input_batches(scan, columns))
    for shard in plan.shards:
        path = shard.input_path(root)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        writer: pq.ParquetWriter | None = None
        left = shard.rows
        while left > 0:
            batch = next(batches)
            if batch.num_rows > left:
                batches = _push_back(batch.slice(left), batches)
                batch = batch.slice(0, left)
            if writer is None:
                writer = pq.ParquetWriter(tmp, batch.schema)
            writer.write_batch(batch)
            left -= batch.num_rows
        if writer is None:
            pq.write_table(pa.table({}), tmp)
        else:
            writer.close()
        os.replace(tmp, path)


def _rows(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    yield from (batch for batch in batches if batch.num_rows)


def _push_back(first: pa.RecordBatch, rest: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    yield first
    yield from rest


def shard_job(job: JobSpec, shard: Shard, root: Path) -> JobSpec:
    """The job a worker runs for ``shard``: its slice, its part, its state folder."""
    return replace(
        job,
        input=replace(
            job.input, path=str(shard.input_path(root)), row_offset=shard.start, limit=None
        ),
        output=replace(
            job.output, path=str(shard.part_path(root)), state_dir=str(shard.state_path(root))
        ),
        cluster=ClusterSpec(),
        notices=(),
    )


def shard_done(shard: Shard, root: Path) -> dict[str, Any] | None:
    path = shard.folder(root) / DONE_FILE
    if not path.exists() or not shard.part_path(root).exists():
        return None
    found: dict[str, Any] = json.loads(path.read_text())
    return found


def earlier_spend(job: JobSpec, plan: ShardPlan, root: Path) -> Decimal | None:
    """What the shards' earlier runs spent, and the job's single-machine runs before them
    (None: some ran without a price)."""
    total = Decimal(0)
    before = seeded(root)
    if before is not None:
        if before.spent_usd is None:
            return None
        total += before.spent_usd
    for shard in plan.shards:
        folder = shard.state_path(root)
        if not folder.exists():
            continue
        spent = StateFolder(folder).spent_usd()
        if spent is None:
            return None
        total += spent
    return total


def _limiter_config(job: JobSpec, plan: ShardPlan, root: Path) -> LimiterConfig:
    limits = job.limits
    config = LimiterConfig(
        max_in_flight=limits.max_in_flight,
        requests_per_minute=limits.requests_per_minute,
        tokens_per_minute=limits.tokens_per_minute,
    )
    for shard in reversed(plan.shards):
        if shard.state_path(root).exists():
            learned = JobContext(shard_job(job, shard, root)).learned_limit()
            if learned is not None:
                return start_from(config, learned)
    return config


def connect(options: ClusterOptions) -> Any:
    """Ray, connected (a local instance is started when no address is given)."""
    try:
        import ray
    except ImportError:
        raise PipelineError(
            "running on a Ray cluster needs Ray: pip install 'pipeline[ray]'."
        ) from None
    if not ray.is_initialized():
        if options.address is None:
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(
            address=options.address,
            num_cpus=options.num_cpus if options.address is None else None,
            namespace=NAMESPACE,
            log_to_driver=False,
            include_dashboard=False,
            configure_logging=False,
        )
    return ray


def actor_tag(root: Path) -> str:
    """What names a run's actors: its state root (two runs of one job share the name)."""
    return hashlib.blake2b(str(root.resolve()).encode(), digest_size=6).hexdigest()


def run_cluster(
    job: JobSpec,
    options: ClusterOptions,
    *,
    reporter: ClusterReporter | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> ClusterReport:
    """Run ``job`` across a Ray cluster; see the module's docstring."""
    reporter = reporter or ClusterReporter()
    root = state_root_of(job, options)
    planned = not options.fresh and (root / SHARDS / PLAN_FILE).exists()
    context, scan, plan = plan_for(job, options)
    context.check_before_sending(write_output=True)
    report = ClusterReport(
        job=job.name, output=Path(job.output.path), rows=scan.rows, shards=len(plan.shards)
    )
    taken = None if planned else seeded(root)
    if taken is not None:
        report.resent += taken.unanswered
        left = f"; {taken.unanswered} request(s) it left in flight go again" * bool(
            taken.unanswered
        )
        reporter.notice(
            f"{taken.rows:,} row(s) answered by the job's single-machine runs count as done{left}."
        )
    todo: list[Shard] = []
    for shard in plan.shards:
        done = shard_done(shard, root)
        if done is not None and not (options.retry_failed and done.get("failed", 0)):
            report.skipped += 1
            report.ok += int(done.get("ok", 0))
            report.failed += int(done.get("failed", 0))
        else:
            todo.append(shard)
    cap = job.budget.max_cost_usd
    spent = Decimal(0)
    if cap is not None:
        context.check_priced()
        found = earlier_spend(job, plan, root)
        if found is None:
            raise StateError(
                f"the spend of earlier runs under {root / SHARDS} is unknown (they ran without a "
                "price), so the budget cannot be enforced; run with --fresh."
            )
        spent = found
    ray = connect(options)
    reporter.start(job, plan, options.workers, report.skipped)
    if todo:
        _run_shards(
            ray,
            job,
            options=options,
            plan=plan,
            root=root,
            todo=todo,
            report=report,
            reporter=reporter,
            cap=cap,
            spent=spent,
            clock=clock,
        )
    if len(report.results) + report.skipped == len(plan.shards) and all(
        result.complete for result in report.results
    ):
        write_output(job, plan, root)
        report.output_written = True
    return report


def _run_shards(
    ray: Any,
    job: JobSpec,
    *,
    options: ClusterOptions,
    plan: ShardPlan,
    root: Path,
    todo: list[Shard],
    report: ClusterReport,
    reporter: ClusterReporter,
    cap: Decimal | None,
    spent: Decimal,
    clock: Callable[[], float],
) -> None:
    tag = actor_tag(root)
    config = _limiter_config(job, plan, root)
    coordinator_name = f"coordinator-{tag}"
    _kill_named(ray, coordinator_name)
    count = min(options.workers, len(todo))
    coordinator = (
        ray.remote(Coordinator)
        .options(name=coordinator_name, namespace=NAMESPACE, num_cpus=0, max_concurrency=1)
        .remote(config, cap, spent, options.ttl_s, count)
    )
    workers = []
    for index in range(count):
        name = f"worker-{tag}-{index}"
        _kill_named(ray, name)
        workers.append(
            ray.remote(ShardWorker)
            .options(
                name=name,
                namespace=NAMESPACE,
                num_cpus=WORKER_CPUS,
                max_restarts=-1,
                max_task_retries=-1,
                max_concurrency=2,  # pid() answers while a shard runs
            )
            .remote(index, coordinator_name, NAMESPACE)
        )
    pending = list(todo)
    running: dict[Any, tuple[Any, Shard]] = {}
    idle = list(workers)
    leaving: list[Any] = []
    stop = False
    next_tick = clock()
    try:
        while pending or running:
            while idle and pending and not stop:
                worker, shard = idle.pop(0), pending.pop(0)
                task = ShardTask(
                    shard=shard.id,
                    job=shard_job(job, shard, root),
                    retry_failed=options.retry_failed,
                    last=not pending,
                )
                running[worker.run_shard.remote(task)] = (worker, shard)
                if not pending:
                    coordinator.ending.remote()
            if not running:
                break
            ready, _ = ray.wait(list(running), num_returns=1, timeout=options.tick_s)
            for ref in ready:
                worker, shard = running.pop(ref)
                result = _result(ray, ref)
                _record(result, shard, root, report)
                if result.over_budget:
                    stop = True
                idle.append(worker)
                if not pending or stop:  # the worker gets no more shards: its lease goes back
                    leaving.append(worker.leave.remote())
                if not pending and running:  # the idle workers get no more shards
                    coordinator.expect.remote(len(running))
            if clock() >= next_tick:
                next_tick = clock() + options.tick_s
                report.figures = ray.get(coordinator.figures.remote())
                reporter.update(report.figures, report)
        report.leave_calls += sum(ray.get(leaving))
        report.figures = ray.get(coordinator.figures.remote())
        reporter.update(report.figures, report)
    finally:
        for actor in [*workers, coordinator]:
            ray.kill(actor)


def _result(ray: Any, ref: Any) -> ShardResult:
    """A shard's result; a mistake a worker found (a bad row file, a refused key) is raised
    as itself, not wrapped in Ray's error."""
    try:
        result: ShardResult = ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, PipelineError):
            raise exc.cause from None
        raise
    return result


def _record(result: ShardResult, shard: Shard, root: Path, report: ClusterReport) -> None:
    report.results.append(result)
    report.ok += result.ok
    report.failed += result.failed
    report.requests += result.requests
    report.resent += result.resent
    if result.cost_usd is None or report.cost_usd is None:
        report.cost_usd = None
    else:
        report.cost_usd += result.cost_usd
    report.over_budget = report.over_budget or result.over_budget
    if result.complete:
        path = shard.folder(root) / DONE_FILE
        path.write_text(json.dumps({"ok": result.ok, "failed": result.failed}))


def _kill_named(ray: Any, name: str) -> None:
    """Kill an actor left under ``name`` by a driver that died on a long-lived cluster."""
    with contextlib.suppress(ValueError):
        ray.kill(ray.get_actor(name, namespace=NAMESPACE))


def write_output(job: JobSpec, plan: ShardPlan, root: Path) -> int:
    """Write the output from the shards' parts, in input order, atomically; returns its rows."""
    path = Path(job.output.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    writer: pq.ParquetWriter | None = None
    rows = 0
    try:
        for shard in plan.shards:
            if shard.rows == 0:
                continue
            part = pq.ParquetFile(shard.part_path(root))
            if writer is None:
                writer = pq.ParquetWriter(tmp, part.schema_arrow)
            for batch in part.iter_batches():
                writer.write_batch(batch)
                rows += batch.num_rows
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        return 0
    os.replace(tmp, path)
    return rows
