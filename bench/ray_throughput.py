"""Throughput of a job on a local Ray cluster with 1, 2 and 4 workers, beside a single-machine
run, all against the same built-in server (one process, fixed latency, optional hidden cap).

    python bench/ray_throughput.py                  # test 1: max_in_flight 32, 300 ms
    python bench/ray_throughput.py --scenario hidden  # test 2: server cap 40, job allows 256
    python bench/ray_throughput.py --rpm 3000         # a requests/min budget binds (50 req/s)

Prints one line per run: wall time (planning, actor start and the output included), requests
per second over the whole run, and the *steady* utilisation: from the server's own per-second
series (requests received, average in flight), the seconds after the ramp (``--skip-s``, 10 s
for the hidden cap as the issue says, 3 s otherwise, counted from the first request) and
before the last shards drain, as the average in flight over ``min(max_in_flight, hidden)``;
then the server's peak in flight, 429s, and coordinator calls per request. Every run is
``--fresh``. With ``--rpm`` (or ``--tpm``) the job sets that budget and the server (its
``openai`` profile) enforces it per second, so a cluster over it would see 429s. At 50 ms
the run is CPU-bound on a 2-core machine (4 workers, the driver, the coordinator and the
server share it): the default latency, 300 ms, measures the limiter.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def write_job(folder: Path, base_url: str, max_in_flight: int, limits: str = "") -> Path:
    job = folder / "job.toml"
    job.write_text(
        f"""
name = "ray-bench"
[input]
path = "{folder / "in.parquet"}"
[request]
base_url = "{base_url}"
model = "deepseek/deepseek-v4-flash"
prompt = "Say {{text}}"
max_tokens = 8
thinking = {{ type = "disabled" }}
[limits]
max_in_flight = {max_in_flight}
max_attempts = 20
max_retry_wait_s = 0.05
{limits}
[output]
path = "{folder / "out.parquet"}"
"""
    )
    return job


def steady_utilisation(
    series: dict[str, list[float]], cap: int, *, skip_s: float, latency_s: float
) -> float:
    """The average in flight over ``cap`` in the server's seconds after the ramp (``skip_s``
    from the first request) and before the drain (the last second with requests, less a
    latency and a second)."""
    arrivals, in_flight = series["arrivals"], series["in_flight"]
    busy = [second for second, count in enumerate(arrivals) if count]
    if not busy:
        return 0.0
    first = busy[0] + int(skip_s + 0.999)
    last = busy[-1] - int(latency_s + 0.999) - 1
    window = in_flight[first : last + 1]
    return sum(window) / len(window) / cap if window else 0.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--scenario", choices=("cap", "hidden"), default="cap")
    parser.add_argument("--latency-ms", type=float, default=300.0)
    parser.add_argument("--max-in-flight", type=int, default=None)
    parser.add_argument("--hidden", type=int, default=None, help="server's hidden cap (0: none)")
    parser.add_argument("--skip-s", type=float, default=None)
    parser.add_argument("--no-single", action="store_true", help="skip the single-machine run")
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--num-cpus", type=int, default=4)
    parser.add_argument("--rpm", type=int, default=0, help="requests_per_minute (0: none)")
    parser.add_argument("--tpm", type=int, default=0, help="tokens_per_minute (0: none)")
    args = parser.parse_args()
    hidden_scenario = args.scenario == "hidden"
    if args.max_in_flight is None:
        args.max_in_flight = 256 if hidden_scenario else 32
    if args.hidden is None:
        args.hidden = 40 if hidden_scenario else 0
    if args.skip_s is None:
        args.skip_s = 10.0 if hidden_scenario else 3.0
    return args


def rate_limits(args: argparse.Namespace) -> tuple[str, dict[str, object]]:
    """The job's [limits] lines for ``--rpm``/``--tpm``, and the server options enforcing
    them per second (none without them)."""
    limits = "".join(
        f"{name} = {value}\n"
        for name, value in (("requests_per_minute", args.rpm), ("tokens_per_minute", args.tpm))
        if value
    )
    server = {"profile": "openai", "rpm": args.rpm, "tpm": args.tpm, "rate_window_s": 1}
    return limits, server if limits else {}


def main() -> None:
    args = parse_args()
    cap = min(args.max_in_flight, args.hidden or args.max_in_flight)

    import ray

    import pipeline
    import pipeline.ray as pipeline_ray
    from pipeline import testing
    from pipeline.server.process import reset_server_stats, server_stats

    ideal = min(args.max_in_flight, args.hidden or args.max_in_flight) / (args.latency_ms / 1000)
    if args.rpm:
        ideal = min(ideal, args.rpm / 60)
    limits, rated = rate_limits(args)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        texts = [f"row {i}" for i in range(args.rows)]
        pq.write_table(pa.table({"text": texts}), folder / "in.parquet")
        with testing.local_server(
            latency_ms=args.latency_ms,
            max_concurrency=args.hidden,
            **rated,
        ) as base_url:
            job = write_job(folder, base_url, args.max_in_flight, limits)

            def line(name: str, elapsed: float, requests: int, calls: int | None) -> None:
                stats = server_stats(base_url)
                per = "-" if calls is None else f"{calls / max(1, requests):.4f}"
                used = steady_utilisation(
                    stats["per_second"], cap, skip_s=args.skip_s, latency_s=args.latency_ms / 1000
                )
                print(
                    f"{name:<14} {elapsed:6.1f} s {requests / elapsed:7.0f} req/s "
                    f"{requests / elapsed / ideal:5.0%} of ideal, steady {used:5.1%}  "
                    f"peak {stats['max_in_flight_seen']:4d} "
                    f" 429s {stats['429']:5d}  calls/request {per}",
                    flush=True,
                )

            print(f"ideal {ideal:.0f} req/s; {args.rows} rows", flush=True)
            if not args.no_single:
                reset_server_stats(base_url)
                started = time.monotonic()
                pipeline.run_job(str(job), fresh=True)
                line(
                    "single machine",
                    time.monotonic() - started,
                    server_stats(base_url)["requests_total"],
                    None,
                )
            ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
            for workers in (int(w) for w in args.workers.split(",")):
                reset_server_stats(base_url)
                started = time.monotonic()
                report = pipeline_ray.run_job(
                    str(job), workers=workers, shard_rows=args.rows // workers, fresh=True
                )
                line(
                    f"ray {workers} worker(s)",
                    time.monotonic() - started,
                    report.requests,
                    report.calls,
                )
                shards = ", ".join(f"{r.elapsed_s:.1f}" for r in report.results)
                print(f"{'':<14} shards ran {shards} s", flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
