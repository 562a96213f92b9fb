"""OpenAI Batch files: scanning and planning batch input, exporting batch output."""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion
from pydantic import BaseModel, ConfigDict

from pipeline.errors import InputError, UsageError
from pipeline.io.openai_batch import (
    BATCH_COLUMNS,
    BatchPlanner,
    BatchScan,
    iter_batch_records,
    looks_like_batch_file,
    scan_batch_file,
)
from pipeline.io.openai_export import export_openai_batch
from pipeline.rows.templating import encode_body, request_key

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample" / "openai_batch.jsonl"
URL = "https://llm.example/v1/chat/completions"


def request(custom_id: str, content: str = "Hi", **extra: Any) -> dict[str, Any]:
    body = {"model": "m1", "messages": [{"role": "user", "content": content}]}
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": body,
        **extra,
    }


def write_lines(path: Path, lines: list[Any]) -> Path:
    path.write_text(
        "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines),
        encoding="utf-8",
    )
    return path


# ---------------------------------------------------------------------------------------------
# Input


def test_the_sample_file_scans() -> None:
    assert looks_like_batch_file(SAMPLE)
    assert scan_batch_file(SAMPLE) == BatchScan(
        path=SAMPLE,
        rows=2,
        endpoint="chat/completions",
        models=("meta-llama/Meta-Llama-3-8B-Instruct",),
    )
    assert scan_batch_file(SAMPLE, limit=1).rows == 1


def test_looks_like_batch_file(tmp_path: Path) -> None:
    plain = write_lines(tmp_path / "rows.jsonl", [{"text": "hello"}])
    gz = tmp_path / "batch.jsonl.gz"
    gz.write_bytes(gzip.compress(b"\n\n" + json.dumps(request("a")).encode() + b"\n"))
    wrong_suffix = write_lines(tmp_path / "batch.json", [request("a")])
    broken = write_lines(tmp_path / "broken.jsonl", ["{not json"])
    empty = write_lines(tmp_path / "empty.jsonl", [])
    assert looks_like_batch_file(gz)
    assert not looks_like_batch_file(plain)
    assert not looks_like_batch_file(wrong_suffix)
    assert not looks_like_batch_file(broken)
    assert not looks_like_batch_file(empty)
    assert not looks_like_batch_file(tmp_path / "missing.jsonl")


def test_records_hold_ids_and_canonical_bodies() -> None:
    batches = list(iter_batch_records(SAMPLE, limit=None, batch_rows=1))
    assert [b.num_rows for b in batches] == [1, 1]
    assert batches[0].schema.names == list(BATCH_COLUMNS)
    first = batches[0].to_pylist()[0]
    assert first["custom_id"] == "request-1"
    original = json.loads(SAMPLE.read_text().splitlines()[0])["body"]
    assert first["body"] == encode_body(original).decode()
    assert [b.num_rows for b in iter_batch_records(SAMPLE, limit=1, batch_rows=10)] == [1]


def plan_all(planner: BatchPlanner, path: Path = SAMPLE) -> list[Any]:
    rows = []
    start = 0
    for batch in iter_batch_records(path, limit=None, batch_rows=1):
        rows.extend(planner.plan(batch, start))
        start += batch.num_rows
    return rows


def test_planning_keys_are_stable_and_follow_the_body() -> None:
    planner = BatchPlanner(url=URL)
    first, second = plan_all(planner)
    assert plan_all(planner) == [first, second]
    assert (first.row, second.row) == (0, 1)
    original = json.loads(SAMPLE.read_text().splitlines()[0])["body"]
    assert first.body == encode_body(original)
    assert first.key == request_key(URL, encode_body(original), "request-1")
    assert first.failure is None
    assert planner.columns == ["custom_id", "body"]


def test_model_override_and_params() -> None:
    planner = BatchPlanner(
        url=URL,
        model="deepseek/deepseek-v4-flash",
        params={"max_completion_tokens": 5, "temperature": 0.2},
    )
    rows = plan_all(planner)
    bodies = [json.loads(row.body) for row in rows]
    assert {b["model"] for b in bodies} == {"deepseek/deepseek-v4-flash"}
    assert {b["max_completion_tokens"] for b in bodies} == {1000}  # the line's own value wins
    assert {b["temperature"] for b in bodies} == {0.2}
    plain = plan_all(BatchPlanner(url=URL))
    assert [r.key for r in rows] != [r.key for r in plain]
    assert rows[0].key == request_key(URL, rows[0].body, "request-1")


