"""Seals: a durable note that one input batch is finished, so a resume can skip it unplanned.

Resuming must know, for every input row, whether its *current* request (a hash of the
rendered body) already has a result, which means rendering every row again: about 10 µs
a row, 9 s for 900,000 done rows. A seal records, for one batch of input rows, a digest of
everything that decides the batch's request keys (the planner's fingerprint: endpoint
identity, model, system, template, parameters, id column; and the batch's own Arrow data)
together with how many of its rows ended ok and failed. It is written only after every row of
the batch has a durable result. A later run whose batch has the same start, size and digest
skips it without rendering; any change to the job or to those rows changes the digest, and
the batch is planned row by row as before.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from pipeline.errors import StateError
from pipeline.state.journal import append_lines


@dataclass(frozen=True, slots=True, kw_only=True)
class Seal:
    start: int
    rows: int
    digest: str
    ok: int
    failed: int

    def to_json(self) -> str:
        return json.dumps(
            {
                "start": self.start,
                "rows": self.rows,
                "digest": self.digest,
                "ok": self.ok,
                "failed": self.failed,
            },
            separators=(",", ":"),
        )


def batch_digest(fingerprint: bytes, batch: pa.RecordBatch) -> str:
    """A digest of the job's fingerprint and the batch's data (its Arrow IPC bytes)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    digest = hashlib.blake2b(fingerprint, digest_size=16)
    digest.update(sink.getvalue())
    return digest.hexdigest()


class SealBook:
    """The seals of one job (``seals.jsonl`` in the state folder)."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "seals.jsonl"

    def read(self) -> dict[int, Seal]:
        """Seals by batch start; torn or damaged lines are skipped."""
        seals: dict[int, Seal] = {}
        try:
            lines = self.path.read_bytes().splitlines()
        except FileNotFoundError:
            return seals
        except OSError as exc:
            raise StateError(f"cannot read {self.path} ({exc.strerror or exc}).") from None
        for line in lines:
            try:
                data = json.loads(line)
                seal = Seal(
                    start=int(data["start"]),
                    rows=int(data["rows"]),
                    digest=str(data["digest"]),
                    ok=int(data["ok"]),
                    failed=int(data["failed"]),
                )
            except (ValueError, KeyError, TypeError):
                continue
            seals[seal.start] = seal
        return seals

    def append(self, seals: list[Seal]) -> None:
        if seals:
            append_lines(self.path, [seal.to_json() for seal in seals])

    def clear(self) -> None:
        try:
            self.path.unlink(missing_ok=True)
        except OSError as exc:
            raise StateError(f"cannot remove {self.path} ({exc.strerror or exc}).") from None
