"""Issue 5's acceptance criteria, at full size, against the built-in server over real HTTP.

Every figure comes from the CLI run in subprocesses (``python -m pipeline estimate|run|status``)
against :class:`pipeline.server.process.LocalServer` on 127.0.0.1, and from the server's own
counters (``/_stats``). Three checks:

1. **Tokens.** For each sample job (``jobs/*.toml``), on a fresh server: ``pipeline estimate``'s
   ``input_tokens.total`` against the ``prompt_tokens`` a plain full run then reports (its
   summary JSON) and against the server's ``prompt_tokens_total``. The structured job re-asks
   invalid answers (each re-ask is a billed prompt), so it runs twice: against a server with
   ``invalid_json_rate=0`` (no re-asks: the totals must match to the token), and against the
   default 5 % server, where the estimate's per-row counts (``estimate --rows-to``) must equal
   the output's ``prompt_tokens`` on every row that was not re-asked (first attempt only), and
   be exceeded on every re-asked row.
2. **Cost after a 2 % sample.** ``estimate --sample 2%`` (2 % of the rows, at least 20), then
   the full run; the
   estimate's ``total_expected`` (spent on the sample + expected for the rest) against the
   job's total spend (``pipeline status --json``: every row, sampled ones included), plus the
   95 % interval. Also checked: the run re-sends no sampled row (its summary's
   ``rows_resumed``, the server's request count and per-body send counts). On the sample
   jobs and on a generated job of ``--rows`` (10,000) rows with varied prompts (5 to 600
   words) in thinking mode with ``max_tokens = 512``: the server draws 32..256 reasoning
   tokens and then an answer uniform in [0.3, 1] x what is left of max_tokens.
3. **Budget cap.** A fresh job run with ``--max-cost`` = half of its plain estimate's expected
   cost: exit code 4, spend <= cap, every answered row kept; then run again with a cap of
   twice the worst case: exit 0, and the server received each distinct body exactly as often
   as the input holds it (no completed row sent again).

    python bench/money_acceptance.py [--rows 10000] [--sample-percent 2] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import polars as pl

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.engine.context import JobContext  # noqa: E402
from pipeline.io.sources import iter_batches  # noqa: E402
from pipeline.job.load import load_job  # noqa: E402
from pipeline.job.spec import Overrides, apply_overrides  # noqa: E402
from pipeline.server.options import ServerOptions  # noqa: E402
from pipeline.server.process import LocalServer, server_stats  # noqa: E402

SAMPLE_JOBS = [
    "jobs/label_reviews.toml",
    "jobs/label_reviews_structured.toml",
    "jobs/summarize_articles.toml",
    "jobs/complete_code_fim.toml",
]
EXIT_OK, EXIT_ROWS_FAILED, EXIT_OVER_BUDGET = 0, 3, 4
WORDS = [
    "the",
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
    "fast",
    "slow",
    "box",
    "manual",
    "cable",
    "charger",
    "warranty",
    "return",
    "replaced",
    "seller",
]


# ---------------------------------------------------------------------------------------
# The CLI in subprocesses.


def cli(*args: str, codes: tuple[int, ...] = (EXIT_OK,)) -> subprocess.CompletedProcess[str]:
    """``python -m pipeline ARGS`` from the project root; fails unless it exits in ``codes``."""
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    if proc.returncode not in codes:
        raise RuntimeError(
            f"pipeline {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
        )
    return proc


def estimate(job: str, url: str, out: Path, *extra: str) -> dict[str, Any]:
    proc = cli("estimate", job, "--base-url", url, "--output", str(out), "--json", *extra)
    data: dict[str, Any] = json.loads(proc.stdout[proc.stdout.index("{") :])
    return data


def run(job: str, url: str, out: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    """Run the job; returns its exit code and the summary JSON written beside the output."""
    proc = cli(
        "run",
        job,
        "--base-url",
        url,
        "--output",
        str(out),
        *extra,
        codes=(EXIT_OK, EXIT_ROWS_FAILED, EXIT_OVER_BUDGET),
    )
    summary = json.loads(out.with_name(f"{out.stem}.summary.json").read_text())
    return proc.returncode, summary


def status(job: str, url: str, out: Path) -> dict[str, Any]:
    proc = cli("status", job, "--base-url", url, "--output", str(out), "--json")
    data: dict[str, Any] = json.loads(proc.stdout)
    return data


def body_counts(job: str, url: str, out: Path) -> Counter[bytes]:
    """How many rows of the input render to each distinct request body (planned, not sent)."""
    spec = apply_overrides(load_job(ROOT / job), Overrides(base_url=url, output=str(out)))
    context = JobContext(spec)
    scan = context.scan()
    counts: Counter[bytes] = Counter()
    start = 0
    for batch in iter_batches(scan.files, context.planner.columns, limit=spec.input.limit):
        for planned in context.planner.plan(batch, start):
            if planned.body is not None:
                counts[planned.body] += 1
        start += batch.num_rows
    return counts


def histogram(counts: Counter[bytes]) -> dict[str, int]:
    """``{times: bodies}`` like the server's ``sends_histogram``."""
    found = Counter(counts.values())
    return {str(k): v for k, v in sorted(found.items())}


