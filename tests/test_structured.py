"""Structured output, re-asks, truncation, tool calls and FIM through the real Runner, with a
scripted provider (the built-in server's versions of these are in test_labeling_e2e.py)."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import httpx
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.engine.report import RunReport
from pipeline.engine.runner import Runner, RunOptions
from pipeline.errors import JobFileError
from pipeline.job.load import parse_job
from pipeline.job.spec import JobSpec

SCHEMA = """
[output.schema]
type = "object"
required = ["label", "confidence", "tags"]
[output.schema.properties.label]
type = "string"
enum = ["positive", "negative", "neutral"]
[output.schema.properties.confidence]
type = "number"
minimum = 0
maximum = 1
[output.schema.properties.tags]
type = "array"
items = { type = "string" }
"""

TOOLS = """
[[request.tools]]
type = "function"
[request.tools.function]
name = "record_label"
[request.tools.function.parameters]
type = "object"
required = ["label"]
properties.label = { type = "string", enum = ["positive", "negative"] }
properties.score = { type = "integer" }
"""


def _job(tmp_path: Path, *, request: str = "", output: str = SCHEMA, rows: int = 12) -> JobSpec:
    pq.write_table(
        pa.table({"rid": [f"r{i}" for i in range(rows)], "text": [f"t{i}" for i in range(rows)]}),
        tmp_path / "in.parquet",
    )
    return parse_job(
        f"""
name = "labels"
[input]
path = "{tmp_path / "in.parquet"}"
id_column = "rid"
[request]
base_url = "http://127.0.0.1:9/v1"
model = "deepseek-v4-flash"
system = "You label things."
prompt = "Label {{text}} as JSON."
max_tokens = 64
{request}
[limits]
max_in_flight = 3
max_retry_wait_s = 0.01
[output]
path = "{tmp_path / "out.parquet"}"
max_reasks = 2
{output}
""",
        tmp_path / "labels.toml",
    )


def _answer(content: str | None, *, finish: str = "stop", **message: Any) -> httpx.Response:
    return httpx.Response(
        200,
        json={
            "id": "chatcmpl-x",
            "choices": [{"message": {"content": content, **message}, "finish_reason": finish}],
            "usage": {"prompt_tokens": 20, "completion_tokens": 5},
        },
    )


def _run(job: JobSpec, handler: Any) -> RunReport:
    runner = Runner(
        job,
        api_key=None,
        options=RunOptions(batch_rows=5),
        transport=httpx.MockTransport(handler),
        rng=random.Random(5),
    )
    return anyio.run(runner.run, runner.prepare())


def test_answers_become_typed_columns_and_bad_ones_are_asked_again(tmp_path: Path) -> None:
    bodies: list[dict[str, Any]] = []
    good = {"label": "positive", "confidence": 0.75, "tags": ["a", "b"]}

    def provider(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        bodies.append(body)
        row = int(body["messages"][1]["content"].split()[1][1:])
        asks = (len(body["messages"]) - 2) // 2
        if row % 3 == 0 and asks == 0:
            return _answer('{"label": "great", "confidence": 0.5, "tags": []}')
        if row == 4:
            return _answer("Sure! " + json.dumps(good))  # prose around JSON, every time
        return _answer("```json\n" + json.dumps({**good, "confidence": 1}) + "\n```")

    job = _job(tmp_path)
    report = _run(job, provider)
    first = bodies[0]
    assert first["response_format"] == {"type": "json_object"}
    assert "JSON Schema" in first["messages"][0]["content"]
    assert first["messages"][0]["content"].startswith("You label things.")

    out = pl.read_parquet(job.output.path)
    assert out.schema["label"] == pl.Categorical
    assert out.schema["confidence"] == pl.Float64
    assert out.schema["tags"] == pl.List(pl.String)
    ok = out.filter(pl.col("status") == "ok")
    assert ok.height == 11
    assert set(ok["label"].cast(pl.String)) == {"positive"}
    assert set(ok["confidence"]) == {1.0}
    # rows 0, 3, 6, 9 were asked once more; row 4 twice and then failed
    reasks = dict(zip(out["id"], out["reasks"], strict=True))
    assert [reasks[f"r{i}"] for i in (0, 3, 6, 9)] == [1, 1, 1, 1]
    assert reasks["r4"] == 2
    assert report.final.reasks == 6
    failed = out.filter(pl.col("id") == "r4").row(0, named=True)
    assert failed["status"] == "failed"
    assert failed["error"].startswith("invalid answer after 2 re-ask(s)")
    assert failed["response"].startswith("Sure!")  # the raw text is kept
    assert failed["label"] is None
    # re-asks are billed: 12 first asks + 6 re-asks, 20 prompt tokens each
    assert out["prompt_tokens"].sum() == 20 * 18
    assert out.filter(pl.col("id") == "r0")["attempts"].item() == 2
    reask = next(b for b in bodies if len(b["messages"]) == 4)
    assert reask["messages"][2]["role"] == "assistant"
    assert "not one of" in reask["messages"][3]["content"]


def test_answers_cut_off_by_max_tokens_are_reported_as_truncated(tmp_path: Path) -> None:
    job = _job(tmp_path, output="", rows=4)
    report = _run(job, lambda request: _answer("half an ans", finish="length"))
    out = pl.read_parquet(job.output.path)
    assert set(out["status"]) == {"failed"}
    assert all(error.startswith("truncated: ") for error in out["error"])
    assert set(out["response"]) == {"half an ans"}
    assert report.final.truncated == 4


def test_a_function_call_can_be_the_structured_answer(tmp_path: Path) -> None:
    seen: list[dict[str, Any]] = []

    def provider(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append(body)
        arguments = '{"label": "negative", "score": 3}'
        if len(body["messages"]) == 2 and body["messages"][1]["content"].endswith("t1 as JSON."):
            arguments = '{"label": "meh"}'
        call = {
            "id": "call_1",
            "type": "function",
            "function": {"name": "record_label", "arguments": arguments},
        }
        return _answer(None, finish="tool_calls", tool_calls=[call])

    output = 'schema_from_tool = "record_label"'
    job = _job(tmp_path, request=TOOLS, output=output, rows=3)
    _run(job, provider)
    assert seen[0]["tool_choice"] == {"type": "function", "function": {"name": "record_label"}}
    assert "response_format" not in seen[0]
    out = pl.read_parquet(job.output.path)
    assert set(out["status"]) == {"ok"}
    assert out.schema["score"] == pl.Int64
    assert set(out["label"].cast(pl.String)) == {"negative"}
    calls = out["tool_calls"].to_list()
    assert calls[0] == [
        {"id": "call_1", "name": "record_label", "arguments": '{"label": "negative", "score": 3}'}
    ]
    reask = next(b for b in seen if len(b["messages"]) > 2)
    assert reask["messages"][-1]["role"] == "tool"
    assert reask["messages"][-1]["tool_call_id"] == "call_1"


def test_fim_jobs_send_prompt_and_suffix_to_the_completions_endpoint(tmp_path: Path) -> None:
    paths: Counter[str] = Counter()
    bodies: list[dict[str, Any]] = []

    def provider(request: httpx.Request) -> httpx.Response:
        paths[request.url.path] += 1
        bodies.append(json.loads(request.content))
        return httpx.Response(
            200,
            json={
                "id": "cmpl-1",
                "object": "text_completion",
                "choices": [{"index": 0, "text": "    return a + b", "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 9, "completion_tokens": 4},
            },
        )

    pq.write_table(
        pa.table({"head": ["def add(a, b):\n"], "tail": ["\n\nprint(add(1, 2))"]}),
        tmp_path / "code.parquet",
    )
    job = parse_job(
        f"""
