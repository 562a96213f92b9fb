"""Budget caps, accounting by kind and the run summary, with a scripted provider."""

from __future__ import annotations

import json
import random
from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.engine.report import RunReport
from pipeline.engine.runner import Runner, RunOptions
from pipeline.engine.summary import summary_path
from pipeline.errors import JobFileError
from pipeline.job.load import parse_job
from pipeline.job.spec import JobSpec, Overrides, apply_overrides
from pipeline.money.budget import Budget
from pipeline.money.pricing import Usage, cost, resolve_price
from pipeline.state.runs import StateFolder
from pipeline.testing import chat_reply

PROMPT_TOKENS = 10
COMPLETION_TOKENS = 3


def _reply(request: httpx.Request) -> httpx.Response:
    return chat_reply("fine", prompt=PROMPT_TOKENS, completion=COMPLETION_TOKENS, cached=4)


def _job(tmp_path: Path, rows: int = 60, extra: str = "") -> JobSpec:
    pq.write_table(
        pa.table({"rid": [f"r{i}" for i in range(rows)], "text": [f"t{i}" for i in range(rows)]}),
        tmp_path / "in.parquet",
    )
    return parse_job(
        f"""
name = "money"
[input]
path = "{tmp_path / "in.parquet"}"
id_column = "rid"
[request]
base_url = "http://127.0.0.1:9/v1"
model = "deepseek-v4-flash"
prompt = "{{text}}"
max_tokens = 8
[limits]
max_in_flight = 4
max_retry_wait_s = 0.01
[output]
path = "{tmp_path / "out.parquet"}"
{extra}
""",
        tmp_path / "money.toml",
    )


class Recorder:
    """A provider that counts the request keys it is sent."""

    def __init__(self) -> None:
        self.sent: Counter[str] = Counter()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.sent[body["messages"][-1]["content"]] += 1
        return _reply(request)


def _run(job: JobSpec, provider: Any, **options: Any) -> RunReport:
    runner = Runner(
        job,
        api_key=None,
        options=RunOptions(batch_rows=16, **options),
        transport=httpx.MockTransport(provider),
        rng=random.Random(3),
    )
    return anyio.run(runner.run, runner.prepare())


def test_budget_reserves_worst_cases_and_never_passes_the_cap() -> None:
    budget = Budget(cap=Decimal("1.0"), spent=Decimal("0.2"))
    assert budget.reserve(Decimal("0.5")) == "reserved"
    assert budget.reserve(Decimal("0.31")) == "wait"  # fits once the first one settles
    budget.settle(Decimal("0.5"), Decimal("0.1"))
    assert (budget.spent, budget.reserved) == (Decimal("0.3"), 0)
    assert budget.reserve(Decimal("0.31")) == "reserved"
    assert budget.reserve(Decimal("0.71")) == "exhausted"  # not even with nothing in flight
    assert budget.exhausted
    assert budget.reserve(Decimal("0.01")) == "exhausted"  # once exhausted, nothing starts
    budget.settle(Decimal("0.31"), None)  # no answer (a timeout): the worst case is spent
    assert budget.spent == Decimal("0.61")


@given(st.lists(st.tuples(st.booleans(), st.integers(1, 100), st.integers(0, 100)), max_size=80))
def test_spend_stays_under_the_cap_whatever_the_answers_cost(
    steps: list[tuple[bool, int, int]],
) -> None:
    """Requests reserve their worst case and later spend at most that, in any order."""
    budget = Budget(cap=Decimal(500))
    in_flight: list[Decimal] = []
    for settle, worst, percent in steps:
        if settle and in_flight:
            held = in_flight.pop(percent % len(in_flight))
            budget.settle(held, held * percent / 100)
        elif budget.reserve(Decimal(worst)) == "reserved":
            in_flight.append(Decimal(worst))
        assert budget.spent + budget.reserved <= budget.cap
        assert budget.reserved == sum(in_flight)


def test_a_capped_run_stops_keeps_its_rows_and_a_higher_cap_finishes(tmp_path: Path) -> None:
    job = _job(tmp_path)
    price = resolve_price(job.request.base_url, job.request.model, None)
    per_row = cost(
        Usage(prompt_tokens=PROMPT_TOKENS, completion_tokens=COMPLETION_TOKENS, cached_tokens=4),
        price,
    )
    assert per_row is not None
    cap = per_row * 30  # half of the 60 rows' real cost
    provider = Recorder()
    first = _run(apply_overrides(job, Overrides(max_cost=cap)), provider)
    assert first.over_budget
    assert not first.interrupted
    assert first.budget is not None
    assert first.budget.spent <= cap
    assert 0 < first.final.ok < 60
    kept = {r.key for r in StateFolder(job.state_path).journal.iter_results()}
    assert len(kept) == first.final.ok  # every completed row is in the journal
    summary = json.loads(summary_path(job.output.path).read_text())
    assert summary["ended"] == "over_budget"
    assert summary["this_run"]["budget"]["stopped"] is True

    second = _run(apply_overrides(job, Overrides(max_cost=Decimal(1))), provider)
    assert not second.over_budget
    assert second.final.resumed_rows == first.final.ok
    assert second.final.ok == 60 - first.final.ok
    assert max(provider.sent.values()) == 1  # no completed row was sent again
    assert len(provider.sent) == 60
    total = StateFolder(job.state_path).spent_usd()
    assert total == per_row * 60