def test_fingerprint_changes_with_settings() -> None:
    base = BatchPlanner(url=URL)
    assert isinstance(base.fingerprint, bytes)
    assert base.fingerprint == BatchPlanner(url=URL).fingerprint
    assert base.fingerprint != BatchPlanner(url=URL, model="x").fingerprint
    assert base.fingerprint != BatchPlanner(url=URL, params={"max_tokens": 1}).fingerprint
    assert base.fingerprint != BatchPlanner(url=URL + "/").fingerprint


def test_a_body_without_model_fails_its_row_unless_overridden(tmp_path: Path) -> None:
    line = request("a")
    del line["body"]["model"]
    path = write_lines(tmp_path / "batch.jsonl", [line])
    [row] = plan_all(BatchPlanner(url=URL), path)
    assert row.body is None
    assert row.failure is not None
    assert "model" in row.failure
    [row] = plan_all(BatchPlanner(url=URL, model="m2"), path)
    assert row.failure is None
    assert json.loads(row.body)["model"] == "m2"


def test_completions_endpoint_is_accepted(tmp_path: Path) -> None:
    lines = [
        {
            "custom_id": "a",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": "m", "prompt": "x"},
        },
        {
            "custom_id": "b",
            "method": "POST",
            "url": "/completions",
            "body": {"model": "n", "prompt": "y"},
        },
    ]
    scan = scan_batch_file(write_lines(tmp_path / "batch.jsonl", lines))
    assert (scan.endpoint, scan.rows, scan.models) == ("completions", 2, ("m", "n"))


def test_many_unique_ids_pass(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "batch.jsonl", [request(f"r{i}") for i in range(5000)])
    assert scan_batch_file(path).rows == 5000


def with_body(**changes: Any) -> dict[str, Any]:
    line = request("x")
    line["body"].update(changes)
    return line


ERROR_CASES: list[tuple[str, list[Any], str, str]] = [
    ("not json", [request("a"), "{oops"], "line 2", "is not valid JSON"),
    ("not an object", [request("a"), [1, 2]], "line 2", "is a JSON list, not an object"),
    (
        "missing custom_id",
        [{"method": "POST", "url": "/v1/chat/completions", "body": {}}],
        "line 1",
        "field `custom_id` is missing",
    ),
    ("empty custom_id", [request("")], "line 1", 'field `custom_id` is ""'),
    (
        "numeric custom_id",
        [request("a"), {**request("b"), "custom_id": 7}],
        "line 2",
        "field `custom_id` is 7",
    ),
    (
        "duplicate custom_id",
        [request("a"), request("b"), request("a"), request("b")],
        "line 3",
        "field `custom_id` repeats the id of line 1",
    ),
    ("method", [{**request("a"), "method": "GET"}], "line 1", 'field `method` is "GET"'),
    (
        "url",
        [{**request("a"), "url": "/v1/embeddings"}],
        "line 1",
        'field `url` is "/v1/embeddings"',
    ),
    (
        "mixed endpoints",
        [request("a"), {**request("b"), "url": "/v1/completions"}],
        "line 2",
        "field `url` is /v1/completions but line 1 uses /v1/chat/completions",
    ),
    ("body not object", [{**request("a"), "body": "text"}], "line 1", "field `body` is a JSON str"),
    (
        "body missing",
        [{k: v for k, v in request("a").items() if k != "body"}],
        "line 1",
        "field `body` is missing",
    ),
    ("stream", [with_body(stream=True)], "line 1", "field `body.stream` is true"),
]


@pytest.mark.parametrize(
    ("lines", "where", "what"),
    [case[1:] for case in ERROR_CASES],
    ids=[case[0] for case in ERROR_CASES],
)
def test_scan_errors_name_the_line_and_field(
    tmp_path: Path, lines: list[Any], where: str, what: str
) -> None:
    path = write_lines(tmp_path / "batch.jsonl", lines)
    with pytest.raises(InputError) as caught:
        scan_batch_file(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: {where}: ")
    assert what in message
    assert "fix" in message


def test_blank_lines_keep_line_numbers(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "batch.jsonl", ["", request("a"), "  ", {**request("b"), "method": "PUT"}]
    )
    with pytest.raises(InputError, match="line 4: field `method`"):
        scan_batch_file(path)


def test_errors_beyond_the_limit_are_not_read(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "batch.jsonl", [request("a"), request("a")])
    assert scan_batch_file(path, limit=1).rows == 1
    with pytest.raises(InputError, match="line 2"):
        scan_batch_file(path)


def test_an_empty_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="holds no request"):
        scan_batch_file(write_lines(tmp_path / "batch.jsonl", ["", "  "]))