# ---------------------------------------------------------------------------------------
# The generated job.


def make_big_job(folder: Path, rows: int, seed: int) -> str:
    """A ``rows``-row job with prompts of 5..600 words, thinking on, max_tokens 512."""
    rng = random.Random(seed)
    texts = []
    for i in range(rows):
        words = int(5 + (600 - 5) * rng.random() ** 2)  # more short prompts than long ones
        texts.append(f"Note {i}: " + " ".join(rng.choice(WORDS) for _ in range(words)))
    pl.DataFrame(
        {"doc_id": [f"d{i:06d}" for i in range(rows)], "text": texts, "n": list(range(rows))}
    ).write_parquet(folder / "docs.parquet")
    job = folder / "big.toml"
    job.write_text(
        f"""
name = "money-big"
[input]
path = "{folder / "docs.parquet"}"
id_column = "doc_id"
[request]
base_url = "https://llm.wavespeed.ai/v1"
api_key_env = "WAVESPEED_API_KEY"
model = "deepseek/deepseek-v4-flash"
system = "You summarize customer notes."
prompt = "Summarize note {{n}} in as many words as it needs.\\n\\n{{text}}"
max_tokens = 512
thinking = {{ type = "enabled" }}
[limits]
max_in_flight = 128
[output]
path = "{folder / "big.parquet"}"
"""
    )
    return str(job)


# ---------------------------------------------------------------------------------------
# The checks.


@dataclass
class Report:
    failures: list[str] = field(default_factory=list)

    def check(self, ok: bool, what: str) -> bool:
        if not ok:
            self.failures.append(what)
            print(f"  FAIL: {what}", flush=True)
        return ok


def server(**options: Any) -> LocalServer:
    return LocalServer(ServerOptions(**{"latency_ms": 5.0, **options}))


