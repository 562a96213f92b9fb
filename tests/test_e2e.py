"""End-to-end: the CLI against the built-in server over real HTTP on 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner

from pipeline.cli.commands import cli
from pipeline.server.process import server_stats

ROOT = Path(__file__).resolve().parent.parent
SECRET = "sk-e2e-do-not-leak-0123456789"


def job_file(
    tmp_path: Path,
    *,
    base_url: str = "http://127.0.0.1:9/v1",
    input_path: str | Path = ROOT / "data/sample/reviews.parquet",
    id_column: str | None = "review_id",
    prompt: str = "Review of {product}: {text}",
    limits: str = "",
    request: str = "",
) -> Path:
    id_line = f'id_column = "{id_column}"' if id_column else ""
    path = tmp_path / "job.toml"
    path.write_text(
        f"""
name = "e2e"
[input]
path = "{input_path}"
{id_line}
[request]
base_url = "{base_url}"
api_key_env = "E2E_API_KEY"
model = "deepseek/deepseek-v4-flash"
system = "You label reviews."
prompt = "{prompt}"
max_tokens = 24
thinking = {{ type = "disabled" }}
{request}
[limits]
max_in_flight = 32
max_retry_wait_s = 0.05
{limits}
[output]
path = "{tmp_path / "out.parquet"}"
keep_columns = ["product"]
"""
    )
    return path


def invoke(*args: str, key: str | None = SECRET) -> tuple[int, str]:
    env = {"E2E_API_KEY": key} if key else {}
    result = CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)
    return result.exit_code, result.output


def run_sample(out: Path) -> subprocess.CompletedProcess[str]:
    """The README's sample job in its own process, against the embedded server."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "run",
            "jobs/label_reviews.toml",
            "--local",
            "--output",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_sample_job_readme_command_in_a_real_process(tmp_path: Path) -> None:
    """The README's first command, as a newcomer runs it (a subprocess, --local)."""
    out = tmp_path / "labels.parquet"
    proc = run_sample(out)
    assert proc.returncode == 0, proc.stderr
    df = pl.read_parquet(out)
    source = pl.read_parquet(ROOT / "data/sample/reviews.parquet")
    assert df["id"].to_list() == source["review_id"].to_list()
    assert df["product"].to_list() == source["product"].to_list()
    assert set(df["status"]) == {"ok"}
    assert (df["prompt_tokens"] > 0).all()
    assert (df["completion_tokens"] > 0).all()
    for row in df.iter_rows(named=True):
        expected = (
            Decimal(row["prompt_tokens"]) * Decimal("0.17")
            + Decimal(row["completion_tokens"]) * Decimal("0.34")
        ) / 10**6
        assert row["cost_usd"] == pytest.approx(float(expected), rel=1e-12)
    assert "summary" in proc.stdout + proc.stderr

    # Again: the built-in server gets another port, yet nothing is sent twice...
    again = run_sample(out)
    assert again.returncode == 0, again.stderr
    assert re.search(r"requests sent\s*│\s*0 ", again.stderr), again.stderr
    # ... and results of the built-in server never count as the real provider's.
    _, local_status = invoke(
        "status", "jobs/label_reviews.toml", "--output", str(out), "--local", "--json"
    )
    assert json.loads(local_status)["rows"]["ok"] == 300
    _, real_status = invoke("status", "jobs/label_reviews.toml", "--output", str(out), "--json")
    assert json.loads(real_status)["rows"] == {"total": 300, "ok": 0, "failed": 0, "pending": 300}


def test_transient_faults_are_retried_until_every_row_is_ok(
    tmp_path: Path, local_server: Callable[..., str]
) -> None:
    base = local_server(
        latency_ms=5,
        seed=7,
        fault_500=0.02,
        fault_503=0.02,
        fault_502_html=0.02,
        fault_drop=0.02,
        fault_malformed=0.01,
        fault_timeout=0.01,
        timeout_hang_s=5,
    )
    job = job_file(tmp_path, base_url=base, limits="max_attempts = 10\ntimeout_s = 1")
    code, output = invoke("run", str(job))
    assert code == 0, output
    df = pl.read_parquet(tmp_path / "out.parquet")
    assert df.height == 300
    assert set(df["status"]) == {"ok"}
    assert df["attempts"].max() > 1  # faults happened and were retried
    stats = server_stats(base)
    assert stats["requests_total"] == df["attempts"].sum()
    assert stats["requests_total"] > 300


def test_rows_the_server_rejects_fail_and_the_rest_succeed(
    tmp_path: Path, local_server: Callable[..., str]
) -> None:
    base = local_server(latency_ms=5, reject_substring="robot vacuum")
    job = job_file(tmp_path, base_url=base)
    code, output = invoke("run", str(job))
    assert code == 3, output
    df = pl.read_parquet(tmp_path / "out.parquet")
    rejected = df.filter(pl.col("product") == "robot vacuum")
    assert rejected.height > 0
    assert set(rejected["status"]) == {"failed"}
    assert set(rejected["attempts"]) == {1}  # a 400 is never retried
    assert all(e.startswith("HTTP 400") for e in rejected["error"])
    assert set(df.filter(pl.col("product") != "robot vacuum")["status"]) == {"ok"}


