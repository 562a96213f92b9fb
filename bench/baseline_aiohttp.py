"""The floor of bench/throughput.py: a bare aiohttp loop, no journal, no output, no limiter.

Sends one chat completion per row of a Parquet file through one ``aiohttp.ClientSession``
from ``concurrency`` worker coroutines, reads each answer and checks its status, then prints
one JSON line: requests, ok, failed and wall time. It is what the hardware and the server
allow; every other client in the benchmark is compared against it in the same run. With
``--rate R`` the requests start evenly, one every ``1/R`` seconds (an even pacer, no burst);
it neither retries nor adapts: told the real limits, it shows what they allow.

    python bench/baseline_aiohttp.py INPUT.parquet BASE_URL --concurrency 256 --max-tokens 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import aiohttp
import pyarrow.parquet as pq


async def main(
    path: str, base_url: str, concurrency: int, max_tokens: int, rate: float | None
) -> None:
    texts = pq.read_table(path, columns=["text"]).column("text").to_pylist()
    url = base_url.rstrip("/") + "/chat/completions"
    headers = {"content-type": "application/json"}
    ok = failed = 0
    rows = iter(texts)
    loop = asyncio.get_running_loop()
    next_start = loop.time()

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal ok, failed, next_start
        for text in rows:
            if rate is not None:  # an even pacer: start k goes at start + k / rate
                start, next_start = next_start, max(next_start, loop.time()) + 1 / rate
                await asyncio.sleep(max(0.0, start - loop.time()))
            body = json.dumps(
                {
                    "model": "deepseek/deepseek-v4-flash",
                    "messages": [{"role": "user", "content": f"Write about {text}"}],
                    "max_tokens": max_tokens,
                    "thinking": {"type": "disabled"},
                }
            ).encode()
            async with session.post(url, data=body, headers=headers) as response:
                json.loads(await response.read())
                if response.status == 200:
                    ok += 1
                else:
                    failed += 1

    started = time.monotonic()
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    wall = time.monotonic() - started
    print(json.dumps({"requests": len(texts), "ok": ok, "failed": failed, "wall_s": wall}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("input")
    parser.add_argument("base_url")
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rate", type=float, default=None, help="requests/s, evenly")
    args = parser.parse_args()
    asyncio.run(main(args.input, args.base_url, args.concurrency, args.max_tokens, args.rate))