def check_tokens(job: str, tmp: Path, report: Report) -> list[list[str]]:
    """Criterion 1: estimate's input tokens vs a plain full run's prompt tokens."""
    name = Path(job).stem
    lines = []
    variants: list[tuple[str, dict[str, Any]]] = [("", {})]
    if "structured" in name:
        variants = [(" (invalid_json_rate=0)", {"invalid_json_rate": 0.0})]
        variants.append((" (default 5% invalid)", {}))
    for label, options in variants:
        out = tmp / f"tokens-{name}-{len(lines)}" / "out.parquet"
        per_row = out.parent / "estimate.parquet"
        with server(**options) as url:
            before = estimate(job, url, out, "--rows-to", str(per_row))
            code, summary = run(job, url, out)
            stats = server_stats(url)
        this = summary["this_run"]
        est = before["input_tokens"]["total"]
        ran = this["prompt_tokens"]
        note = f"exit {code}, {this['reasks']} re-asks"
        if this["reasks"] == 0:
            report.check(
                est == ran == stats["prompt_tokens_total"],
                f"{name}{label}: estimate {est} != run {ran} / server "
                f"{stats['prompt_tokens_total']}",
            )
            report.check(before["token_count"] == "exact", f"{name}: token count not exact")
            first = ran
        else:
            # First attempts: rows never re-asked must match the per-row estimate exactly;
            # a re-asked row's prompt_tokens add its re-asks' (longer) prompts.
            joined = (
                pl.read_parquet(per_row)
                .select("id", pl.col("prompt_tokens").alias("estimated"))
                .join(pl.read_parquet(out).select("id", "prompt_tokens", "reasks"), on="id")
            )
            plain = joined.filter(pl.col("reasks") == 0)
            asked = joined.filter(pl.col("reasks") > 0)
            report.check(
                (plain["estimated"] == plain["prompt_tokens"]).all(),
                f"{name}{label}: a row without re-asks differs from its estimate",
            )
            report.check(
                (asked["prompt_tokens"] > asked["estimated"]).all(),
                f"{name}{label}: a re-asked row has no extra prompt tokens",
            )
            first = int(plain["prompt_tokens"].sum() + asked["estimated"].sum())
            note += (
                f"; first-attempt tokens = {first} ({plain.height} rows as sent once + the "
                f"estimate of {asked.height} re-asked rows: only the former is measured)"
            )
            report.check(
                int(plain["estimated"].sum()) == int(plain["prompt_tokens"].sum()),
                f"{name}{label}: first-attempt totals differ",
            )
        lines.append(
            [
                f"{name}{label}",
                f"{est:,}",
                f"{ran:,}",
                f"{stats['prompt_tokens_total']:,}",
                "yes" if est == ran == stats["prompt_tokens_total"] else f"no ({note})",
            ]
        )
        print(f"  tokens {name}{label}: estimate {est}, run {ran}, {note}", flush=True)
    return lines


def _in_window(window: dict[str, Any] | None, moment: datetime) -> bool:
    if window is None:
        return False
    now = moment.strftime("%H:%M")
    start, end = window["start"], window["end"]
    return start <= now < end if start < end else (now >= start or now < end)


