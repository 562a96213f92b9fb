"""`pipeline estimate` on 1,000,000 prompts of about 200 tokens: speed and memory.

Generates a 1M-row Parquet in a temp dir, measures the DeepSeek V4 tokenizer's own
``encode_batch`` on the same laid-out prompts (the ceiling) before and after the estimate,
runs the estimate in a child process (``python -m pipeline.cli.estimate JOB --json``) and
prints its time, tokens/s, the ratio to raw ``encode_batch`` (the mean of the two raw
measurements: the machine may be shared) and the child's peak RSS.

The peak RSS is the child's own ``VmHWM`` (``/proc/self/status``), read by the child itself
at exit. ``getrusage(RUSAGE_CHILDREN).ru_maxrss`` is not used where ``/proc`` exists: Linux
folds the high-water mark of the memory the child had *before* ``exec`` into it, and a child
forked or vforked from this process starts out sharing this process's pages, so that figure
reports this (large) process's peak, not the estimate's.

    python bench/estimate_large.py [--rows 1000000] [--raw-rows 200000]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.rows.tokens import deepseek_chat_layout, deepseek_tokenizer  # noqa: E402

WORDS = [
    "the",
    "a",
    "battery",
    "screen",
    "price",
    "shipping",
    "quality",
    "arrived",
    "broken",
    "works",
    "great",
    "terrible",
    "excellent",
    "refund",
    "support",
    "customer",
    "weeks",
    "months",
    "sound",
    "camera",
    "light",
    "heavy",
    "cheap",
    "recommend",
    "would",
    "not",
    "again",
    "love",
    "hate",
    "okay",
    "fine",
    "product",
    "company",
    "delivery",
    "box",
    "manual",
]
SYSTEM = "You label product reviews. Answer with one word: positive, negative or neutral."
PROMPT = "Review: {text}\nLabel it."


def make_input(path: Path, rows: int, seed: int = 0) -> None:
    """``rows`` reviews of about 150 words (about 200 tokens with the chat framing)."""
    rng = random.Random(seed)
    writer = None
    chunk = 50_000
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        texts = [" ".join(rng.choices(WORDS, k=rng.randint(140, 170))) for _ in range(n)]
        table = pa.table({"text": texts})
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    assert writer is not None
    writer.close()


# Runs the estimate CLI in the child and writes the child's own VmHWM (KiB) to a file at exit.
CHILD = """
import atexit, runpy, sys

PEAK_FILE = sys.argv[1]

def peak() -> None:
    try:
        with open("/proc/self/status") as status:
            kib = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return
    with open(PEAK_FILE, "w") as out:
        out.write(kib)

atexit.register(peak)
sys.argv = ["pipeline.cli.estimate", *sys.argv[2:]]
runpy.run_module("pipeline.cli.estimate", run_name="__main__", alter_sys=True)
"""


def laid_out(path: Path, rows: int) -> list[str]:
    """The first ``rows`` prompts laid out as the estimate (and the server) lay them out."""
    texts: list[str] = []
    for batch in pq.ParquetFile(path).iter_batches(batch_size=50_000, columns=["text"]):
        texts.extend(batch.column(0).to_pylist()[: rows - len(texts)])
        if len(texts) >= rows:
            break
    return [
        deepseek_chat_layout(
            [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": PROMPT.format(text=t)},
            ],
            thinking=False,
        )
        for t in texts
    ]


def raw_speed(laid: list[str]) -> tuple[float, int]:
    """tokens/s of bare ``encode_batch`` (8,192 a call) over ``laid``."""
    tokenizer = deepseek_tokenizer()
    tokenizer.encode_batch(laid[:100], add_special_tokens=False)
    started = time.perf_counter()
    total = 0
    for i in range(0, len(laid), 8192):
        total += sum(
            len(e.ids) for e in tokenizer.encode_batch(laid[i : i + 8192], add_special_tokens=False)
        )
    return total / (time.perf_counter() - started), total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--raw-rows", type=int, default=200_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        data = folder / "prompts.parquet"
        started = time.perf_counter()
        make_input(data, args.rows)
        print(f"input: {args.rows:,} rows in {time.perf_counter() - started:.1f} s")
        laid = laid_out(data, min(args.raw_rows, args.rows))
        raw_before, raw_tokens = raw_speed(laid)
        print(f"raw encode_batch before: {raw_before:,.0f} tokens/s ({raw_tokens:,} tokens)")
        job = folder / "job.toml"
        job.write_text(
            f"""
name = "bench-estimate"
[input]
path = "{data}"
[request]
model = "deepseek/deepseek-v4-flash"
system = "{SYSTEM}"
prompt = "Review: {{text}}\\nLabel it."
max_tokens = 16
thinking = {{ type = "disabled" }}
[output]
path = "{folder / "out.parquet"}"
"""
        )
        peak_file = folder / "peak_kib"
        argv = [sys.executable, "-c", CHILD, str(peak_file), str(job), "--json"]
        started = time.perf_counter()
        proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=False)
        elapsed = time.perf_counter() - started
        if proc.returncode != 0:
            sys.exit(f"estimate failed ({proc.returncode}):\n{proc.stderr}")
        if peak_file.exists():
            peak_kib = int(peak_file.read_text())
            how = "VmHWM"
        else:  # no /proc: ru_maxrss, which may include this process's own peak (see above)
            peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            how = "ru_maxrss, an upper bound"
        raw_after, _ = raw_speed(laid)
        print(f"raw encode_batch after: {raw_after:,.0f} tokens/s")
        raw = (raw_before + raw_after) / 2
        report = json.loads(proc.stdout)
        rows = report["rows"]["total"]
        tokens = report["input_tokens"]["total"]
        speed = tokens / elapsed
        print(f"rows: {rows:,}")
        print(f"tokens: {tokens:,} ({tokens / rows:.0f}/row)")
        print(f"cached prefix tokens: {report['input_tokens']['cached_prefix']:,}")
        print(f"estimate time: {elapsed:.1f} s (the whole child process, startup included)")
        print(f"estimate tokens/s: {speed:,.0f}")
        print(f"raw encode_batch tokens/s: {raw:,.0f} (mean of before and after)")
        print(f"ratio: {speed / raw:.2f}x")
        print(f"peak RSS MiB: {peak_kib / 1024:,.0f} ({how} of the estimate process)")
        summary = {"rows": rows, "seconds": elapsed, "ratio": speed / raw}
        print(json.dumps({**summary, "peak_mib": peak_kib / 1024}))


if __name__ == "__main__":
    main()
