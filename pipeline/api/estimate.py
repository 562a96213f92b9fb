"""Estimating a job from Python: what ``pipeline estimate`` prints, as a typed value."""

from __future__ import annotations

from typing import Any

from pipeline.api.endpoint import LOCAL_PRICE_URL
from pipeline.api.jobs import JobLike
from pipeline.api.run import prepared_job
from pipeline.engine.shared import shard_folders
from pipeline.estimate.figures import Estimate
from pipeline.estimate.scan import compute_estimate
from pipeline.job.spec import Overrides, apply_overrides


def estimate_job(
    job: JobLike, *, rows: Any = None, local: bool = False, **overrides: Any
) -> Estimate:
    """Estimate ``job``'s tokens, cost and duration; nothing is sent.

    The arguments are :func:`~pipeline.api.run.run_job`'s: the same job forms, ``rows``
    instead of ``[input]``, ``local=True`` for the built-in server's side (priced by model id,
    as a ``--local`` run is), and the overrides (``output`` locates the state of runs that
    used one; ``limit``, ``model``, ``base_url``, ``price``, ...). Rows that earlier runs
    finished count with what they cost, and their answers teach the output length.

    Returns an :class:`~pipeline.estimate.figures.Estimate`: ``rows``, ``rows_to_send``,
    ``input_tokens`` (``exact_tokens``/``token_count`` say how they were counted),
    ``output_tokens_expected`` and ``output_tokens_worst``, ``cost`` (``expected``,
    ``worst_case``, ``interval_95``, in USD as Decimals; None when the price is unknown),
    ``duration`` and ``warnings``; ``to_dict()`` gives what ``pipeline estimate --json``
    prints. Works anywhere, a running event loop included (it runs no loop of its own). A
    job that ran on a Ray cluster counts its shards' finished rows, as ``pipeline estimate``
    does.
    """
    with prepared_job(job, rows, local, overrides, caller="estimate_job") as spec:
        priced = apply_overrides(spec, Overrides(base_url=LOCAL_PRICE_URL)) if local else spec
        journal = None
        if shard_folders(priced):  # it ran on a cluster: its shards' results count
            from pipeline.cluster.status import ShardedJournal, shard_plan

            plan = shard_plan(priced)
            journal = None if plan is None else ShardedJournal(priced, plan)
        return compute_estimate(priced, journal=journal)
