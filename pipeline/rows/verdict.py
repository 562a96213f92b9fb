"""Pure: what an answer means for its row: keep it, fail it, or ask again.

An answer cut off by ``max_tokens`` (``finish_reason = "length"``) fails the row as
truncated: the text is kept, but never silently taken as whole. With an output schema the
answer (its content, or the named function call's arguments) is validated; an invalid one is
asked again, with the bad answer and the error appended to the conversation, until
``max_reasks`` is used up, and then fails the row with the reason.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.results import Reply, ToolCall
from pipeline.rows.schema import Invalid, OutputSchema
from pipeline.rows.templating import encode_body
from pipeline.rows.tokens import heuristic_tokens


@dataclass(frozen=True, slots=True, kw_only=True)
class AnswerRules:
    """What a job asks of its answers."""

    schema: OutputSchema | None = None
    schema_from_tool: str | None = None
    """The answer is this function's call; its arguments are checked against ``schema``."""
    max_reasks: int = 2
    max_tokens: int | None = None
    thinking: bool = False


@dataclass(frozen=True, slots=True)
class Keep:
    structured: Mapping[str, Any] | None = None
    """The validated answer, when the job has a schema."""


@dataclass(frozen=True, slots=True)
class Fail:
    error: str


@dataclass(frozen=True, slots=True)
class AskAgain:
    body: bytes
    """The next request: the conversation so far, the bad answer and what was wrong."""
    added_tokens: int
    """About how many prompt tokens the re-ask adds (for rate budgets)."""


Verdict = Keep | Fail | AskAgain


def judge(
    reply: Reply, *, body: bytes, reasks: int, output_tokens: int, rules: AnswerRules
) -> Verdict:
    """The verdict on ``reply``, the answer to ``body`` after ``reasks`` re-asks so far;
    ``output_tokens`` is its length, which a re-ask sends back as part of the prompt."""
    if reply.finish_reason == "length":
        limit = rules.max_tokens
        budget = f"max_tokens ({limit:,})" if limit else "the model's output limit"
        why = " with thinking on, reasoning spends it first" if rules.thinking else ""
        return Fail(
            f"truncated: the answer reached {budget}{why}; raise max_tokens and run again "
            "with --retry-failed"
        )
    schema = rules.schema
    if schema is None:
        return Keep()
    name = rules.schema_from_tool
    call = None
    if name is not None:
        call = next((found for found in reply.tool_calls if found.name == name), None)
    checked: Mapping[str, Any] | Invalid
    if name is not None and call is None:
        checked = Invalid(f"the answer did not call {name}()")
    else:
        checked = schema.check(call.arguments if call is not None else reply.content or "")
    if not isinstance(checked, Invalid):
        return Keep(checked)
    if reasks >= rules.max_reasks:
        tries = f"after {reasks} re-ask(s)" if reasks else "(re-asks are off)"
        return Fail(f"invalid answer {tries}: {checked.reason}")
    message = schema.reask(checked.reason)
    return AskAgain(
        body=reask_body(body, reply, call, message),
        added_tokens=heuristic_tokens(message) + output_tokens,
    )


def reask_body(body: bytes, reply: Reply, call: ToolCall | None, message: str) -> bytes:
    """The body that asks again: the conversation so far, the bad answer, and what was wrong
    with it (as the tool's result when the answer was a tool call)."""
    request = json.loads(body)
    messages = list(request["messages"])
    if call is not None:
        function = {"name": call.name, "arguments": call.arguments}
        messages.append(
            {
                "role": "assistant",
                "content": reply.content or "",
                "tool_calls": [{"id": call.id, "type": "function", "function": function}],
            }
        )
        messages.append({"role": "tool", "tool_call_id": call.id, "content": message})
    else:
        messages.append({"role": "assistant", "content": reply.content or ""})
        messages.append({"role": "user", "content": message})
    request["messages"] = messages
    return encode_body(request)
