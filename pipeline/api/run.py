"""Running a job from Python: in a script, inside a running event loop (Jupyter), or awaited.

::

    run_job(job, rows=..., local=..., **overrides) ─┐ no loop running in this thread:
                                                    │   anyio.run here (Ctrl-C stops
    run_job_report(...) ─────────────────────────── ┤   gracefully, as the CLI does)
                                                    │ a loop is running (a notebook):
                                                    │   a worker thread with its own loop
    await arun_job(...) ──── the caller's own loop ─┴─▶ _Session.run: the embedded server
                                                        (local=True), Runner.prepare(),
                                                        Runner.run(): the CLI's engine

Everything that can be wrong with the job, its overrides or its input is raised in the
calling thread before anything is sent. The run itself is the command line's: same resume
(request keys from the rows' ids), budget, accounting, state folder and output Parquet.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.from_thread
import anyio.to_thread

from pipeline.api.endpoint import api_key_for, endpoint, loop_options
from pipeline.api.jobs import JobLike, job_for_call
from pipeline.engine.report import Reporter, RunReport
from pipeline.engine.runner import Runner, RunOptions
from pipeline.errors import EXIT_OVER_BUDGET, PipelineError, UsageError
from pipeline.io import tables
from pipeline.job.spec import JobSpec
from pipeline.provider.redact import redact

if TYPE_CHECKING:
    import httpx
    import polars as pl

log = logging.getLogger("pipeline")
T = TypeVar("T")


class OverBudgetError(PipelineError):
    """A run stopped at its budget: the next request could have taken the spend over
    ``max_cost``. Finished rows are kept in the state folder (and in :attr:`output`); call
    again with a higher ``max_cost`` to go on: they are not sent again."""

    exit_code = EXIT_OVER_BUDGET

    def __init__(self, message: str, *, report: RunReport, output: pl.DataFrame | None) -> None:
        super().__init__(message)
        self.report = report
        """The run's report (figures, budget, rows left)."""
        self.output = output
        """The rows finished so far (every run's), as the output Parquet holds them."""


class LogReporter(Reporter):
    """What a run tells a person, as log records of the ``pipeline`` logger: notices (a stop,
    requests left in flight by an earlier run) as warnings, each row's retry or failure at
    debug level. With no logging set up, Python prints warnings to stderr."""

    def notice(self, message: str) -> None:
        log.warning("%s", redact(message, None))

    def event(self, message: str) -> None:
        log.debug("%s", redact(message, None))

    def finish(self, report: RunReport) -> None:
        final = report.final
        money = "unknown" if final.cost_usd is None else f"${final.cost_usd:.6f}"
        log.info(
            "%s: %s ok, %s failed, %s resumed, cost %s; output %s",
            report.job,
            final.ok,
            final.failed,
            final.resumed_rows,
            money,
            report.output,
        )


def run_job(
    job: JobLike,
    *,
    rows: Any = None,
    local: bool = False,
    fresh: bool = False,
    retry_failed: bool = False,
    api_key: str | None = None,
    **overrides: Any,
) -> pl.DataFrame:
    """Run ``job`` to the end and return its output, one row per input row in input order.

    ``job`` is a job file's path, its TOML text, a dict of its tables or a
    :class:`~pipeline.job.spec.JobSpec`. ``rows`` (a polars or pandas DataFrame, a pyarrow
    Table) replaces the job's ``[input]``; rows are identified as in a file (``id_column``, else
    the row number), so calling again with the same rows and output resumes: finished rows are
    not sent again. ``local=True`` runs against the embedded built-in server (``--local``).
    ``fresh``/``retry_failed`` are the command line's ``--fresh``/``--retry-failed``, and
    ``**overrides`` its flags (:data:`~pipeline.api.jobs.OVERRIDES`: ``output``, ``limit``,
    ``max_cost``, ``model``, ``base_url``, ``input``, ``price``). The API key is ``api_key``,
    else the environment variable ``[request] api_key_env`` names (checked before anything is
    sent, as by the CLI).

    Works in a plain script and inside a running event loop (a notebook: the run then gets a
    worker thread and a loop of its own). Raises :class:`~pipeline.errors.PipelineError` for a
    bad job or input, before anything is sent; :class:`OverBudgetError` when the run stopped
    at ``max_cost``; :class:`KeyboardInterrupt` after Ctrl-C, once finished rows are saved.
    Failed rows are rows of the output (``status == "failed"``, with their ``error``).
    """
    options = RunOptions(fresh=fresh, retry_failed=retry_failed)
    with prepared_job(job, rows, local, overrides, caller="run_job") as spec:
        report = _run_blocking(_Session(spec, api_key=api_key, options=options), signals=True)
    return _result(report)


