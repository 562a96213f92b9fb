"""`pipeline estimate`: exact input tokens, history and samples, checks, cost figures, files."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipeline.cli.commands import cli
from pipeline.cli.estimate import estimate
from pipeline.engine.context import JobContext
from pipeline.estimate.figures import (
    Observation,
    estimate_duration,
    output_interval,
    summarize,
)
from pipeline.estimate.scan import plan_with_bodies, tokenize_bodies
from pipeline.io.sources import iter_batches
from pipeline.job.load import load_job
from pipeline.job.spec import Overrides, apply_overrides
from pipeline.money.pricing import Usage
from pipeline.results import RowResult
from pipeline.rows.prefix import BLOCK_TOKENS
from pipeline.rows.tokens import DEEPSEEK_COUNT, count_prompt_tokens
from pipeline.server.process import StatsClient
from pipeline.state.runs import StateFolder

ROOT = Path(__file__).resolve().parent.parent
REVIEWS = ROOT / "data/sample/reviews.parquet"
ARTICLES = ROOT / "data/sample/articles.jsonl"
KEY_ENV = {"WAVESPEED_API_KEY": "sk-test"}


def run_estimate(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(estimate, list(args), env=KEY_ENV, catch_exceptions=False)
    return result.exit_code, result.output


def estimate_json(*args: str) -> dict[str, Any]:
    code, output = run_estimate(*args, "--json")
    assert code == 0, output
    data: dict[str, Any] = json.loads(output[output.index("{") :])
    return data


def run_job(*args: str) -> str:
    result = CliRunner().invoke(cli, ["run", *args], env=KEY_ENV, catch_exceptions=False)
    assert result.exit_code in (0, 3), result.output
    return result.output


# -- pure pieces ---------------------------------------------------------------------------


def test_summarize_mean_spread_and_truncation_shares() -> None:
    observations = [
        Observation(10, 4, "stop", 100),
        Observation(20, 0, "stop", 300),
        Observation(30, 0, "length", None),
    ]
    stats = summarize(observations, max_tokens=30)
    assert stats is not None
    assert stats.count == 3
    assert stats.mean == 20
    assert stats.sd == pytest.approx(10.0)
    assert stats.mean_reasoning == pytest.approx(4 / 3)
    assert stats.length_share == pytest.approx(1 / 3)
    assert stats.at_max_share == pytest.approx(1 / 3)
    assert stats.mean_latency_s == pytest.approx(0.2)
    assert summarize([], 10) is None
    single = summarize([Observation(5, 0, "stop", None)], None)
    assert single is not None
    assert single.sd is None
    assert single.at_max_share is None


def test_interval_is_the_clt_on_the_mean_plus_the_rows_own_spread() -> None:
    low, high = output_interval(1000, 50.0, 10.0, 100) or (0, 0)
    half = 1.96 * 10 * math.sqrt(1000**2 / 100 + 1000)
    assert (low, high) == pytest.approx((50_000 - half, 50_000 + half))
    assert output_interval(10, 5.0, None, 1) is None
    assert output_interval(10, 1.0, 100.0, 2) == pytest.approx(
        (0.0, 10 + 1.96 * 100 * math.sqrt(50 + 10))
    )


def test_duration_takes_the_binding_limit() -> None:
    base = {"max_in_flight": 10, "latency_s": 2.0, "tokens_per_request": 1000.0}
    free = estimate_duration(100, requests_per_minute=None, tokens_per_minute=None, **base)  # type: ignore[arg-type]
    assert free.binding == "max_in_flight"
    assert free.seconds == pytest.approx(20.0)
    rpm = estimate_duration(100, requests_per_minute=60, tokens_per_minute=None, **base)  # type: ignore[arg-type]
    assert rpm.binding == "requests_per_minute"
    assert rpm.seconds == pytest.approx(100.0)
    tpm = estimate_duration(100, requests_per_minute=600, tokens_per_minute=6000, **base)  # type: ignore[arg-type]
    assert tpm.binding == "tokens_per_minute"
    assert tpm.seconds == pytest.approx(1000.0)
    assert estimate_duration(0, requests_per_minute=1, tokens_per_minute=1, **base).seconds == 0  # type: ignore[arg-type]


def test_tokenize_bodies_agrees_with_count_prompt_tokens() -> None:
    bodies: list[dict[str, Any]] = [
        {"model": "deepseek/deepseek-v4-flash", "messages": [{"role": "user", "content": "hi"}]},
        {
            "model": "deepseek-v4-flash",
            "thinking": {"type": "disabled"},
            "messages": [
                {"role": "system", "content": "Be brief. " * 40},
                {"role": "user", "content": "Hello there, how are you?"},
            ],
        },
    ]
    counts, prefixes, counting = tokenize_bodies(bodies)
    assert counts == count_prompt_tokens(bodies)
    assert counting.exact
    assert counting.methods == {DEEPSEEK_COUNT}
    assert prefixes[1] is not None
    assert counts[1] > BLOCK_TOKENS
    assert len(prefixes[1]) == counts[1] // BLOCK_TOKENS
    assert prefixes[0] == ()
    other = [{"model": "meta-llama/Llama-3.1-8B", "messages": [{"role": "user", "content": "x"}]}]
    counts, prefixes, counting = tokenize_bodies(other)
    assert counts == count_prompt_tokens(other)
    assert not counting.exact
    assert prefixes == [None]


def test_tokenize_bodies_in_several_tokenizer_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("pipeline.estimate.scan.ENCODE_CHUNK", 3)
    bodies: list[dict[str, Any]] = [
        {
            "model": "deepseek-v4-flash",
            "messages": [{"role": "user", "content": f"Row {i}: " + "word " * (i * 13)}],
        }
        for i in range(10)
    ]
    counts, prefixes, counting = tokenize_bodies(bodies)
    assert counts == count_prompt_tokens(bodies)
    assert counting.exact
    assert [len(p or ()) for p in prefixes] == [c // BLOCK_TOKENS for c in counts]


@pytest.mark.parametrize(
    ("job", "data"),
    [("jobs/label_reviews.toml", REVIEWS), ("jobs/summarize_articles.toml", ARTICLES)],
)
def test_plan_with_bodies_plans_as_the_planner(job: str, data: Path) -> None:
    spec = apply_overrides(load_job(ROOT / job), Overrides(input=str(data)))
    context = JobContext(spec)
    scan = context.scan()
    planner = context.planner
    start = 0
    for batch in iter_batches(scan.files, planner.columns, limit=None, batch_rows=7):
        planned, bodies = plan_with_bodies(planner, batch, start)
        assert planned == list(planner.plan(batch, start))
        assert bodies == [json.loads(row.body) for row in planned if row.body is not None]
        # Without keys (an estimate whose journal holds no result): the same rows and bodies.
        unkeyed, same = plan_with_bodies(planner, batch, start, keyed=False)
        assert same == bodies
        assert [(r.row, r.id, r.failure, r.body is None) for r in unkeyed] == [
            (r.row, r.id, r.failure, r.body is None) for r in planned
        ]
        assert {r.key for r in unkeyed} == {""}
        start += batch.num_rows
    assert start > 0


# -- against the built-in server -------------------------------------------------------------


@pytest.mark.parametrize(
    ("job", "data"),
    [("jobs/label_reviews.toml", REVIEWS), ("jobs/summarize_articles.toml", ARTICLES)],
)
def test_input_tokens_equal_what_the_server_counts(
    job: str,
    data: Path,
    sample_jobs: Path,
    monkeypatch: pytest.MonkeyPatch,
    local_server: Callable[..., str],
) -> None:
    monkeypatch.chdir(sample_jobs.parent)
    before = estimate_json(str(sample_jobs.parent / job), "--input", str(data), "--local")
    assert before["token_count"] == "exact"
    assert before["rows"]["to_send"] == before["rows"]["total"] > 0
    base = local_server(latency_ms=1)
    run_job(str(sample_jobs.parent / job), "--input", str(data), "--base-url", base)
    with StatsClient(base) as stats:
        counters = stats()
    assert before["input_tokens"]["total"] == counters["prompt_tokens_total"]
    assert counters["requests_total"] == before["requests"]


def test_cached_prefix_tokens_match_the_server_in_input_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, local_server: Callable[..., str]
) -> None:
    """With one request in flight the server sees rows in input order, like the estimate."""
    monkeypatch.chdir(tmp_path)
    system = "You label product reviews carefully and consistently. " * 30
    job = tmp_path / "job.toml"
    job.write_text(
        f"""