name = "fim"
[input]
path = "{tmp_path / "code.parquet"}"
[request]
base_url = "http://127.0.0.1:9/beta"
endpoint = "completions"
model = "deepseek-v4-flash"
prompt = "{{head}}"
suffix = "{{tail}}"
max_tokens = 32
[output]
path = "{tmp_path / "fim.parquet"}"
""",
        tmp_path / "fim.toml",
    )
    _run(job, provider)
    assert paths == Counter({"/beta/completions": 1})
    assert bodies[0]["prompt"] == "def add(a, b):\n"
    assert bodies[0]["suffix"] == "\n\nprint(add(1, 2))"
    assert "messages" not in bodies[0]
    out = pl.read_parquet(job.output.path)
    assert out["response"].to_list() == ["    return a + b"]


@pytest.mark.parametrize(
    ("request_keys", "output", "key"),
    [
        ('endpoint = "completions"\nsuffix = "x"', "", "[request] system"),
        ('suffix = "{text}"', "", "[request] suffix"),
        ('thinking = "disabled"\nreasoning_effort = "max"', "", "[request] reasoning_effort"),
        ("", 'schema = "missing.json"', "[output] schema"),
        ("", 'schema_from_tool = "f"', "[output] schema_from_tool"),
        (
            "",
            '[output.schema]\ntype = "object"\nproperties = { status = { type = "string" } }',
            "[output] schema",
        ),
    ],
)
def test_mistakes_in_the_new_keys_name_the_key(
    tmp_path: Path, request_keys: str, output: str, key: str
) -> None:
    def load_and_prepare() -> None:
        job = _job(tmp_path, request=request_keys, output=output)
        Runner(job, api_key=None).prepare()

    with pytest.raises(JobFileError) as caught:
        load_and_prepare()
    assert key in str(caught.value)


def test_thinking_keys_reach_the_body_the_way_deepseek_expects(tmp_path: Path) -> None:
    job = _job(tmp_path, request='thinking = "enabled"\nreasoning_effort = "max"', output="")
    assert job.request.params["thinking"] == {"type": "enabled"}
    assert job.request.params["reasoning_effort"] == "max"
    runner = Runner(job, api_key=None)
    assert any("thinking is on and max_tokens is 64" in w for w in runner.warnings())
    off = _job(tmp_path, request='thinking = "disabled"', output="")
    assert Runner(off, api_key=None).warnings() == []


def test_order_prefix_sends_rows_that_share_a_prefix_together(tmp_path: Path) -> None:
    """Rows alternate between two long shared prefixes; with order = "prefix" each prefix's
    rows go out one after another within each input batch (2,048 rows by default)."""
    heads = ["A" * 300, "B" * 300]
    pq.write_table(
        pa.table({"text": [f"{heads[i % 2]} item {i}" for i in range(10)]}),
        tmp_path / "in.parquet",
    )
    sent: list[str] = []

    def provider(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content)["messages"][-1]["content"][0])
        return _answer("ok")

    def run_with(order: str) -> list[str]:
        sent.clear()
        job = parse_job(
            f"""
