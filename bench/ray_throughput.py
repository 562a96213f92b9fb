"""Throughput of a job on a local Ray cluster with 1, 2 and 4 workers, beside a single-machine
run, all against the same built-in server (one process, fixed latency, optional hidden cap).

    python bench/ray_throughput.py --rows 4000 --latency-ms 50 --max-in-flight 32
    python bench/ray_throughput.py --rows 4000 --latency-ms 50 --max-in-flight 256 --hidden 40

Prints one line per run: wall time (planning, actor start and the output included), requests
per second, the share of the ideal ``min(max_in_flight, hidden) / latency``, the server's peak
in flight, 429s, and coordinator calls per request. Every run is ``--fresh``. On a shared
2-core machine the figures are noisy; the ratios between the rows are what to read.
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


def write_job(folder: Path, base_url: str, max_in_flight: int) -> Path:
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
[output]
path = "{folder / "out.parquet"}"
"""
    )
    return job


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--max-in-flight", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=0, help="server's hidden cap (0: none)")
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--num-cpus", type=int, default=4)
    args = parser.parse_args()

    import ray

    import pipeline
    import pipeline.ray as pipeline_ray
    from pipeline import testing
    from pipeline.server.process import reset_server_stats, server_stats

    ideal = min(args.max_in_flight, args.hidden or args.max_in_flight) / (args.latency_ms / 1000)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        texts = [f"row {i}" for i in range(args.rows)]
        pq.write_table(pa.table({"text": texts}), folder / "in.parquet")
        with testing.local_server(
            latency_ms=args.latency_ms, max_concurrency=args.hidden
        ) as base_url:
            job = write_job(folder, base_url, args.max_in_flight)

            def line(name: str, elapsed: float, requests: int, calls: int | None) -> None:
                stats = server_stats(base_url)
                per = "-" if calls is None else f"{calls / max(1, requests):.4f}"
                print(
                    f"{name:<14} {elapsed:6.1f} s {requests / elapsed:7.0f} req/s "
                    f"{requests / elapsed / ideal:5.0%} of ideal  "
                    f"peak {stats['max_in_flight_seen']:4d} "
                    f" 429s {stats['429']:5d}  calls/request {per}",
                    flush=True,
                )

            print(f"ideal {ideal:.0f} req/s; {args.rows} rows", flush=True)
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
