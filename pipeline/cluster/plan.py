"""Pure: the shard plan of a cluster run, and where each shard keeps its state.

A shard is a fixed range of input rows, ``[start, start + rows)``, run by this project's own
engine as a job of its own: its rows keep their global numbers (so their ids and request keys
are those of a single-machine run of the whole job), its journal, intents and runs live in
``<state_root>/shards/<id>/state``, its input slice in ``.../input.parquet`` and its output part
in ``.../part.parquet``. The plan is written once, beside the shards, and every later run of
the job uses it as it is: planning anew could move rows to other shards and orphan what their
journals hold (the rows would be paid for again). A plan that no longer matches the input
(another row count, other columns, another request template) is refused, not replaced.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

PLAN_FILE = "plan.json"
SHARDS = "shards"
SHARDS_PER_WORKER = 4
MIN_SHARD_ROWS = 100


@dataclass(frozen=True, slots=True, kw_only=True)
class Shard:
    id: str
    start: int
    """The input row number of the shard's first row."""
    rows: int

    def folder(self, root: Path) -> Path:
        """The shard's folder under the state root."""
        return root / SHARDS / self.id

    def input_path(self, root: Path) -> Path:
        return self.folder(root) / "input.parquet"

    def part_path(self, root: Path) -> Path:
        return self.folder(root) / "part.parquet"

    def state_path(self, root: Path) -> Path:
        return self.folder(root) / "state"


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardPlan:
    rows: int
    fingerprint: str
    """What decides the rows' request keys besides their data (the planner's fingerprint)
    and the input's columns: a plan made for something else is refused."""
    shards: tuple[Shard, ...]

    def to_json(self) -> str:
        return json.dumps(
            {
                "rows": self.rows,
                "fingerprint": self.fingerprint,
                "shards": [[shard.id, shard.start, shard.rows] for shard in self.shards],
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str) -> ShardPlan:
        data = json.loads(text)
        shards = tuple(
            Shard(id=str(name), start=int(start), rows=int(rows))
            for name, start, rows in data["shards"]
        )
        return cls(rows=int(data["rows"]), fingerprint=str(data["fingerprint"]), shards=shards)

    def mismatch(self, rows: int, fingerprint: str) -> str | None:
        """Why this plan does not fit an input of ``rows`` rows and ``fingerprint`` (None:
        it fits)."""
        if rows != self.rows:
            return f"it was made for {self.rows:,} input rows, and the input has {rows:,} now"
        if fingerprint != self.fingerprint:
            return "it was made for other input columns or another request template"
        return None


def shard_rows_for(rows: int, workers: int) -> int:
    """Rows per shard when the job sets none: about four shards per worker (so a slow shard
    does not hold the end of the run back), at least :data:`MIN_SHARD_ROWS`."""
    return max(MIN_SHARD_ROWS, math.ceil(rows / max(1, workers * SHARDS_PER_WORKER)))


def plan_shards(rows: int, shard_rows: int, fingerprint: str) -> ShardPlan:
    """Cut ``rows`` input rows into shards of ``shard_rows`` (the last one shorter)."""
    if shard_rows < 1:
        raise ValueError(f"shard_rows must be at least 1, not {shard_rows}")
    count = max(1, math.ceil(rows / shard_rows))
    width = max(5, len(str(count)))
    shards = tuple(
        Shard(
            id=f"{index:0{width}d}",
            start=index * shard_rows,
            rows=min(shard_rows, rows - index * shard_rows),
        )
        for index in range(count)
        if rows - index * shard_rows > 0 or index == 0
    )
    return ShardPlan(rows=rows, fingerprint=fingerprint, shards=shards)
