"""The runner's orchestration, with a scripted transport standing in for the provider."""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import anyio
import httpx
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.engine.context import JobContext
from pipeline.engine.runner import Runner, RunOptions
from pipeline.errors import AuthError, JobFileError, ProviderError
from pipeline.job.load import parse_job
from pipeline.job.spec import JobSpec
from pipeline.rows.plan import Planner
from pipeline.state.seals import SealBook
from pipeline.testing import echo

Handler = Callable[[httpx.Request], httpx.Response]


def make_job(tmp_path: Path, rows: int = 50, **extra: str) -> JobSpec:
    pq.write_table(
        pa.table({"rid": [f"r{i}" for i in range(rows)], "text": [f"t{i}" for i in range(rows)]}),
        tmp_path / "in.parquet",
    )
    text = f"""
name = "t"
[input]
path = "{tmp_path / "in.parquet"}"
id_column = "rid"
[request]
base_url = "http://127.0.0.1:9/v1"
model = "deepseek-v4-flash"
prompt = "{{text}}"
max_tokens = 8
[limits]
max_in_flight = 4
max_attempts = 3
max_retry_wait_s = 0.01
{extra.get("limits", "")}
[output]
path = "{tmp_path / "out.parquet"}"
"""
    return parse_job(text, "t.toml")


def run(job: JobSpec, handler: Handler, **options: bool) -> object:
    runner = Runner(
        job,
        api_key="sk-test-secret",
        options=RunOptions(batch_rows=7, **options),
        transport=httpx.MockTransport(handler),
        rng=random.Random(1),
    )
    scan = runner.prepare()
    return anyio.run(runner.run, scan)


def test_output_is_in_input_order_with_one_row_each(tmp_path: Path) -> None:
    job = make_job(tmp_path, rows=50)

    def shuffled(request: httpx.Request) -> httpx.Response:
        return echo(request)

    report = run(job, shuffled)
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out["id"].to_list() == [f"r{i}" for i in range(50)]
    assert out["response"].to_list() == [f"re: t{i}" for i in range(50)]
    assert set(out["status"]) == {"ok"}
    assert out["prompt_tokens"].sum() == 500
    # WaveSpeed has no "deepseek-v4-flash" id, DeepSeek does: loopback prices by model id.
    assert out["cost_usd"][0] == pytest.approx((10 * 0.14 + 3 * 0.28) / 1e6)
    assert report.all_ok  # type: ignore[attr-defined]


def test_transient_failures_are_retried_and_billed_attempts_counted(tmp_path: Path) -> None:
    job = make_job(tmp_path, rows=10)
    calls: Counter[str] = Counter()

    def flaky(request: httpx.Request) -> httpx.Response:
        content = json.loads(request.content)["messages"][-1]["content"]
        calls[content] += 1
        if calls[content] == 1:
            # Billed but unusable: the usage must still be counted.
            return httpx.Response(200, json={"usage": {"prompt_tokens": 10}})
        return echo(request)

    run(job, flaky)
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out["attempts"].to_list() == [2] * 10
    assert out["prompt_tokens"].to_list() == [20] * 10
    assert set(out["status"]) == {"ok"}


def test_permanent_failures_become_failed_rows(tmp_path: Path) -> None:
    job = make_job(tmp_path, rows=10)

    def reject_odd(request: httpx.Request) -> httpx.Response:
        content = json.loads(request.content)["messages"][-1]["content"]
        if int(content[1:]) % 2:
            return httpx.Response(400, json={"error": {"message": "bad row"}})
        return echo(request)

    report = run(job, reject_odd)
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out["status"].to_list() == ["ok", "failed"] * 5
    assert out["attempts"].to_list() == [1] * 10
    assert out["error"][1] == "HTTP 400: bad row"
    assert out["http_status"].to_list() == [200, 400] * 5
    assert not report.all_ok  # type: ignore[attr-defined]


