"""Pure: turn a batch of input rows into planned requests (id, key, body or failure).

The same planning runs when sending and when assembling the output, so both agree on each
row's request key.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import pyarrow as pa

from pipeline.rows.templating import RenderFailure, RequestTemplate, encode_body, request_key
from pipeline.rows.tokens import count_prompt_tokens, prompt_token_bound


@dataclass(frozen=True, slots=True)
class PlannedRow:
    row: int
    key: str
    """The request key ("" when the caller asked for none: see :meth:`Planner.plan_bodies`)."""
    body: bytes | None
    """The request body (b"" when the caller asked for none), or None when the row cannot be
    rendered."""
    failure: str | None
    prompt_tokens: int | None = None
    """The prompt's token count (exact for DeepSeek models), when it was counted."""
    id: str | None = None
    """The row's id (its ``id_column`` value, else its number), for messages."""

    def counted(self, prompt_tokens: int) -> PlannedRow:
        """This row with its prompt tokens counted: ``dataclasses.replace`` without its cost
        (it looks the fields up again on every call: a microsecond a row)."""
        return PlannedRow(self.row, self.key, self.body, self.failure, prompt_tokens, self.id)

    def describe(self) -> str:
        """How messages name the row: ``row 17`` or, with an id column, ``row 17 (id r-42)``."""
        if self.id is None or self.id == str(self.row):
            return f"row {self.row}"
        return f"row {self.row} (id {self.id})"


@dataclass(frozen=True, slots=True, kw_only=True)
class Planner:
    template: RequestTemplate
    url: str
    id_column: str | None
    row_offset: int = 0
    """Added to a row's number to make its id (a shard of a cluster run: see
    :attr:`pipeline.job.spec.InputSpec.row_offset`)."""

    @property
    def columns(self) -> list[str]:
        """The input columns that planning reads."""
        wanted = list(self.template.columns)
        if self.id_column is not None:
            wanted.append(self.id_column)
        return list(dict.fromkeys(wanted))

    @property
    def fingerprint(self) -> bytes:
        """Everything besides the rows' data that decides their request keys."""
        template = self.template
        return json.dumps(
            {
                "url": self.url,
                "model": template.model,
                "system": template.system,
                "prompt": template.prompt,
                "messages_column": template.messages_column,
                "params": dict(template.params),
                "id_column": self.id_column,
                "columns": self.columns,
            },
            sort_keys=True,
            default=str,
        ).encode()

    def plan(self, batch: pa.RecordBatch, start: int) -> Iterator[PlannedRow]:
        """Planned rows for ``batch``, whose first row is input row ``start``."""
        for planned, _ in self.plan_bodies(batch, start):
            yield planned

    def plan_bodies(
        self, batch: pa.RecordBatch, start: int, *, keyed: bool = True
    ) -> Iterator[tuple[PlannedRow, dict[str, Any] | None]]:
        """Planned rows with each body as a dict too (None when the row cannot be sent):
        what counting the prompts needs, without decoding the JSON just encoded. Not
        ``keyed``: no body is encoded and no key made (an estimate with no result to match
        needs neither: the JSON encoding was a sixth of its time)."""
        rows: list[dict[str, Any]] = batch.to_pylist()
        for offset, row in enumerate(rows):
            index = start + offset
            row_id = (
                str(row[self.id_column])
                if self.id_column is not None
                else str(self.row_offset + index)
            )
            body = self.template.body(row)
            if isinstance(body, RenderFailure):
                key = request_key(self.url, b"", row_id) if keyed else ""
                yield PlannedRow(index, key, None, body.reason, id=row_id), None
                continue
            if not keyed:
                yield PlannedRow(index, "", b"", None, id=row_id), body
                continue
            encoded = encode_body(body)
            yield (
                PlannedRow(index, request_key(self.url, encoded, row_id), encoded, None, id=row_id),
                body,
            )


def with_prompt_tokens(rows: list[PlannedRow]) -> list[PlannedRow]:
    """``rows`` with their prompts counted, in one parallel tokenizer batch."""
    sendable = [row for row in rows if row.body is not None]
    bodies = [json.loads(row.body) for row in sendable if row.body is not None]
    counts = iter(count_prompt_tokens(bodies))
    return [row if row.body is None else row.counted(next(counts)) for row in rows]


def with_prompt_token_bounds(rows: list[PlannedRow]) -> list[PlannedRow]:
    """``rows`` with upper bounds on their prompt tokens, from the bodies' lengths alone
    (:func:`~pipeline.rows.tokens.prompt_token_bound`: no parsing, no tokenizer)."""
    return [row if row.body is None else row.counted(prompt_token_bound(row.body)) for row in rows]


class RowPlanner(Protocol):
    """What resume planning and the output need of a planner: the job's own
    (:class:`Planner`) or an OpenAI batch file's."""

    @property
    def columns(self) -> list[str]:
        """The input columns that planning reads."""
        ...

    @property
    def fingerprint(self) -> bytes:
        """Changes whenever what the rows would send changes."""
        ...

    def plan(self, batch: pa.RecordBatch, start: int) -> Iterator[PlannedRow]:
        """The planned rows of ``batch``, whose first row is input row ``start``."""
        ...