def test_reading_reports_bad_lines_too(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "batch.jsonl", [request("a"), with_body(stream=True)])
    with pytest.raises(InputError, match=r"line 2: field `body\.stream`"):
        list(iter_batch_records(path, limit=None, batch_rows=10))


# ---------------------------------------------------------------------------------------------
# Export


class BatchResponse(BaseModel):
    """``response`` of a batch output line, as OpenAI documents it."""

    model_config = ConfigDict(extra="forbid")
    status_code: int
    request_id: str
    body: dict[str, Any]


class BatchError(BaseModel):
    model_config = ConfigDict(extra="forbid")
    code: str
    message: str


class BatchOutputLine(BaseModel):
    """One line of an OpenAI batch output (or error) file."""

    model_config = ConfigDict(extra="forbid")
    id: str
    custom_id: str
    response: BatchResponse | None
    error: BatchError | None


TOOL_CALL = pa.struct([("id", pa.string()), ("name", pa.string()), ("arguments", pa.string())])


def output_table(*, with_new_columns: bool = True) -> pa.Table:
    columns: dict[str, pa.Array] = {
        "id": pa.array(["request-1", "request-2", "request-3", "request-4"]),
        "text": pa.array(["a", "b", "c", "d"]),
        "status": pa.array(["ok", "ok", "failed", "ok"]),
        "response": pa.array(["Hello!", None, None, "Cut"]),
        "reasoning": pa.array(["Greet back.", None, None, None]),
        "finish_reason": pa.array(["stop", "tool_calls", None, "insufficient_system_resource"]),
        "prompt_tokens": pa.array([25, 30, None, 9], type=pa.int64()),
        "completion_tokens": pa.array([6, 12, None, 3], type=pa.int64()),
        "cached_tokens": pa.array([16, 0, None, 0], type=pa.int64()),
        "reasoning_tokens": pa.array([3, 0, None, 0], type=pa.int64()),
        "cost_usd": pa.array([0.1, 0.2, None, 0.1]),
        "error": pa.array([None, None, "HTTP 400: context length exceeded", None]),
        "model": pa.array(["deepseek-v4-flash", "deepseek-v4-flash", None, "deepseek-v4-flash"]),
    }
    if with_new_columns:
        columns["response_id"] = pa.array(["chatcmpl-abc", None, None, None])
        columns["tool_calls"] = pa.array(
            [
                None,
                [
                    {"id": "call_1", "name": "lookup", "arguments": '{"q":"x"}'},
                    {"id": None, "name": "f", "arguments": None},
                ],
                None,
                [],
            ],
            type=pa.list_(TOOL_CALL),
        )
    return pa.table(columns)


def export(tmp_path: Path, table: pa.Table, endpoint: str) -> list[dict[str, Any]]:
    source = tmp_path / "out.parquet"
    pq.write_table(table, source, row_group_size=2)
    dest = tmp_path / "results" / "batch_output.jsonl"
    assert export_openai_batch(source, dest, endpoint=endpoint) == table.num_rows
    assert [p.name for p in dest.parent.iterdir()] == ["batch_output.jsonl"]  # no temp file left
    return [json.loads(line) for line in dest.read_text(encoding="utf-8").splitlines()]


