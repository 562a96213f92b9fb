"""A job across a local Ray cluster (4 workers) against the built-in server on 127.0.0.1:
one cluster-wide in-flight cap and budget, shards resumed after kill -9 (issue 14).

One Ray instance (``num_cpus=4``) serves every test of the module: starting one takes ~4.5 s
and ~490 MB here.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ray = pytest.importorskip("ray")

import pipeline.ray as pipeline_ray  # noqa: E402
from pipeline.cluster.driver import NAMESPACE, actor_tag, cluster_options, plan_for  # noqa: E402
from pipeline.job.load import load_job  # noqa: E402
from pipeline.server.process import server_stats  # noqa: E402
from pipeline.state.runs import StateFolder  # noqa: E402

PRICE = "input = 0.17\noutput = 0.34"


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(
        num_cpus=4,
        namespace=NAMESPACE,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def make_job(
    tmp_path: Path,
    base_url: str,
    *,
    rows: int,
    max_in_flight: int = 32,
    limits: str = "",
    extra: str = "",
) -> Path:
    texts = [f"row {i} says hello" for i in range(rows)]
    pq.write_table(pa.table({"text": texts}), tmp_path / "in.parquet")
    job = tmp_path / "job.toml"
    job.write_text(
        f"""
name = "cluster"
[input]
path = "{tmp_path / "in.parquet"}"
[request]
base_url = "{base_url}"
model = "deepseek/deepseek-v4-flash"
prompt = "Repeat {{text}}"
max_tokens = 8
thinking = {{ type = "disabled" }}
[limits]
max_in_flight = {max_in_flight}
max_attempts = 30
max_retry_wait_s = 0.05
{limits}
[pricing]
{PRICE}
[output]
path = "{tmp_path / "out.parquet"}"
{extra}
"""
    )
    return job


def read_ids(tmp_path: Path) -> list[int]:
    return pq.read_table(tmp_path / "out.parquet", columns=["id"]).column("id").to_pylist()


def statuses(tmp_path: Path) -> set[str]:
    return set(pq.read_table(tmp_path / "out.parquet", columns=["status"]).column(0).to_pylist())


def resent_by_server(stats: dict[str, Any]) -> int:
    """Requests that reached the server more than once: bodies it received more than once
    (once per extra receipt), plus the requests of a killed worker that arrived but whose body
    the server had not read yet when the connection closed (``unread_bodies``: the rerun's
    copy is the first the server read)."""
    extra = sum((int(k) - 1) * v for k, v in stats["sends_histogram"].items())
    return extra + int(stats["unread_bodies"])


def reported_matches_resent(reported: int, resent: int, killed: int) -> bool:
    """What a rerun reports as left in flight is what went out twice, give or take the requests
    each killed process wrote in the instant of its death.

    A row's intent is recorded in the same step as its request's write to the socket, so the
    report never says less than went out twice (the money guarantee). It may say more, by a
    request the kill cut off after that write: a process killed with a response unread in its
    socket has its connection reset by the kernel, which drops what the server had not read
    yet. One CI run reported 33 where the server had seen 32. At most one such request per
    killed process is allowed here."""
    return resent <= reported <= resent + killed


# -- against a local Ray cluster --------------------------------------------------------------


def test_one_cap_for_the_cluster_few_coordinator_calls_and_single_machine_keys(
    tmp_path: Path, local_server: Callable[..., str], ray_address: str
) -> None:
    """Tests 1 and 6 of the issue: max_in_flight = 32 across 4 workers. At 100 ms (320
    requests/s) the run is not CPU-bound here (at 50 ms the four workers, the coordinator,
    the driver and the server share two cores at 640 requests/s)."""
    base = local_server(latency_ms=100)
    rows = 4000
    job = make_job(tmp_path, base, rows=rows)
    started = time.monotonic()
    report = pipeline_ray.run_job(str(job), workers=4, shard_rows=rows // 4)
    elapsed = time.monotonic() - started
    stats = server_stats(base)
    assert report.output_written
    assert (report.ok, report.failed) == (rows, 0)
    assert read_ids(tmp_path) == list(range(rows))  # input order, each row exactly once
    assert statuses(tmp_path) == {"ok"}
    assert stats["requests_total"] == rows
    assert stats["max_in_flight_seen"] <= 32  # one cap for the whole cluster
    assert stats["max_in_flight_seen"] >= 28  # ... and the cluster fills it
    calls_per_request = report.calls / report.requests
    assert calls_per_request <= 0.01
    # Throughput against 32 / latency: the server's average in flight over 32 (Little's law),
    # from its first whole second (the cap's slow start from 16 included) to the drain.
    used = steady_utilisation(stats["per_second"], 32, skip_s=1, latency_s=0.1)
    print(
        f"\ntest 1/6: peak {stats['max_in_flight_seen']}, {used:.1%} of 32 in flight, "
        f"{rows / elapsed:.0f} req/s in {elapsed:.1f} s with Ray's start-up (ideal "
        f"{32 / 0.1:.0f}), calls/request {calls_per_request:.4f}"
    )
    assert used >= 0.85
    # The shards' request keys are a single-machine run's keys for the same job.
    spec = load_job(job)
    context, scan, plan = plan_for(spec, cluster_options(spec))
    single = {
        planned.key
        for start, batch in _numbered(context.input_batches(scan))
        for planned in context.planner.plan(batch, start)
    }
    root = spec.state_path
    cluster_keys = {
        result.key
        for shard in plan.shards
        for result in StateFolder(shard.state_path(root)).journal.iter_results()
    }
    assert cluster_keys == single
    assert len(single) == rows


def _numbered(batches: Iterator[pa.RecordBatch]) -> Iterator[tuple[int, pa.RecordBatch]]:
    start = 0
    for batch in batches:
        yield start, batch
        start += batch.num_rows


def test_a_hidden_cap_is_found_once_for_the_whole_cluster(
    tmp_path: Path, local_server: Callable[..., str], ray_address: str
) -> None:
    """Test 2: the server takes 40 in flight, the job allows 256. At 250 ms the run is not
    CPU-bound here, so the server's own per-second figures show how well the cluster shares
    the cap it found: the average in flight over 40, after the first 10 s."""
    base = local_server(latency_ms=250, max_concurrency=40)
    rows = 4800
    job = make_job(tmp_path, base, rows=rows, max_in_flight=256)
    report = pipeline_ray.run_job(str(job), workers=4, shard_rows=rows // 4)
    stats = server_stats(base)
    assert report.output_written
    assert report.ok == rows
    assert statuses(tmp_path) == {"ok"}
    share_429 = stats["429"] / stats["requests_total"]
    used = steady_utilisation(stats["per_second"], 40, skip_s=10, latency_s=0.25)
    print(
        f"\ntest 2: 429s {stats['429']} of {stats['requests_total']} ({share_429:.2%}), "
        f"steady utilisation {used:.1%} of 40 in flight, calls/request "
        f"{report.calls / report.requests:.4f}"
    )
    # The coordinator learns from the requests really in flight (not from permits lent or
    # idle), so its ceiling is the server's 40 and it probes it as one machine does.
    assert share_429 < 0.02
    assert used >= 0.85
    # The 0.01 calls per request. About half the calls come in the first 10 s (4
    # first calls, slow start, the 429s of its overshoot, the climb back), then one per BATCH
    # requests per worker, a few 429s' and 4 leaving calls: 0.0085-0.0097 at 4,800 rows.
    assert report.calls / report.requests <= 0.01


def steady_utilisation(
    series: dict[str, list[float]], cap: int, *, skip_s: float, latency_s: float
) -> float:
    """The server's average in flight over ``cap`` from ``skip_s`` after the first request to
    the last shards' drain (as bench/ray_throughput.py)."""
    arrivals, in_flight = series["arrivals"], series["in_flight"]
    busy = [second for second, count in enumerate(arrivals) if count]
    first = busy[0] + int(skip_s + 0.999)
    last = busy[-1] - int(latency_s + 0.999) - 1
    window = in_flight[first : last + 1]
    assert len(window) >= 5, series
    return sum(window) / len(window) / cap