def test_the_cap_counts_what_earlier_runs_spent(tmp_path: Path) -> None:
    job = _job(tmp_path, rows=20)
    provider = Recorder()
    _run(job, provider)
    spent = StateFolder(job.state_path).spent_usd()
    assert spent is not None
    assert spent > 0
    # Twenty more rows against a cap already used up: nothing is sent.
    more = _job(tmp_path, rows=40)
    report = _run(apply_overrides(more, Overrides(max_cost=spent)), provider)
    assert report.over_budget
    assert report.final.requests == 0
    # --fresh forgets the earlier runs' spend along with their results.
    report = _run(apply_overrides(more, Overrides(max_cost=Decimal(1))), provider, fresh=True)
    assert report.final.ok == 40
    assert StateFolder(job.state_path).spent_usd() == report.final.cost_usd


def test_a_budget_needs_a_price(tmp_path: Path) -> None:
    job = _job(tmp_path, extra="[budget]\nmax_cost_usd = 1.0")
    unpriced = apply_overrides(job, Overrides(base_url="https://example.invalid/v1"))
    runner = Runner(unpriced, api_key=None, transport=httpx.MockTransport(_reply))
    with pytest.raises(JobFileError, match=r"\[budget\] max_cost_usd.*\[pricing\]"):
        anyio.run(runner.run, runner.prepare())


def test_every_billed_attempt_counts_and_costs_split_by_kind(tmp_path: Path) -> None:
    """A retried request whose first answer was billed (malformed, with usage) costs twice."""
    calls = Counter[str]()

    def flaky(request: httpx.Request) -> httpx.Response:
        text = json.loads(request.content)["messages"][-1]["content"]
        calls[text] += 1
        if calls[text] == 1:
            usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": COMPLETION_TOKENS}
            return httpx.Response(200, json={"choices": [], "usage": usage})
        return _reply(request)

    job = _job(tmp_path, rows=10)
    report = _run(job, flaky)
    assert report.final.ok == 10
    assert report.final.usage.prompt_tokens == 2 * 10 * PROMPT_TOKENS
    assert report.final.usage.cached_tokens == 10 * 4
    parts = report.final.cost_parts
    assert parts is not None
    price = resolve_price(job.request.base_url, job.request.model, None)
    assert price is not None
    assert parts.cached_input == Decimal(40) * price.cached_input / 1_000_000
    assert parts.uncached_input == Decimal(200 - 40) * price.input / 1_000_000
    assert parts.total == report.final.cost_usd
    document = json.loads(summary_path(job.output.path).read_text())
    by_kind = document["this_run"]["cost_by_kind_usd"]
    assert Decimal(by_kind["output"]) == parts.output
    assert document["tokens"]["input_cached"] == 40


def test_billed_attempts_of_a_row_a_stop_interrupts_are_kept_and_the_row_is_sent_again(
    tmp_path: Path,
) -> None:
    """A row whose first answer was billed but unusable, then stopped before its retry: the
    cost is recorded (a ``stopped`` record), the row is not taken as done, and the next run
    finishes it."""
    job = _job(tmp_path, rows=3)
    runner_box: list[Runner] = []
    calls = Counter[str]()

    def provider(request: httpx.Request) -> httpx.Response:
        text = json.loads(request.content)["messages"][-1]["content"]
        calls[text] += 1
        if text == "t1" and calls[text] == 1:
            runner_box[0].stop()  # Ctrl-C while this billed, unusable answer comes back
            usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": COMPLETION_TOKENS}
            return httpx.Response(200, json={"choices": [], "usage": usage})
        return _reply(request)

    runner = Runner(
        job,
        api_key=None,
        options=RunOptions(batch_rows=16),
        transport=httpx.MockTransport(provider),
        rng=random.Random(3),
    )
    runner_box.append(runner)
    first = anyio.run(runner.run, runner.prepare())
    assert first.interrupted
    stopped = [
        r for r in StateFolder(job.state_path).journal.iter_results() if r.status == "stopped"
    ]
    assert [(r.row, r.usage.prompt_tokens, r.attempts) for r in stopped] == [(1, PROMPT_TOKENS, 1)]
    assert first.final.usage.prompt_tokens >= PROMPT_TOKENS  # counted in this run's spend
    assert first.unanswered is None

    second = _run(job, provider)
    assert not second.interrupted
    assert calls["t1"] == 2  # sent again: a stopped row is not done
    out = pq.read_table(job.output.path).to_pylist()
    assert [row["status"] for row in out] == ["ok", "ok", "ok"]
    spent = StateFolder(job.state_path).spent_usd()
    assert spent == first.final.cost_usd + second.final.cost_usd
