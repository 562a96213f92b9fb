"""The simulated model: schema instances, schema violations, tool calls and FIM replies."""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.rows import tokens
from pipeline.server.options import ServerOptions
from pipeline.server.requests import schema_in_messages
from pipeline.server.schema_answers import schema_answer, schema_instance, violating_text
from pipeline.server.simulate import Tool, fim_reply, make_reply, vocabulary

# ---------------------------------------------------------------------------------------------
# A tiny JSON Schema checker for the keywords the generator supports


def _type_ok(value: Any, kind: str) -> bool:
    checks = {
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
        "null": lambda v: v is None,
        "array": lambda v: isinstance(v, list),
        "object": lambda v: isinstance(v, dict),
    }
    return bool(checks[kind](value))


def _resolve(ref: str, root: dict[str, Any]) -> Any:
    node: Any = root
    for key in ref.removeprefix("#/").split("/"):
        node = node[key]
    return node


def _numeric_ok(value: float, schema: dict[str, Any]) -> bool:
    low, high = schema.get("minimum"), schema.get("maximum")
    if low is not None and value < low:
        return False
    if high is not None and value > high:
        return False
    if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
        return False
    if "exclusiveMaximum" in schema and value >= schema["exclusiveMaximum"]:
        return False
    step = schema.get("multipleOf")
    return step is None or value % step == 0


def _array_ok(value: list[Any], schema: dict[str, Any], root: dict[str, Any]) -> bool:
    if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", math.inf):
        return False
    if schema.get("uniqueItems"):
        keys = [json.dumps(item, sort_keys=True) for item in value]
        if len(set(keys)) != len(keys):
            return False
    return all(conforms(item, schema.get("items", {}), root) for item in value)


def _object_ok(value: dict[str, Any], schema: dict[str, Any], root: dict[str, Any]) -> bool:
    properties = schema.get("properties", {})
    if any(name not in value for name in schema.get("required", [])):
        return False
    if len(value) < schema.get("minProperties", 0):
        return False
    extra = schema.get("additionalProperties", True)
    for name, item in value.items():
        if name in properties:
            if not conforms(item, properties[name], root):
                return False
        elif extra is False or (isinstance(extra, dict) and not conforms(item, extra, root)):
            return False
    return True


def _combinators_ok(value: Any, schema: dict[str, Any], root: Any) -> bool:
    if "$ref" in schema and not conforms(value, _resolve(schema["$ref"], root), root):
        return False
    if "const" in schema and value != schema["const"]:
        return False
    if "enum" in schema and value not in schema["enum"]:
        return False
    if "anyOf" in schema and not any(conforms(value, s, root) for s in schema["anyOf"]):
        return False
    if "oneOf" in schema and sum(conforms(value, s, root) for s in schema["oneOf"]) != 1:
        return False
    return all(conforms(value, s, root) for s in schema.get("allOf", []))


def conforms(value: Any, schema: Any, root: Any = None) -> bool:
    """Whether ``value`` is valid against ``schema`` (the keywords the generator knows)."""
    root = schema if root is None else root
    if schema is True or schema == {}:
        return True
    if not _combinators_ok(value, schema, root):
        return False
    kinds = schema.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if not any(_type_ok(value, kind) for kind in kinds):
            return False
    if isinstance(value, str):
        return schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", math.inf)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return _numeric_ok(value, schema)
    if isinstance(value, list):
        return _array_ok(value, schema, root)
    if isinstance(value, dict):
        return _object_ok(value, schema, root)
    return True


def answer_conforms(text: str, schema: dict[str, Any]) -> bool:
    """Whether JSON text parses and its value conforms to ``schema``."""
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return conforms(value, schema)


def test_the_checker_catches_what_it_should() -> None:
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 1}, "s": {"enum": ["a"]}},
        "required": ["n"],
    }
    assert conforms({"n": 1, "s": "a"}, schema)
    for bad in ({"s": "a"}, {"n": 0}, {"n": "1"}, {"n": True}, {"n": 1, "s": "b"}, []):
        assert not conforms(bad, schema), bad


# ---------------------------------------------------------------------------------------------
# Random schemas

_words = st.sampled_from(["alpha", "beta", "gamma", "delta", "eps", "zeta"])
_names = st.text(alphabet="abcdefgh_", min_size=1, max_size=6)
_scalars = st.one_of(st.none(), st.booleans(), st.integers(-50, 50), _words)


@st.composite
def _string_schemas(draw: st.DrawFn) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    low = draw(st.one_of(st.none(), st.integers(0, 30)))
    if low is not None:
        schema["minLength"] = low
    if draw(st.booleans()):
        schema["maxLength"] = (low or 0) + draw(st.integers(0, 12))
    if draw(st.booleans()):
        schema["format"] = draw(st.sampled_from(["date", "date-time", "email", "uuid"]))
        schema.pop("minLength", None)
        schema.pop("maxLength", None)
    return schema


