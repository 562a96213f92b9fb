"""`pipeline estimate` on 1,000,000 prompts of about 200 tokens: speed and memory.

Generates a 1M-row Parquet in a temp dir, measures the DeepSeek V4 tokenizer's own
``encode_batch`` on the same laid-out prompts (the ceiling), then runs the estimate in a
child process (``python -m pipeline.cli_estimate JOB --json``) and prints its time, tokens/s,
the ratio to raw ``encode_batch`` and the child's peak RSS.

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

from pipeline.tokens import deepseek_chat_layout, deepseek_tokenizer  # noqa: E402

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


def raw_speed(path: Path, rows: int) -> tuple[float, int]:
    """tokens/s of bare ``encode_batch`` (8,192 a call) over the first ``rows`` prompts."""
    texts = pq.read_table(path, columns=["text"]).column("text").to_pylist()[:rows]
    laid = [
        deepseek_chat_layout(
            [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": PROMPT.format(text=t)},
            ],
            thinking=False,
        )
        for t in texts
    ]
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
        raw, raw_tokens = raw_speed(data, min(args.raw_rows, args.rows))
        print(f"raw encode_batch: {raw:,.0f} tokens/s ({raw_tokens:,} tokens)")
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
        argv = [sys.executable, "-m", "pipeline.cli_estimate", str(job), "--json"]
        started = time.perf_counter()
        proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=False)
        elapsed = time.perf_counter() - started
        if proc.returncode != 0:
            sys.exit(f"estimate failed ({proc.returncode}):\n{proc.stderr}")
        report = json.loads(proc.stdout)
        tokens = report["input_tokens"]["total"]
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        speed = tokens / elapsed
        print(
            f"estimate: {report['rows']['total']:,} rows, {tokens:,} input tokens "
            f"({tokens / report['rows']['total']:.0f}/row), cached prefix "
            f"{report['input_tokens']['cached_prefix']:,}, in {elapsed:.1f} s"
        )
        print(f"estimate speed: {speed:,.0f} tokens/s = {speed / raw:.2f}x raw encode_batch")
        print(f"peak RSS of the estimate process: {peak_kib / 1024:,.0f} MiB")


if __name__ == "__main__":
    main()