name = "prefix"
[input]
path = "{REVIEWS}"
id_column = "review_id"
limit_placeholder = 0
[request]
model = "deepseek-v4-flash"
system = "{system}"
prompt = "Review of {{product}}: {{text}}"
max_tokens = 8
thinking = {{ type = "disabled" }}
[limits]
max_in_flight = 1
[output]
path = "out.parquet"
""".replace("limit_placeholder = 0\n", "")
    )
    before = estimate_json(str(job), "--local", "--limit", "60")
    assert before["input_tokens"]["cached_prefix"] > 0
    base = local_server(latency_ms=0)
    run_job(str(job), "--base-url", base, "--limit", "60")
    with StatsClient(base) as stats:
        counters = stats()
    assert before["input_tokens"]["cached_prefix"] == counters["cache_hit_tokens_total"]
    to_send = before["cost_usd"]["to_send"]
    assert float(to_send["expected"]) < float(to_send["expected_without_cache"])
    window = before["cost_usd"]["price"]["off_peak"]
    assert window == {"start": "16:30", "end": "00:30", "discount": "0.5"}
    off_peak = before["cost_usd"]["to_send_off_peak"]
    assert float(off_peak["expected"]) == pytest.approx(float(to_send["expected"]) / 2)


def test_history_gives_the_expected_output_and_its_interval(
    tmp_path: Path,
    sample_jobs: Path,
    monkeypatch: pytest.MonkeyPatch,
    local_server: Callable[..., str],
) -> None:
    monkeypatch.chdir(tmp_path)
    job = str(sample_jobs / "summarize_articles.toml")
    base = local_server(latency_ms=1)
    run_job(job, "--input", str(ARTICLES), "--base-url", base, "--limit", "15")
    out = pl.read_parquet(tmp_path / "out/summarize-articles.parquet")
    observed = out["completion_tokens"].to_list()
    mean = sum(observed) / len(observed)
    sd = math.sqrt(sum((x - mean) ** 2 for x in observed) / (len(observed) - 1))
    spent = sum(out["cost_usd"].to_list())

    data = estimate_json(job, "--input", str(ARTICLES), "--base-url", base)
    output = data["output_tokens"]
    assert output["source"] == "history"
    assert output["observations"] == 15
    assert output["mean_per_row"] == pytest.approx(mean)
    assert output["sd_per_row"] == pytest.approx(sd)
    assert data["rows"] == {
        "total": 40,
        "to_send": 25,
        "done_ok": int((out["status"] == "ok").sum()),
        "done_failed": int((out["status"] == "failed").sum()),
        "unrenderable": 0,
    }
    assert output["expected"] == round(25 * mean)
    max_tokens = load_job(job).request.max_tokens
    assert max_tokens is not None
    assert output["worst_case"] == 25 * max_tokens
    low, high = output["interval_95"]
    half = 1.96 * sd * math.sqrt(25**2 / 15 + 25)
    assert low == math.floor(max(25 * mean - half, 0))
    assert high == min(math.ceil(25 * mean + half), 25 * max_tokens)
    costs = data["cost_usd"]
    assert float(costs["spent"]) == pytest.approx(spent)
    assert float(costs["total_expected"]) == pytest.approx(
        spent + float(costs["to_send"]["expected"])
    )
    lo_cost, hi_cost = (float(x) for x in costs["to_send"]["interval_95"])
    assert lo_cost <= float(costs["to_send"]["expected"]) <= hi_cost
    assert data["duration"]["latency_observed"] is True


def test_sample_is_sent_once_and_the_run_does_not_send_it_again(
    tmp_path: Path,
    sample_jobs: Path,
    monkeypatch: pytest.MonkeyPatch,
    local_server: Callable[..., str],
) -> None:
    monkeypatch.chdir(tmp_path)
    job = str(sample_jobs / "label_reviews.toml")
    base = local_server(latency_ms=1)
    code, output = run_estimate(
        job, "--input", str(REVIEWS), "--base-url", base, "--sample", "20", "--seed", "3"
    )
    assert code == 0, output
    assert "20 rows sampled; they will not be sent again." in output
    with StatsClient(base) as stats:
        assert stats()["requests_total"] == 20
        again = estimate_json(job, "--input", str(REVIEWS), "--base-url", base)
        assert again["rows"]["to_send"] == 280
        assert again["output_tokens"]["source"] == "history"
        assert again["output_tokens"]["observations"] == 20
        assert stats()["requests_total"] == 20  # a plain estimate sends nothing
        run_job(job, "--input", str(REVIEWS), "--base-url", base)
        counters = stats()
    assert counters["requests_total"] == 300
    out = pl.read_parquet(tmp_path / "out/label-reviews.parquet")
    assert out.height == 300


def test_context_window_and_truncation_checks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    job = tmp_path / "job.toml"
    job.write_text(
        f"""
