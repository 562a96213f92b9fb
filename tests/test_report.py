"""``pipeline report``: the pure figures and charts, the run's timeline, and the command."""

from __future__ import annotations

import json
import random
import re
import shutil
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli.commands import cli
from pipeline.cli.display import report_hint
from pipeline.engine.accounting import outcome_code
from pipeline.money.pricing import Usage
from pipeline.provider.client import Attempt
from pipeline.provider.retry import Failure
from pipeline.report.data import CostKind, ReportData, RunLine
from pipeline.report.figures import (
    LatencyHistogram,
    Reservoir,
    TimeAggregator,
    bin_width,
    failure_reason,
    histogram,
    outcome_kind,
)
from pipeline.report.gather import cost_by_kind
from pipeline.report.page import render
from pipeline.report.svg import Series, empty_chart, line_chart, nice_ticks
from pipeline.results import Reply
from pipeline.state.timeline import Timeline, read_events, read_head
from pipeline.testing import FakeClock

ROOT = Path(__file__).resolve().parent.parent

# -- figures (pure) ----------------------------------------------------------------------


def exact_quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, -(-len(ordered) * q // 1) - 1).__int__()]


@pytest.mark.parametrize("q", [0.5, 0.9, 0.99])
def test_latency_percentiles_are_within_two_percent_of_the_exact_ones(q: float) -> None:
    rng = random.Random(3)
    values = [rng.lognormvariate(5, 0.8) for _ in range(5000)]
    hist = LatencyHistogram()
    for value in values:
        hist.add(value)
    exact = exact_quantile(values, q)
    assert hist.quantile(q) == pytest.approx(exact, rel=0.02)


def test_an_empty_latency_histogram_has_no_percentile() -> None:
    assert LatencyHistogram().quantile(0.5) is None


def test_percentiles_of_a_few_values_pick_the_nearest_rank() -> None:
    hist = LatencyHistogram()
    for value in (100, 200, 300, 400):
        hist.add(value)
    assert hist.quantile(0.5) == pytest.approx(200, rel=0.02)
    assert hist.quantile(0.99) == pytest.approx(400, rel=0.02)


def test_histogram_counts_every_value_in_round_bins() -> None:
    values = [float(v) for v in range(7, 513, 3)]
    hist = histogram(values, bins=20)
    assert sum(hist.counts) == len(values)
    assert len(hist.edges) == len(hist.counts) + 1
    step = hist.edges[1] - hist.edges[0]
    assert step in (20.0, 25.0, 50.0)
    assert hist.edges[0] <= 7 < hist.edges[1]
    assert hist.edges[-2] <= 511 < hist.edges[-1]
    assert not hist.sampled


def test_histogram_of_token_counts_keeps_bins_whole_numbers() -> None:
    hist = histogram([3.0, 4.0, 4.0, 5.0], integers=True)
    assert hist.edges == (3.0, 4.0, 5.0, 6.0)
    assert hist.counts == (1, 2, 1)


def test_histogram_of_one_repeated_value_has_one_bin() -> None:
    assert histogram([0.25, 0.25]).counts == (2,)
    assert histogram([7.0], integers=True).edges == (7.0, 8.0)


def test_an_empty_histogram_has_no_bins() -> None:
    hist = histogram([])
    assert hist.counts == ()
    assert hist.edges == ()


def test_a_histogram_of_a_sample_says_how_many_rows_it_stands_for() -> None:
    reservoir = Reservoir(size=100, rng=random.Random(1))
    for value in range(10_000):
        reservoir.add(float(value))
    assert len(reservoir.values) == 100
    hist = histogram(reservoir.values, seen=reservoir.seen)
    assert hist.sampled
    assert hist.seen == 10_000
    assert 3000 < sum(reservoir.values) / 100 < 7000  # uniform over the stream


def test_bin_width_keeps_charts_under_the_bin_count() -> None:
    assert bin_width(3) == 0.25
    assert bin_width(100) == 1
    assert bin_width(8 * 3600) == 300
    assert 10 * 24 * 3600 / bin_width(10 * 24 * 3600) <= 150


def test_time_bins_count_rates_429s_latency_and_carry_the_cap() -> None:
    aggregator = TimeAggregator(duration_s=4, max_bins=4)  # 1 s bins
    events = [
        ("c", 0, 16, "0"),
        ("a", 100, 200, "200"),
        ("a", 200, 400, "200"),
        ("a", 300, 10, "429"),
        ("a", 1500, 300, "503"),
        ("a", 1600, 5000, "T"),
        ("c", 2000, 8, "6"),
        ("c", 2500, 8, "2"),
        ("a", 3100, 100, "200"),
        ("a", 3200, 1, "X"),
        ("x", 3300, 1, "junk"),  # an unknown kind is ignored
    ]
    aggregator.add(events)
    figures = aggregator.figures()
    assert figures.bin_s == 1
    assert [b.sent_per_s for b in figures.bins] == [3, 2, 0, 2]
    assert [b.ok_per_s for b in figures.bins] == [2, 0, 0, 1]
    assert [b.rate_limited for b in figures.bins] == [1, 0, 0, 0]
    assert [b.cap for b in figures.bins] == [16, 16, 8, 8]
    assert [b.in_flight for b in figures.bins] == [0, 0, 4, 4]
    assert figures.bins[0].p50_ms == pytest.approx(200, rel=0.02)
    assert figures.bins[0].p99_ms == pytest.approx(400, rel=0.02)
    assert figures.bins[1].p50_ms is None  # nothing answered 200 then
    assert figures.attempts == 7
    assert dict(figures.outcomes) == {
        "ok": 3,
        "429 rate limited": 1,
        "5xx server error": 1,
        "timeout": 1,
        "cut off by a stop": 1,
    }


def test_no_events_give_no_bins() -> None:
    figures = TimeAggregator(duration_s=10).figures()
    assert figures.bins == ()
    assert figures.latency == (None, None, None)


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        ("200", "ok"),
        ("429", "429 rate limited"),
        ("502", "5xx server error"),
        ("400", "other HTTP error"),
        ("M", "unusable answer"),
        ("T", "timeout"),
        ("C", "connection error"),
        ("N", "connection error"),
        ("X", "cut off by a stop"),
    ],
)
def test_outcome_kinds(code: str, kind: str) -> None:
    assert outcome_kind(code) == kind