def check_sample_cost(
    job: str, tmp: Path, report: Report, *, percent: float, seed: int
) -> list[str]:
    """Criterion 2: expected total after a 2 % sample vs what the job then really cost."""
    name = Path(job).stem
    out = tmp / f"cost-{name}" / "out.parquet"
    with server() as url:
        rows = estimate(job, url, out)["rows"]["total"]
        started = datetime.now(UTC)
        t0 = time.monotonic()
        # "P%": P % of the rows, but at least 20 (pipeline.cli.estimate.MIN_SAMPLE_ROWS).
        est = estimate(job, url, out, "--sample", f"{percent:g}%", "--seed", str(seed))
        n = est["output_tokens"]["sampled"]
        sampled_stats = server_stats(url)
        code, summary = run(job, url, out)
        wall = time.monotonic() - t0
        stats = server_stats(url)
        after = status(job, url, out)
    ended = datetime.now(UTC)
    costs = est["cost_usd"]
    window = (costs["price"] or {}).get("off_peak")
    off_peak = _in_window(window, started)
    if off_peak != _in_window(window, ended):
        report.check(False, f"{name}: the run crossed an off-peak boundary; figures mixed")
    figures = costs["to_send_off_peak"] if off_peak else costs["to_send"]
    spent = Decimal(costs["spent"])
    expected = spent + Decimal(figures["expected"])
    actual = Decimal(after["spent"]["cost_usd"])
    diff = float((expected - actual) / actual * 100)
    interval = figures["interval_95"]
    low = high = None
    inside = "-"
    if interval is not None:
        low, high = spent + Decimal(interval[0]), spent + Decimal(interval[1])
        inside = "yes" if low <= actual <= high else "NO"
    this = summary["this_run"]
    # Nothing sampled is sent again: the run resumed the sample, sent only the rest, and the
    # server received each body as often as the input holds it (duplicates in the input are
    # sent once per row) -- for a job without re-asks.
    # The sample sends one request per sampled row, plus re-asks of invalid answers (a
    # structured job): at least n. That the run resumes exactly those n rows is checked next.
    report.check(sampled_stats["requests_total"] >= n, f"{name}: the sample sent < {n}")
    report.check(this["rows_resumed"] == n, f"{name}: rows_resumed {this['rows_resumed']} != {n}")
    report.check(
        this["requests"] == rows - n + this["reasks"] + this["retries"],
        f"{name}: run sent {this['requests']} requests for {rows - n} rows",
    )
    if this["reasks"] == 0 and this["retries"] == 0:
        expected_hist = histogram(body_counts(job, url, out))
        report.check(
            stats["sends_histogram"] == expected_hist,
            f"{name}: server sends {stats['sends_histogram']} != input's bodies {expected_hist}",
        )
    report.check(
        after["spent"]["prompt_tokens"] == stats["prompt_tokens_total"],
        f"{name}: status prompt tokens != server's",
    )
    report.check(
        Decimal(this["cost_usd"]) + spent == actual,
        f"{name}: run cost {this['cost_usd']} + sample {spent} != status {actual}",
    )
    report.check(abs(diff) <= 10, f"{name}: expected cost {diff:+.2f}% off (over 10%)")
    mean = est["output_tokens"]["mean_per_row"]
    print(
        f"  cost {name}: {rows} rows, sample {n}, mean out/row {mean:.1f}, expected {expected} "
        f"vs actual {actual} ({diff:+.2f}%), exit {code}, {wall:.1f} s",
        flush=True,
    )
    return [
        name,
        f"{rows:,}",
        str(n),
        f"{est['input_tokens']['total']:,} / {after['spent']['prompt_tokens']:,}",
        f"{expected:.6f}",
        f"{actual:.6f}",
        f"{diff:+.2f}%",
        "-" if low is None else f"{low:.6f}..{high:.6f}",
        inside,
        f"{this['rows_resumed']}/{this['requests']}/{stats['max_sends_per_request']}",
        "off-peak" if off_peak else "peak",
    ]


def check_cap(job: str, tmp: Path, report: Report) -> list[str]:
    """Criterion 3: a cap of half the estimate stops with 4; a higher cap finishes, no re-sends."""
    name = Path(job).stem
    out = tmp / f"cap-{name}" / "out.parquet"
    with server() as url:
        est = estimate(job, url, out)
        rows = est["rows"]["total"]
        figures = est["cost_usd"]["to_send"]
        cap = (Decimal(figures["expected"]) / 2).quantize(Decimal("0.00000001"))
        code1, summary1 = run(job, url, out, "--max-cost", str(cap))
        stats1 = server_stats(url)
        status1 = status(job, url, out)
        kept = pl.read_parquet(out)
        higher = (Decimal(figures["worst_case"]) * 2).quantize(Decimal("0.00000001"))
        code2, summary2 = run(job, url, out, "--max-cost", str(higher))
        stats2 = server_stats(url)
        status2 = status(job, url, out)
        expected_hist = histogram(body_counts(job, url, out))
    budget = summary1["this_run"]["budget"]
    spent1 = Decimal(budget["spent_usd"])
    done1 = status1["rows"]["ok"] + status1["rows"]["failed"]
    report.check(code1 == EXIT_OVER_BUDGET, f"{name}: capped run exited {code1}, not 4")
    report.check(summary1["ended"] == "over_budget", f"{name}: ended {summary1['ended']}")
    report.check(spent1 <= cap, f"{name}: spent {spent1} > cap {cap}")
    report.check(
        Decimal(status1["spent"]["cost_usd"]) == spent1,
        f"{name}: status spend {status1['spent']['cost_usd']} != summary {spent1}",
    )
    report.check(0 < done1 < rows, f"{name}: {done1} of {rows} rows done at the cap")
    # Every answered request is a kept row: the server answered exactly the rows recorded.
    report.check(stats1["ok"] == done1, f"{name}: server answered {stats1['ok']}, kept {done1}")
    # The partial output holds the finished rows (and only those).
    report.check(
        kept.height == done1 and int((kept["status"] == "ok").sum()) == status1["rows"]["ok"],
        f"{name}: the partial output holds {kept.height} rows, {done1} were completed",
    )
    this2 = summary2["this_run"]
    report.check(code2 == EXIT_OK, f"{name}: second run exited {code2}")
    report.check(this2["rows_resumed"] == done1, f"{name}: resumed {this2['rows_resumed']}")
    report.check(this2["requests"] == rows - done1, f"{name}: second run sent {this2['requests']}")
    report.check(stats2["requests_total"] == rows, f"{name}: server got {stats2['requests_total']}")
    report.check(
        stats2["sends_histogram"] == expected_hist,
        f"{name}: sends {stats2['sends_histogram']} != input's bodies {expected_hist}",
    )
    report.check(status2["rows"]["ok"] == rows, f"{name}: {status2['rows']} at the end")
    total = Decimal(status2["spent"]["cost_usd"])
    report.check(total <= higher, f"{name}: total {total} > second cap {higher}")
    resent = sum(int(k) - 1 for k in stats2["sends_histogram"]) - sum(
        int(k) - 1 for k in expected_hist
    )
    print(
        f"  cap {name}: estimate {figures['expected']}, cap {cap}, spent {spent1}, exit {code1}, "
        f"{done1}/{rows} rows; then cap {higher}: exit {code2}, total {total}",
        flush=True,
    )
    return [
        name,
        f"{figures['expected']}",
        f"{cap}",
        f"{spent1}",
        f"{cap - spent1}",
        str(code1),
        f"{done1:,}/{rows:,}",
        f"{stats1['ok']:,}",
        str(code2),
        f"{this2['requests']:,}",
        f"{stats2['requests_total']:,} ({stats2['max_sends_per_request']}; {resent})",
    ]