name = "big"
[input]
path = "{REVIEWS}"
id_column = "review_id"
[request]
prompt = "Review: {{text}}"
max_tokens = 1048575
[output]
path = "out.parquet"
"""
    )
    # Recorded answers (their keys match no row): 2 of 4 stopped at the limit.
    state = StateFolder(tmp_path / "out.parquet.state")
    state.journal.open()
    answers = [(1_048_575, "length"), (1_048_575, "length"), (100, "stop"), (300, "stop")]
    state.journal.append_results(
        [
            RowResult(
                key=f"k{i}",
                row=i,
                status="failed" if reason == "length" else "ok",
                finish_reason=reason,
                usage=Usage(prompt_tokens=10, completion_tokens=n),
                latency_ms=500,
                run=1,
            )
            for i, (n, reason) in enumerate(answers)
        ]
    )
    data = estimate_json(str(job))
    checks = data["checks"]
    assert checks["context_window"] == 1_048_576
    over = checks["over_context"]
    source = pl.read_parquet(REVIEWS)
    assert over["count"] == 300  # every prompt is longer than 1 token
    assert over["ids"] == source["review_id"].to_list()[:20]
    assert checks["truncation"] == {
        "observations": 4,
        "finish_reason_length_share": 0.5,
        "at_max_tokens_share": 0.5,
    }
    warnings = " ".join(data["warnings"])
    assert "300 row(s) exceed the model's context window of 1,048,576" in warnings
    assert 'finish_reason "length"' in warnings
    assert "likely truncated by max_tokens" in warnings


def test_no_max_tokens_falls_back_to_the_models_longest_answer_loudly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    job = tmp_path / "job.toml"
    job.write_text(
        f"""
