"""The seam through which a run shares its limiter and budget with other runs.

A single-machine run owns its :class:`~pipeline.provider.limiter.Limiter` and its
:class:`~pipeline.money.budget.Budget`. A shard of a cluster run (:mod:`pipeline.cluster`)
gets both from :class:`SharedLimits` instead: a limiter that hands out permits leased from the
cluster's coordinator, and a budget that reserves against dollars leased from it. The engine
sees the same two types either way.
"""

from __future__ import annotations

import shutil
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from pipeline.errors import UsageError

if TYPE_CHECKING:
    from pipeline.engine.accounting import Accounts
    from pipeline.job.spec import JobSpec
    from pipeline.money.budget import Budget
    from pipeline.provider.limiter import Limiter
    from pipeline.provider.limits import LimiterConfig


class SharedLimits(Protocol):
    """A limiter and a budget shared with other runs."""

    def limiter(self, config: LimiterConfig) -> Limiter:
        """The run's limiter, for a job whose own limits are ``config``."""
        ...

    def budget_for(self, cap: Decimal) -> Budget:
        """The run's budget, for a job whose cap is ``cap`` (the shared books know what
        every run spent)."""
        ...

    def bind(self, accounts: Accounts) -> None:
        """The run's books are open: the shared budget wakes their waiters through them."""
        ...

    def commit_group(self) -> int:
        """Results the run's writer commits together at most: half the permits this run
        holds now (not half the job's ``max_in_flight``, which the runs share)."""
        ...


SHARDS = "shards"
"""The folder of a cluster run's shards, under its state root (as :mod:`pipeline.cluster.plan`,
which the engine does not import)."""
PLAN_FILE = "plan.json"
"""The shard plan, in that folder."""


def shard_folders(job: JobSpec) -> list[Path]:
    """The shard folders of the job's cluster runs that exist: under its state folder, and
    under ``[cluster] state_root``."""
    roots = [job.state_path]
    if job.cluster.state_root is not None:
        roots.append(Path(job.cluster.state_root))
    return [root / SHARDS for root in roots if (root / SHARDS / PLAN_FILE).exists()]


def refuse_after_cluster(job: JobSpec) -> None:
    """A single-machine run cannot see what a cluster run of the job answered (its shards'
    journals): it would pay for those rows again, so it is refused before anything is sent."""
    found = shard_folders(job)
    if found:
        raise UsageError(
            f"the job {job.name} ran on a Ray cluster ({found[0]}): run it with --ray to finish "
            "it without paying again for the rows its shards answered, or with --fresh to start "
            "over."
        )


def forget_cluster_runs(job: JobSpec) -> None:
    """A single-machine ``--fresh`` run starts over: the job's shards go too."""
    for folder in shard_folders(job):
        shutil.rmtree(folder)
