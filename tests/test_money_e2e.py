"""Issue 5's acceptance criteria, small: the CLI in subprocesses against the built-in server.

The full-size version (10,000 rows) is ``bench/money_acceptance.py``. Every figure here comes
from ``python -m pipeline estimate|run|status`` in a child process, the summary JSON written
beside the output, and the server's own counters (``/_stats``).
"""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from pipeline.server.process import server_stats

ROOT = Path(__file__).resolve().parent.parent
EXIT_OK, EXIT_ROWS_FAILED, EXIT_OVER_BUDGET = 0, 3, 4
WORDS = ["the", "battery", "screen", "price", "shipping", "quality", "broken", "great", "refund"]


def _pipeline(*args: str, codes: tuple[int, ...]) -> subprocess.CompletedProcess[str]:
    """``python -m pipeline ARGS`` from the project root (the sample jobs' paths are
    relative to it), asserting the exit code is one of ``codes``."""
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode in codes, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    return proc


def pipeline_cli(*args: str, codes: tuple[int, ...] = (EXIT_OK,)) -> str:
    """Its stdout (see :func:`_pipeline`)."""
    return _pipeline(*args, codes=codes).stdout


def estimate(job: str | Path, url: str, out: Path, *extra: str) -> dict[str, Any]:
    stdout = pipeline_cli(
        "estimate", str(job), "--base-url", url, "--output", str(out), "--json", *extra
    )
    data: dict[str, Any] = json.loads(stdout[stdout.index("{") :])
    return data