def test_auth_failure_stops_the_job_without_leaking_the_key(tmp_path: Path) -> None:
    job = make_job(tmp_path, rows=200)
    calls = 0

    def refuse(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(401, json={"error": {"message": "bad key sk-test-secret"}})

    with pytest.raises(AuthError) as info:
        run(job, refuse)
    assert "sk-test-secret" not in str(info.value)
    assert calls <= 4  # at most one per worker, not one per row
    assert not (tmp_path / "out.parquet").exists()


def test_second_run_resumes_and_sends_nothing_already_done(tmp_path: Path) -> None:
    job = make_job(tmp_path, rows=30)
    run(job, echo)
    sent = 0

    def counting(request: httpx.Request) -> httpx.Response:
        nonlocal sent
        sent += 1
        return echo(request)

    report = run(job, counting)
    assert sent == 0
    assert report.final.resumed_rows == 30  # type: ignore[attr-defined]
    assert pl.read_parquet(tmp_path / "out.parquet").height == 30
    run(job, counting, fresh=True)
    assert sent == 30


def test_retry_failed_sends_only_failed_rows(tmp_path: Path) -> None:
    job = make_job(tmp_path, rows=10)
    run(job, lambda r: httpx.Response(400, json={"error": {"message": "no"}}))
    sent = 0

    def counting(request: httpx.Request) -> httpx.Response:
        nonlocal sent
        sent += 1
        return echo(request)

    run(job, counting)
    assert sent == 0
    run(job, counting, retry_failed=True)
    assert sent == 10
    assert set(pl.read_parquet(tmp_path / "out.parquet")["status"]) == {"ok"}


def test_unrenderable_rows_fail_without_a_request(tmp_path: Path) -> None:
    pq.write_table(pa.table({"text": ["a", None, "  ", "d"]}), tmp_path / "in.parquet")
    job = parse_job(
        f"""
name = "t"
[input]
path = "{tmp_path / "in.parquet"}"
[request]
base_url = "http://127.0.0.1:9/v1"
prompt = "{{text}}"
[output]
path = "{tmp_path / "out.parquet"}"
""",
        "t.toml",
    )
    sent = 0

    def counting(request: httpx.Request) -> httpx.Response:
        nonlocal sent
        sent += 1
        return echo(request)

    run(job, counting)
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert sent == 2
    assert out["id"].to_list() == [0, 1, 2, 3]
    assert out["status"].to_list() == ["ok", "failed", "failed", "ok"]
    assert "null" in out["error"][1]
    assert "empty" in out["error"][2]


def test_placeholder_for_a_missing_column_is_caught_before_sending(tmp_path: Path) -> None:
    job = make_job(tmp_path)
    job = replace(job, request=replace(job.request, prompt="{txt}"))
    with pytest.raises(
        JobFileError, match=r"\[request\] prompt: has a placeholder for column 'txt'"
    ):
        Runner(job, api_key=None).prepare()


def test_keep_column_clashing_with_an_output_column_is_rejected(tmp_path: Path) -> None:
    job = make_job(tmp_path)
    job = replace(job, output=replace(job.output, keep_columns=("text",)))
    Runner(job, api_key=None).prepare()
    job = replace(job, output=replace(job.output, keep_columns=("rid", "nope")))
    with pytest.raises(JobFileError, match=r"\[output\] keep_columns: names the column 'nope'"):
        Runner(job, api_key=None).prepare()


def test_an_endpoint_that_never_answers_stops_the_job(tmp_path: Path) -> None:
    job = make_job(tmp_path, rows=100)
    calls = 0

    def refuse(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(
        ProviderError, match=r"cannot reach http://127\.0\.0\.1:9/v1/chat/completions"
    ):
        run(job, refuse)
    assert calls < 20  # not 100 rows x 3 attempts


def test_connection_errors_after_answers_are_retried_not_fatal(tmp_path: Path) -> None:
    job = make_job(tmp_path, rows=30)
    seen: Counter[str] = Counter()

    def flaky(request: httpx.Request) -> httpx.Response:
        content = json.loads(request.content)["messages"][-1]["content"]
        seen[content] += 1
        if content != "t0" and seen[content] == 1:
            raise httpx.ConnectError("connection refused", request=request)
        return echo(request)

    run(job, flaky)
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert set(out["status"]) == {"ok"}
    assert out["attempts"].sum() == 59


def count_planned_rows(monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    """Count the rows planned from now on (a function returning the count so far)."""
    planned = 0
    original = Planner.plan

    def counting(self: Planner, batch: pa.RecordBatch, start: int) -> object:
        nonlocal planned
        planned += batch.num_rows
        return original(self, batch, start)

    monkeypatch.setattr(Planner, "plan", counting)
    return lambda: planned


def test_finished_batches_are_sealed_and_skipped_unplanned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = make_job(tmp_path, rows=30)
    run(job, echo)
    seals = SealBook(job.state_path).read()
    assert sorted(seals) == [0, 7, 14, 21, 28]  # batch_rows is 7 in these tests
    assert sum(seal.ok for seal in seals.values()) == 30
    planned = count_planned_rows(monkeypatch)
    report = run(job, echo)
    assert report.final.resumed_rows == 30  # type: ignore[attr-defined]
    assert planned() == 30  # only the output assembly plans; the resume skipped every batch


def test_an_edited_row_in_a_sealed_batch_is_sent_again(tmp_path: Path) -> None:
    job = make_job(tmp_path, rows=30)
    run(job, echo)
    table = pq.read_table(tmp_path / "in.parquet").to_pydict()
    table["text"][9] = "changed"
    pq.write_table(pa.table(table), tmp_path / "in.parquet")
    sent: list[str] = []

    def counting(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content)["messages"][-1]["content"])
        return echo(request)

    run(job, counting)
    assert sent == ["changed"]
    assert pl.read_parquet(tmp_path / "out.parquet")["response"][9] == "re: changed"


def test_a_changed_template_invalidates_every_seal(tmp_path: Path) -> None:
    job = make_job(tmp_path, rows=30)
    run(job, echo)
    edited = replace(job, request=replace(job.request, prompt="Now: {text}"))
    sent = 0

    def counting(request: httpx.Request) -> httpx.Response:
        nonlocal sent
        sent += 1
        return echo(request)

    run(edited, counting)
    assert sent == 30


def test_status_counts_sealed_batches_from_their_seals(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.engine.status import job_status

    job = make_job(tmp_path, rows=30)

    def half_failing(request: httpx.Request) -> httpx.Response:
        text = json.loads(request.content)["messages"][-1]["content"]
        if int(text[1:]) % 4 == 0:
            return httpx.Response(400, json={"error": {"message": "no"}})
        return echo(request)

    run(job, half_failing)
    # Rows 7-13 (the second batch) are edited: the next status must plan them again.
    table = pq.read_table(tmp_path / "in.parquet").to_pydict()
    table["text"][9] = "t9 edited"
    pq.write_table(pa.table(table), tmp_path / "in.parquet")
    planned = count_planned_rows(monkeypatch)
    context = JobContext(job, batch_rows=7)
    status = job_status(context, context.scan())
    assert planned() == 7  # only the edited batch
    failed = {i for i in range(30) if i % 4 == 0}  # row 9 was ok, and is now pending
    assert (status.ok, status.failed, status.pending) == (30 - len(failed) - 1, len(failed), 1)
    assert status.spent.completion_tokens == 3 * (30 - 8)  # every answered row, from the journal
