"""Pure: turn a batch of input rows into planned requests (id, key, body or failure).

The same planning runs when sending and when assembling the output, so both agree on each
row's request key.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from pipeline.templating import RenderFailure, RequestTemplate, encode_body, request_key
from pipeline.tokens import count_prompt_tokens


@dataclass(frozen=True, slots=True)
class PlannedRow:
    row: int
    key: str
    body: bytes | None
    """The request body, or None when the row cannot be rendered."""
    failure: str | None
    prompt_tokens: int | None = None
    """The prompt's token count (exact for DeepSeek models), when it was counted."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Planner:
    template: RequestTemplate
    url: str
    id_column: str | None

    @property
    def columns(self) -> list[str]:
        """The input columns that planning reads."""
        wanted = list(self.template.columns)
        if self.id_column is not None:
            wanted.append(self.id_column)
        return list(dict.fromkeys(wanted))

    def plan(
        self, batch: pa.RecordBatch, start: int, *, count_tokens: bool = False
    ) -> Iterator[PlannedRow]:
        """Planned rows for ``batch``, whose first row is input row ``start``.

        With ``count_tokens`` the prompts are counted in one parallel tokenizer batch.
        """
        rows: list[dict[str, Any]] = batch.to_pylist()
        bodies = [self.template.body(row) for row in rows]
        counts: list[int | None] = [None] * len(rows)
        if count_tokens:
            rendered = [(i, b) for i, b in enumerate(bodies) if not isinstance(b, RenderFailure)]
            for (index, _), count in zip(
                rendered, count_prompt_tokens([b for _, b in rendered]), strict=True
            ):
                counts[index] = count
        for offset, (row, body) in enumerate(zip(rows, bodies, strict=True)):
            index = start + offset
            row_id = str(row[self.id_column]) if self.id_column is not None else str(index)
            if isinstance(body, RenderFailure):
                key = request_key(self.url, b"", row_id)
                yield PlannedRow(index, key, None, body.reason)
                continue
            encoded = encode_body(body)
            key = request_key(self.url, encoded, row_id)
            yield PlannedRow(index, key, encoded, None, counts[offset])
