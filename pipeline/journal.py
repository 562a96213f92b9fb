"""Crash-safe record of results, in the job's state folder.

Results are appended as JSON lines to one file per bucket of :data:`BUCKET_ROWS` input rows
(``results/000003.jsonl`` holds rows 12288-16383), flushed and fsynced in groups by the
writer task, so a result is durable a fraction of a second after it arrives. Bucketing by
row number keeps both resume and the final in-order assembly bounded in memory: only the
bucket being read is held. A torn last line (a crash mid-write) is ignored, never fatal.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from pipeline.errors import StateError
from pipeline.records import RowResult

BUCKET_ROWS = 4096


def bucket_of(row: int) -> int:
    return row // BUCKET_ROWS


class Journal:
    """The result journal of one job."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._results = folder / "results"

    def open(self, *, fresh: bool = False) -> None:
        """Create the state folder (emptied first when ``fresh``)."""
        try:
            if fresh and self._results.exists():
                shutil.rmtree(self._results)
            self._results.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(
                f"cannot use the state folder {self.folder} ({exc.strerror or exc}). "
                "Make it writable or set [output] state_dir."
            ) from None

    def _bucket_path(self, bucket: int) -> Path:
        return self._results / f"{bucket:06d}.jsonl"

    def read_bucket(self, bucket: int) -> dict[str, RowResult]:
        """Results of one bucket by request key; the last record of a key wins."""
        path = self._bucket_path(bucket)
        results: dict[str, RowResult] = {}
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return results
        except OSError as exc:
            raise StateError(f"cannot read {path} ({exc.strerror or exc}).") from None
        for line in data.splitlines():
            try:
                record = RowResult.from_json(json.loads(line))
            except (ValueError, KeyError, TypeError):
                continue  # a torn or damaged line: that row is simply not done
            results[record.key] = record
        return results

    def append(self, records: Sequence[RowResult]) -> None:
        """Append ``records`` durably (write, flush, fsync) before returning."""
        by_bucket: dict[int, list[str]] = defaultdict(list)
        for record in records:
            by_bucket[bucket_of(record.row)].append(record.to_json())
        for bucket, lines in by_bucket.items():
            path = self._bucket_path(bucket)
            try:
                with path.open("a", encoding="utf-8") as handle:
                    handle.write("\n".join(lines) + "\n")
                    handle.flush()
                    os.fsync(handle.fileno())
            except OSError as exc:
                raise StateError(
                    f"cannot write results to {path} ({exc.strerror or exc}). "
                    "Finished rows so far are kept; free space or fix permissions, then run "
                    "the job again to resume."
                ) from None
