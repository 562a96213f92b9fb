"""The baseline of bench/throughput.py: what a user would write by hand.

Sends one chat completion per row of a Parquet file with ``openai.AsyncOpenAI`` under an
``asyncio.Semaphore``, then prints one JSON line: requests, ok, failed and wall time.

    python bench/baseline_openai.py INPUT.parquet BASE_URL --concurrency 256 --max-tokens 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import openai
import pyarrow.parquet as pq


async def main(path: str, base_url: str, concurrency: int, max_tokens: int) -> None:
    texts = pq.read_table(path, columns=["text"]).column("text").to_pylist()
    client = openai.AsyncOpenAI(base_url=base_url, api_key="baseline", max_retries=6)
    semaphore = asyncio.Semaphore(concurrency)
    ok = failed = 0

    async def one(text: str) -> None:
        nonlocal ok, failed
        async with semaphore:
            try:
                await client.chat.completions.create(
                    model="deepseek/deepseek-v4-flash",
                    messages=[{"role": "user", "content": f"Write about {text}"}],
                    max_tokens=max_tokens,
                    extra_body={"thinking": {"type": "disabled"}},
                )
                ok += 1
            except openai.OpenAIError:
                failed += 1

    started = time.monotonic()
    await asyncio.gather(*(one(text) for text in texts))
    wall = time.monotonic() - started
    await client.close()
    print(json.dumps({"requests": len(texts), "ok": ok, "failed": failed, "wall_s": wall}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("input")
    parser.add_argument("base_url")
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    asyncio.run(main(args.input, args.base_url, args.concurrency, args.max_tokens))
