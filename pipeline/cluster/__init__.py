"""Running a job across a Ray cluster: shards run by this project's engine, one cluster-wide
limiter and budget (see :mod:`pipeline.cluster.driver`). Ray is imported only when a run
starts."""
