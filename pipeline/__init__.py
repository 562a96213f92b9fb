"""pipeline: batch-processing engine for large offline LLM workloads.

The public API; everything else is internal and may change::

    from pipeline import Runner, RunOptions, load_job

    job = load_job("jobs/label_reviews.toml")
    runner = Runner(job, api_key=job.api_key())
    report = anyio.run(runner.run, runner.prepare())
"""

from __future__ import annotations

from pipeline.engine.report import Reporter, RunReport
from pipeline.engine.runner import Runner, RunOptions
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
from pipeline.job.spec import JobSpec, Overrides, apply_overrides, load_job, parse_job
from pipeline.money.pricing import Price, Usage, cost, resolve_price

__version__ = "0.1.0"

__all__ = [
    "AuthError",
    "InputError",
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
]