def run(job: str | Path, url: str, out: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    """Run the job; its exit code and the summary JSON written beside the output."""
    args = ("run", str(job), "--base-url", url, "--output", str(out), *extra)
    proc = _pipeline(*args, codes=(EXIT_OK, EXIT_ROWS_FAILED, EXIT_OVER_BUDGET))
    summary: dict[str, Any] = json.loads((out.parent / f"{out.stem}.summary.json").read_text())
    return proc.returncode, summary


def status(job: str | Path, url: str, out: Path) -> dict[str, Any]:
    stdout = pipeline_cli("status", str(job), "--base-url", url, "--output", str(out), "--json")
    data: dict[str, Any] = json.loads(stdout)
    return data


# -- 1. input tokens ----------------------------------------------------------------------


SAMPLE_JOBS = [
    "jobs/label_reviews.toml",
    "jobs/label_reviews_structured.toml",
    "jobs/summarize_articles.toml",
    "jobs/complete_code_fim.toml",
]


def in_parallel(*calls: Callable[[], None]) -> None:
    """Run independent checks at once (each spends most of its time starting Python);
    re-raise the first failure."""
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        for future in [pool.submit(call) for call in calls]:
            future.result()


def test_estimated_input_tokens_equal_what_the_run_reports(
    tmp_path: Path, local_server: Callable[..., str]
) -> None:
    """To the token, for every sample job. The structured job runs against a server whose
    answers always follow the schema (``invalid_json_rate=0``): no re-asks, so every prompt
    is a first attempt; :func:`check_reasks` runs it against the default server too."""
    urls = [local_server(latency_ms=1, invalid_json_rate=0.0) for _ in SAMPLE_JOBS]
    reasking = local_server(latency_ms=1)  # invalid_json_rate 0.05, the default

    def check(job: str, url: str) -> None:
        out = tmp_path / Path(job).stem / "out.parquet"
        before = estimate(job, url, out)
        assert before["token_count"] == "exact", job
        code, summary = run(job, url, out)
        counters = server_stats(url)
        this = summary["this_run"]
        assert code == EXIT_OK, job
        assert this["reasks"] == 0, job
        assert this["requests"] == counters["requests_total"] == before["rows"]["total"], job
        assert before["input_tokens"]["total"] == this["prompt_tokens"], job
        assert this["prompt_tokens"] == counters["prompt_tokens_total"], job

    in_parallel(
        *(partial(check, job, url) for job, url in zip(SAMPLE_JOBS, urls, strict=True)),
        partial(check_reasks, tmp_path / "reasks", reasking),
    )


def check_reasks(folder: Path, url: str) -> None:
    """With 5 % invalid answers: rows never re-asked cost exactly their estimated prompt; a
    re-asked row costs more (the estimate counts first attempts only)."""
    job = "jobs/label_reviews_structured.toml"
    out = folder / "out.parquet"
    per_row = folder / "estimate.parquet"
    estimate(job, url, out, "--limit", "150", "--rows-to", str(per_row))
    _, summary = run(job, url, out, "--limit", "150")
    assert summary["this_run"]["reasks"] > 0
    rows = (
        pl.read_parquet(per_row)
        .select("id", pl.col("prompt_tokens").alias("estimated"))
        .join(pl.read_parquet(out).select("id", "prompt_tokens", "reasks"), on="id")
    )
    assert rows.height == 150
    plain = rows.filter(pl.col("reasks") == 0)
    asked = rows.filter(pl.col("reasks") > 0)
    assert plain.height > 0
    assert asked.height > 0
    assert plain["prompt_tokens"].to_list() == plain["estimated"].to_list()
    assert (asked["prompt_tokens"] > asked["estimated"]).all()
    assert rows["prompt_tokens"].sum() == server_stats(url)["prompt_tokens_total"]


# -- 2. the expected cost after a 2 % sample -----------------------------------------------


def varied_job(folder: Path, rows: int, seed: int = 7) -> Path:
    """Prompts of 5..300 words, thinking on (32..256 reasoning tokens), max_tokens 384."""
    rng = random.Random(seed)
    texts = [
        f"Note {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 300)))
        for i in range(rows)
    ]
    pl.DataFrame({"doc_id": [f"d{i}" for i in range(rows)], "text": texts}).write_parquet(
        folder / "docs.parquet"
    )
    job = folder / "varied.toml"
    job.write_text(
        f"""
name = "varied"
[input]
path = "{folder / "docs.parquet"}"
id_column = "doc_id"
[request]
model = "deepseek/deepseek-v4-flash"
system = "You summarize notes."
prompt = "Summarize:\\n{{text}}"
max_tokens = 384
thinking = {{ type = "enabled" }}
[limits]
max_in_flight = 64
[output]
path = "{folder / "out.parquet"}"
"""
    )
    return job


def test_expected_cost_after_a_2_percent_sample_is_within_10_percent(
    tmp_path: Path, local_server: Callable[..., str]
) -> None:
    """On the sample job with the most rows and on 1,000 rows of varied prompts and outputs;
    the expected total includes what the sample spent, the actual one every row."""
    varied = varied_job(tmp_path, 1000)
    in_parallel(
        partial(
            check_sample, "jobs/label_reviews.toml", tmp_path / "a", local_server(latency_ms=1)
        ),
        partial(check_sample, varied, tmp_path / "b", local_server(latency_ms=1)),
    )


def check_sample(path: str | Path, folder: Path, url: str) -> None:
    job = str(path)
    out = folder / "out.parquet"
    rows = 300 if job.startswith("jobs/") else 1000
    n = math.ceil(rows * 0.02)
    est = estimate(path, url, out, "--sample", str(n), "--seed", "0")
    assert est["rows"] == {
        "total": rows,
        "to_send": rows - n,
        "done_ok": n,
        "done_failed": 0,
        "unrenderable": 0,
    }
    assert est["output_tokens"]["source"] == "sample"
    sampled = server_stats(url)
    assert sampled["requests_total"] == n
    costs = est["cost_usd"]
    assert costs["price"]["off_peak"] is None  # this model's price has no time window
    spent = Decimal(costs["spent"])
    expected = Decimal(costs["total_expected"])
    assert expected == spent + Decimal(costs["to_send"]["expected"])

    code, summary = run(path, url, out)
    assert code == EXIT_OK
    this = summary["this_run"]
    counters = server_stats(url)
    # The sampled rows are not sent again.
    assert this["rows_resumed"] == n
    assert this["requests"] == rows - n
    assert counters["requests_total"] == rows
    if rows == 1000:  # every prompt differs: each body reached the server once
        assert counters["sends_histogram"] == {"1": rows}
    # The job's total: every row, the sampled ones included.
    actual = Decimal(status(path, url, out)["spent"]["cost_usd"])
    assert actual == spent + Decimal(this["cost_usd"])
    assert float(actual) == pytest.approx(pl.read_parquet(out)["cost_usd"].sum(), rel=1e-9)
    assert abs(expected - actual) <= actual / 10, f"expected {expected}, actual {actual}"
    low, high = (spent + Decimal(x) for x in costs["to_send"]["interval_95"])
    assert low <= actual <= high
    # Input tokens: the estimate equals what the sample and the run report, together.
    assert est["input_tokens"]["total"] == sampled["prompt_tokens_total"] + this["prompt_tokens"]
    assert est["input_tokens"]["total"] == counters["prompt_tokens_total"]


# -- 3. the budget's cap ------------------------------------------------------------------


def test_a_cap_of_half_the_estimate_stops_then_a_higher_cap_finishes_without_resending(
    tmp_path: Path, local_server: Callable[..., str]
) -> None:
    job = "jobs/label_reviews.toml"
    url = local_server(latency_ms=2)
    out = tmp_path / "out.parquet"
    figures = estimate(job, url, out)["cost_usd"]["to_send"]
    cap = (Decimal(figures["expected"]) / 2).quantize(Decimal("0.00000001"))

    code, summary = run(job, url, out, "--max-cost", str(cap))
    assert code == EXIT_OVER_BUDGET
    assert summary["ended"] == "over_budget"
    budget = summary["this_run"]["budget"]
    assert budget["stopped"] is True
    assert Decimal(budget["cap_usd"]) == cap
    spent = Decimal(budget["spent_usd"])
    assert 0 < spent <= cap
    assert Decimal(summary["this_run"]["cost_usd"]) == spent
    first = server_stats(url)
    after_cap = status(job, url, out)
    done = after_cap["rows"]["ok"] + after_cap["rows"]["failed"]
    assert Decimal(after_cap["spent"]["cost_usd"]) == spent
    assert 0 < done < 300
    # Every answered request is a kept row, in the state and in the partial output.
    assert first["ok"] == first["requests_total"] == done
    kept = pl.read_parquet(out)
    assert kept.height == done
    assert set(kept["status"]) == {"ok"}

    higher = str(Decimal(figures["worst_case"]) * 2)
    code, summary = run(job, url, out, "--max-cost", higher)
    assert code == EXIT_OK
    this = summary["this_run"]
    assert this["rows_resumed"] == done
    assert this["requests"] == 300 - done
    counters = server_stats(url)
    assert counters["requests_total"] == 300
    # reviews.parquet holds one review twice (same product and text): that body is sent
    # once per row; every other body exactly once.
    assert counters["sends_histogram"] == {"1": 298, "2": 1}
    final = pl.read_parquet(out)
    assert final.height == 300
    assert set(final["status"]) == {"ok"}
    total = spent + Decimal(this["cost_usd"])
    assert float(total) == pytest.approx(final["cost_usd"].sum(), rel=1e-9)