def test_chat_export_validates_with_the_openai_types(tmp_path: Path) -> None:
    lines = export(tmp_path, output_table(), "chat/completions")
    assert [line["custom_id"] for line in lines] == [
        "request-1",
        "request-2",
        "request-3",
        "request-4",
    ]
    parsed = [BatchOutputLine.model_validate(line) for line in lines]
    ok = [p for p in parsed if p.error is None]
    assert len(ok) == 3
    bodies = [ChatCompletion.model_validate(p.response.body) for p in ok if p.response is not None]

    first = bodies[0]
    assert parsed[0].response is not None
    assert parsed[0].response.status_code == 200
    assert parsed[0].response.request_id == "chatcmpl-abc"
    assert first.id == "chatcmpl-abc"
    assert first.object == "chat.completion"
    assert first.model == "deepseek-v4-flash"
    assert first.choices[0].message.content == "Hello!"
    assert first.choices[0].message.role == "assistant"
    assert (
        lines[0]["response"]["body"]["choices"][0]["message"]["reasoning_content"] == "Greet back."
    )
    assert first.choices[0].finish_reason == "stop"
    assert first.usage is not None
    assert (first.usage.prompt_tokens, first.usage.completion_tokens, first.usage.total_tokens) == (
        25,
        6,
        31,
    )
    assert first.usage.prompt_tokens_details is not None
    assert first.usage.prompt_tokens_details.cached_tokens == 16
    assert first.usage.completion_tokens_details is not None
    assert first.usage.completion_tokens_details.reasoning_tokens == 3

    tools = bodies[1]
    assert tools.choices[0].finish_reason == "tool_calls"
    assert tools.choices[0].message.content is None
    calls = tools.choices[0].message.tool_calls
    assert calls is not None
    assert calls[0].model_dump() == {
        "id": "call_1",
        "type": "function",
        "function": {"name": "lookup", "arguments": '{"q":"x"}'},
    }
    assert calls[1].id.startswith("call_")
    assert "reasoning_content" not in lines[1]["response"]["body"]["choices"][0]["message"]

    assert bodies[2].choices[0].finish_reason == "length"  # DeepSeek's resource cut
    assert "tool_calls" not in lines[3]["response"]["body"]["choices"][0]["message"]

    failed = parsed[2]
    assert failed.response is None
    assert failed.error == BatchError(
        code="request_failed", message="HTTP 400: context length exceeded"
    )


def test_completions_export_validates(tmp_path: Path) -> None:
    lines = export(tmp_path, output_table(with_new_columns=False), "completions")
    for line in lines:
        BatchOutputLine.model_validate(line)
    body = Completion.model_validate(lines[0]["response"]["body"])
    assert body.object == "text_completion"
    assert body.choices[0].text == "Hello!"
    assert body.id.startswith("cmpl-")
    assert lines[0]["response"]["request_id"].startswith("req_")
    second = Completion.model_validate(lines[1]["response"]["body"])
    assert second.choices[0].text == ""
    assert second.choices[0].finish_reason == "stop"  # "tool_calls" is not a completions reason


def test_export_is_stable_and_replaces_the_destination(tmp_path: Path) -> None:
    first = export(tmp_path, output_table(), "chat/completions")
    second = export(tmp_path, output_table(), "/v1/chat/completions")
    assert first == second
    ids = [line["id"] for line in first]
    assert all(i.startswith("batch_req_") for i in ids)
    assert len(set(ids)) == len(ids)


def test_export_of_integer_ids(tmp_path: Path) -> None:
    table = output_table().set_column(0, "id", pa.array([0, 1, 2, 3], type=pa.int64()))
    lines = export(tmp_path, table, "chat/completions")
    assert [line["custom_id"] for line in lines] == ["0", "1", "2", "3"]


def test_export_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="unknown endpoint"):
        export_openai_batch(tmp_path / "x.parquet", tmp_path / "y.jsonl", endpoint="embeddings")
    not_parquet = tmp_path / "x.parquet"
    not_parquet.write_text("nope")
    with pytest.raises(InputError, match="not a readable Parquet file"):
        export_openai_batch(not_parquet, tmp_path / "y.jsonl", endpoint="chat/completions")
    no_ids = tmp_path / "z.parquet"
    pq.write_table(pa.table({"a": [1]}), no_ids)
    with pytest.raises(InputError, match="`id` and `status`"):
        export_openai_batch(no_ids, tmp_path / "y.jsonl", endpoint="chat/completions")
    assert not (tmp_path / "y.jsonl").exists()


def test_a_batch_file_is_read_once_to_make_its_job_and_prepare_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.engine.context import JobContext
    from pipeline.io import openai_batch as batchfile
    from pipeline.io.openai_batch import batch_file_job

    path = write_lines(tmp_path / "batch.jsonl", [request(f"r{i}") for i in range(5)])
    passes: list[int | None] = []
    original = batchfile._scan_batch_file

    def counting(path: Path, limit: int | None) -> BatchScan:
        passes.append(limit)
        return original(path, limit)

    monkeypatch.setattr(batchfile, "_scan_batch_file", counting)
    job = batch_file_job(path, model=None, max_in_flight=None, api_key_env=None, limit=3)
    job = replace(job, input=replace(job.input, limit=3))
    assert JobContext(job).scan().rows == 3
    assert passes == [3]
    # A changed file is read again.
    write_lines(path, [request(f"r{i}") for i in range(7)])
    assert scan_batch_file(path).rows == 7
    assert passes == [3, None]


