"""pipeline: batch-processing engine for large offline LLM workloads.

The public API; everything else is internal and may change. Run a job::

    from pipeline import run_job

    report = run_job("jobs/label_reviews.toml")  # the API key from the job's api_key_env
    print(report.final.ok, report.final.cost_usd)

See where a job stands, without sending anything::

    from pipeline import JobContext, job_status, load_job

    context = JobContext(load_job("jobs/label_reviews.toml"))
    status = job_status(context, context.scan())

Inside a running event loop, drive a :class:`Runner` yourself::

    runner = Runner(load_job("jobs/label_reviews.toml"), api_key=None)
    report = await runner.run(runner.prepare())

Test helpers (a fake clock, a scripted provider, the built-in server) are in
:mod:`pipeline.testing`.
"""

from __future__ import annotations

from pipeline.engine.context import JobContext
from pipeline.engine.report import Reporter, RunReport
from pipeline.engine.runner import Runner, RunOptions, run_job
from pipeline.engine.status import JobStatus, job_status
from pipeline.errors import (
    AuthError,
    InputError,
    JobFileError,
    PipelineError,
    ProviderError,
    StateError,
    UsageError,
)
from pipeline.job.load import load_job, parse_job
from pipeline.job.spec import JobSpec, Overrides, apply_overrides
from pipeline.money.pricing import Price, Usage, cost, resolve_price

__version__ = "0.1.0"

__all__ = [
    "AuthError",
    "InputError",
    "JobContext",
    "JobFileError",
    "JobSpec",
    "JobStatus",
    "Overrides",
    "PipelineError",
    "Price",
    "ProviderError",
    "Reporter",
    "RunOptions",
    "RunReport",
    "Runner",
    "StateError",
    "Usage",
    "UsageError",
    "__version__",
    "apply_overrides",
    "cost",
    "job_status",
    "load_job",
    "parse_job",
    "resolve_price",
    "run_job",
]