async def arun_job(
    job: JobLike,
    *,
    rows: Any = None,
    local: bool = False,
    fresh: bool = False,
    retry_failed: bool = False,
    api_key: str | None = None,
    **overrides: Any,
) -> pl.DataFrame:
    """:func:`run_job` for async code (``await arun_job(...)``, in a notebook too): the run
    uses the caller's event loop. Cancelling the awaiting task stops the run at once;
    finished rows are kept."""
    options = RunOptions(fresh=fresh, retry_failed=retry_failed)
    with prepared_job(job, rows, local, overrides, caller="arun_job") as spec:
        report = await _Session(spec, api_key=api_key, options=options).run()
    return await anyio.to_thread.run_sync(_result, report)


def run_job_report(
    job: JobLike,
    *,
    rows: Any = None,
    local: bool = False,
    api_key: str | None = None,
    options: RunOptions | None = None,
    reporter: Reporter | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    **overrides: Any,
) -> RunReport:
    """Run ``job`` as :func:`run_job` does (the same job forms, ``rows``, ``local`` and
    overrides, in a script or a notebook) and return the run's :class:`RunReport` (figures,
    budget, how it ended) instead of the output; a stop at the budget is a report with
    ``over_budget`` set, not an error. ``options`` are the runner's
    (:class:`~pipeline.engine.runner.RunOptions`), ``reporter`` receives its figures as it
    goes, and ``transport`` replaces the network (an ``httpx.MockTransport``, see
    :mod:`pipeline.testing`). For full control in async code, use
    :class:`~pipeline.engine.runner.Runner`: ``await runner.run(runner.prepare())``.
    """
    options = options or RunOptions()
    with prepared_job(job, rows, local, overrides, caller="run_job_report") as spec:
        session = _Session(
            spec, api_key=api_key, options=options, reporter=reporter, transport=transport
        )
        return _run_blocking(session, signals=options.handle_signals)


@contextlib.contextmanager
def prepared_job(
    job: JobLike, rows: Any, local: bool, overrides: Mapping[str, Any], *, caller: str
) -> Iterator[JobSpec]:
    """The call's job (see :func:`~pipeline.api.jobs.job_for_call`), validated, with its
    rows (if any) registered as its input for the block; the job's notices are logged."""
    with contextlib.ExitStack() as stack:
        name = None
        if rows is not None:
            name = stack.enter_context(tables.registered(tables.as_table(rows)))
        spec = job_for_call(job, caller=caller, rows_name=name, local=local, overrides=overrides)
        if spec.request.mode == "batch" and caller != "estimate_job":
            raise UsageError(
                f'{caller}(): [request] mode = "batch" runs from the command line (pipeline '
                "run JOB, which can wait for the provider's batches for hours); the Python "
                'API sends rows online: give a job with mode = "online".'
            )
        for notice in spec.notices:
            log.warning("%s", redact(str(notice), None))
        yield spec


