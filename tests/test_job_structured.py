"""Issue 12: a json_schema response format gives typed columns by itself; it and [output] schema
must agree; a schema property named like one of the output's own columns is refused at load,
with a message that says so."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.engine.context import JobContext, request_template
from pipeline.errors import JobFileError
from pipeline.io.sinks import RESULT_COLUMNS
from pipeline.job.load import parse_job
from pipeline.job.spec import JobSpec
from pipeline.job.structured import OUTPUT_COLUMNS
from pipeline.rows.schema import OutputSchema

SCHEMA = (
    '{ type = "object", required = ["label"], additionalProperties = false, '
    'properties = { label = { type = "string", enum = ["good", "bad"] }, '
    'score = { type = "number" } } }'
)
OTHER = '{ type = "object", properties = { label = { type = "string" } } }'


def _format(schema: str = SCHEMA, strict: str = "true") -> str:
    return (
        'response_format = { type = "json_schema", json_schema = { name = "label", '
        f"strict = {strict}, schema = {schema} }} }}"
    )


def _job(request: str = "", output: str = "", *, source: str = "jobs/x.toml") -> JobSpec:
    return parse_job(
        f"""
name = "s"
[input]
path = "in.parquet"
[request]
model = "deepseek-v4-flash"
system = "You label."
prompt = "Label {{text}}."
{request}
[output]
path = "out.parquet"
{output}
""",
        source,
    )


def _error(request: str = "", output: str = "") -> JobFileError:
    with pytest.raises(JobFileError) as info:
        _job(request, output)
    return info.value


def test_a_json_schema_response_format_alone_gives_the_output_schema() -> None:
    job = _job(_format())
    assert job.output.schema is not None
    assert job.output.schema.columns == ("label", "score")
    assert job.output.schema_enforced
    fields = {f.name: f.type for f in job.output.schema.arrow_fields()}
    assert fields["score"] == pa.float64()
    # the response format is sent as written; a strict schema is not repeated in the prompt
    body = request_template(job).body({"text": "t"})
    assert isinstance(body, dict)
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["strict"] is True
    assert body["response_format"]["json_schema"]["schema"] == dict(job.output.schema.schema)
    assert body["messages"][0]["content"] == "You label."


def test_a_schema_the_provider_does_not_enforce_is_also_told_in_the_prompt() -> None:
    job = _job(_format(strict="false"))
    assert job.output.schema is not None
    assert not job.output.schema_enforced
    body = request_template(job).body({"text": "t"})
    assert isinstance(body, dict)
    assert body["messages"][0]["content"].startswith("You label.\n\nAnswer with one JSON object")
    assert body["response_format"]["type"] == "json_schema"


def test_the_same_schema_in_both_places_is_fine() -> None:
    job = _job(_format(), f"schema = {SCHEMA}")
    assert job.output.schema is not None
    assert job.output.schema.columns == ("label", "score")
    assert job.request.params["response_format"]["type"] == "json_schema"
    assert job.output.schema_enforced


def test_different_schemas_in_both_places_are_refused_before_anything_is_sent() -> None:
    error = _error(_format(), f"schema = {OTHER}")
    assert error.key == "[output] schema"
    assert "differs from the schema of the json_schema in [request] response_format" in str(error)


def test_a_schema_file_equal_to_the_response_formats_is_fine(tmp_path: Path) -> None:
    (tmp_path / "label.json").write_text(
        '{"type": "object", "properties": {"label": {"type": "string"}}}'
    )
    job = _job(_format(OTHER), 'schema = "label.json"', source=str(tmp_path / "job.toml"))
    assert job.output.schema is not None
    assert job.output.schema.columns == ("label",)


@pytest.mark.parametrize(
    ("response_format", "words"),
    [
        ('{ type = "json_schema" }', "needs a `json_schema` table"),
        (f'{{ type = "json_schema", json_schema = {{ schema = {SCHEMA} }} }}', "`name`"),
        ('{ type = "json_schema", json_schema = { name = "x" } }', "needs a `schema`"),
        ('{ type = "json_schema", json_schema = { name = "x", schema = "s.json" } }', "table"),
        (
            f'{{ type = "json_schema", json_schema = {{ name = "x", strict = 1, '
            f"schema = {SCHEMA} }} }}",
            "strict must be true or false",
        ),
        (
            '{ type = "json_schema", json_schema = { name = "x", schema = { type = "array" } } }',
            "top level must be",
        ),
    ],
)
def test_a_malformed_json_schema_response_format_names_the_key(
    response_format: str, words: str
) -> None:
    error = _error(f"response_format = {response_format}")
    assert error.key == "[request] response_format"
    assert words in str(error)


def test_a_tool_answer_and_a_json_schema_response_format_are_exclusive() -> None:
    tools = 'tools = [{ type = "function", function = { name = "f", parameters = ' + OTHER + " } }]"
    error = _error(f"{tools}\n{_format()}", 'schema_from_tool = "f"')
    assert error.key == "[output] schema_from_tool"


# -- a property named like one of the output's own columns -----------------------------------


@pytest.mark.parametrize("column", ["status", "response", "error", "id", "cost_usd"])
def test_a_property_named_like_an_output_column_is_refused_at_load(column: str) -> None:
    schema = f'{{ type = "object", properties = {{ {column} = {{ type = "string" }} }} }}'
    error = _error(output=f"schema = {schema}")  # no input exists: nothing is read
    assert error.key == "[output] schema"
    assert error.problem == (
        f"the property {column!r} is a column the output already has "
        f"({', '.join(OUTPUT_COLUMNS)}): rename the property."
    )
    assert "input" not in str(error)


def test_the_same_check_covers_a_response_formats_schema_and_a_tools() -> None:
    schema = '{ type = "object", properties = { status = { type = "string" } } }'
    error = _error(_format(schema))
    assert error.key == "[request] response_format"
    assert "is a column the output already has" in error.problem
    tools = (
        'tools = [{ type = "function", function = { name = "f", parameters = ' + schema + " } }]"
    )
    error = _error(tools, 'schema_from_tool = "f"')
    assert error.key == "[output] schema_from_tool"
    assert "is a column the output already has" in error.problem


def test_a_property_that_is_also_a_kept_column_says_so() -> None:
    error = _error(output=f'keep_columns = ["label"]\nschema = {OTHER}')
    assert error.key == "[output] schema"
    assert "also in [output] keep_columns" in error.problem


def test_the_output_columns_known_at_load_are_the_outputs() -> None:
    assert ("id", *RESULT_COLUMNS) == OUTPUT_COLUMNS


def test_a_jobspec_made_in_code_gets_the_same_message_when_scanned(tmp_path: Path) -> None:
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "in.parquet")
    job = _job(source=str(tmp_path / "job.toml"))
    schema = OutputSchema({"type": "object", "properties": {"status": {"type": "string"}}})
    job = dataclasses.replace(job, output=dataclasses.replace(job.output, schema=schema))
    with pytest.raises(JobFileError) as info:
        JobContext(job).scan()
    assert "'status' is a column the output already has (id, status, response" in str(info.value)
    assert "rename the property" in str(info.value)