name = "order-{order}"
[input]
path = "{tmp_path / "in.parquet"}"
[request]
base_url = "http://127.0.0.1:9/v1"
model = "deepseek-v4-flash"
prompt = "{{text}}"
order = "{order}"
[limits]
max_in_flight = 1
[output]
path = "{tmp_path / order}.parquet"
""",
            tmp_path / "order.toml",
        )
        _run(job, provider)
        out = pl.read_parquet(tmp_path / f"{order}.parquet")
        assert out["id"].to_list() == list(range(10))  # the output keeps input order
        return list(sent)

    assert run_with("input") == ["A", "B"] * 5
    # _run reads batches of 5 rows: A B A B A | B A B A B, each sorted by its prompts
    assert run_with("prefix") == ["A", "A", "A", "B", "B", "A", "A", "B", "B", "B"]


@pytest.mark.parametrize("strict", [True, False])
def test_a_json_schema_response_format_gives_typed_columns_against_the_built_in_server(
    tmp_path: Path, local_server: Any, strict: bool
) -> None:
    """OpenAI's convention alone, no [output] schema: the answers are checked and typed. A
    strict schema is enforced by the provider (the built-in server never breaks it); without
    strict, answers that break it are asked again."""
    from pipeline.server.process import server_stats

    base_url = local_server(latency_ms=1, invalid_json_rate=0.3)
    rows = 40
    pq.write_table(pa.table({"text": [f"t{i}" for i in range(rows)]}), tmp_path / "in.parquet")
    job = parse_job(
        f"""
name = "rf"
[input]
path = "in.parquet"
[request]
base_url = "{base_url}"
model = "deepseek-v4-flash"
prompt = "Label {{text}}."
max_tokens = 200
thinking = "disabled"
[request.response_format]
type = "json_schema"
[request.response_format.json_schema]
name = "label"
strict = {str(strict).lower()}
[request.response_format.json_schema.schema]
type = "object"
required = ["label", "confidence"]
additionalProperties = false
properties.label = {{ type = "string", enum = ["positive", "negative", "neutral"] }}
properties.confidence = {{ type = "number", minimum = 0, maximum = 1 }}
[output]
path = "out/labels.parquet"
max_reasks = 3
""",
        tmp_path / "job.toml",
    )
    assert job.output.path == str(tmp_path / "out/labels.parquet")  # beside the job file
    runner = Runner(job, api_key=None)
    report = anyio.run(runner.run, runner.prepare())
    out = pl.read_parquet(job.output.path)
    assert out.schema["label"] == pl.Categorical
    assert out.schema["confidence"] == pl.Float64
    ok = out.filter(pl.col("status") == "ok")
    assert ok["label"].null_count() == 0
    assert ok["confidence"].is_between(0, 1).all()
    stats = server_stats(base_url)
    if strict:
        assert ok.height == rows
        assert report.final.reasks == 0
        assert stats["requests_total"] == rows
    else:
        assert report.final.reasks > 0  # 30 % of answers break the schema: asked again
        assert stats["requests_total"] == rows + report.final.reasks