def table(title: str, header: list[str], lines: list[list[str]]) -> None:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *lines, strict=True)]
    print(f"\n{title}")
    for line in [header, ["-" * w for w in widths], *lines]:
        print("  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000, help="rows of the generated job")
    parser.add_argument("--sample-percent", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0, help="seed of --sample and the data")
    args = parser.parse_args()
    os.chdir(ROOT)  # the sample jobs' paths are relative to the project root
    report = Report()
    with tempfile.TemporaryDirectory(prefix="money-") as name:
        tmp = Path(name)
        big = make_big_job(tmp, args.rows, args.seed)
        print("1. tokens", flush=True)
        token_lines = [line for job in SAMPLE_JOBS for line in check_tokens(job, tmp, report)]
        print("2. cost after a sample", flush=True)
        cost_lines = [
            check_sample_cost(job, tmp, report, percent=args.sample_percent, seed=args.seed)
            for job in [*SAMPLE_JOBS, big]
        ]
        print("3. budget cap", flush=True)
        cap_lines = [check_cap(job, tmp, report) for job in ["jobs/label_reviews.toml", big]]
    table(
        "1. input tokens: estimate vs a full run",
        ["job", "estimate", "run summary", "server", "equal"],
        token_lines,
    )
    table(
        f"2. cost after a {args.sample_percent:g}% --sample (seed {args.seed}) vs the full run",
        [
            "job",
            "rows",
            "sampled",
            "tokens est/run",
            "expected $",
            "actual $",
            "diff",
            "95% interval $",
            "inside",
            "resumed/sent/max sends",
            "price",
        ],
        cost_lines,
    )
    table(
        "3. --max-cost at half the estimate, then a higher cap",
        [
            "job",
            "estimate $",
            "cap $",
            "spent $",
            "headroom $",
            "exit",
            "rows done",
            "server ok",
            "exit 2",
            "sent 2",
            "server total (max sends; re-sends)",
        ],
        cap_lines,
    )
    if report.failures:
        print(f"\n{len(report.failures)} check(s) failed:")
        for line in report.failures:
            print(f"  - {line}")
        return 1
    print("\nall checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