@st.composite
def _number_schemas(draw: st.DrawFn) -> dict[str, Any]:
    integer = draw(st.booleans())
    schema: dict[str, Any] = {"type": "integer" if integer else "number"}
    low = draw(st.integers(-1000, 1000))
    width = draw(st.integers(2, 500)) if integer else draw(st.floats(0.01, 500))
    high = low + width
    if draw(st.booleans()):
        schema["exclusiveMinimum" if draw(st.booleans()) else "minimum"] = low
    if draw(st.booleans()):
        schema["exclusiveMaximum" if draw(st.booleans()) else "maximum"] = high
    if integer and draw(st.booleans()) and "minimum" in schema and "maximum" in schema:
        schema["multipleOf"] = draw(st.integers(1, 2))
    return schema


_enums = st.lists(_scalars, min_size=1, max_size=5, unique_by=json.dumps)
_leaves = st.one_of(
    _string_schemas(),
    _number_schemas(),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.just({"type": ["string", "null"]}),
    _enums.map(lambda values: {"enum": values}),
    st.lists(_words, min_size=1, max_size=4, unique=True).map(
        lambda values: {"type": "string", "enum": values}
    ),
    _scalars.map(lambda value: {"const": value}),
)


@st.composite
def _objects(draw: st.DrawFn, children: st.SearchStrategy[dict[str, Any]]) -> dict[str, Any]:
    properties = draw(st.dictionaries(_names, children, min_size=0, max_size=5))
    names = sorted(properties)
    required = [name for name in names if draw(st.booleans())]
    schema: dict[str, Any] = {"type": "object", "properties": properties, "required": required}
    if draw(st.booleans()):
        schema["additionalProperties"] = False
    return schema


@st.composite
def _arrays(draw: st.DrawFn, children: st.SearchStrategy[dict[str, Any]]) -> dict[str, Any]:
    if draw(st.booleans()):
        values = draw(st.lists(_words, min_size=1, max_size=5, unique=True))
        low = draw(st.integers(0, len(values)))
        return {
            "type": "array",
            "items": {"type": "string", "enum": values},
            "uniqueItems": True,
            "minItems": low,
            "maxItems": draw(st.integers(low, len(values))),
        }
    low = draw(st.integers(0, 3))
    schema = {"type": "array", "items": draw(children), "minItems": low}
    if draw(st.booleans()):
        schema["maxItems"] = low + draw(st.integers(0, 3))
    return schema


def _compound(children: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    return st.one_of(
        _objects(children),
        _arrays(children),
        children.map(lambda child: {"anyOf": [child, {"type": "null"}]}),
        st.just({"oneOf": [{"type": "string"}, {"type": "integer"}]}),
    )


schemas = st.recursive(_leaves, _compound, max_leaves=12)
object_schemas = _objects(schemas)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schema=schemas, seed=st.integers(0, 2**32))
def test_schema_instances_conform(schema: dict[str, Any], seed: int) -> None:
    instance = schema_instance(schema, random.Random(seed))
    assert conforms(instance, schema), (schema, instance)
    assert json.loads(json.dumps(instance)) == instance


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schema=object_schemas, seed=st.integers(0, 2**32))
def test_violations_always_break_the_schema(schema: dict[str, Any], seed: int) -> None:
    rng = random.Random(seed)
    text = violating_text(schema, schema_instance(schema, rng), rng)
    assert not answer_conforms(text, schema), (schema, text)


RICH_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "label": {"type": "string", "enum": ["positive", "negative", "neutral"]},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "stars": {"type": "integer", "minimum": 1, "maximum": 5},
        "summary": {"type": "string", "minLength": 5, "maxLength": 40},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
    },
    "required": ["label", "confidence", "stars"],
}


def _violation_kind(text: str, schema: dict[str, Any]) -> str:
    try:
        value = json.loads(text)
    except ValueError:
        return "prose"
    if any(name not in value for name in schema["required"]):
        return "missing"
    if value["label"] not in schema["properties"]["label"]["enum"]:
        return "enum"
    properties = schema["properties"]
    if any(not _type_ok(v, properties[k]["type"]) for k, v in value.items()):
        return "type"
    return "range"


def test_every_kind_of_violation_is_drawn() -> None:
    kinds: Counter[str] = Counter()
    for seed in range(600):
        rng = random.Random(seed)
        text = violating_text(RICH_SCHEMA, schema_instance(RICH_SCHEMA, rng), rng)
        assert not answer_conforms(text, RICH_SCHEMA)
        kinds[_violation_kind(text, RICH_SCHEMA)] += 1
    assert set(kinds) >= {"prose", "missing", "enum", "type", "range"}
    assert min(kinds.values()) > 30