class _Session:
    """One run of a job: built in the calling thread, run in whichever loop runs it."""

    def __init__(
        self,
        job: JobSpec,
        *,
        api_key: str | None,
        options: RunOptions,
        reporter: Reporter | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.job = job
        self.api_key = api_key_for(job, local_flag="local=True") if api_key is None else api_key
        self.options = options
        self.reporter = reporter or LogReporter()
        self.transport = transport
        self.runner: Runner | None = None

    async def run(self) -> RunReport:
        """Start the embedded server (``local``), check the job against its input, run it."""
        stack = contextlib.ExitStack()
        try:
            target = await anyio.to_thread.run_sync(stack.enter_context, endpoint(self.job))
            runner = Runner(
                target,
                api_key=self.api_key,
                options=self.options,
                reporter=self.reporter,
                transport=self.transport,
            )
            self.runner = runner
            scan = await anyio.to_thread.run_sync(runner.prepare)
            for warning in runner.warnings():
                log.warning("%s", warning)
            return await runner.run(scan)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(stack.close)

    def stop(self) -> bool:
        """Stop sending (requests in flight may finish); False when the run has not begun."""
        if self.runner is None:
            return False
        self.runner.stop()
        return True

    def stop_now(self) -> None:
        """Cancel the requests in flight too; finished rows are kept."""
        if self.runner is not None:
            self.runner.stop()
            self.runner.control.stop_now()


def loop_running() -> bool:
    """Whether an event loop runs in this thread (a notebook's, or the caller's own)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        return True
    try:
        import sniffio
    except ImportError:
        return False
    try:
        sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        return False
    return True


def _run_blocking(session: _Session, *, signals: bool) -> RunReport:
    """Run ``session`` to its end from synchronous code: here with ``anyio.run`` when no
    loop runs in this thread (on the main thread, SIGINT/SIGTERM stop gracefully as in the
    CLI), else in a worker thread with a loop of its own."""
    if not loop_running():
        import threading

        main = threading.current_thread() is threading.main_thread()
        session.options = replace(session.options, handle_signals=signals and main)
        return anyio.run(session.run, backend_options=loop_options())
    session.options = replace(session.options, handle_signals=False)
    with anyio.from_thread.start_blocking_portal(backend_options=loop_options()) as portal:
        future = portal.start_task_soon(session.run)
        try:
            return wait_for(future)
        except KeyboardInterrupt:
            _interrupt(portal, future, session)
            raise interrupted(session.job.name, session.job.state_path) from None


def _interrupt(
    portal: anyio.from_thread.BlockingPortal,
    future: concurrent.futures.Future[RunReport],
    session: _Session,
) -> None:
    """Ctrl-C while a worker thread runs the job: stop as the CLI does on its first SIGINT
    (no new requests; those in flight get ``grace_s`` to finish and are recorded), at once on
    a second Ctrl-C or when the grace period ends; then wait for the run to close its state."""
    log.warning(
        "stopping: no new requests; waiting up to %g s for those in flight. "
        "Interrupt again to stop at once.",
        session.options.grace_s,
    )
    try:
        if not portal.call(session.stop):
            future.cancel()
        wait_for(future, timeout=session.options.grace_s)
    except TimeoutError:
        portal.call(session.stop_now)
    except KeyboardInterrupt:
        portal.call(session.stop_now)
    except Exception:  # the run's own end (cancelled, or an error after the stop)
        return
    with contextlib.suppress(Exception):
        wait_for(future)


WAIT_SLICE_S = 0.2
"""How long a wait for the worker thread's run blocks at a time (see :func:`wait_for`)."""


def wait_for(future: concurrent.futures.Future[T], timeout: float | None = None) -> T:
    """``future.result(timeout)``, waited for in slices of :data:`WAIT_SLICE_S`.

    Python raises KeyboardInterrupt on the main thread between bytecodes; a lock wait wakes
    for it only when the kernel delivers SIGINT to that very thread. Linux may deliver it to
    any thread of the process (measured here: to another one, every time, with the run's
    threads about), and Windows never interrupts a lock wait, so a single long wait would
    leave Ctrl-C unanswered until the run ended."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        left = WAIT_SLICE_S if deadline is None else min(WAIT_SLICE_S, deadline - time.monotonic())
        try:
            return future.result(timeout=max(left, 0))
        except TimeoutError:
            if deadline is not None and time.monotonic() >= deadline:
                raise


def _result(report: RunReport) -> pl.DataFrame:
    """The output a finished run wrote; a stop is an exception carrying what it holds."""
    if report.interrupted:
        raise interrupted(report.job, report.state_dir)
    output = read_output(report.output) if report.output_rows else empty_output()
    if report.over_budget and report.budget is not None:
        raise OverBudgetError(budget_stop_message(report), report=report, output=output)
    return output


def interrupted(job: str, state: object) -> KeyboardInterrupt:
    """The KeyboardInterrupt a stopped run ends with: where its finished rows are."""
    return KeyboardInterrupt(
        f"{job}: interrupted; finished rows are kept in {state}. Call again to resume."
    )


def empty_output() -> pl.DataFrame:
    """The output of a run that has no row to write (no input row, or none finished before a
    stop): no file is written then, so the frame is made here (the id and result columns)."""
    import polars as pl
    import pyarrow as pa

    from pipeline.io.sinks import RESULT_SCHEMA

    schema = pa.schema([pa.field("id", pa.int64()), *RESULT_SCHEMA])
    frame = pl.from_arrow(schema.empty_table())
    assert isinstance(frame, pl.DataFrame)
    return frame


def read_output(where: object) -> pl.DataFrame:
    """The output Parquet at ``where`` (a path, or a URL in object storage) as polars."""
    import polars as pl
    import pyarrow.parquet as pq

    from pipeline.io import remote

    text = str(where)
    if remote.is_url(text):
        with remote.open_input(text) as handle:
            frame = pl.from_arrow(pq.read_table(handle))
    else:
        frame = pl.read_parquet(text)
    assert isinstance(frame, pl.DataFrame)
    return frame


def budget_stop_message(report: RunReport) -> str:
    """What happened at the budget, and by how much to raise ``max_cost`` to finish."""
    budget = report.budget
    assert budget is not None
    head = (
        f"{report.job}: stopped at the budget: ${budget.spent:.6f} spent of the ${budget.cap} "
        f"cap, and the next request could have passed it. {report.rows_left:,} rows are left; "
        f"finished rows are kept in {report.state_dir}."
    )
    rest = report.cost_of_the_rest()
    cap = report.cap_to_finish()
    if rest is None or cap is None:
        return head + " Raise max_cost and call again; finished rows are not sent again."
    return head + (
        f" They would cost about ${rest:.6f} more at this run's cost per row: call again with "
        f"max_cost={cap:.6f} (10% to spare); finished rows are not sent again."
    )
