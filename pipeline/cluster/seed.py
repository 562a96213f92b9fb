"""A cluster run of a job that ran on one machine before: what that run answered counts.

When the driver first plans a job's shards, the rows the job's single-machine journal holds
(``ok`` or ``failed``) are copied into the journals of the shards they fall in, so that the
shards resume past them as if they had answered them: nothing is paid twice. The copies carry
run number 0 (no run of the shard's own), so a shard's spend stays its own; what the
single-machine runs spent (and the worst case of the requests a killed one left in flight,
which the cluster sends again) is written once to ``shards/seeded.json`` and counted as
earlier spend by every later cluster run's budget.

The other way round, a single-machine run of a job that has a shard plan is refused
(:func:`pipeline.engine.shared.refuse_after_cluster`).
"""

from __future__ import annotations

import bisect
import json
from collections import defaultdict
from dataclasses import dataclass, replace
from decimal import Decimal
from pathlib import Path

from pipeline.cluster.plan import SHARDS, ShardPlan
from pipeline.errors import StateError
from pipeline.job.spec import JobSpec
from pipeline.results import RowResult
from pipeline.state.journal import Journal
from pipeline.state.runs import StateFolder

SEEDED_FILE = "seeded.json"


@dataclass(frozen=True, slots=True, kw_only=True)
class Seeded:
    rows: int
    """Rows of the single-machine journal copied into the shards."""
    unanswered: int
    """Requests a killed single-machine run left in flight (the cluster sends them again)."""
    spent_usd: Decimal | None
    """What the single-machine runs spent, their unanswered requests' worst case included
    (None: a price was unknown)."""

    def to_json(self) -> str:
        spent = None if self.spent_usd is None else str(self.spent_usd)
        return json.dumps(
            {"rows": self.rows, "unanswered": self.unanswered, "spent_usd": spent}, indent=1
        )

    @classmethod
    def from_json(cls, text: str) -> Seeded:
        data = json.loads(text)
        spent = data.get("spent_usd")
        return cls(
            rows=int(data["rows"]),
            unanswered=int(data.get("unanswered", 0)),
            spent_usd=None if spent is None else Decimal(spent),
        )


def seed_shards(job: JobSpec, plan: ShardPlan, root: Path) -> Seeded | None:
    """Copy the job's single-machine results into the shards' journals (before the plan is
    written: the plan commits them); None when the job never ran on one machine."""
    folder = StateFolder(job.state_path)
    history = folder.history()
    if not history:
        return None
    holder = folder.locked_by_other()
    if holder is not None:
        raise StateError(
            f"the job {job.name} is running on one machine now ({holder}); wait for it to end "
            "before running it on a cluster."
        )
    starts = [shard.start for shard in plan.shards]
    rows = 0
    journal = folder.journal
    for bucket in journal.result_buckets():
        by_shard: dict[int, list[RowResult]] = defaultdict(list)
        for record in journal.read_bucket(bucket).values():
            index = bisect.bisect_right(starts, record.row) - 1
            if index >= 0 and record.row < starts[index] + plan.shards[index].rows:
                by_shard[index].append(replace(record, run=0))
        for index, records in by_shard.items():
            target = Journal(plan.shards[index].state_path(root))
            target.open()
            target.append_results(records)
            rows += len(records)
    unanswered = folder.unanswered()
    spent = folder.spent_usd()
    if unanswered is not None and spent is not None and history[-1].summary is None:
        # A killed run's left-over requests are recorded by the run after it: this one.
        worst = unanswered.worst_cost_usd
        spent = None if worst is None else spent + worst
    seeded = Seeded(
        rows=rows,
        unanswered=0 if unanswered is None else unanswered.count,
        spent_usd=spent,
    )
    path = root / SHARDS / SEEDED_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(seeded.to_json())
    return seeded


def seeded(root: Path) -> Seeded | None:
    """What the job's first cluster run took over from its single-machine runs."""
    path = root / SHARDS / SEEDED_FILE
    return Seeded.from_json(path.read_text()) if path.exists() else None