@pytest.mark.parametrize(
    ("error", "status", "reason"),
    [
        ("not sent: the prompt is too long", None, "not sent (request could not be made)"),
        ("truncated: the answer reached max_tokens", 200, "truncated (max_tokens reached)"),
        ("invalid answer after 2 re-asks: x", 200, "answer broke the output schema"),
        ("HTTP 400: bad request", 400, "HTTP 400"),
        ("HTTP 429: slow down (gave up after 6 attempts)", 429, "HTTP 429"),
        ("no answer within 600 s (gave up after 6 attempts)", None, "timeout"),
        ("connection error (ClientOSError: reset)", None, "connection error"),
        ("malformed_response", 200, "unusable answer"),
        (None, None, "unknown"),
    ],
)
def test_failure_reasons(error: str | None, status: int | None, reason: str) -> None:
    assert failure_reason(error, status) == reason


def test_cost_by_kind_splits_reasoning_out_of_output() -> None:
    from pipeline.money.pricing import Price

    price = Price(input=Decimal("1"), cached_input=Decimal("0.1"), output=Decimal("2"))
    usage = Usage(
        prompt_tokens=1_000_000,
        cached_tokens=400_000,
        completion_tokens=300_000,
        reasoning_tokens=100_000,
    )
    kinds = {kind.name: kind for kind in cost_by_kind(usage, price)}
    assert kinds["input"] == CostKind(name="input", tokens=600_000, usd=Decimal("0.6"))
    assert kinds["cached input"].usd == Decimal("0.04")
    assert kinds["output"] == CostKind(name="output", tokens=200_000, usd=Decimal("0.4"))
    assert kinds["reasoning"] == CostKind(name="reasoning", tokens=100_000, usd=Decimal("0.2"))
    unpriced = cost_by_kind(usage, None)
    assert [kind.usd for kind in unpriced] == [None] * 4


# -- charts and page (pure) ---------------------------------------------------------------


def test_nice_ticks_cover_the_range_with_round_steps() -> None:
    assert nice_ticks(0, 87) == [0, 20, 40, 60, 80, 100]
    assert nice_ticks(0, 0) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(0, 12, integers=True) == [0, 5, 10, 15]
    assert nice_ticks(0, 3, integers=True) == [0, 1, 2, 3]
    ticks = nice_ticks(0, 0.00034)
    assert ticks[0] == 0
    assert ticks[-1] >= 0.00034


def test_an_empty_chart_says_so_and_has_no_marks() -> None:
    svg = empty_chart("x", "A chart", "no data to draw")
    assert 'data-marks="0"' in svg
    assert "no data to draw" in svg
    assert svg.startswith("<svg")
    assert svg.endswith("</svg>")


def test_a_line_chart_breaks_at_gaps_and_counts_its_points() -> None:
    svg = line_chart(
        "t",
        "T",
        series=[Series("s", "#000", [(0, 1), (1, 2), (2, None), (3, 4)])],
        x_max=3,
        x_label="x",
        y_label="y",
    )
    assert 'data-marks="3"' in svg
    path = re.search(r'<path d="([^"]+)" fill="none"', svg)
    assert path is not None
    assert path.group(1).count("M") == 2