def test_the_budget_stops_the_whole_cluster_and_a_rerun_sends_no_finished_row(
    tmp_path: Path, local_server: Callable[..., str], ray_address: str
) -> None:
    """Test 3: --max-cost at half the estimate: exit 4, spend within the cap; a rerun with
    a higher cap finishes without sending a finished row again."""
    from click.testing import CliRunner

    from pipeline import estimate_job
    from pipeline.cli.commands import cli

    base = local_server(latency_ms=20)
    rows = 1200
    job = make_job(tmp_path, base, rows=rows)
    estimate = estimate_job(str(job))
    assert estimate.cost is not None
    cap = (estimate.cost.expected / 2).quantize(Decimal("0.000001"))
    runner = CliRunner()
    args = ["run", str(job), "--ray", ray_address, "--workers", "4", "-q"]
    first = runner.invoke(cli, [*args, "--max-cost", str(cap)])
    assert first.exit_code == 4, first.output
    assert "stopped at the budget" in first.output
    stats = server_stats(base)
    billed = (
        Decimal(stats["prompt_tokens_total"]) * Decimal("0.17")
        + Decimal(stats["completion_tokens_total"]) * Decimal("0.34")
    ) / 10**6
    assert 0 < billed <= cap
    assert stats["requests_total"] < rows
    print(f"\ntest 3: spent ${billed:.6f} of the ${cap} cap ({stats['requests_total']} requests)")
    # status and estimate add up the shards.
    status = json.loads(runner.invoke(cli, ["status", str(job), "--json"]).output)
    assert status["rows"]["ok"] == stats["requests_total"]
    assert status["rows"]["pending"] == rows - stats["requests_total"]
    estimated = json.loads(runner.invoke(cli, ["estimate", str(job), "--json"]).output)
    assert estimated["rows"]["to_send"] == rows - stats["requests_total"]
    assert estimate_job(str(job)).rows_to_send == rows - stats["requests_total"]  # Python
    second = runner.invoke(cli, [*args, "--max-cost", str(cap * 4)])
    assert second.exit_code == 0, second.output
    again = server_stats(base)
    assert again["max_sends_per_request"] == 1  # no finished row was sent again
    assert again["requests_total"] == rows
    assert read_ids(tmp_path) == list(range(rows))


