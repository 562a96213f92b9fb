"""pipeline: batch-processing engine for large offline LLM workloads.

The public API; everything else is internal and may change. Run a job and get its output as
a polars DataFrame, one row per input row (in a script, or in a notebook's running loop)::

    from pipeline import run_job

    out = run_job("jobs/label_reviews.toml")  # the API key from the job's api_key_env
    out = run_job({"name": "labels", "request": {"prompt": "Label: {text}"}},
                  rows=df, local=True)        # a dict job, rows from a DataFrame
    out = await arun_job(job, rows=df)        # in async code, on the caller's loop

Estimate it without sending anything: ``estimate_job(job, rows=df)`` returns an
:class:`Estimate`. The run's figures instead of its output: ``run_job_report(...)`` returns a
:class:`RunReport`. See where a job stands::

    from pipeline import JobContext, job_status, load_job

    context = JobContext(load_job("jobs/label_reviews.toml"))
    status = job_status(context, context.scan())

For full control in async code, drive a :class:`Runner` yourself::

    runner = Runner(load_job("jobs/label_reviews.toml"), api_key=None)
    report = await runner.run(runner.prepare())

Test helpers (a fake clock, a scripted provider, the built-in server) are in
:mod:`pipeline.testing`.
"""

from __future__ import annotations

import typing

if typing.TYPE_CHECKING:
    from pipeline.api.estimate import estimate_job
    from pipeline.api.run import OverBudgetError, arun_job, run_job, run_job_report
    from pipeline.engine.context import JobContext
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
    from pipeline.estimate.figures import Estimate
    from pipeline.job.load import job_from_dict, load_job, parse_job
    from pipeline.job.spec import JobSpec, Overrides, apply_overrides
    from pipeline.money.pricing import Price, Usage, cost, resolve_price

__version__ = "0.1.0"

_LAZY = {
    "AuthError": "pipeline.errors",
    "Estimate": "pipeline.estimate.figures",
    "InputError": "pipeline.errors",
    "JobContext": "pipeline.engine.context",
    "JobFileError": "pipeline.errors",
    "JobSpec": "pipeline.job.spec",
    "JobStatus": "pipeline.engine.status",
    "OverBudgetError": "pipeline.api.run",
    "Overrides": "pipeline.job.spec",
    "PipelineError": "pipeline.errors",
    "Price": "pipeline.money.pricing",
    "ProviderError": "pipeline.errors",
    "Reporter": "pipeline.engine.report",
    "RunOptions": "pipeline.engine.runner",
    "RunReport": "pipeline.engine.report",
    "Runner": "pipeline.engine.runner",
    "StateError": "pipeline.errors",
    "Usage": "pipeline.money.pricing",
    "UsageError": "pipeline.errors",
    "apply_overrides": "pipeline.job.spec",
    "arun_job": "pipeline.api.run",
    "cost": "pipeline.money.pricing",
    "estimate_job": "pipeline.api.estimate",
    "job_from_dict": "pipeline.job.load",
    "job_status": "pipeline.engine.status",
    "load_job": "pipeline.job.load",
    "parse_job": "pipeline.job.load",
    "resolve_price": "pipeline.money.pricing",
    "run_job": "pipeline.api.run",
    "run_job_report": "pipeline.api.run",
}
"""Where each public name lives: imported on first use (PEP 562), so that ``python -m
pipeline run`` loads only what running needs (start-up counts: bench/throughput.py (s))."""


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    "AuthError",
    "Estimate",
    "InputError",
    "JobContext",
    "JobFileError",
    "JobSpec",
    "JobStatus",
    "OverBudgetError",
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
    "arun_job",
    "cost",
    "estimate_job",
    "job_from_dict",
    "job_status",
    "load_job",
    "parse_job",
    "resolve_price",
    "run_job",
    "run_job_report",
]
