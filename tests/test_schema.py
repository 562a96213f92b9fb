"""Structured output: schema loading, the prompt text, answer checks and typed columns."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator  # type: ignore[import-untyped,unused-ignore]

from pipeline.errors import JobFileError
from pipeline.rows.schema import Invalid, OutputSchema

SOURCE = Path("jobs/label.toml")
KEY = "[output] schema"

LABELS = ["positive", "negative", "neutral"]
RICH: dict[str, Any] = {
    "type": "object",
    "properties": {
        "label": {"type": "string", "enum": LABELS},
        "summary": {"type": "string"},
        "score": {"type": "number"},
        "count": {"type": "integer"},
        "spam": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "ratings": {"type": "array", "items": {"type": "integer"}},
        "author": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "age": {"type": ["integer", "null"]},
                "moods": {"type": "array", "items": {"enum": ["happy", "sad"]}},
            },
            "required": ["name"],
        },
        "note": {"type": ["string", "null"]},
        "weight": {"anyOf": [{"type": "number"}, {"type": "null"}]},
        "extra": {},
        "either": {"type": ["string", "integer"]},
        "shape": {
            "oneOf": [
                {"type": "object", "properties": {"r": {"type": "number"}}, "required": ["r"]},
                {"type": "object", "properties": {"w": {"type": "number"}}, "required": ["w"]},
            ]
        },
        "counts": {"type": "object", "additionalProperties": {"type": "integer"}},
    },
    "required": ["label", "summary"],
}


def rich() -> OutputSchema:
    return OutputSchema.load(RICH, source=SOURCE, key=KEY)


def test_columns_follow_schema_order() -> None:
    assert rich().columns == tuple(RICH["properties"])


def test_arrow_types_per_json_type() -> None:
    types = {f.name: f.type for f in rich().arrow_fields()}
    enum = pa.dictionary(pa.int32(), pa.string())
    assert types == {
        "label": enum,
        "summary": pa.string(),
        "score": pa.float64(),
        "count": pa.int64(),
        "spam": pa.bool_(),
        "tags": pa.list_(pa.string()),
        "ratings": pa.list_(pa.int64()),
        "author": pa.struct(
            [
                pa.field("name", pa.string()),
                pa.field("age", pa.int64()),
                pa.field("moods", pa.list_(enum)),
            ]
        ),
        "note": pa.string(),
        "weight": pa.float64(),
        "extra": pa.string(),
        "either": pa.string(),
        "shape": pa.string(),
        "counts": pa.string(),
    }
    assert all(f.nullable for f in rich().arrow_fields())


FULL = {
    "label": "negative",
    "summary": "Late and cold.",
    "score": 2,
    "count": 3,
    "spam": False,
    "tags": ["food", "delivery"],
    "ratings": [1, 2],
    "author": {"name": "Ana", "age": None, "moods": ["sad"]},
    "note": None,
    "weight": 1,
    "extra": {"b": [1, 2], "a": "x"},
    "either": 7,
    "shape": {"r": 1.5},
    "counts": {"x": 1},
}


def table_of(schema: OutputSchema, instances: list[dict[str, Any] | None]) -> pa.Table:
    arrays = schema.column_arrays(instances)
    return pa.Table.from_arrays(arrays, schema=pa.schema(schema.arrow_fields()))


def test_column_values_and_coercions() -> None:
    schema = rich()
    minimal = {"label": "positive", "summary": "Fine."}
    rows = table_of(schema, [FULL, minimal, None]).to_pylist()
    first = rows[0]
    assert first["score"] == 2.0
    assert isinstance(first["score"], float)  # an integer where a number is expected
    assert first["weight"] == 1.0
    assert isinstance(first["weight"], float)
    assert first["author"] == {"name": "Ana", "age": None, "moods": ["sad"]}
    assert first["extra"] == '{"a":"x","b":[1,2]}'  # canonical JSON text
    assert first["either"] == "7"
    assert first["shape"] == '{"r":1.5}'
    assert rows[1]["label"] == "positive"
    assert rows[1]["score"] is None  # optional and missing: null
    assert rows[1]["tags"] is None
    assert set(rows[2].values()) == {None}  # no answer: every column null


def test_round_trip_through_parquet_and_polars(tmp_path: Path) -> None:
    schema = rich()
    path = tmp_path / "out.parquet"
    pq.write_table(table_of(schema, [FULL, {"label": "neutral", "summary": "ok"}, None]), path)
    assert pq.read_table(path).to_pylist()[0]["label"] == "negative"
    frame = pl.read_parquet(path)
    assert frame.schema["label"] == pl.Categorical
    assert frame.schema["score"] == pl.Float64
    assert frame.schema["count"] == pl.Int64
    assert frame.schema["spam"] == pl.Boolean
    assert frame.schema["tags"] == pl.List(pl.String)
    assert frame.schema["author"] == pl.Struct(
        {"name": pl.String, "age": pl.Int64, "moods": pl.List(pl.Categorical)}
    )
    assert frame["label"].to_list() == ["negative", "neutral", None]
    assert frame["author"].struct.field("name").to_list() == ["Ana", None, None]


def test_enum_codes_are_fixed_across_batches() -> None:
    schema = rich()
    one = schema.column_arrays([{"label": "neutral", "summary": "a"}])[0]
    two = schema.column_arrays([{"label": "positive", "summary": "b"}])[0]
    assert one.dictionary.to_pylist() == two.dictionary.to_pylist() == LABELS


def test_instruction_is_the_exact_text() -> None:
    schema = rich()
    expected = (
        "Answer with one JSON object, and nothing else, that conforms to this JSON Schema:\n"
        "```json\n"
        + json.dumps(RICH, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
        + "\n```"
    )
    assert schema.instruction() == expected


def test_check_returns_the_parsed_object() -> None:
    answer = json.dumps(FULL)
    assert rich().check(answer) == FULL
    assert rich().check(f"  \n{answer}\n ") == FULL


@pytest.mark.parametrize(
    "text",
    [
        '```json\n{"label": "positive", "summary": "s"}\n```',
        '```\n{"label": "positive", "summary": "s"}\n```',
        '\n  ```JSON\n{"label": "positive", "summary": "s"}\n```  \n',
    ],
)
def test_check_accepts_one_fence(text: str) -> None:
    assert rich().check(text) == {"label": "positive", "summary": "s"}


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (
            '{"label": "great", "summary": "s"}',
            "$.label: 'great' is not one of ['positive', 'negative', 'neutral']",
        ),
        ('{"label": "positive"}', "$: 'summary' is a required property"),
        (
            '{"label": "positive", "summary": "s", "count": 1.5}',
            "$.count: 1.5 is not of type 'integer'",
        ),
        (
            '{"label": "positive", "summary": "s", "author": {"name": 3}}',
            "$.author.name: 3 is not of type 'string'",
        ),
        (
            '{"label": "positive", "summary": "s", "tags": ["a", 2]}',
            "$.tags[1]: 2 is not of type 'string'",
        ),
        ("", "the answer is empty"),
        ("   \n", "the answer is empty"),
        ("null", "the answer is empty"),
        ("[1, 2]", "the answer is a JSON list, not a JSON object"),
        ('"positive"', "the answer is a JSON str, not a JSON object"),
    ],
)
def test_check_reports_why(text: str, reason: str) -> None:
    assert rich().check(text) == Invalid(reason)


def test_check_of_none_is_empty() -> None:
    assert rich().check(None) == Invalid("the answer is empty")


@pytest.mark.parametrize(
    "text",
    [
        'Sure! Here it is: {"label": "positive", "summary": "s"}',
        'Here:\n```json\n{"label": "positive", "summary": "s"}\n```\nHope that helps.',
    ],
)
def test_prose_around_the_object_is_invalid(text: str) -> None:
    result = rich().check(text)
    assert isinstance(result, Invalid)
    assert "prose around the JSON object" in result.reason


def test_text_after_the_object_is_invalid() -> None:
    result = rich().check('{"label": "positive", "summary": "s"} I think.')
    assert isinstance(result, Invalid)
    assert "text after the JSON object" in result.reason


def test_broken_json_and_nan_are_invalid() -> None:
    for text in ('{"label": "positive",', '{"label": NaN}', "positive"):
        result = rich().check(text)
        assert isinstance(result, Invalid)
        assert result.reason.startswith("the answer is not valid JSON")


def test_long_values_are_shortened_on_one_line() -> None:
    value = "x" * 500 + "\n" + "y" * 500
    result = rich().check(json.dumps({"label": value, "summary": "s"}))
    assert isinstance(result, Invalid)
    assert result.reason.startswith("$.label: 'xxxx")
    assert "…" in result.reason
    assert "\n" not in result.reason
    assert len(result.reason) < 200


def test_integers_too_large_for_int64_are_invalid() -> None:
    result = rich().check('{"label": "positive", "summary": "s", "count": 99999999999999999999}')
    assert result == Invalid("$.count: 99999999999999999999 does not fit a 64-bit number column")


def test_reask_carries_the_error() -> None:
    message = rich().reask("$.label: 'great' is not one of ['positive']")
    assert message == (
        "Your answer was not valid: $.label: 'great' is not one of ['positive']. "
        "Answer again with only the JSON object, conforming to the schema."
    )


def test_load_from_a_file_relative_to_the_job(tmp_path: Path) -> None:
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "label.json").write_text(json.dumps(RICH), encoding="utf-8")
    schema = OutputSchema.load("schemas/label.json", source=tmp_path / "job.toml", key=KEY)
    assert schema.schema == RICH


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("missing.json", "cannot read the schema file"),
        ("broken.json", "is not valid JSON"),
        ({"type": "object", "properties": {"a": {"type": "strin"}}}, "is not a valid JSON Schema"),
        ({"type": "object", "properties": {"a": {"minLength": -1}}}, "is not a valid JSON Schema"),
        ({"type": "array", "items": {"type": "string"}}, "top level must be"),
        ({"type": "object"}, "top level must be"),
        ({"type": "object", "properties": {}}, "top level must be"),
        ("list.json", "must be a JSON object"),
    ],
)
def test_load_errors_name_the_file_and_key(tmp_path: Path, value: Any, problem: str) -> None:
    (tmp_path / "broken.json").write_text('{"type": "object",', encoding="utf-8")
    (tmp_path / "list.json").write_text("[]", encoding="utf-8")
    source = tmp_path / "job.toml"
    with pytest.raises(JobFileError) as caught:
        OutputSchema.load(value, source=source, key=KEY)
    assert caught.value.key == KEY
    assert caught.value.path == str(source)
    assert problem in caught.value.problem
    assert str(caught.value).startswith(f"{source}: {KEY}: ")


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "noop",
            "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}},
        },
    },
    {
        "type": "function",
        "function": {
            "name": "classify",
            "description": "Label a review.",
            "parameters": {
                "type": "object",
                "properties": {"label": {"type": "string", "enum": LABELS}},
                "required": ["label"],
            },
        },
    },
]


def test_from_tool_takes_the_named_functions_parameters() -> None:
    schema = OutputSchema.from_tool(TOOLS, "classify", source=SOURCE, key="[request] tool")
    assert schema.columns == ("label",)
    assert schema.check('{"label": "neutral"}') == {"label": "neutral"}


def test_from_tool_names_the_missing_function() -> None:
    with pytest.raises(JobFileError) as caught:
        OutputSchema.from_tool(TOOLS, "summarize", source=SOURCE, key="[request] tool")
    assert caught.value.key == "[request] tool"
    assert "'summarize'" in caught.value.problem
    assert "'noop', 'classify'" in caught.value.problem


def test_from_tool_without_parameters() -> None:
    tools = [{"type": "function", "function": {"name": "f"}}]
    with pytest.raises(JobFileError, match="no `parameters` schema"):
        OutputSchema.from_tool(tools, "f", source=SOURCE, key="[request] tool")


# ---------------------------------------------------------------------------------------------
# Property: whatever validates converts to columns without raising.

ANY_TEXT = st.text(alphabet=st.characters(exclude_categories=()), max_size=8)
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | ANY_TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(ANY_TEXT, inner, max_size=3),
    max_leaves=8,
)
NUMBERS = st.integers() | st.floats(allow_nan=False, allow_infinity=False)


def typed(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly well-typed values, sometimes anything (the validator then decides)."""
    return strategy | JSON_VALUES


