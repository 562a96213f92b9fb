"""Waiting for provider batches and collecting their results into the journal.

Each open batch is looked at (``GET /batches/{id}``) with a wait that doubles from
``[batch] poll_s`` to ``poll_max_s``; its state and request counts are recorded in the batch
book. Once it ends (completed, expired, failed, cancelled) its output and error files are
downloaded, every line becomes its row's result exactly as an online answer would (tokens,
cost at the batch price, status, error), appended to the journal, and the batch is closed. A
line the batch never ran (expired, cancelled) gives no result: its row is free again, and is
submitted again (or sent online). Collecting is idempotent: a row that already has a result
is not recorded twice, so a run killed while downloading simply collects again.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import anyio
import anyio.to_thread

from pipeline.batch.client import NotFound, lines_of
from pipeline.batch.plan import LineContext, line_result, poll_waits
from pipeline.batch.submit import Session, crash_point
from pipeline.engine.sender import answer_rules
from pipeline.money.pricing import Price, cost
from pipeline.results import RowResult
from pipeline.state.batches import BatchEntry, parse_custom_id

ENDED = frozenset({"completed", "expired", "failed", "cancelled"})


@dataclass(slots=True)
class Collected:
    """What collecting brought in during this run."""

    rows: int = 0
    freed: int = 0
    """Rows whose batch ended without answering them (expired, failed, cancelled, lost)."""
    cost_usd: Decimal | None = Decimal(0)
    online_cost_usd: Decimal | None = Decimal(0)
    """The same tokens at the online price."""
    ended: Counter[str] = field(default_factory=Counter)


class Collector:
    def __init__(self, session: Session, online_price: Price | None) -> None:
        self.s = session
        self.online_price = online_price
        self.collected = Collected()
        job = session.context.job
        self._line = LineContext(
            rules=answer_rules(job),
            price=session.pricing.price,
            model=job.request.model,
            run=session.run,
        )

    async def wait(self, *, once: bool = False) -> None:
        """Look at the open batches until none is left (``once``: one look only)."""
        waits = poll_waits(self.s.context.job.batch.poll_s, self.s.context.job.batch.poll_max_s)
        if not self.s.book.open_entries():
            return
        while True:
            entries = [entry for entry in self.s.book.open_entries() if entry.batch_id]
            for entry in entries:
                await self.look(entry)
            crash_point("while_polling")
            self.s.notice(self.progress())
            if once or not any(entry.batch_id for entry in self.s.book.open_entries()):
                return
            await anyio.sleep(next(waits))

    def progress(self) -> str:
        entries = self.s.book.entries()
        states = Counter(entry.status for entry in entries if not entry.closed)
        shown = ", ".join(f"{count} {status}" for status, count in sorted(states.items()))
        done = sum(
            entry.counts.get("completed", 0) + entry.counts.get("failed", 0)
            for entry in entries
            if not entry.closed
        )
        held = sum(entry.requests for entry in entries if not entry.closed)
        money = self.collected.cost_usd
        spent = "unknown" if money is None else f"${money:.6f}"
        return (
            f"batches: {shown or 'none open'}; {done:,} of {held:,} rows answered in open "
            f"batches, {self.collected.rows:,} collected this run ({spent})"
        )

    async def look(self, entry: BatchEntry) -> None:
        assert entry.batch_id is not None
        try:
            info = await self.s.client.retrieve(entry.batch_id)
        except NotFound:
            self.s.notice(
                f"batch {entry.batch_id} is unknown to the provider (a --local server that "
                f"stopped?): its {entry.requests:,} rows are submitted again."
            )
            await self._close(entry, "lost", [], entry.requests)
            return
        status = str(info.get("status"))
        counts = info.get("request_counts") or {}
        if status != entry.status or counts != entry.counts:
            self.s.book.record("state", entry.id, status=status, counts=counts)
        if status in ENDED:
            await self.collect(entry, info)

    async def collect(self, entry: BatchEntry, info: dict[str, Any]) -> None:
        """Download the ended batch's files and record each line's result."""
        data = b""
        for name in ("output_file_id", "error_file_id"):
            file_id = info.get(name)
            if file_id:
                data += await self.s.client.content(str(file_id)) + b"\n"
        crash_point("while_downloading")
        results, unanswered = await anyio.to_thread.run_sync(self._results, entry, data)
        await self._close(entry, str(info.get("status")), results, unanswered)

    def _results(self, entry: BatchEntry, data: bytes) -> tuple[list[RowResult], int]:
        """The results of the lines of ``data`` for rows that have none yet, and how many
        of the batch's rows are left without a result."""
        book = self.s.book
        bodies: dict[str, bytes] = {}
        for raw in book.read_input(entry.id).splitlines():
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            bodies[line["custom_id"]] = json.dumps(line["body"]).encode()
        # A result recorded since the batch was submitted is this batch's (its rows were
        # held): collected by a run killed before it closed the batch.
        known = self.s.context.journal.results_for("run")
        results: list[RowResult] = []
        for line in sorted(lines_of(data), key=lambda item: str(item.get("custom_id"))):
            ident = str(line.get("custom_id"))
            found = parse_custom_id(ident)
            if found is None or ident not in bodies:
                continue
            row, key = found
            recorded = known.get(row, key)
            if recorded is not None and recorded >= entry.run:
                bodies.pop(ident)
                continue
            result = line_result(line, row, key, bodies[ident], self._line)
            if result is not None:
                bodies.pop(ident)
                results.append(result)
        return results, len(bodies)

    async def _close(
        self, entry: BatchEntry, status: str, results: list[RowResult], unanswered: int
    ) -> None:
        s = self.s
        if results:
            await anyio.to_thread.run_sync(s.context.journal.append_results, results)
        spent: Decimal | None = Decimal(0)
        for result in results:
            spent = None if spent is None or result.cost_usd is None else spent + result.cost_usd
            online = cost(result.usage, self.online_price)
            total = self.collected.online_cost_usd
            self.collected.online_cost_usd = (
                None if total is None or online is None else total + online
            )
        reserved = s.reserved.pop(entry.id, entry.worst_usd)
        if s.budget is not None and reserved is not None:
            s.budget.settle(reserved, spent)
        total = self.collected.cost_usd
        self.collected.cost_usd = None if total is None or spent is None else total + spent
        self.collected.rows += len(results)
        self.collected.freed += max(0, unanswered)
        self.collected.ended[status] += 1
        s.book.record(
            "closed", entry.id, status=status, answered=len(results), unanswered=unanswered
        )
