"""Provider batch mode end to end: real `pipeline run` processes against the built-in
server's Batch API (real HTTP), with the server's counters as the proof."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pytest

from pipeline.money.pricing import Usage, cost, resolve_price
from pipeline.server.process import server_stats

MODEL = "gpt-4o-mini"


def write_job(tmp_path: Path, rows: int, *, per_file: int, extra: str = "") -> Path:
    with (tmp_path / "rows.jsonl").open("w") as handle:
        for i in range(rows):
            handle.write(json.dumps({"rid": f"r{i}", "text": f"row {i}"}) + "\n")
    job = tmp_path / "job.toml"
    job.write_text(
        f"""
name = "nightly"
[input]
path = "rows.jsonl"
id_column = "rid"
[request]
model = "{MODEL}"
prompt = "Label {{text}}"
max_tokens = 12
mode = "batch"
[output]
path = "out/nightly.parquet"
[batch]
max_requests_per_file = {per_file}
poll_s = 0.1
poll_max_s = 0.3
{extra}
"""
    )
    return job


def pipeline(
    *args: str | Path, crash: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PIPELINE_TEST_CRASH_AT"}
    if crash is not None:
        env["PIPELINE_TEST_CRASH_AT"] = crash
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )


def journal_keys(state: Path) -> Counter[str]:
    """How many results the journal holds for each request key."""
    found: Counter[str] = Counter()
    for path in (state / "results").glob("*.jsonl"):
        for line in path.read_text().splitlines():
            found[json.loads(line)["key"]] += 1
    return found


@pytest.mark.slow
def test_2000_rows_in_three_batch_files_with_per_line_errors(
    tmp_path: Path, local_server: Callable[..., str]
) -> None:
    url = local_server(batch_delay_s=0.1, batch_error_rate=0.05, batch_max_requests=700)
    job = write_job(tmp_path, 2000, per_file=700)
    done = pipeline("run", job, "--base-url", url)
    assert done.returncode == 3, done.stderr  # some rows failed, with the provider's error
    stats = server_stats(url)
    assert (stats["files_uploaded"], stats["batches_created"]) == (3, 3)
    assert stats["batch_requests"] == 2000
    assert stats["requests_total"] == 0  # nothing was sent online
    out = pl.read_parquet(tmp_path / "out/nightly.parquet")
    assert out["id"].to_list() == [f"r{i}" for i in range(2000)]
    failed = out.filter(pl.col("status") == "failed")
    assert 40 <= failed.height <= 170  # 5 % of the lines, chosen by hash
    assert failed["error"].str.starts_with("HTTP 500").all()
    assert out.filter(pl.col("status") == "ok")["response"].is_not_null().all()
    # Priced at the batch price: half of the online price, to the token.
    price = resolve_price(url, MODEL, None)
    assert price is not None
    for row in out.filter(pl.col("status") == "ok").head(50).iter_rows(named=True):
        usage = Usage(
            prompt_tokens=row["prompt_tokens"], completion_tokens=row["completion_tokens"]
        )
        online = cost(usage, price)
        assert online is not None
        assert row["cost_usd"] == pytest.approx(float(online / 2), rel=1e-9)
    assert "at the batch price (50% of online)" in done.stderr
    # The same rows online: an output of the same shape.
    online_run = pipeline(
        "run", job, "--base-url", url, "--mode", "online", "--output", tmp_path / "online.parquet"
    )
    assert online_run.returncode == 0, online_run.stderr
    assert pl.read_parquet(tmp_path / "online.parquet").schema == out.schema
    status = pipeline("status", job, "--base-url", url, "--json")
    batches = json.loads(status.stdout)["batches"]
    assert [b["requests"] for b in batches] == [700, 700, 600]
    assert {b["status"] for b in batches} == {"completed"}


@pytest.mark.slow
@pytest.mark.parametrize(
    "step", ["after_intent", "after_upload", "after_create", "while_polling", "while_downloading"]
)
def test_kill_at_each_step_then_rerun_never_duplicates(
    step: str, tmp_path: Path, local_server: Callable[..., str]
) -> None:
    url = local_server(batch_delay_s=0.1, batch_max_requests=100)
    job = write_job(tmp_path, 200, per_file=100)
    killed = pipeline("run", job, "--base-url", url, crash=step)
    assert killed.returncode == 137, killed.stderr
    before = server_stats(url)
    rerun = pipeline("run", job, "--base-url", url)
    assert rerun.returncode == 0, rerun.stderr
    stats = server_stats(url)
    # Two files and two batches in all: the rerun re-attached, never uploaded or created again.
    assert (stats["files_uploaded"], stats["batches_created"]) == (2, 2), (before, stats)
    assert stats["batch_requests"] == 200
    out = pl.read_parquet(tmp_path / "out/nightly.parquet")
    assert out["id"].to_list() == [f"r{i}" for i in range(200)]
    assert (out["status"] == "ok").all()
    keys = journal_keys(tmp_path / "out/nightly.parquet.state")
    assert len(keys) == 200
    assert set(keys.values()) == {1}  # every row recorded exactly once


@pytest.mark.slow
def test_mixed_job_online_rows_are_not_batched_and_online_finishes_expired_rows(
    tmp_path: Path, local_server: Callable[..., str]
) -> None:
    url = local_server(batch_delay_s=0.1, batch_expire_after=20)
    job = write_job(tmp_path, 100, per_file=1000)
    first = pipeline("run", job, "--base-url", url, "--mode", "online", "--limit", "30")
    assert first.returncode == 0, first.stderr
    assert server_stats(url)["requests_total"] == 30
    detached = pipeline("run", job, "--base-url", url, "--detach")
    assert detached.returncode == 0, detached.stderr
    assert "detached" in detached.stderr
    # The 70 rows without an answer, in one batch; the 30 answered online are not in it.
    batch_file = next((tmp_path / "out/nightly.parquet.state/batches").glob("pb-*.jsonl"))
    rows = [
        int(json.loads(line)["custom_id"].split(":")[0])
        for line in batch_file.read_text().splitlines()
    ]
    assert rows == list(range(30, 100))
    # The batch expires after answering 20 rows: the online run collects those and sends
    # only the other 50.
    online = pipeline("run", job, "--base-url", url, "--mode", "online")
    assert online.returncode == 0, online.stderr
    stats = server_stats(url)
    assert stats["batch_requests"] == 20
    assert stats["requests_total"] == 30 + 50
    assert (stats["files_uploaded"], stats["batches_created"]) == (1, 1)
    out = pl.read_parquet(tmp_path / "out/nightly.parquet")
    assert out.height == 100
    assert (out["status"] == "ok").all()


@pytest.mark.slow
def test_expired_batch_is_resubmitted_or_sent_online_with_fallback(
    tmp_path: Path, local_server: Callable[..., str]
) -> None:
    url = local_server(batch_delay_s=0.05, batch_expire_after=25)
    job = write_job(tmp_path, 40, per_file=1000)
    again = pipeline("run", job, "--base-url", url)
    assert again.returncode == 0, again.stderr
    assert (
        "15 rows came back unanswered from ended batches (1 completed, 1 expired): 15 were submitted again"
        in again.stderr
    )
    assert server_stats(url)["batches_created"] == 2
    fallback = pipeline(
        "run",
        job,
        "--base-url",
        url,
        "--fresh",
        "--fallback",
        "online",
        "--output",
        tmp_path / "f.parquet",
    )
    assert fallback.returncode == 0, fallback.stderr
    assert "sending the 15 rows of ended batches online (--fallback online)" in fallback.stderr
    stats = server_stats(url)
    assert stats["batches_created"] == 3
    assert stats["requests_total"] == 15
    assert (pl.read_parquet(tmp_path / "f.parquet")["status"] == "ok").all()


def test_endpoint_without_a_batch_api_is_one_line_before_anything_is_submitted(
    tmp_path: Path, local_server: Callable[..., str]
) -> None:
    url = local_server(batch_api=False)
    job = write_job(tmp_path, 10, per_file=5)
    done = pipeline("run", job, "--base-url", url)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f'error: {job}: [request] mode: is "batch", but {url} has no Batch API (404 on '
        '/batches); nothing was submitted. Set mode = "online" (or run with --mode online).'
    ]
    assert server_stats(url)["requests_total"] == 0


def test_budget_reserves_each_file_worst_case_before_its_batch_is_created(
    tmp_path: Path, local_server: Callable[..., str]
) -> None:
    url = local_server(batch_delay_s=0.05)
    job = write_job(tmp_path, 30, per_file=10)
    # A file of 10 rows can cost at most ~$0.000045 at the batch price: room for one.
    done = pipeline("run", job, "--base-url", url, "--max-cost", "0.00007")
    assert done.returncode == 4, done.stderr
    assert "stopped submitting at the budget" in done.stderr
    stats = server_stats(url)
    assert (stats["files_uploaded"], stats["batches_created"]) == (1, 1)


@pytest.mark.slow
def test_ctrl_c_while_waiting_never_cancels_and_cancel_does(
    tmp_path: Path, local_server: Callable[..., str]
) -> None:
    url = local_server(batch_delay_s=2.0)
    job = write_job(tmp_path, 20, per_file=10)
    env = {k: v for k, v in os.environ.items() if k != "PIPELINE_TEST_CRASH_AT"}
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", str(job), "--base-url", url],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + 30
    while server_stats(url)["batches_created"] < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 130, err
    assert "nothing was cancelled" in err
    assert server_stats(url)["batches_cancelled"] == 0
    status = pipeline("status", job, "--base-url", url, "--json")
    assert [b["collected"] for b in json.loads(status.stdout)["batches"]] == [False, False]
    cancelled = pipeline("cancel", job, "--base-url", url)
    assert cancelled.returncode == 0, cancelled.stderr
    assert server_stats(url)["batches_cancelled"] == 2


def test_detach_then_status_watch_collects(
    tmp_path: Path, local_server: Callable[..., str]
) -> None:
    url = local_server(batch_delay_s=0.1)
    job = write_job(tmp_path, 30, per_file=20)
    detached = pipeline("run", job, "--base-url", url, "--detach")
    assert detached.returncode == 0, detached.stderr
    assert not (tmp_path / "out/nightly.parquet").exists()  # written once every row is done
    watched = pipeline("status", job, "--base-url", url, "--watch")
    assert watched.returncode == 0, watched.stderr
    assert "completed (collected)" in watched.stdout
    assert "30 total: 30 ok, 0 failed, 0 pending" in watched.stdout
    out = pl.read_parquet(tmp_path / "out/nightly.parquet")
    assert out["id"].to_list() == [f"r{i}" for i in range(30)]
    stats = server_stats(url)
    assert (stats["files_uploaded"], stats["batches_created"], stats["requests_total"]) == (2, 2, 0)