name = "open"
[input]
path = "{REVIEWS}"
[request]
prompt = "Review: {{text}}"
[output]
path = "out.parquet"
"""
    )
    code, output = run_estimate(str(job), "--limit", "5")
    assert code == 0, output
    flat = " ".join(output.split())
    assert "THE JOB SETS NO max_tokens" in flat
    assert "393,216" in flat
    data = estimate_json(str(job), "--limit", "5")
    assert data["output_tokens"]["source"] == "model_max_output"
    assert data["output_tokens"]["expected"] == 5 * 393_216


def test_online_and_batch_side_by_side_for_an_endpoint_with_batches(
    tmp_path: Path, sample_jobs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    job = str(sample_jobs / "label_reviews.toml")
    openai = ("--base-url", "https://api.openai.com/v1", "--price", "input=0.15,output=0.6")
    data = estimate_json(job, "--input", str(REVIEWS), *openai)
    assert data["batch"]["discount"] == "0.5"
    online = Decimal(data["cost_usd"]["to_send"]["expected"])
    assert Decimal(data["batch"]["expected_usd"]) == online / 2
    code, output = run_estimate(job, "--input", str(REVIEWS), "--local")
    assert code == 0, output
    assert "online / batch mode" in output
    assert "in batch" in output


def test_json_shape(tmp_path: Path, sample_jobs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    data = estimate_json(str(sample_jobs / "label_reviews.toml"), "--input", str(REVIEWS))
    assert set(data) == {
        "job",
        "model",
        "endpoint",
        "token_count",
        "rows",
        "requests",
        "input_tokens",
        "output_tokens",
        "cost_usd",
        "duration",
        "checks",
        "warnings",
        "per_row_output",
        "batch",
    }
    assert data["batch"] is None  # WaveSpeedAI has no Batch API
    assert data["input_tokens"]["total"] == 17_826
    assert data["output_tokens"]["source"] == "max_tokens"
    costs = data["cost_usd"]
    assert costs["price"] == {
        "input": "0.17",
        "cached_input": "0.17",
        "output": "0.34",
        "off_peak": None,
    }
    assert costs["to_send_off_peak"] is None
    expected = (17_826 * 0.17 + 300 * 16 * 0.34) / 1e6
    assert isinstance(costs["to_send"]["expected"], str)
    assert float(costs["to_send"]["expected"]) == pytest.approx(expected, rel=1e-12)
    assert costs["to_send"]["worst_case"] == costs["to_send"]["expected"]
    assert data["duration"]["binding"] == "max_in_flight"


def test_per_row_parquet(
    tmp_path: Path, sample_jobs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "per_row.parquet"
    data = estimate_json(
        str(sample_jobs / "label_reviews.toml"), "--input", str(REVIEWS), "--rows-to", str(target)
    )
    assert data["per_row_output"] == str(target)
    table = pq.read_table(target)
    assert table.column_names == [
        "id",
        "row",
        "prompt_tokens",
        "cached_prefix_tokens",
        "expected_output_tokens",
        "worst_output_tokens",
        "expected_cost_usd",
        "worst_cost_usd",
        "over_context",
    ]
    df = pl.from_arrow(table)
    assert isinstance(df, pl.DataFrame)
    assert df.height == 300
    assert df["id"].to_list() == pl.read_parquet(REVIEWS)["review_id"].to_list()
    assert df["row"].to_list() == list(range(300))
    assert df["prompt_tokens"].sum() == data["input_tokens"]["total"]
    assert set(df["worst_output_tokens"]) == {16}
    assert df["expected_cost_usd"].sum() == pytest.approx(
        float(data["cost_usd"]["to_send"]["expected"])
    )
    assert not df["over_context"].any()
    assert not list(tmp_path.glob(".*partial"))


@pytest.mark.parametrize(
    ("setup", "args", "words"),
    [
        (None, ["nope.toml"], "no such job file"),
        ("bad_input", ["job.toml"], "[input] path: no such file or folder"),
        ("bad_window", ["job.toml"], "[pricing] off_peak_start: must be a UTC time"),
        ("good", ["job.toml", "--rows-to", "x.csv"], "written as .parquet"),
        ("good", ["job.toml", "--sample", "2"], "WAVESPEED_API_KEY is not set"),
    ],
)
def test_mistakes_get_one_line_and_no_traceback(
    setup: str | None,
    args: list[str],
    words: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    path = REVIEWS if setup != "bad_input" else tmp_path / "missing.parquet"
    pricing = '[pricing]\noff_peak_start = "4pm"\noff_peak_end = "01:00"\noff_peak_discount = 0.5'
    (tmp_path / "job.toml").write_text(
        f"""
