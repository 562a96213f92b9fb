"""The built-in server's Batch API with the `openai` package as the client, and the pure
parts of batch mode: splitting into files, batch lines into results, batch prices."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI

from pipeline.batch.plan import FileSplitter, LineContext, batch_line, line_result
from pipeline.errors import JobFileError
from pipeline.job.load import parse_job
from pipeline.money.batch import batch_discount, batch_price
from pipeline.money.pricing import Price, PriceOverride
from pipeline.rows.plan import PlannedRow
from pipeline.rows.verdict import AnswerRules
from pipeline.server.process import server_stats


def request_line(number: int, body: dict[str, Any] | None = None) -> str:
    body = body or {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": f"hello {number}"}],
        "max_tokens": 16,
    }
    return json.dumps(
        {"custom_id": f"c{number}", "method": "POST", "url": "/v1/chat/completions", "body": body}
    )


def wait_until_ended(client: OpenAI, batch_id: str) -> Any:
    deadline = time.monotonic() + 20
    batch = client.batches.retrieve(batch_id)
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
        batch = client.batches.retrieve(batch_id)
    return batch


def test_openai_sdk_batch_calls_against_the_built_in_server(
    local_server: Callable[..., str],
) -> None:
    url = local_server(batch_delay_s=0.05, batch_error_rate=0.25, batch_max_requests=20)
    client = OpenAI(base_url=url, api_key="unused")
    bad_body = {"model": "gpt-4o-mini", "max_tokens": 5}  # no messages
    lines = [request_line(i) for i in range(12)] + [request_line(13, bad_body)]
    uploaded = client.files.create(
        file=("in.jsonl", io.BytesIO("\n".join(lines).encode())), purpose="batch"
    )
    assert (uploaded.purpose, uploaded.filename) == ("batch", "in.jsonl")
    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"job": "sdk"},
    )
    assert batch.status == "validating"
    batch = wait_until_ended(client, batch.id)
    assert batch.status == "completed"
    assert batch.metadata == {"job": "sdk"}
    counts = batch.request_counts
    assert counts is not None
    assert counts.total == 13
    assert counts.completed + counts.failed == 13
    output = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
    errors = [json.loads(x) for x in client.files.content(batch.error_file_id).text.splitlines()]
    assert len(output) == counts.completed
    assert len(errors) == counts.failed
    assert {line["response"]["status_code"] for line in output} == {200}
    statuses = {line["custom_id"]: line["response"]["status_code"] for line in errors}
    assert statuses["c13"] == 400  # the invalid body
    assert set(statuses.values()) == {400, 500}
    assert output[0]["response"]["body"]["object"] == "chat.completion"
    assert [b.id for b in client.batches.list(limit=5)] == [batch.id]
    assert uploaded.id in [f.id for f in client.files.list()]
    # Over the per-file limit: the batch fails at validation, as OpenAI's does.
    big = client.files.create(
        file=("big.jsonl", io.BytesIO("\n".join(request_line(i) for i in range(21)).encode())),
        purpose="batch",
    )
    failed = wait_until_ended(
        client,
        client.batches.create(
            input_file_id=big.id, endpoint="/v1/chat/completions", completion_window="24h"
        ).id,
    )
    assert failed.status == "failed"
    assert failed.errors is not None
    assert failed.errors.data[0].code == "too_many_requests"
    # Cancelled before it runs.
    again = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert client.batches.cancel(again.id).status == "cancelling"
    assert wait_until_ended(client, again.id).status == "cancelled"
    assert client.files.delete(big.id).deleted
    stats = server_stats(url)
    assert (stats["files_uploaded"], stats["batches_created"], stats["batches_cancelled"]) == (
        2,
        3,
        1,
    )


def planned(row: int, size: int) -> PlannedRow:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * size}]})
    return PlannedRow(row, f"k{row}", body.encode(), None)


def test_files_are_split_by_requests_and_by_bytes() -> None:
    url = "/v1/chat/completions"
    by_count = FileSplitter(max_requests=3, max_bytes=10**6)
    full = [by_count.add(p, batch_line(p, url)) for p in (planned(i, 5) for i in range(7))]
    assert [len(f) for f in full if f is not None] == [3, 3]
    assert len(by_count.take()) == 1
    line = batch_line(planned(0, 100), url)
    by_size = FileSplitter(max_requests=1000, max_bytes=len(line) * 2 + 1)
    full = [by_size.add(p, batch_line(p, url)) for p in (planned(i, 100) for i in range(5))]
    assert [len(f) for f in full if f is not None] == [2, 2]
    assert json.loads(line) == {
        "custom_id": "0:k0",
        "method": "POST",
        "url": url,
        "body": json.loads(planned(0, 100).body or b""),
    }


def test_batch_lines_become_results_like_online_answers() -> None:
    price = Price(input=Decimal("0.075"), cached_input=Decimal("0.075"), output=Decimal("0.3"))
    context = LineContext(rules=AnswerRules(max_tokens=8), price=price, model="m", run=2)
    answer = {
        "id": "chatcmpl-1",
        "model": "m",
        "choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1000, "completion_tokens": 100},
    }
    ok = line_result(
        {"custom_id": "4:k", "response": {"status_code": 200, "body": answer}},
        4,
        "k",
        b"{}",
        context,
    )
    assert ok is not None
    assert (ok.status, ok.response, ok.cost_usd, ok.run) == ("ok", "hi", Decimal("0.000105"), 2)
    cut = dict(answer, choices=[{"message": {"content": "h"}, "finish_reason": "length"}])
    truncated = line_result({"response": {"status_code": 200, "body": cut}}, 4, "k", b"{}", context)
    assert truncated is not None
    assert truncated.status == "failed"
    assert (truncated.error or "").startswith("truncated")
    error = {"error": {"message": "bad", "type": "server_error"}}
    failed = line_result({"response": {"status_code": 500, "body": error}}, 4, "k", b"", context)
    assert failed is not None
    assert (failed.status, failed.error, failed.http_status) == ("failed", "HTTP 500: bad", 500)
    expired = {"response": None, "error": {"code": "batch_expired", "message": "late"}}
    assert line_result(expired, 4, "k", b"", context) is None


def test_batch_prices() -> None:
    assert batch_discount("https://api.openai.com/v1", None) == Decimal("0.5")
    assert batch_discount("http://127.0.0.1:8000/v1", None) == Decimal("0.5")
    assert batch_discount("https://llm.wavespeed.ai/v1", None) is None
    mine = PriceOverride(batch_discount=Decimal("0.4"))
    assert batch_discount("https://llm.wavespeed.ai/v1", mine) == Decimal("0.4")
    price = Price(input=Decimal("0.2"), cached_input=Decimal("0.1"), output=Decimal("0.8"))
    assert batch_price(price, Decimal("0.5")) == Price(
        input=Decimal("0.1"), cached_input=Decimal("0.05"), output=Decimal("0.4")
    )
    assert batch_price(price, None) == price  # unknown discount: the online price, an upper bound


def test_job_file_mode_and_batch_table(tmp_path: Path) -> None:
    text = """
name = "x"
[input]
path = "rows.jsonl"
[request]
prompt = "{a}"
mode = "{mode}"
[output]
path = "o.parquet"
[batch]
max_requests_per_file = 10
[pricing]
batch_discount = 0.5
"""
    job = parse_job(text.replace("{mode}", "batch"), tmp_path / "job.toml")
    assert (job.request.mode, job.batch.max_requests_per_file) == ("batch", 10)
    assert job.pricing is not None
    assert job.pricing.batch_discount == Decimal("0.5")
    assert "mode" not in job.request.params
    with pytest.raises(JobFileError, match=r"\[request\] mode: 'bach' is not allowed"):
        parse_job(text.replace("{mode}", "bach"), tmp_path / "job.toml")
