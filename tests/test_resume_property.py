"""Property: whatever sequence of outcomes and crashes, resuming ends with every row once."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import anyio
import httpx
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.engine.runner import Runner, RunOptions
from pipeline.job.load import parse_job
from pipeline.job.spec import JobSpec
from pipeline.state.runs import StateFolder

OUTCOMES = ("ok", "ok", "ok", "ok", "500", "drop", "billed-malformed", "400")


def make_job(folder: Path, rows: int) -> JobSpec:
    pq.write_table(
        pa.table({"rid": [f"r{i}" for i in range(rows)], "text": [f"t{i}" for i in range(rows)]}),
        folder / "in.parquet",
    )
    return parse_job(
        f"""
name = "p"
[input]
path = "{folder / "in.parquet"}"
id_column = "rid"
[request]
base_url = "http://127.0.0.1:9/v1"
model = "deepseek-v4-flash"
prompt = "{{text}}"
max_tokens = 8
[limits]
max_in_flight = 4
max_attempts = 3
max_retry_wait_s = 0.001
[output]
path = "{folder / "out.parquet"}"
""",
        "p.toml",
    )


class Provider:
    """A scripted provider: draws an outcome per request, can crash the client mid-run."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.ok_sends: Counter[str] = Counter()
        self.calls = 0
        self.crash_at: int | None = None
        self.scope: anyio.CancelScope | None = None

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        if self.crash_at is not None and self.calls >= self.crash_at and self.scope is not None:
            self.scope.cancel()  # the process dies with requests in flight
            await anyio.sleep(10)
        text = json.loads(request.content)["messages"][-1]["content"]
        outcome = self.rng.choice(OUTCOMES) if self.crash_at is not None else "ok"
        if outcome == "500":
            return httpx.Response(500, json={"error": {"message": "boom"}})
        if outcome == "drop":
            raise httpx.RemoteProtocolError("dropped", request=request)
        if outcome == "billed-malformed":
            return httpx.Response(200, json={"usage": {"prompt_tokens": 1}})
        if outcome == "400":
            return httpx.Response(400, json={"error": {"message": "bad"}})
        self.ok_sends[text] += 1
        return httpx.Response(
            200,
            json={
                "choices": [{"message": {"content": f"re {text}"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 2},
            },
        )


def run_once(job: JobSpec, provider: Provider, *, retry_failed: bool = False) -> None:
    runner = Runner(
        job,
        api_key=None,
        options=RunOptions(batch_rows=5, retry_failed=retry_failed),
        transport=httpx.MockTransport(provider),
        rng=random.Random(0),
    )
    scan = runner.prepare()

    async def go() -> None:
        with anyio.CancelScope() as scope:
            provider.scope = scope
            await runner.run(scan)

    anyio.run(go)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    rows=st.integers(1, 30),
    seed=st.integers(0, 2**16),
    crashes=st.lists(st.integers(1, 40), max_size=4),
)
def test_no_row_lost_or_duplicated_across_crashes(
    tmp_path_factory: object, rows: int, seed: int, crashes: list[int]
) -> None:
    folder = tmp_path_factory.mktemp("resume")  # type: ignore[attr-defined]
    job = make_job(folder, rows)
    provider = Provider(seed)
    for crash_at in crashes:
        provider.crash_at = provider.calls + crash_at
        run_once(job, provider)
    provider.crash_at = None
    run_once(job, provider, retry_failed=True)

    history = StateFolder(job.state_path).history()
    assert len(history) == len(crashes) + 1
    assert history[-1].how == "completed"
    if crashes and crashes[0] <= rows:  # the first run sends every row, so this crash hits
        assert history[0].how == "failed"

    out = pl.read_parquet(folder / "out.parquet")
    assert out["id"].to_list() == [f"r{i}" for i in range(rows)]  # each id once, in order
    assert set(out["status"]) == {"ok"}
    assert out["response"].to_list() == [f"re t{i}" for i in range(rows)]
    # A row whose answer was recorded is never asked again; only a crash can repeat one.
    assert max(provider.ok_sends.values()) <= 1 + len(crashes)
    # A crash loses at most the answers not yet durable: those held by the 4 workers and the
    # 4 the results stream buffers for the writer (max_in_flight each).
    assert sum(provider.ok_sends.values()) <= rows + len(crashes) * (4 + 4)