def test_wrong_api_key_stops_the_job_and_never_leaks(
    tmp_path: Path, local_server: Callable[..., str]
) -> None:
    base = local_server(latency_ms=5, api_key="the-right-key")
    job = job_file(tmp_path, base_url=base)
    code, output = invoke("run", str(job))
    assert code == 1
    assert "refused the key in $E2E_API_KEY" in output
    assert SECRET not in output
    assert server_stats(base)["requests_total"] <= 32  # stopped at once, not once per row
    assert not (tmp_path / "out.parquet").exists()


def test_the_key_reaches_the_server_but_no_file_or_log(
    tmp_path: Path, local_server: Callable[..., str]
) -> None:
    base = local_server(latency_ms=5, api_key=SECRET)
    job = job_file(tmp_path, base_url=base)
    code, output = invoke("run", str(job))
    assert code == 0, output
    assert SECRET not in output
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_missing_api_key_variable_is_a_usage_error(tmp_path: Path) -> None:
    job = job_file(tmp_path, base_url="https://llm.wavespeed.ai/v1")
    code, output = invoke("run", str(job), key=None)
    assert code == 2
    assert "[request] api_key_env: the environment variable E2E_API_KEY is not set" in output


def test_validation_errors_name_file_key_and_fix(tmp_path: Path) -> None:
    job = job_file(tmp_path, prompt="Review: {txt}")
    code, output = invoke("run", str(job))
    assert code == 2
    assert f"{job}: [request] prompt: has a placeholder for column 'txt'" in output
    assert "Traceback" not in output


def test_jsonl_thinking_job_records_reasoning(
    tmp_path: Path, local_server: Callable[..., str]
) -> None:
    base = local_server(latency_ms=5)
    out = tmp_path / "summaries.parquet"
    code, output = invoke(
        "run",
        str(ROOT / "jobs/summarize_articles.toml"),
        "--base-url",
        base,
        "--output",
        str(out),
        "--limit",
        "10",
    )
    assert code == 0, output
    df = pl.read_parquet(out)
    assert df["id"].to_list() == list(range(1, 11))
    assert df["reasoning"].null_count() == 0
    assert (df["reasoning_tokens"] > 0).all()
    assert (df["completion_tokens"] > df["reasoning_tokens"]).any()


def test_python_dash_m_help() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "--help"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "COLUMNS": "100"},
    )
    assert "run" in proc.stdout
    assert "serve" in proc.stdout


def test_a_second_run_starts_at_the_hidden_limit_the_first_one_found(
    tmp_path: Path, local_server: Callable[..., str]
) -> None:
    from pipeline.server.process import reset_server_stats

    base = local_server(latency_ms=20, max_concurrency=8, seed=3)
    job = job_file(tmp_path, base_url=base, limits="max_attempts = 20")  # max_in_flight 32
    code, first_output = invoke("run", str(job))
    assert code == 0, first_output
    first_429s = server_stats(base)["429"]
    assert first_429s > 0  # slow start from 16 ran into the limit of 8
    assert "from what the last run learned" not in first_output
    runs = (tmp_path / "out.parquet.state" / "runs.jsonl").read_text()
    assert '"limiter": {"endpoint"' in runs
    assert "127.0.0.1" not in runs  # the endpoint is kept as a digest
    reset_server_stats(base)
    code, second_output = invoke("run", str(job), "--fresh")
    assert code == 0, second_output
    found = re.search(r"starting at (\d+) requests in flight, .*429s came at (\d+)", second_output)
    assert found is not None, second_output
    start, ceiling = int(found.group(1)), int(found.group(2))
    assert 8 <= ceiling <= 12  # the server's limit is 8
    assert start == int(0.9 * ceiling)
    assert server_stats(base)["429"] < first_429s


def test_a_limit_enforced_per_second_is_met_without_429s(
    tmp_path: Path, local_server: Callable[..., str]
) -> None:
    # The server holds one second of 3,000 requests/min (50) and refuses the 51st of any
    # instant, as OpenAI documents quantized limits; the job is told the per-minute figure.
    base = local_server(profile="openai", rpm=3000, rate_window_s=1, latency_ms=20, seed=5)
    job = job_file(tmp_path, base_url=base, limits="requests_per_minute = 3000")
    code, output = invoke("run", str(job))
    assert code == 0, output
    df = pl.read_parquet(tmp_path / "out.parquet")
    assert df.height == 300
    assert set(df["status"]) == {"ok"}
    stats = server_stats(base)
    assert stats["429"] == 0
    assert stats["requests_total"] == 300
