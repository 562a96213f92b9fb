"""Running a job across a Ray cluster from Python: ``pipeline.ray.run_job(job, workers=4)``.

The same run as ``pipeline run JOB --ray [ADDRESS] --workers N`` (see
:mod:`pipeline.cluster.driver`). Ray is an optional extra (``pip install 'pipeline[ray]'``);
it is imported only when a run starts. With Ray already initialised in this process, the run
uses that instance; else ``address`` picks the cluster (``None``: a new local instance,
``"auto"``: the running one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.api.endpoint import api_key_for, endpoint
from pipeline.api.jobs import JobLike, job_for_call
from pipeline.cluster.driver import ClusterReport, ClusterReporter, cluster_options, run_cluster

__all__ = ["ClusterReport", "run_job"]


def run_job(
    job: JobLike,
    *,
    address: str | None = None,
    workers: int | None = None,
    shard_rows: int | None = None,
    state_root: str | Path | None = None,
    local: bool = False,
    fresh: bool = False,
    retry_failed: bool = False,
    num_cpus: int | None = None,
    lease_ttl_s: float | None = None,
    reporter: ClusterReporter | None = None,
    **overrides: Any,
) -> ClusterReport:
    """Run ``job`` across a Ray cluster and return the cluster's report; the output Parquet
    is written (in input order, one row per input row) once every shard has finished.

    ``job`` and ``**overrides`` are those of :func:`pipeline.run_job`; ``address``,
    ``workers``, ``shard_rows`` and ``state_root`` override the job's ``[cluster]`` table.
    ``num_cpus`` sizes a local Ray instance started here; ``lease_ttl_s`` is how long a
    worker that stopped calling the coordinator keeps its permits (60 s; a worker Ray
    restarts gives back its predecessor's at its first call). The API key is
    read from the environment variable ``[request] api_key_env`` names, on each node: it
    never passes through Ray.
    """
    spec = job_for_call(job, caller="pipeline.ray.run_job", local=local, overrides=overrides)
    api_key_for(spec)
    options = cluster_options(
        spec,
        address=address,
        workers=workers,
        shard_rows=shard_rows,
        state_root=None if state_root is None else Path(state_root),
        fresh=fresh or None,
        retry_failed=retry_failed or None,
        num_cpus=num_cpus,
        ttl_s=lease_ttl_s,
    )
    with endpoint(spec) as target:
        return run_cluster(target, options, reporter=reporter)
