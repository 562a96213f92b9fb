"""A job's structured output: its schema, from whichever key gives it, checked at load.

The schema of each answer comes from one of three keys: ``[output] schema`` (pipeline asks
for JSON and tells the model the schema in the prompt), a ``json_schema`` response format in
``[request]`` (OpenAI's convention: the provider is given the schema, and enforces it when
``strict = true``) or ``[output] schema_from_tool`` (a function's arguments are the answer).
``[output] schema`` and a response format may both be given if they hold the same schema.
Each top-level property becomes an output column, so it must not be named like a column the
output already has.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from pipeline.errors import JobFileError
from pipeline.rows.schema import OutputSchema

OUTPUT_COLUMNS: Final = (
    "id",
    "status",
    "response",
    "reasoning",
    "finish_reason",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "cost_usd",
    "attempts",
    "latency_ms",
    "error",
    "http_status",
    "model",
    "reasks",
    "tool_calls",
    "response_id",
)
"""The columns every output has: ``id`` and :data:`pipeline.io.sinks.RESULT_COLUMNS` (a test
keeps the two the same; this layer cannot import that one)."""

_RESPONSE_FORMAT = "[request] response_format"


@dataclass(frozen=True, slots=True, kw_only=True)
class Structured:
    """The job's output schema, if any, and whether the provider enforces it."""

    schema: OutputSchema | None = None
    enforced: bool = False


def output_schema(
    source: Path,
    *,
    schema: Mapping[str, Any] | str | None,
    schema_from_tool: str | None,
    endpoint: str,
    keep_columns: Sequence[str],
    params: dict[str, Any],
) -> Structured:
    """The job's output schema; adds to ``params`` what the request needs to ask for it."""
    if schema is not None and schema_from_tool is not None:
        raise JobFileError(
            source, "[output] schema", "give `schema` or `schema_from_tool`, not both."
        )
    from_format = _response_format_schema(source, params.get("response_format"))
    if from_format is not None and schema_from_tool is not None:
        raise JobFileError(
            source,
            "[output] schema_from_tool",
            "the answer cannot be both a function's arguments and a json_schema response format.",
            "Remove one of the two.",
        )
    if schema is None and schema_from_tool is None and from_format is None:
        return Structured()
    if endpoint != "chat/completions":
        raise JobFileError(
            source,
            "[output] schema",
            'structured output needs endpoint = "chat/completions".',
        )
    if schema_from_tool is not None:
        found = _tool_schema(source, schema_from_tool, params)
        _check_property_names(source, "[output] schema_from_tool", found, keep_columns)
        return Structured(schema=found)
    if schema is not None:
        given = OutputSchema.load(schema, source=source, key="[output] schema")
        if from_format is not None and dict(from_format[0].schema) != dict(given.schema):
            raise JobFileError(
                source,
                "[output] schema",
                "differs from the schema of the json_schema in [request] response_format.",
                "Give the schema once (the response format's alone gives typed columns), "
                "or make the two the same.",
            )
        _check_property_names(source, "[output] schema", given, keep_columns)
        # DeepSeek cannot enforce a schema: ask for a JSON object and describe the schema in
        # the prompt (see pipeline.rows.schema.OutputSchema.instruction).
        params.setdefault("response_format", {"type": "json_object"})
        return Structured(schema=given, enforced=from_format is not None and from_format[1])
    assert from_format is not None
    _check_property_names(source, _RESPONSE_FORMAT, from_format[0], keep_columns)
    return Structured(schema=from_format[0], enforced=from_format[1])


def _response_format_schema(source: Path, value: Any) -> tuple[OutputSchema, bool] | None:
    """The schema of a ``json_schema`` response format and whether it is ``strict``."""
    if not isinstance(value, Mapping) or value.get("type") != "json_schema":
        return None
    spec = value.get("json_schema")
    shape = 'Write response_format = {type = "json_schema", json_schema = {name = "...", '
    shape += "schema = {...}, strict = true}}."
    if not isinstance(spec, Mapping):
        raise JobFileError(source, _RESPONSE_FORMAT, "needs a `json_schema` table.", shape)
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise JobFileError(
            source, _RESPONSE_FORMAT, "json_schema needs a `name` (OpenAI requires one).", shape
        )
    if "schema" not in spec:
        raise JobFileError(
            source, _RESPONSE_FORMAT, "json_schema needs a `schema`, the answer's shape.", shape
        )
    strict = spec.get("strict", False)
    if not isinstance(strict, bool):
        raise JobFileError(
            source, _RESPONSE_FORMAT, f"json_schema.strict must be true or false (got {strict!r})."
        )
    table = spec["schema"]
    if not isinstance(table, Mapping):  # a string would be taken for a schema file's path
        raise JobFileError(
            source,
            _RESPONSE_FORMAT,
            f"json_schema.schema must be a table, the answer's JSON Schema (got "
            f"{type(table).__name__}).",
            shape,
        )
    return OutputSchema.load(table, source=source, key=_RESPONSE_FORMAT), strict


def _tool_schema(source: Path, name: str, params: dict[str, Any]) -> OutputSchema:
    tools = params.get("tools")
    if not isinstance(tools, list):
        raise JobFileError(
            source,
            "[output] schema_from_tool",
            "names a function, but [request] has no `tools` list.",
            'Add tools = [{type = "function", function = {...}}] to [request].',
        )
    found = OutputSchema.from_tool(tools, name, source=source, key="[output] schema_from_tool")
    params.setdefault("tool_choice", {"type": "function", "function": {"name": name}})
    return found


def _check_property_names(
    source: Path, key: str, schema: OutputSchema, keep_columns: Sequence[str]
) -> None:
    """Each property becomes a column: none may be named like one the output already has."""
    for column in schema.columns:
        if column in OUTPUT_COLUMNS:
            raise JobFileError(
                source,
                key,
                f"the property {column!r} is a column the output already has "
                f"({', '.join(OUTPUT_COLUMNS)}): rename the property.",
            )
        if column in keep_columns:
            raise JobFileError(
                source,
                key,
                f"the property {column!r} is also in [output] keep_columns: both would be "
                "the output column of that name.",
                "Rename the property, or do not keep that input column.",
            )