def test_a_line_chart_of_nothing_is_an_empty_chart() -> None:
    svg = line_chart(
        "t", "T", series=[Series("s", "#000", [(0, None)])], x_max=1, x_label="", y_label=""
    )
    assert 'data-marks="0"' in svg


def report_data(**changes: object) -> ReportData:
    values: dict[str, object] = {
        "job": "a <b>job</b> & co",
        "model": "m",
        "endpoint": "https://example.invalid/v1",
        "state_dir": "/tmp/state",
        "made_at": 0.0,
        "rows_ok": 3,
        "rows_failed": 1,
        "spent_usd": Decimal("0.001"),
        "history": (
            RunLine(
                run=1,
                started_at=0.0,
                ended_at=5.0,
                how="completed",
                rows_ok=3,
                rows_failed=1,
                requests=5,
                rate_limited=1,
                cost_usd=Decimal("0.001"),
            ),
        ),
        "time_run": None,
        "time": None,
        "time_note": "no run has a timeline",
        "output_tokens": histogram([1.0, 2.0, 2.0], integers=True),
        "row_cost": histogram([0.0001, 0.0002, 0.0003]),
        "cost_by_kind": cost_by_kind(Usage(prompt_tokens=10, completion_tokens=5), None),
        "price_note": "no price is known",
        "failures": (("<script>alert(1)</script>", 1),),
    }
    values.update(changes)
    return ReportData(**values)  # type: ignore[arg-type]


def test_the_page_is_self_contained_and_escapes_every_text() -> None:
    page = render(report_data())
    assert "<script" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "a &lt;b&gt;job&lt;/b&gt; &amp; co" in page
    assert not re.search(r"(src|href)=\"(?!data:)", page)  # nothing to fetch
    assert re.findall(r"url\(", page) == []
    assert "no run has a timeline" in page
    charts = re.findall(r'data-chart="([^"]+)"', page)
    assert charts == ["output-tokens", "row-cost", "cost-by-kind", "failed-rows", "runs"]


# -- the timeline ------------------------------------------------------------------------


def test_the_timeline_writes_attempts_and_samples_and_reads_them_back(tmp_path: Path) -> None:
    clock = FakeClock()
    timeline = Timeline(tmp_path, 7, clock=clock, wall=lambda: 1_700_000_000.5)
    clock.advance(1.5)
    timeline.attempt(clock(), 0.2034, "200")
    timeline.sample(16, 1)
    timeline.flush()
    clock.advance(0.25)
    timeline.attempt(clock(), None, "X")  # cut off: it lasted until the close
    clock.advance(0.5)
    timeline.close((8, 0))
    with timeline.path.open("ab") as handle:
        handle.write(b"a,99,1")  # a torn last line (a crash mid-write)
    head = read_head(timeline.path)
    assert head is not None
    assert (head.run, head.t0) == (7, 1_700_000_000.5)
    assert list(read_events(timeline.path)) == [
        ("c", 1500, 16, "1"),
        ("a", 1500, 203, "200"),
        ("c", 2250, 8, "0"),
        ("a", 1750, 500, "X"),
    ]


def test_a_timeline_that_cannot_be_written_does_not_stop_the_run(tmp_path: Path) -> None:
    blocked = tmp_path / "state"
    blocked.write_text("a file where the folder should be")
    timeline = Timeline(blocked, 1)
    timeline.attempt(timeline.now(), 0.1, "200")
    timeline.close((1, 0))
    assert timeline.broken is not None


def attempt(**fields: object) -> Attempt:
    values: dict[str, object] = {
        "reply": None,
        "failure": None,
        "error": None,
        "status": None,
        "usage": None,
        "retry_after_s": None,
        "latency_s": 0.1,
    }
    values.update(fields)
    return Attempt(**values)  # type: ignore[arg-type]


def test_outcome_codes_of_attempts() -> None:
    reply = Reply(content="x", reasoning=None, finish_reason="stop", model=None)
    assert outcome_code(attempt(reply=reply, status=200)) == "200"
    assert outcome_code(attempt(failure=Failure.MALFORMED, status=200)) == "M"
    assert outcome_code(attempt(failure=Failure.RATE_LIMITED, status=429)) == "429"
    assert outcome_code(attempt(failure=Failure.TIMEOUT)) == "T"
    assert outcome_code(attempt(failure=Failure.CONNECTION)) == "C"
    assert outcome_code(attempt(failure=Failure.CONNECTION, reached=False)) == "N"
    assert outcome_code(None) == "X"


