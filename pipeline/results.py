"""The result of one row, as kept in the journal and written to the output."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

from pipeline.money.pricing import ZERO_USAGE, Usage

Status = Literal["ok", "failed", "stopped"]
"""``stopped``: a row a stop (Ctrl-C, the budget) interrupted after attempts that were
billed. Not the row's result (the next run sends the row again), but a record of what those
attempts cost, so that every billed attempt is accounted."""


_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
"""One encoder for every record: ``json.dumps`` with options builds a new one per call."""


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A function call the model asked for; ``arguments`` is the JSON text it wrote."""

    id: str
    name: str
    arguments: str

    def to_dict(self) -> dict[str, str]:
        return {"id": self.id, "name": self.name, "arguments": self.arguments}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ToolCall:
        return cls(
            id=str(data.get("id") or ""),
            name=str(data.get("name") or ""),
            arguments=str(data.get("arguments") or ""),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Reply:
    """The useful parts of a chat-completions answer."""

    content: str | None
    reasoning: str | None
    finish_reason: str | None
    model: str | None
    response_id: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class RowResult:
    key: str
    """The request key (see :func:`pipeline.rows.templating.request_key`)."""
    row: int
    """The row's number in the input, from 0."""
    status: Status
    response: str | None = None
    reasoning: str | None = None
    finish_reason: str | None = None
    usage: Usage = ZERO_USAGE
    """Summed over every billed attempt."""
    cost_usd: Decimal | None = None
    """Exact cost of every billed attempt; None when the price is unknown."""
    attempts: int = 0
    latency_ms: int | None = None
    error: str | None = None
    model: str | None = None
    run: int = 0
    """The run that recorded this result."""
    response_id: str | None = None
    """The provider's id of the (last) answer."""
    tool_calls: tuple[ToolCall, ...] = ()
    structured: Mapping[str, Any] | None = None
    """The answer parsed and validated against the job's output schema."""
    reasks: int = 0
    """Answers that failed the output schema and were asked again (each one billed)."""
    http_status: int | None = None
    """The HTTP status of the last attempt's answer (None: no answer, e.g. a timeout)."""

    def to_json(self) -> str:
        usage = self.usage
        return _ENCODER.encode(
            {
                "key": self.key,
                "row": self.row,
                "status": self.status,
                "response": self.response,
                "reasoning": self.reasoning,
                "finish_reason": self.finish_reason,
                "tokens": [
                    usage.prompt_tokens,
                    usage.completion_tokens,
                    usage.cached_tokens,
                    usage.reasoning_tokens,
                ],
                "cost_usd": None if self.cost_usd is None else str(self.cost_usd),
                "attempts": self.attempts,
                "latency_ms": self.latency_ms,
                "error": self.error,
                "model": self.model,
                "response_id": self.response_id,
                "tool_calls": [call.to_dict() for call in self.tool_calls] or None,
                "structured": self.structured,
                "reasks": self.reasks,
                "http_status": self.http_status,
                "run": self.run,
            }
        )

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RowResult:
        prompt, completion, cached, reasoning = data["tokens"]
        cost = data.get("cost_usd")
        return cls(
            key=data["key"],
            row=data["row"],
            status=data["status"],
            response=data.get("response"),
            reasoning=data.get("reasoning"),
            finish_reason=data.get("finish_reason"),
            usage=Usage(
                prompt_tokens=prompt,
                completion_tokens=completion,
                cached_tokens=cached,
                reasoning_tokens=reasoning,
            ),
            cost_usd=None if cost is None else Decimal(cost),
            attempts=data.get("attempts", 0),
            latency_ms=data.get("latency_ms"),
            error=data.get("error"),
            model=data.get("model"),
            run=data.get("run", 0),
            response_id=data.get("response_id"),
            tool_calls=tuple(ToolCall.from_dict(call) for call in data.get("tool_calls") or ()),
            structured=data.get("structured"),
            reasks=data.get("reasks", 0),
            http_status=data.get("http_status"),
        )
