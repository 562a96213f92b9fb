"""Pure: batch files out of planned rows, and results out of batch output lines.

Rows are rendered exactly as online (the same body bytes, so the same request keys): a
row's batch line is ``{"custom_id": "<row>:<key>", "method": "POST", "url":
"/v1/chat/completions", "body": <the online body>}``. :class:`FileSplitter` cuts the lines
into files that stay within the provider's limits (requests and bytes per file), so no file
is ever refused for its size. :func:`line_result` turns one line of a batch's output or error
file into the row's :class:`~pipeline.results.RowResult`, judged as an online answer is
(truncation, the output schema), priced at the batch price; a line the batch never answered
(expired, cancelled) is no result at all, and its row is submitted again.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from pipeline.money.pricing import ZERO_USAGE, Price, cost
from pipeline.provider.wire import error_message, parse_reply
from pipeline.results import RowResult
from pipeline.rows.plan import PlannedRow
from pipeline.rows.verdict import AnswerRules, Fail, Keep, judge

BATCH_URLS = {"chat/completions": "/v1/chat/completions", "completions": "/v1/completions"}
UNANSWERED_CODES = frozenset({"batch_expired", "batch_cancelled", "batch_failed"})
"""Error codes of lines the provider never ran: their rows have no result yet."""


def batch_line(planned: PlannedRow, url: str) -> bytes:
    """The batch file line of a planned (renderable) row."""
    assert planned.body is not None
    head = json.dumps(
        {"custom_id": f"{planned.row}:{planned.key}", "method": "POST", "url": url},
        separators=(",", ":"),
    )
    return head[:-1].encode() + b',"body":' + planned.body + b"}\n"


@dataclass(slots=True)
class FileSplitter:
    """Collects lines into files of at most ``max_requests`` lines and ``max_bytes`` bytes."""

    max_requests: int
    max_bytes: int
    lines: list[bytes] = field(default_factory=list)
    rows: list[PlannedRow] = field(default_factory=list)
    size: int = 0

    def fits(self, line: bytes) -> bool:
        return len(self.lines) < self.max_requests and self.size + len(line) <= self.max_bytes

    def add(self, planned: PlannedRow, line: bytes) -> list[PlannedRow] | None:
        """Add a line; returns the rows of a full file to submit first (the line then starts
        the next file), else None."""
        full = None
        if self.lines and not self.fits(line):
            full = self.take()
        self.lines.append(line)
        self.rows.append(planned)
        self.size += len(line)
        return full

    def take(self) -> list[PlannedRow]:
        rows = self.rows
        self.lines, self.rows, self.size = [], [], 0
        return rows


def too_big(line: bytes, max_bytes: int) -> bool:
    """A request alone over the per-file byte limit cannot go in any batch."""
    return len(line) > max_bytes


def poll_waits(first_s: float, most_s: float) -> Iterator[float]:
    """Waits between looks at the batches: ``first_s``, doubling up to ``most_s``."""
    wait = first_s
    while True:
        yield wait
        wait = min(most_s, wait * 2)


def _error_text(error: Any) -> str:
    if isinstance(error, Mapping):
        code = error.get("code")
        message = str(error.get("message") or "the request failed")
        return f"{code}: {message}" if code else message
    return str(error or "the request failed")


@dataclass(frozen=True, slots=True, kw_only=True)
class LineContext:
    """What turning a batch line into a result needs of the job and the run."""

    rules: AnswerRules
    price: Price | None
    """The batch price (None: unknown)."""
    model: str
    run: int


def line_result(
    line: Mapping[str, Any], row: int, key: str, body: bytes, context: LineContext
) -> RowResult | None:
    """The result of one output/error file line for input row ``row`` (request ``key``,
    sent with ``body``); None when the provider never ran it."""
    response = line.get("response")
    error = line.get("error")
    if not isinstance(response, Mapping):
        if isinstance(error, Mapping) and error.get("code") in UNANSWERED_CODES:
            return None
        return _failed(row, key, f"batch: {_error_text(error)}", None, context)
    status = response.get("status_code")
    raw = json.dumps(response.get("body"), ensure_ascii=False).encode()
    if status != 200:
        code = status if isinstance(status, int) else 0
        return _failed(row, key, error_message(code, raw, "application/json"), code, context)
    reply, usage, problem = parse_reply(raw)
    usage = usage or ZERO_USAGE
    price = context.price
    spent: Decimal | None = cost(usage, price)
    if reply is None:
        return _failed(row, key, problem or "no answer", 200, context, usage=usage, spent=spent)
    rules = context.rules
    verdict = judge(
        reply,
        body=body,
        reasks=rules.max_reasks,
        output_tokens=usage.completion_tokens,
        rules=rules,
    )
    error_text = verdict.error if isinstance(verdict, Fail) else None
    structured = verdict.structured if isinstance(verdict, Keep) else None
    return RowResult(
        key=key,
        row=row,
        status="ok" if error_text is None else "failed",
        response=reply.content,
        reasoning=reply.reasoning,
        finish_reason=reply.finish_reason,
        usage=usage,
        cost_usd=spent,
        attempts=1,
        error=error_text,
        model=reply.model or context.model,
        run=context.run,
        response_id=reply.response_id,
        tool_calls=reply.tool_calls,
        structured=structured,
        http_status=200,
    )


def _failed(
    row: int,
    key: str,
    error: str,
    status: int | None,
    context: LineContext,
    *,
    usage: Any = ZERO_USAGE,
    spent: Decimal | None = None,
) -> RowResult:
    return RowResult(
        key=key,
        row=row,
        status="failed",
        usage=usage,
        cost_usd=spent if spent is not None else cost(ZERO_USAGE, context.price),
        attempts=1,
        error=error,
        model=context.model,
        run=context.run,
        http_status=status,
    )