INSTANCES = st.fixed_dictionaries(
    {"label": typed(st.sampled_from(LABELS)), "summary": typed(ANY_TEXT)},
    optional={
        "score": typed(NUMBERS),
        "count": typed(st.integers() | st.integers().map(float)),
        "spam": typed(st.booleans()),
        "tags": typed(st.lists(ANY_TEXT, max_size=3)),
        "ratings": typed(st.lists(st.integers(), max_size=3)),
        "author": typed(
            st.fixed_dictionaries(
                {"name": ANY_TEXT},
                optional={
                    "age": st.none() | st.integers(),
                    "moods": st.lists(st.sampled_from(["happy", "sad"]), max_size=2),
                },
            )
        ),
        "note": typed(st.none() | ANY_TEXT),
        "weight": typed(st.none() | NUMBERS),
        "extra": JSON_VALUES,
        "either": typed(ANY_TEXT | st.integers()),
        "shape": typed(st.fixed_dictionaries({"r": NUMBERS})),
        "counts": typed(st.dictionaries(ANY_TEXT, st.integers(), max_size=3)),
        "unknown": JSON_VALUES,
    },
)
VALIDATOR = Draft202012Validator(RICH)


@settings(
    max_examples=300, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow]
)
@given(st.lists(INSTANCES.filter(VALIDATOR.is_valid) | st.none(), max_size=4))
def test_column_arrays_never_raise_for_valid_instances(instances: list[Any]) -> None:
    schema = rich()
    arrays = schema.column_arrays(instances)
    table = pa.Table.from_arrays(arrays, schema=pa.schema(schema.arrow_fields()))
    assert table.num_rows == len(instances)
    for instance, row in zip(instances, table.to_pylist(), strict=True):
        if instance is None:
            assert set(row.values()) == {None}
        else:
            assert row["label"] == instance["label"]
