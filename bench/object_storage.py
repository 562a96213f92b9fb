"""Reading a 1M-row Parquet from a local S3-compatible server against the same file on disk.

Generates a Parquet input (``rid`` and a ~20-word ``text``; row groups of 131,072 rows),
starts moto's S3 server in a child process on 127.0.0.1 (``python -m moto.server``), uploads
the file to a bucket, and times what a run does with its input, both ways, through the
project's own reader (:mod:`pipeline.io.sources`): ``resolve_input`` + ``scan_input`` (the
pre-flight pass: row count and the id column's uniqueness) and iterating every batch of the
columns a job reads (``iter_batches``, 2,048 rows a batch). Each way is run ``--repeat`` times,
alternating, and the median is reported; rows/s counts input rows (the scan and the read pass
are one "pass" over them together).

The S3 server runs on this machine, so the figure measures the object-storage code path (HTTP
round trips, fsspec's read-ahead blocks, Python-side buffering) rather than a network: a real
bucket adds its latency and bandwidth on top.

    python bench/object_storage.py [--rows 1000000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from estimate_large import WORDS  # noqa: E402  (the same review vocabulary)

from pipeline.io import remote  # noqa: E402
from pipeline.io.sources import iter_batches, resolve_input, scan_input  # noqa: E402

ROW_GROUP = 131_072
BATCH_ROWS = 2048


def make_input(path: Path, rows: int) -> None:
    rng = random.Random(13)
    writer: pq.ParquetWriter | None = None
    step = 100_000
    for start in range(0, rows, step):
        count = min(step, rows - start)
        table = pa.table(
            {
                "rid": [f"r{i}" for i in range(start, start + count)],
                "text": [" ".join(rng.choices(WORDS, k=20)) for _ in range(count)],
            }
        )
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema, compression="zstd")
        writer.write_table(table, row_group_size=ROW_GROUP)
    assert writer is not None
    writer.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_s3(port: int) -> subprocess.Popen[bytes]:
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return server
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise SystemExit("the moto S3 server did not start") from None
            time.sleep(0.1)


def one_pass(where: str) -> tuple[float, int]:
    """Seconds to resolve, scan and read every batch of ``where``; rows read."""
    began = time.perf_counter()
    files = resolve_input(where, "bench")
    scan = scan_input(files, id_column="rid", limit=None, job_source="bench")
    rows = sum(b.num_rows for b in iter_batches(files, ["rid", "text"], batch_rows=BATCH_ROWS))
    assert rows == scan.rows
    return time.perf_counter() - began, rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-object-storage-"))
    work.mkdir(parents=True, exist_ok=True)
    local = work / "rows.parquet"
    port = free_port()
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench-secret",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
    )
    server = start_s3(port)
    try:
        began = time.perf_counter()
        make_input(local, args.rows)
        made = time.perf_counter() - began
        size = local.stat().st_size
        url = "s3://bench/rows.parquet"
        import s3fs

        s3fs.S3FileSystem(skip_instance_cache=True).mkdir("bench")
        remote.upload(local, url)
        print(
            f"input: {args.rows:,} rows, {size / 2**20:.1f} MiB ({made:.1f} s to make); "
            f"read blocks of {remote.READ_BLOCK_BYTES // 2**20} MiB"
        )
        times: dict[str, list[float]] = {"disk": [], "s3": []}
        for attempt in range(args.repeat):
            for name, where in (("disk", str(local)), ("s3", url)):
                seconds, rows = one_pass(where)
                times[name].append(seconds)
                rate = rows / seconds
                print(f"  pass {attempt + 1} {name:>4}: {seconds:6.2f} s  {rate:>12,.0f} rows/s")
        disk = statistics.median(times["disk"])
        s3 = statistics.median(times["s3"])
        print(f"median  disk: {args.rows / disk:>12,.0f} rows/s ({disk:.2f} s)")
        print(f"median    s3: {args.rows / s3:>12,.0f} rows/s ({s3:.2f} s)")
        print(f"s3 / disk: {disk / s3:.2f} of the on-disk rate")
        print(
            json.dumps(
                {
                    "rows": args.rows,
                    "bytes": size,
                    "disk_rows_per_s": round(args.rows / disk),
                    "s3_rows_per_s": round(args.rows / s3),
                    "ratio": round(disk / s3, 3),
                    "disk_s": times["disk"],
                    "s3_s": times["s3"],
                }
            )
        )
    finally:
        server.terminate()
        server.wait(timeout=10)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
