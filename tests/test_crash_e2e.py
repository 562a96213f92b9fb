"""Interruptions of a real `pipeline run` process against the built-in server."""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.server.process import server_stats

ROWS = 1500
IN_FLIGHT = 16


def write_job(tmp_path: Path, base_url: str, rows: int = ROWS) -> Path:
    pq.write_table(
        pa.table(
            {"rid": [f"r{i}" for i in range(rows)], "text": [f"row {i}" for i in range(rows)]}
        ),
        tmp_path / "in.parquet",
    )
    job = tmp_path / "job.toml"
    job.write_text(
        f"""
name = "crash"
[input]
path = "{tmp_path / "in.parquet"}"
id_column = "rid"
[request]
base_url = "{base_url}"
model = "deepseek/deepseek-v4-flash"
prompt = "Write about {{text}}"
max_tokens = 16
thinking = {{ type = "disabled" }}
[limits]
max_in_flight = {IN_FLIGHT}
[output]
path = "{tmp_path / "out.parquet"}"
"""
    )
    return job


# Runs `python -m pipeline` with a 60 kB limit on file sizes: writes past it fail with EFBIG,
# a real "disk full" from the operating system.
SMALL_FILES = (
    "import resource, runpy, signal, sys; "
    "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
    "resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000)); "
    "sys.argv[0] = 'pipeline'; runpy.run_module('pipeline', run_name='__main__')"
)


def start(job: Path, *extra: str, small_files: bool = False) -> subprocess.Popen[str]:
    launcher = ["-c", SMALL_FILES] if small_files else ["-m", "pipeline"]
    return subprocess.Popen(
        [sys.executable, *launcher, "run", str(job), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def results_bytes(tmp_path: Path) -> int:
    folder = tmp_path / "out.parquet.state" / "results"
    return sum(p.stat().st_size for p in folder.glob("*.jsonl")) if folder.exists() else 0


def wait_for_progress(tmp_path: Path, proc: subprocess.Popen[str], at_least: int) -> None:
    deadline = time.monotonic() + 60
    while results_bytes(tmp_path) < at_least:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.02)


def finish(job: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", "run", str(job), *extra],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def assert_complete(tmp_path: Path, rows: int = ROWS) -> None:
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out["id"].to_list() == [f"r{i}" for i in range(rows)]
    assert set(out["status"]) == {"ok"}


def test_sigkill_at_random_moments_then_resume(
    tmp_path: Path, local_server: Callable[..., str]
) -> None:
    base = local_server(latency_ms=20, latency_jitter_ms=20)
    job = write_job(tmp_path, base)
    rng = random.Random(11)
    kills = 3
    reported = 0
    for _ in range(kills):
        proc = start(job)
        wait_for_progress(tmp_path, proc, results_bytes(tmp_path) + 1)
        time.sleep(rng.uniform(0.05, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        done = finish(job, "--limit", "1")  # resumes nothing new beyond row 0, reports suspects
        found = re.search(r"stopped with ([\d,]+) request", done.stdout + done.stderr)
        assert found, done.stdout + done.stderr
        count = int(found.group(1).replace(",", ""))
        assert 1 <= count <= IN_FLIGHT * 2  # in flight, plus the last commit window
        reported += count
    last = finish(job)
    assert last.returncode == 0, last.stderr
    assert_complete(tmp_path)
    stats = server_stats(base)
    assert stats["distinct_requests"] == ROWS
    assert stats["max_sends_per_request"] <= 1 + kills
    assert stats["requests_total"] - ROWS <= reported  # every repeat was reported beforehand


def test_status_after_a_kill_shows_suspects(
    tmp_path: Path, local_server: Callable[..., str]
) -> None:
    base = local_server(latency_ms=50)
    job = write_job(tmp_path, base, rows=400)
    proc = start(job)
    wait_for_progress(tmp_path, proc, 1)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    status = subprocess.run(
        [sys.executable, "-m", "pipeline", "status", str(job), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    data = json.loads(status.stdout)
    assert data["rows"]["total"] == 400
    assert data["rows"]["ok"] + data["rows"]["pending"] == 400
    assert 0 < data["rows"]["ok"] < 400
    assert data["last_run"]["how"] == "did not end"
    assert data["double_spend_suspects"]["count"] >= 1
    assert float(data["double_spend_suspects"]["worst_cost_usd"]) > 0
    assert float(data["spent"]["cost_usd"]) > 0


def test_ctrl_c_stops_gracefully_and_resumes_without_repeats(
    tmp_path: Path, local_server: Callable[..., str]
) -> None:
    base = local_server(latency_ms=50)
    job = write_job(tmp_path, base)
    proc = start(job)
    wait_for_progress(tmp_path, proc, 2000)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Run the same command again to resume" in out + err
    partial = pl.read_parquet(tmp_path / "out.parquet")
    assert 0 < partial.height < ROWS
    assert set(partial["status"]) == {"ok"}
    last = finish(job)
    assert last.returncode == 0, last.stderr
    assert "stopped with" not in last.stdout + last.stderr  # nothing was left in flight
    assert_complete(tmp_path)
    assert server_stats(base)["max_sends_per_request"] == 1


def test_second_ctrl_c_stops_at_once(tmp_path: Path, local_server: Callable[..., str]) -> None:
    base = local_server(latency_ms=3000)
    job = write_job(tmp_path, base, rows=2 * IN_FLIGHT)
    proc = start(job)
    deadline = time.monotonic() + 30
    while server_stats(base)["in_flight"] < IN_FLIGHT:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    began = time.monotonic()
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert time.monotonic() - began < 2.5  # did not wait for the 3 s requests
    resumed = finish(job)
    assert resumed.returncode == 0
    # The abandoned requests were counted by the run itself and reported now.
    assert f"stopped with {IN_FLIGHT} request(s) in flight" in resumed.stdout + resumed.stderr
    assert_complete(tmp_path, rows=2 * IN_FLIGHT)


def test_full_disk_stops_clearly_and_the_next_run_resumes(
    tmp_path: Path, local_server: Callable[..., str]
) -> None:
    base = local_server(latency_ms=5)
    job = write_job(tmp_path, base)
    proc = start(job, small_files=True)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, out + err
    assert "File too large" in err
    assert "run the job again to resume" in err
    assert "Traceback" not in err
    last = finish(job)
    assert last.returncode == 0, last.stderr
    assert_complete(tmp_path)


def test_two_runs_of_one_job_do_not_share_the_state(
    tmp_path: Path, local_server: Callable[..., str]
) -> None:
    base = local_server(latency_ms=200)
    job = write_job(tmp_path, base, rows=300)
    first = start(job)
    wait_for_progress(tmp_path, first, 1)
    second = finish(job)
    assert second.returncode == 1
    assert "another run of this job is in progress" in second.stderr
    first.communicate(timeout=60)
    assert first.returncode == 0
    assert_complete(tmp_path, rows=300)
