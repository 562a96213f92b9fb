"""pipeline.testing, the helpers shipped for users' tests, and run_job_report, the one-call API
that returns a run's report."""

from __future__ import annotations

from pathlib import Path

import httpx
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import RunOptions, run_job_report
from pipeline.engine.stats import RunStats
from pipeline.job.load import parse_job
from pipeline.job.spec import JobSpec
from pipeline.results import RowResult
from pipeline.server.process import server_stats
from pipeline.testing import FakeClock, Script, chat_reply, echo, error_reply, local_server


def _job(tmp_path: Path, base_url: str = "http://127.0.0.1:9/v1", rows: int = 6) -> JobSpec:
    pq.write_table(pa.table({"text": [f"t{i}" for i in range(rows)]}), tmp_path / "in.parquet")
    return parse_job(_toml(tmp_path, base_url), "helpers.toml")


def test_fake_clock_moves_only_when_told() -> None:
    clock = FakeClock(10.0)
    assert clock() == 10.0
    assert clock.advance(2.5) == 12.5
    clock.set(20.0)
    assert clock() == 20.0
    with pytest.raises(ValueError, match="does not go back"):
        clock.advance(-1)
    with pytest.raises(ValueError, match="does not go back"):
        clock.set(19.0)


def test_run_figures_follow_a_fake_clock() -> None:
    clock = FakeClock()
    stats = RunStats(total_rows=10, clock=clock)
    for row in range(4):
        stats.add_result(RowResult(key=f"k{row}", row=row, status="ok", run=1))
    clock.advance(2.0)
    snapshot = stats.snapshot()
    assert snapshot.elapsed_s == 2.0
    assert snapshot.rows_per_s == 2.0
    assert snapshot.eta_s == 3.0  # 6 rows left at 2 rows/s


def test_script_plays_its_answers_in_order_then_the_fallback() -> None:
    script = Script(error_reply(429, "slow down"), chat_reply("first"))
    with httpx.Client(transport=script.transport()) as client:
        url = "http://provider.test/v1/chat/completions"
        body = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}
        answers = [client.post(url, json=body) for _ in range(3)]
    assert [a.status_code for a in answers] == [429, 200, 200]
    assert answers[0].json()["error"]["message"] == "slow down"
    assert answers[1].json()["choices"][0]["message"]["content"] == "first"
    assert answers[2].json()["choices"][0]["message"]["content"] == "re: hello"  # echo
    assert len(script.requests) == 3
    assert script.left == 0


def test_a_script_without_fallback_refuses_extra_requests() -> None:
    script = Script(chat_reply("only"), then=None)
    request = httpx.Request("POST", "http://x/v1/chat/completions", json={"messages": []})
    assert script(request).status_code == 200
    with pytest.raises(AssertionError, match="no answer left"):
        script(request)


def test_run_job_report_with_a_scripted_provider(tmp_path: Path) -> None:
    """A 429 and a 500 come first; the runner retries both and every row ends ok."""
    script = Script(
        error_reply(429, headers={"retry-after": "0"}),
        error_reply(500, "boom"),
        then=echo,
    )
    report = run_job_report(
        _job(tmp_path),
        api_key="sk-test",
        options=RunOptions(batch_rows=4),
        transport=script.transport(),
    )
    assert report.all_ok
    assert report.final.ok == 6
    assert report.final.retries == 2
    assert report.final.rate_limited == 1
    assert len(script.requests) == 8
    assert script.requests[0].headers["authorization"] == "Bearer sk-test"
    output = pl.read_parquet(tmp_path / "out.parquet")
    assert output["response"].to_list() == [f"re: t{i}" for i in range(6)]


def test_run_job_report_reads_a_job_file_and_runs_against_the_local_server(tmp_path: Path) -> None:
    _job(tmp_path)  # writes the input
    with local_server(latency_ms=1) as base_url:
        job_file = tmp_path / "helpers.toml"
        job_file.write_text(_toml(tmp_path, base_url))
        report = run_job_report(job_file)
        assert server_stats(base_url)["requests_total"] == 6
    assert report.final.ok == 6
    assert report.output_rows == 6
    assert pl.read_parquet(tmp_path / "out.parquet").height == 6


def _toml(tmp_path: Path, base_url: str) -> str:
    return f"""
name = "helpers"
[input]
path = "{tmp_path / "in.parquet"}"
[request]
base_url = "{base_url}"
model = "deepseek-v4-flash"
prompt = "{{text}}"
max_tokens = 32
thinking = "disabled"
[limits]
max_in_flight = 2
max_retry_wait_s = 0.01
[output]
path = "{tmp_path / "out.parquet"}"
"""