def test_invalid_rate_is_honoured() -> None:
    draws = 2000
    invalid = sum(
        not answer_conforms(schema_answer(RICH_SCHEMA, random.Random(seed), 0.05), RICH_SCHEMA)
        for seed in range(draws)
    )
    assert 0.035 < invalid / draws < 0.065
    assert all(
        answer_conforms(schema_answer(RICH_SCHEMA, random.Random(seed), 0.0), RICH_SCHEMA)
        for seed in range(300)
    )


def test_pydantic_style_refs_and_optional_fields() -> None:
    schema = {
        "$defs": {
            "Node": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "title": "Name"},
                    "note": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None},
                    "children": {"type": "array", "items": {"$ref": "#/$defs/Node"}},
                },
                "required": ["name", "children"],
            }
        },
        "$ref": "#/$defs/Node",
    }
    for seed in range(50):
        instance = schema_instance(schema, random.Random(seed))
        assert conforms(instance, schema)
        assert len(json.dumps(instance)) < 20_000  # recursion stays bounded


def test_schema_answers_are_deterministic() -> None:
    first = schema_answer(RICH_SCHEMA, random.Random(9), 0.5)
    assert first == schema_answer(RICH_SCHEMA, random.Random(9), 0.5)


# ---------------------------------------------------------------------------------------------
# Finding the schema in a prompt


def _schema_prompt(schema: dict[str, Any]) -> str:
    return (
        "Answer with one JSON object, and nothing else, that conforms to this JSON Schema:\n"
        f"```json\n{json.dumps(schema)}\n```"
    )


def test_the_last_schema_block_of_system_or_user_messages_wins() -> None:
    first, second = {"type": "object", "title": "one"}, {"type": "object", "title": "two"}
    messages = [
        {"role": "system", "content": _schema_prompt(first)},
        {"role": "user", "content": [{"type": "text", "text": _schema_prompt(second)}]},
        {"role": "assistant", "content": _schema_prompt({"type": "object", "title": "no"})},
        {"role": "user", "content": "```json\n[1, 2]\n```\n```json\n{broken\n```"},
    ]
    assert schema_in_messages(messages) == second
    assert schema_in_messages(messages[:1]) == first
    assert schema_in_messages([{"role": "user", "content": 'Reply in json: {"a": 1}'}]) is None
    inline = [{"role": "user", "content": 'x ```json {"type": "object"} ```'}]
    assert schema_in_messages(inline) is None  # the fences must be lines of their own


# ---------------------------------------------------------------------------------------------
# Replies


@dataclass(frozen=True)
class _Ask:
    max_tokens: int = 256
    thinking: bool = False
    reasoning_effort: str = "high"
    json_mode: bool = False
    schema: dict[str, Any] | None = None
    strict: bool = False
    tool: Tool | None = None


def test_tool_call_replies_carry_conforming_arguments() -> None:
    options = ServerOptions(invalid_json_rate=0.0)
    tool = Tool(name="record_label", parameters=RICH_SCHEMA)
    for seed in range(30):
        thinking = seed % 2 == 0
        reply = make_reply(
            _Ask(max_tokens=1024, tool=tool, thinking=thinking),
            random.Random(seed),
            options,
            vocabulary(),
        )
        assert reply.content is None
        assert reply.finish_reason == "tool_calls"
        (call,) = reply.tool_calls
        assert call.name == "record_label"
        assert call.id.startswith("call_")
        assert answer_conforms(call.arguments, RICH_SCHEMA)
        assert tokens.count_text_tokens([call.arguments]) == [reply.content_tokens]
        assert (reply.reasoning_tokens > 0) == thinking
        assert reply.completion_tokens == reply.content_tokens + reply.reasoning_tokens


def test_schema_answers_are_cut_to_the_budget() -> None:
    options = ServerOptions(invalid_json_rate=0.0)
    ask = _Ask(max_tokens=5, json_mode=True, schema=RICH_SCHEMA)
    reply = make_reply(ask, random.Random(1), options, vocabulary())
    assert reply.finish_reason == "length"
    assert reply.content_tokens == 5
    assert reply.content is not None
    assert tokens.count_text_tokens([reply.content]) == [5]
    with pytest.raises(json.JSONDecodeError):
        json.loads(reply.content)


@pytest.mark.parametrize("max_tokens", [1, 7, 64, 300])
def test_fim_replies_follow_the_budget(max_tokens: int) -> None:
    for seed in range(20):
        reply = fim_reply(max_tokens, random.Random(seed), ServerOptions(), vocabulary())
        assert reply.reasoning is None
        assert reply.reasoning_tokens == 0
        assert reply.content is not None
        assert tokens.count_text_tokens([reply.content]) == [reply.content_tokens]
        assert reply.content_tokens <= max_tokens
        if reply.finish_reason == "length":
            assert reply.content_tokens == max_tokens