def test_an_http_error_is_exported_as_openai_writes_it(tmp_path: Path) -> None:
    table = output_table().append_column(
        "http_status", pa.array([200, 200, 400, 200], type=pa.int64())
    )
    timeout = output_table().append_column(
        "http_status", pa.array([200, 200, None, 200], type=pa.int64())
    )
    failed = BatchOutputLine.model_validate(export(tmp_path, table, "chat/completions")[2])
    assert failed.error is None
    assert failed.response is not None
    assert failed.response.status_code == 400
    assert failed.response.body == {"error": {"message": "HTTP 400: context length exceeded"}}
    no_answer = BatchOutputLine.model_validate(export(tmp_path, timeout, "chat/completions")[2])
    assert no_answer.response is None
    assert no_answer.error is not None
    assert no_answer.error.code == "request_failed"


# ---------------------------------------------------------------------------------------------
# Issue 12: a byte-order mark; the output's default place


@pytest.mark.parametrize("gz", [False, True])
def test_a_batch_file_starting_with_a_byte_order_mark_is_read(tmp_path: Path, gz: bool) -> None:
    def lines(prefix: str) -> str:
        return "\ufeff" + "".join(json.dumps(request(f"{prefix}{i}")) + "\n" for i in range(3))

    text = lines("r")
    path = tmp_path / ("batch.jsonl.gz" if gz else "batch.jsonl")
    path.write_bytes(gzip.compress(text.encode()) if gz else text.encode())
    assert looks_like_batch_file(path)
    assert scan_batch_file(path).rows == 3
    records = list(iter_batch_records(path, limit=None, batch_rows=10))
    assert records[0].column("custom_id").to_pylist() == ["r0", "r1", "r2"]
    # Only at the start: one inside the file is a line to fix.
    both = (text + lines("s")).encode()
    path.write_bytes(gzip.compress(both) if gz else both)
    with pytest.raises(InputError, match=r"line 4: is not valid JSON \(it starts with a byte-"):
        scan_batch_file(path)


def test_a_batch_files_output_goes_under_out_in_the_current_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, local_server: Callable[..., str]
) -> None:
    from pipeline import run_job_report
    from pipeline.io.openai_batch import batch_file_job, job_models
    from pipeline.job.spec import Overrides, apply_overrides

    data = tmp_path / "data"
    data.mkdir()
    path = write_lines(data / "requests.jsonl", [request("a"), request("b")])
    here = tmp_path / "work"
    here.mkdir()
    monkeypatch.chdir(here)
    job = batch_file_job(path, model=None, max_in_flight=None, api_key_env=None)
    assert Path(job.output.path) == Path("out", "requests.output.parquet")
    base_url = local_server(latency_ms=1, served_models=job_models(job))
    report = run_job_report(apply_overrides(job, Overrides(base_url=base_url)))
    assert report.final.ok == 2
    assert pq.read_table(here / "out" / "requests.output.parquet").column("id").to_pylist() == [
        "a",
        "b",
    ]
    assert sorted(p.name for p in data.iterdir()) == ["requests.jsonl"]  # nothing beside it


def test_job_models_name_what_a_local_server_must_serve(tmp_path: Path) -> None:
    from pipeline.io.openai_batch import batch_file_job, job_models
    from pipeline.job.load import parse_job

    second = request("b")
    second["body"]["model"] = "m2"
    path = write_lines(tmp_path / "batch.jsonl", [request("a"), second, request("c")])
    kept = batch_file_job(path, model=None, max_in_flight=None, api_key_env=None)
    assert job_models(kept) == ("deepseek/deepseek-v4-flash", "m1", "m2")
    replaced = batch_file_job(path, model="mine", max_in_flight=None, api_key_env=None)
    assert job_models(replaced) == ("mine",)
    one = batch_file_job(SAMPLE, model=None, max_in_flight=None, api_key_env=None)
    assert job_models(one) == ("meta-llama/Meta-Llama-3-8B-Instruct",)
    text = 'name = "j"\n[input]\npath = "x.jsonl"\n[request]\nmodel = "my-model"\nprompt = "{t}"\n'
    assert job_models(parse_job(text + '[output]\npath = "o.parquet"\n', "job.toml")) == (
        "my-model",
    )