def test_a_worker_killed_mid_shard_is_resumed_and_resends_what_it_reported(
    tmp_path: Path, local_server: Callable[..., str], ray_address: str
) -> None:
    """Test 4: kill -9 of one worker process mid-shard."""
    base = local_server(latency_ms=100)
    rows = 2400
    job = make_job(tmp_path, base, rows=rows)
    found: dict[str, Any] = {}

    def run() -> None:
        found["report"] = pipeline_ray.run_job(
            str(job), workers=4, shard_rows=rows // 4, lease_ttl_s=3.0
        )

    thread = threading.Thread(target=run)
    thread.start()
    tag = actor_tag(load_job(job).state_path)
    _wait_for(lambda: server_stats(base)["requests_total"] > rows // 5)
    worker = ray.get_actor(f"worker-{tag}-0", namespace=NAMESPACE)
    coordinator = ray.get_actor(f"coordinator-{tag}", namespace=NAMESPACE)
    pid = ray.get(worker.pid.remote())
    os.kill(pid, signal.SIGKILL)
    # The dead worker's lease (until its restart takes the slot): the permits it held.
    permits = ray.get(coordinator.figures.remote()).permits.get(f"w0:{pid}")
    thread.join(timeout=120)
    report = found["report"]
    stats = server_stats(base)
    assert report.output_written
    assert read_ids(tmp_path) == list(range(rows))
    assert statuses(tmp_path) == {"ok"}
    resent = resent_by_server(stats)
    print(
        f"\ntest 4: re-sent {resent} ({stats['unread_bodies']} of them unread by the server "
        f"before the kill), reported unanswered {report.resent}, the worker held {permits} permits"
    )
    assert stats["429"] == 0
    assert reported_matches_resent(report.resent, resent, killed=1)
    assert permits is not None
    # At most the worker's permits in flight plus its writer's commit group (half of them)
    # and what finished while that group was being made durable.
    assert 0 < report.resent <= 2 * permits


def test_a_killed_driver_is_finished_by_the_same_command(
    tmp_path: Path, local_server: Callable[..., str], ray_address: str
) -> None:
    """Test 5: kill -9 of the driver; the same command finishes; a further one sends 0."""
    base = local_server(latency_ms=100)
    rows = 2400
    job = make_job(tmp_path, base, rows=rows)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    command = [
        sys.executable,
        "-m",
        "pipeline",
        "run",
        str(job),
        "--ray",
        ray_address,
        "--workers",
        "4",
        "-q",
    ]
    driver = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)
    _wait_for(lambda: server_stats(base)["requests_total"] > rows // 3)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    before = server_stats(base)["requests_total"]
    finished = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    assert finished.returncode == 0, finished.stderr
    stats = server_stats(base)
    assert read_ids(tmp_path) == list(range(rows))
    assert statuses(tmp_path) == {"ok"}
    # Only the killed run's unanswered requests went out twice, and the rerun said how many
    # (the driver's kill ends its 4 workers).
    resent = resent_by_server(stats)
    found = re.search(r"(\d+) request\(s\) left in flight", finished.stderr)
    reported = 0 if found is None else int(found.group(1))
    # The bound: the cluster's 32 in flight, plus for each worker the commit group being made
    # durable (half the permits it holds) and what finished meanwhile (no more than half its
    # permits while an fsync takes less than half the latency): twice the cluster's cap. It
    # was 32 + 4 x 16 while each worker grouped by half the job's max_in_flight.
    assert reported <= 2 * 32, finished.stderr
    assert reported_matches_resent(reported, resent, killed=4), finished.stderr
    assert stats["requests_total"] - before == rows - before + resent
    print(f"\ntest 5: first run {before} requests, re-sent {resent}, reported {reported}")
    again = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    assert again.returncode == 0, again.stderr
    assert server_stats(base)["requests_total"] == stats["requests_total"]


def test_the_rate_budget_holds_for_the_whole_cluster(
    tmp_path: Path, local_server: Callable[..., str], ray_address: str
) -> None:
    """requests_per_minute is one budget for the 4 workers: the server, with the same limit,
    answers no 429, and no stretch of seconds it measured holds more than the limit allows
    (a second's burst included)."""
    rpm, rows = 1200, 160
    base = local_server(latency_ms=50, profile="openai", rpm=rpm)
    job = make_job(tmp_path, base, rows=rows, limits=f"requests_per_minute = {rpm}")
    report = pipeline_ray.run_job(str(job), workers=4, shard_rows=rows // 4)
    stats = server_stats(base)
    assert report.output_written
    assert (report.ok, stats["requests_total"], stats["429"]) == (rows, rows, 0)
    arrivals = stats["per_second"]["arrivals"]
    per_s = rpm / 60
    worst = max(
        sum(arrivals[first : first + width]) - (width + 1) * per_s
        for width in range(1, len(arrivals) + 1)
        for first in range(len(arrivals) - width + 1)
    )
    busiest = max(arrivals)
    print(
        f"\nrate test: {rows} requests in {len(arrivals)} s, busiest second {busiest:.0f} "
        f"(limit {per_s:.0f}/s), worst excess over the limit {worst:.1f}, "
        f"coordinator calls {report.calls}"
    )
    assert worst <= 1


def test_the_token_budget_holds_for_the_whole_cluster(
    tmp_path: Path, local_server: Callable[..., str], ray_address: str
) -> None:
    """tokens_per_minute is one budget for the 4 workers: the server enforces the same limit
    per second (a bucket of one second's tokens, as a provider that quantizes its minute) and
    answers no 429; no stretch of seconds holds more tokens than the limit allows (a second's
    burst included)."""
    tpm, rows, max_tokens = 24_000, 200, 8
    base = local_server(latency_ms=50, profile="openai", tpm=tpm, rate_window_s=1)
    job = make_job(tmp_path, base, rows=rows, limits=f"tokens_per_minute = {tpm}")
    report = pipeline_ray.run_job(str(job), workers=4, shard_rows=rows // 4)
    stats = server_stats(base)
    assert report.output_written
    assert (report.ok, stats["requests_total"], stats["429"]) == (rows, rows, 0)
    metered = (stats["prompt_tokens_total"] + rows * max_tokens) / rows  # per request
    arrivals = stats["per_second"]["arrivals"]
    per_s = tpm / 60
    worst = max(
        sum(arrivals[first : first + width]) * metered - (width + 1) * per_s
        for width in range(1, len(arrivals) + 1)
        for first in range(len(arrivals) - width + 1)
    )
    print(
        f"\ntoken test: {rows} requests of {metered:.0f} tokens in {len(arrivals)} s, busiest "
        f"second {max(arrivals) * metered:.0f} tokens (limit {per_s:.0f}/s), worst excess "
        f"{worst:.0f} tokens, coordinator calls {report.calls}"
    )
    assert worst <= metered


def test_single_machine_and_cluster_runs_of_a_job_pay_nothing_twice(
    tmp_path: Path, local_server: Callable[..., str], ray_address: str
) -> None:
    """A cluster run counts the rows a single-machine run answered; a single-machine run
    after a cluster run is refused (exit 2) before sending anything."""
    from click.testing import CliRunner

    from pipeline import estimate_job
    from pipeline.cli.commands import cli

    base = local_server(latency_ms=20)
    rows = 600
    job = make_job(tmp_path, base, rows=rows)
    estimate = estimate_job(str(job))
    assert estimate.cost is not None
    cap = (estimate.cost.expected / 3).quantize(Decimal("0.000001"))
    runner = CliRunner()
    single = runner.invoke(cli, ["run", str(job), "-q", "--max-cost", str(cap)])
    assert single.exit_code == 4, single.output
    answered = server_stats(base)["requests_total"]
    assert 0 < answered < rows
    ray_args = ["run", str(job), "--ray", ray_address, "--workers", "4"]
    cluster = runner.invoke(cli, [*ray_args, "--max-cost", str(cap * 4)])
    assert cluster.exit_code == 0, cluster.output
    assert f"{answered:,} row(s) answered by the job's single-machine runs" in cluster.output
    stats = server_stats(base)
    assert stats["max_sends_per_request"] == 1  # no row answered on one machine went again
    assert stats["requests_total"] == rows
    assert read_ids(tmp_path) == list(range(rows))
    assert statuses(tmp_path) == {"ok"}
    again = runner.invoke(cli, ["run", str(job), "-q"])
    assert again.exit_code == 2, again.output
    assert "--ray" in again.output
    assert server_stats(base)["requests_total"] == rows
    print(f"\nmixed modes: {answered} rows on one machine, {rows - answered} on the cluster")


def _wait_for(condition: Callable[[], bool], timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("the condition never held")
        time.sleep(0.05)
