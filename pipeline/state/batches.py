"""The batch book: what provider batch mode submitted, made durable step by step.

In the job's state folder, ``batches/`` holds one input file per batch
(``<local id>.jsonl``, the very bytes uploaded, written and fsynced before anything is
recorded) and ``book.jsonl``, an append-only log of events, each fsynced before the step after
it starts::

    {"event": "intent", "id": "pb-...", "requests": 1000, "bytes": 123456, "first_row": 0,
     "last_row": 999, "worst_usd": "0.0123", "run": 3}        before the upload
    {"event": "uploaded", "id": "pb-...", "file_id": "file-..."}      after the upload
    {"event": "created", "id": "pb-...", "batch_id": "batch_..."}     after the batch exists
    {"event": "state", "id": "pb-...", "status": "in_progress", "counts": {...}}
    {"event": "closed", "id": "pb-...", "status": "completed", "answered": 990,
     "unanswered": 10}                                                results journaled

A batch is *open* from its intent until it is closed; the rows of open batches are held by
them and never submitted again (nor sent online). The file's name at the provider is
``pipeline-<local id>.jsonl`` and the batch's metadata carries ``pipeline_batch: <local id>``,
so a run killed between a step and its record finds what the provider already has instead of
uploading or creating it twice. A torn last line is skipped.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import Any

from pipeline.errors import StateError
from pipeline.state.journal import append_lines

BOOK = "book.jsonl"


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchEntry:
    """One batch as the book knows it (the fold of its events)."""

    id: str
    requests: int
    bytes: int
    first_row: int
    last_row: int
    worst_usd: Decimal | None
    run: int
    file_id: str | None = None
    batch_id: str | None = None
    status: str = "intent"
    """``intent``, ``uploaded``, ``created``, then the provider's status; once closed, the
    status it closed with."""
    counts: dict[str, int] = field(default_factory=dict)
    closed: bool = False
    answered: int = 0
    unanswered: int = 0

    @property
    def upload_name(self) -> str:
        """The input file's name at the provider."""
        return f"pipeline-{self.id}.jsonl"


def new_batch_id() -> str:
    return f"pb-{secrets.token_hex(6)}"


def custom_id(row: int, key: str) -> str:
    """A request's ``custom_id`` in a batch file: its row and request key."""
    return f"{row}:{key}"


def parse_custom_id(text: str) -> tuple[int, str] | None:
    row, sep, key = text.partition(":")
    if not sep or not row.isdigit() or not key:
        return None
    return int(row), key


class BatchBook:
    """The batch book of one job's state folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder / "batches"
        self._book = self.folder / BOOK

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def input_path(self, ident: str) -> Path:
        return self.folder / f"{ident}.jsonl"

    def write_input(self, ident: str, lines: Sequence[bytes]) -> Path:
        """Write a batch's input file durably (fsynced, renamed into place)."""
        path = self.input_path(ident)
        partial = path.with_name(path.name + ".partial")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with partial.open("wb") as handle:
                for line in lines:
                    handle.write(line)
                handle.flush()
                os.fsync(handle.fileno())
            partial.replace(path)
            directory = os.open(self.folder, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        except OSError as exc:
            raise StateError(f"cannot write {path} ({exc.strerror or exc}).") from None
        return path

    def read_input(self, ident: str) -> bytes:
        try:
            return self.input_path(ident).read_bytes()
        except OSError as exc:
            raise StateError(
                f"cannot read {self.input_path(ident)} ({exc.strerror or exc}); the batch's "
                "input file is gone. Run with --fresh to start over."
            ) from None

    def record(self, event: str, ident: str, **fields: Any) -> None:
        """Append one event durably (fsynced before this returns)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"event": event, "id": ident, **fields}, separators=(",", ":"))
        append_lines(self._book, [line])

    def _events(self) -> Iterator[dict[str, Any]]:
        try:
            data = self._book.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return  # no batch yet (a state folder that is not one is named by the run)
        except OSError as exc:
            raise StateError(f"cannot read {self._book} ({exc.strerror or exc}).") from None
        for raw in data.splitlines():
            try:
                value = json.loads(raw)
            except ValueError:
                continue  # a torn line
            if isinstance(value, dict) and isinstance(value.get("id"), str):
                yield value

    def entries(self) -> list[BatchEntry]:
        """Every batch the book holds, in the order of their intents."""
        found: dict[str, BatchEntry] = {}
        for event in self._events():
            ident = event["id"]
            kind = event.get("event")
            if kind == "intent":
                worst = event.get("worst_usd")
                found[ident] = BatchEntry(
                    id=ident,
                    requests=int(event["requests"]),
                    bytes=int(event["bytes"]),
                    first_row=int(event["first_row"]),
                    last_row=int(event["last_row"]),
                    worst_usd=None if worst is None else Decimal(worst),
                    run=int(event.get("run", 0)),
                )
                continue
            entry = found.get(ident)
            if entry is None:
                continue
            if kind == "uploaded":
                entry = replace(entry, file_id=event["file_id"], status="uploaded")
            elif kind == "created":
                entry = replace(entry, batch_id=event["batch_id"], status="created")
            elif kind == "state":
                entry = replace(entry, status=event["status"], counts=event.get("counts") or {})
            elif kind == "closed":
                entry = replace(
                    entry,
                    status=event["status"],
                    closed=True,
                    answered=int(event.get("answered", 0)),
                    unanswered=int(event.get("unanswered", 0)),
                )
            found[ident] = entry
        return list(found.values())

    def open_entries(self) -> list[BatchEntry]:
        return [entry for entry in self.entries() if not entry.closed]

    def held_keys(self) -> set[str]:
        """The request keys the open batches hold (read from their input files)."""
        held: set[str] = set()
        for entry in self.open_entries():
            for line in self.read_input(entry.id).splitlines():
                try:
                    found = parse_custom_id(json.loads(line)["custom_id"])
                except (ValueError, KeyError, TypeError):
                    continue
                if found is not None:
                    held.add(found[1])
        return held
