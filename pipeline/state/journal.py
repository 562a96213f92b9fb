"""Crash-safe record of what was sent and what came back, in the job's state folder.

Two append-only logs, each split into one JSON-lines file per bucket of :data:`BUCKET_ROWS`
input rows (``results/000003.jsonl`` holds rows 12288-16383):

``sent/``
    one :class:`Intent` per request, made durable *before* the request goes out;
``results/``
    one :class:`~pipeline.results.RowResult` per finished row.

Writers append in groups and fsync before returning, so a result is durable a fraction of a
second after it arrives. A row that was sent but has no result is *unanswered*:
the provider may have billed it, and a resumed run sends it again. Bucketing by row number
keeps resume and the in-order assembly bounded in memory: only one bucket is held at a time.
A torn last line (a crash mid-write) is skipped, never fatal.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Generic, Literal, TypeVar, overload

from pipeline.errors import StateError
from pipeline.money.pricing import Usage
from pipeline.results import RowResult

BUCKET_ROWS = 4096
# RowResult.to_json writes these three fields first, in this order.
_HEAD = re.compile(rb'\{"key":"([^"]+)","row":\d+,"status":"(ok|failed)"')
# Intent.to_json writes exactly these fields.
_INTENT = re.compile(
    rb'\{"key":"([^"]+)","row":(\d+),"run":(\d+),"worst_cost_usd":(null|"[0-9.Ee+-]+")\}$'
)
# ... and the run that recorded it last.
_TAIL = re.compile(rb'"run":(\d+)\}$')
# A billed record's tokens and cost. A JSON string cannot hold `,"` unescaped, so the first
# match is the field, whatever text the response before it holds.
_SPENT = re.compile(rb',"tokens":\[(\d+),(\d+),(\d+),(\d+)\],"cost_usd":(?:null|"([^"]*)")')


def bucket_of(row: int) -> int:
    return row // BUCKET_ROWS


@dataclass(frozen=True, slots=True, kw_only=True)
class Intent:
    """A request about to be sent."""

    key: str
    row: int
    run: int
    worst_cost_usd: Decimal | None
    """What the request can cost at most (its prompt plus ``max_tokens`` of output)."""

    def to_json(self) -> str:
        # Formatted, not json.dumps'd (once per request): the key is a hex digest, the rest
        # numbers; the same text as json.dumps(..., separators=(",", ":")).
        cost = "null" if self.worst_cost_usd is None else f'"{self.worst_cost_usd}"'
        return f'{{"key":"{self.key}","row":{self.row},"run":{self.run},"worst_cost_usd":{cost}}}'


def _read(path: Path) -> bytes:
    """A state file's bytes; a file that does not exist yet is empty."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""
    except OSError as exc:
        raise StateError(f"cannot read {path} ({exc.strerror or exc}).") from None


def _lines(path: Path) -> Iterator[dict[str, object]]:
    """The JSON objects of a JSON-lines file; damaged or torn lines are skipped."""
    for line in _read(path).splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            yield value


def append_lines(path: Path, lines: Sequence[str]) -> None:
    """Append whole lines durably; a torn tail left by a crash is closed off first."""
    data = ("\n".join(lines) + "\n").encode("utf-8")
    try:
        with path.open("ab+") as handle:
            if handle.tell() > 0:
                handle.seek(-1, os.SEEK_END)
                if handle.read(1) != b"\n":
                    data = b"\n" + data  # the torn line stays a damaged line of its own
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        raise StateError(
            f"cannot write {path} ({exc.strerror or exc}). Every row finished so far is kept: "
            "free disk space or fix the folder's permissions, then run the job again to resume."
        ) from None


V = TypeVar("V")


class Lookup(Generic[V]):
    """What the journal holds for rows, by row number and request key, read one bucket at a
    time: the bucket last read is kept, so rows looked up in input order read each bucket
    once. Made by :meth:`Journal.results_for`."""

    __slots__ = ("_bucket", "_found", "_read")

    def __init__(self, read: Callable[[int], dict[str, V]]) -> None:
        self._read = read
        self._bucket = -1
        self._found: dict[str, V] = {}

    def get(self, row: int, key: str) -> V | None:
        """What the journal holds for ``key`` (the request key of input row ``row``)."""
        bucket = bucket_of(row)
        if bucket != self._bucket:
            self._found = self._read(bucket)
            self._bucket = bucket
        return self._found.get(key)