name = "x"
[input]
path = "{path}"
[request]
api_key_env = "WAVESPEED_API_KEY"
prompt = "Review: {{text}}"
max_tokens = 4
[output]
path = "out.parquet"
{pricing if setup == "bad_window" else ""}
"""
    )
    result = CliRunner().invoke(estimate, args, env={"WAVESPEED_API_KEY": None})
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ")
    assert words in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert "Traceback" not in result.output


def test_a_percentage_sample_has_a_floor_and_a_count_is_taken_as_given() -> None:
    from pipeline.cli.estimate import MIN_SAMPLE_ROWS, sample_rows

    assert sample_rows(10_000, 0, 2.0) == 200
    assert sample_rows(300, 0, 2.0) == MIN_SAMPLE_ROWS  # 6 rows would say little
    assert sample_rows(12, 0, 2.0) == 12  # never more than the job has
    assert sample_rows(300, 5, None) == 5
    code, output = run_estimate(str(ROOT / "jobs/label_reviews.toml"), "--sample", "2x")
    assert code == 2
    assert "is not a row count (like 50) or a percentage (like 2%)" in output


def test_re_asked_prompts_seen_in_history_count_in_the_expected_input(
    tmp_path: Path,
    sample_jobs: Path,
    monkeypatch: pytest.MonkeyPatch,
    local_server: Callable[..., str],
) -> None:
    """A structured job re-asks invalid answers: the prompts it sends again are billed, and
    an estimate after a sample expects them."""
    monkeypatch.chdir(tmp_path)
    job = str(sample_jobs / "label_reviews_structured.toml")
    base = local_server(latency_ms=1, invalid_json_rate=0.5)
    reviews = ("--input", str(REVIEWS))
    code, output = run_estimate(job, *reviews, "--base-url", base, "--sample", "40")
    assert code == 0, output
    data = estimate_json(job, *reviews, "--base-url", base)
    assert data["rows"]["to_send"] == 260
    tokens = data["input_tokens"]
    journal = StateFolder(load_job(job).state_path).journal
    sampled = list(journal.iter_results())
    reasks = sum(r.reasks for r in sampled)
    assert reasks > 0  # at rate 0.5, some of the 40 were asked again
    assert tokens["billed_expected"] > tokens["to_send"]
    # the observed ratio of billed to first-attempt prompt tokens, applied to the rest
    ratio = tokens["billed_expected"] / tokens["to_send"]
    assert 1 + reasks / 80 < ratio < 1 + 2 * reasks / 40


def test_an_openai_batch_file_is_estimated_like_any_job(tmp_path: Path) -> None:
    job = tmp_path / "batch.toml"
    job.write_text(
        f"""
name = "batch"
[input]
path = "{ROOT / "data/sample/openai_batch.jsonl"}"
format = "openai-batch"
[request]
base_url = "http://127.0.0.1:9/v1"
model = "deepseek-v4-flash"
[output]
path = "{tmp_path / "out.parquet"}"
"""
    )
    data = estimate_json(str(job))
    assert data["rows"]["total"] == 2
    bodies = [
        {**json.loads(line)["body"], "model": "deepseek-v4-flash"}
        for line in (ROOT / "data/sample/openai_batch.jsonl").read_text().splitlines()
    ]
    assert data["input_tokens"]["total"] == sum(count_prompt_tokens(bodies))