# -- the command -------------------------------------------------------------------------


def write_job(tmp_path: Path, base_url: str) -> Path:
    path = tmp_path / "job.toml"
    path.write_text(
        f"""
name = "report"
[input]
path = "{ROOT / "data/sample/reviews.parquet"}"
id_column = "review_id"
[request]
base_url = "{base_url}"
model = "deepseek-v4-flash"
prompt = "Label: {{text}}"
max_tokens = 16
thinking = {{ type = "disabled" }}
[limits]
max_in_flight = 12
max_retry_wait_s = 0.05
[output]
path = "{tmp_path / "out" / "labels.parquet"}"
"""
    )
    return path


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def test_a_job_with_no_runs_gets_one_line_and_exit_2(tmp_path: Path) -> None:
    job = write_job(tmp_path, "http://127.0.0.1:9/v1")
    code, output = invoke("report", str(job))
    assert code == 2
    assert output.count("\n") == 1
    assert "no runs yet" in output
    assert "pipeline run" in output
    assert not (tmp_path / "out").exists()


def test_the_timeline_records_every_request_and_429_of_the_run(
    tmp_path: Path, local_server: Callable[..., str]
) -> None:
    base_url = local_server(max_concurrency=3, latency_ms=20, latency_jitter_ms=10)
    job = write_job(tmp_path, base_url)
    code, output = invoke("run", str(job), "--limit", "120")
    assert code == 0, output
    assert f"report: pipeline report {job}\n" in output
    state = tmp_path / "out" / "labels.parquet.state"
    end = [json.loads(line) for line in (state / "runs.jsonl").read_text().splitlines()][-1]
    summary = end["summary"]
    events = list(read_events(state / "timeline" / "000001.csv"))
    attempts = [event for event in events if event[0] == "a"]
    assert len(attempts) == summary["requests"]
    assert sum(1 for event in attempts if event[3] == "429") == summary["rate_limited"]
    assert summary["rate_limited"] > 0
    assert sum(1 for event in attempts if event[3] == "200") == 120
    assert all(event[2] >= 0 for event in attempts)
    assert any(event[0] == "c" for event in events)  # the cap, sampled

    code, output = invoke("report", str(job))
    assert code == 0, output
    page = (tmp_path / "out" / "labels.report.html").read_text()
    assert f"to {tmp_path / 'out' / 'labels.report.html'}" in output
    for chart in ("requests", "cap", "latency", "output-tokens", "cost-by-kind", "runs"):
        assert f'data-chart="{chart}"' in page
    assert re.search(r'data-chart="requests" data-marks="[1-9]', page)
    assert "answered 429" in page

    code, output = invoke("report", str(job), "--run", "5")
    assert code == 2
    assert "no run 5" in output


def test_a_state_folder_from_before_the_timeline_still_reports_and_resumes(
    tmp_path: Path, local_server: Callable[..., str]
) -> None:
    base_url = local_server(latency_ms=5)
    job = write_job(tmp_path, base_url)
    assert invoke("run", str(job), "--limit", "40")[0] == 0
    state = tmp_path / "out" / "labels.parquet.state"
    shutil.rmtree(state / "timeline")  # as an older version left it
    code, output = invoke("status", str(job), "--limit", "40")
    assert code == 0, output
    page = tmp_path / "r.html"
    code, output = invoke("report", str(job), "--to", str(page))
    assert code == 0, output
    text = page.read_text()
    assert "no run has a timeline" in text
    assert 'data-chart="output-tokens"' in text
    code, output = invoke("run", str(job), "--limit", "60")  # resumes: 20 rows more
    assert code == 0, output
    history = [json.loads(line) for line in (state / "runs.jsonl").read_text().splitlines()]
    assert history[-1]["summary"]["requests"] == 20
    code, output = invoke("report", str(job), "--to", str(page))
    assert code == 0
    assert 'data-chart="requests"' in page.read_text()


def test_the_hint_after_a_run_repeats_its_side_and_output() -> None:
    assert (
        report_hint("jobs/x.toml", local=False, output=None)
        == "report: pipeline report jobs/x.toml"
    )
    assert (
        report_hint("my jobs/x.toml", local=True, output="out/a b.parquet")
        == "report: pipeline report 'my jobs/x.toml' --local --output 'out/a b.parquet'"
    )


def test_the_page_shows_the_endpoint_without_credentials(tmp_path: Path) -> None:
    from pipeline.job.load import load_job
    from pipeline.report.gather import _shown

    job = load_job(write_job(tmp_path, "https://user:secret@llm.example:8443/v1?key=abc"))
    assert _shown(job) == "https://llm.example:8443/v1"