class Journal:
    """The sent and results logs of one job."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.results_dir = folder / "results"
        self.sent_dir = folder / "sent"

    def open(self, *, fresh: bool = False) -> None:
        """Create the log folders (emptied first when ``fresh``)."""
        try:
            for folder in (self.results_dir, self.sent_dir):
                if fresh and folder.exists():
                    shutil.rmtree(folder)
                folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(
                f"cannot use the state folder {self.folder} ({exc.strerror or exc}). "
                "Make it writable or set [output] state_dir."
            ) from None

    @staticmethod
    def _name(bucket: int) -> str:
        return f"{bucket:06d}.jsonl"

    def intents_path(self, bucket: int) -> Path:
        return self.sent_dir / self._name(bucket)

    @overload
    def results_for(self, what: Literal["result"]) -> Lookup[RowResult]: ...
    @overload
    def results_for(self, what: Literal["status"]) -> Lookup[str]: ...
    @overload
    def results_for(self, what: Literal["run"]) -> Lookup[int]: ...

    def results_for(
        self, what: Literal["result", "status", "run"]
    ) -> Lookup[RowResult] | Lookup[str] | Lookup[int]:
        """Look up each row's last recorded result: the whole ``result``
        (:meth:`read_bucket`), only its ``status`` (:meth:`bucket_status`, fast: resume needs
        no more), or the ``run`` that recorded it (:meth:`bucket_runs`)."""
        if what == "result":
            return Lookup(self.read_bucket)
        if what == "status":
            return Lookup(self.bucket_status)
        return Lookup(self.bucket_runs)

    def read_bucket(self, bucket: int) -> dict[str, RowResult]:
        """Results of one bucket by request key; the last record of a key wins."""
        results: dict[str, RowResult] = {}
        for data in _lines(self.results_dir / self._name(bucket)):
            try:
                record = RowResult.from_json(data)
            except (ValueError, KeyError, TypeError):
                continue
            if record.status != "stopped":  # billed attempts of an unfinished row
                results[record.key] = record
        return results

    def bucket_status(self, bucket: int) -> dict[str, str]:
        """Status (``ok``/``failed``) of each request key in one bucket, without parsing whole
        records: resume needs only this, for every row already done."""
        statuses: dict[str, str] = {}
        for line in _read(self.results_dir / self._name(bucket)).splitlines():
            head = _HEAD.match(line)
            if head is None or not line.endswith(b"}"):
                continue  # a torn or damaged line
            statuses[head.group(1).decode()] = head.group(2).decode()
        return statuses

    def bucket_runs(self, bucket: int) -> dict[str, int]:
        """The run that last recorded a result for each request key in one bucket."""
        runs: dict[str, int] = {}
        for line in _read(self.results_dir / self._name(bucket)).splitlines():
            head = _HEAD.match(line)
            tail = _TAIL.search(line)
            if head is not None and tail is not None:
                runs[head.group(1).decode()] = int(tail.group(1))
        return runs

    def spent(self) -> tuple[Usage, Decimal | None]:
        """Tokens and cost of every result ever recorded (every billed attempt, superseded
        ones included; None when one has no price), read without parsing whole records."""
        prompt = completion = cached = reasoning = 0
        total: Decimal | None = Decimal(0)
        for bucket in self.result_buckets():
            for line in _read(self.results_dir / self._name(bucket)).splitlines():
                found = _SPENT.search(line)
                if found is None or _TAIL.search(line) is None:
                    continue  # a torn or damaged line
                prompt += int(found.group(1))
                completion += int(found.group(2))
                cached += int(found.group(3))
                reasoning += int(found.group(4))
                cost = found.group(5)
                if cost is None or total is None:
                    total = None
                else:
                    total += Decimal(cost.decode())
        usage = Usage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            cached_tokens=cached,
            reasoning_tokens=reasoning,
        )
        return usage, total

    def result_buckets(self) -> list[int]:
        """Buckets that hold results, in order."""
        return sorted(int(p.stem) for p in self.results_dir.glob("*.jsonl") if p.stem.isdigit())

    def has_results(self) -> bool:
        """Whether any result was recorded."""
        return bool(self.result_buckets())

    def iter_results(self) -> Iterator[RowResult]:
        """Every result ever recorded, bucket by bucket (superseded ones included)."""
        for bucket in self.result_buckets():
            for data in _lines(self.results_dir / self._name(bucket)):
                try:
                    yield RowResult.from_json(data)
                except (ValueError, KeyError, TypeError):
                    continue

    def intents_since(self, run: int, since: float) -> Iterator[Intent]:
        """Intents of ``run``, read from the sent files modified at or after ``since``."""
        for path in sorted(self.sent_dir.glob("*.jsonl")):
            try:
                if path.stat().st_mtime < since:
                    continue
            except FileNotFoundError:
                continue
            for line in _read(path).splitlines():
                found = _INTENT.match(line)
                if found is None or int(found.group(3)) != run:
                    continue
                worst = found.group(4)
                yield Intent(
                    key=found.group(1).decode(),
                    row=int(found.group(2)),
                    run=run,
                    worst_cost_usd=None
                    if worst == b"null"
                    else Decimal(worst.strip(b'"').decode()),
                )

    def append_results(self, records: Sequence[RowResult]) -> None:
        """Append ``records`` durably (write, flush, fsync) before returning."""
        by_bucket: dict[int, list[str]] = defaultdict(list)
        for record in records:
            by_bucket[bucket_of(record.row)].append(record.to_json())
        for bucket, lines in by_bucket.items():
            append_lines(self.results_dir / self._name(bucket), lines)

    def append_intents(self, intents: Sequence[Intent]) -> None:
        """Record durably that these requests are about to be sent."""
        by_bucket: dict[int, list[str]] = defaultdict(list)
        for intent in intents:
            by_bucket[bucket_of(intent.row)].append(intent.to_json())
        for bucket, lines in by_bucket.items():
            append_lines(self.sent_dir / self._name(bucket), lines)
