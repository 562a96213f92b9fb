"""``pipeline estimate JOB.toml``: tokens, cost and duration of a job before it is sent.

Nothing is sent, except with ``--sample N``: then N random rows of the job (chosen with
``--seed``) are really sent, their results recorded in the job's own state folder, so the run
that follows does not send (or pay for) them again, and the estimate learns the output length
from them. The logic lives in :mod:`pipeline.estimate.scan` (the tokenizing scan) and
:mod:`pipeline.estimate.figures` (the figures); this module is the command and the
printing. Register it with ``cli.add_command(estimate)``; ``python -m pipeline.cli.estimate``
runs it alone.
"""

from __future__ import annotations

import json
import math
import random
from decimal import Decimal
from pathlib import Path

import anyio
import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pipeline.api.endpoint import LOCAL_PRICE_URL, api_key_for, endpoint, loop_options
from pipeline.cli.common import (
    PRICE_HELP,
    load_to_read,
    price_option,
    report_errors,
    show_notices,
)
from pipeline.cli.display import duration as clock
from pipeline.cli.display import money
from pipeline.errors import UsageError
from pipeline.estimate.figures import CostFigures, Estimate
from pipeline.estimate.scan import compute_estimate
from pipeline.job.spec import JobSpec, Overrides, apply_overrides
from pipeline.money.batch import batch_discount

MIN_SAMPLE_ROWS = 20
"""A percentage sample is never smaller than this (or the whole job, if smaller): one or
two answers say little about the spread of output lengths."""


def parse_sample(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> tuple[int, float | None] | None:
    """``--sample 50`` (rows) or ``--sample 2%`` (of the rows, at least MIN_SAMPLE_ROWS)."""
    if value is None:
        return None
    text = value.strip()
    try:
        if text.endswith("%") and 0 < float(text[:-1]) <= 100:
            return 0, float(text[:-1])
        if not text.endswith("%") and int(text) >= 1:
            return int(text), None
    except ValueError:
        pass
    raise click.BadParameter(f"{value!r} is not a row count (like 50) or a percentage (like 2%).")


def sample_rows(rows: int, count: int, percent: float | None) -> int:
    """How many rows a ``--sample`` sends out of ``rows``."""
    if percent is not None:
        count = max(math.ceil(rows * percent / 100), MIN_SAMPLE_ROWS)
    return min(count, rows)


def _sample(job: JobSpec, *, size: tuple[int, float | None], seed: int) -> tuple[JobSpec, int]:
    """Send random rows of ``job``; their results land in the job's journal.

    Returns the job as the estimate should see it (pointed where the sample went) and the
    number of rows sampled.
    """
    from pipeline.engine.context import JobContext
    from pipeline.engine.report import Reporter
    from pipeline.engine.runner import Runner, RunOptions

    api_key = api_key_for(job)
    with endpoint(job) as target:
        scan = JobContext(target).scan()
        count = sample_rows(scan.rows, *size)
        rows = random.Random(seed).sample(range(scan.rows), count)
        options = RunOptions(select_rows=frozenset(rows), write_output=False)
        runner = Runner(target, api_key=api_key, options=options, reporter=Reporter())
        click.echo(f"sampling {len(rows):,} row(s) of {scan.rows:,} (seed {seed})...", err=True)
        anyio.run(runner.run, scan, backend_options=loop_options())
    if job.request.local:
        return apply_overrides(target, Overrides(base_url=LOCAL_PRICE_URL)), count
    return target, count


@click.command(name="estimate")
@click.argument("job_file", type=click.Path(dir_okay=False, path_type=str))
@click.option("--local", is_flag=True, help="As for `run --local` (the built-in server).")
@click.option("--input", "input_path", help="Read rows from this file, glob or folder.")
@click.option("--limit", type=click.IntRange(min=1), help="Estimate only the first N rows.")
@click.option("--base-url", help="As for `run --base-url`.")
@click.option("--model", help="As for `run --model`: estimate for this model.")
@click.option("--price", "price_text", metavar="input=USD,output=USD", help=PRICE_HELP)
@click.option(
    "--output",
    "--run-output",
    "run_output",
    help="The --output the runs use, if they use one (it locates their state).",
)
@click.option(
    "--sample",
    callback=parse_sample,
    metavar="N|P%",
    help="Really send N random rows (or P% of them, at least 20) first to measure output "
    "length; they are not sent again later.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of --sample.")
@click.option(
    "--rows-to",
    "per_row",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the estimate of every row to this Parquet file.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object for machines.")
@report_errors
def estimate(
    job_file: str,
    *,
    local: bool,
    input_path: str | None,
    limit: int | None,
    base_url: str | None,
    model: str | None,
    price_text: str | None,
    run_output: str | None,
    sample: tuple[int, float | None] | None,
    seed: int,
    per_row: Path | None,
    as_json: bool,
) -> None:
    """Estimate JOB_FILE's tokens, cost and duration; sends nothing (except --sample)."""
    if local and base_url:
        raise click.UsageError("--local and --base-url cannot be used together.")
    job = apply_overrides(
        load_to_read(job_file, limit=limit),
        Overrides(
            input=input_path,
            output=run_output,
            base_url=base_url,
            limit=limit,
            model=model,
            price=price_option(price_text),
            local=local,
        ),
    )
    show_notices(job)
    if per_row is not None and per_row.suffix.lower() != ".parquet":
        raise UsageError(f"--rows-to {per_row}: per-row estimates are written as .parquet.")
    sampled = 0
    if sample:
        job, sampled = _sample(job, size=sample, seed=seed)
    elif local:
        job = apply_overrides(job, Overrides(base_url=LOCAL_PRICE_URL))
    from pipeline.cluster.status import ShardedJournal, shard_plan

    plan = shard_plan(job)  # a job that ran on a cluster: its shards' results count
    journal = None if plan is None else ShardedJournal(job, plan)
    result = compute_estimate(job, per_row=per_row, sampled=sampled, journal=journal)
    discount = batch_discount(job.request.base_url, job.pricing)
    if as_json:
        data = result.to_dict()
        data["per_row_output"] = None if per_row is None else str(per_row)
        data["batch"] = _batch_figures(result, discount)
        click.echo(json.dumps(data, indent=2))
    else:
        print_estimate(
            result, Console(highlight=False), per_row=per_row, local=local, batch=discount
        )


def _batch_figures(e: Estimate, discount: Decimal | None) -> dict[str, str | None] | None:
    """The cost in provider batch mode, for endpoints with a Batch API (None without one):
    every part of the price times the batch discount."""
    if discount is None or e.cost is None:
        return None
    return {
        "discount": str(discount),
        "expected_usd": str(e.cost.expected * discount),
        "worst_case_usd": None if e.cost.worst_case is None else str(e.cost.worst_case * discount),
    }


def _tokens(value: int | None) -> str:
    return "unknown" if value is None else f"{value:,}"


def _costs(figures: CostFigures | None) -> tuple[str, str]:
    if figures is None:
        return "unknown", "unknown"
    expected = money(figures.expected)
    if figures.interval_95 is not None:
        low, high = figures.interval_95
        expected += f" (95%: {money(low)} - {money(high)})"
    return expected, money(figures.worst_case)


_SOURCES = {
    "sample": "from {sampled:,} sampled row(s); they will not be sent again",
    "history": "from earlier results of this job",
    "max_tokens": "max_tokens per row: no results observed yet",
    "model_max_output": "the model's longest answer per row: NO max_tokens and no results",
    "unknown": "unknown",
}


def _row_lines(e: Estimate, *, local: bool) -> list[tuple[str, str]]:
    where = "the built-in server (--local)" if local else e.endpoint
    done = e.rows_done_ok + e.rows_done_failed
    rows = f"{e.rows:,} total, {e.rows_to_send:,} to send"
    if done:
        rows += f", {done:,} already done ({e.rows_done_failed:,} failed)"
    if e.rows_unrenderable:
        rows += f", {e.rows_unrenderable:,} cannot be rendered"
    how = e.token_count if e.exact_tokens else "estimate (heuristic)"
    lines = [
        ("model", f"{e.model} at {where}"),
        ("rows", rows),
        ("requests", f"{e.rows_to_send:,}"),
        ("input tokens", f"{e.input_tokens:,} ({how})"),
    ]
    if done:
        lines.append(("input tokens to send", f"{e.input_tokens_to_send:,}"))
    if e.input_tokens_billed_expected > e.input_tokens_to_send:
        lines.append(
            (
                "input tokens billed",
                f"{e.input_tokens_billed_expected:,} expected (prompts sent again, as observed)",
            )
        )
    lines.append(("cached-prefix tokens", f"{e.cached_prefix_tokens:,} (64-token blocks)"))
    return lines


def _output_lines(e: Estimate) -> list[tuple[str, str]]:
    source = _SOURCES[e.output_source].format(sampled=e.sampled)
    s = e.stats
    if s is not None:
        sd = "-" if s.sd is None else f"{s.sd:,.1f}"
        source += f"; {s.count:,} answers, mean {s.mean:,.1f} (sd {sd}) per row"
        if s.mean_reasoning:
            source += f", {s.mean_reasoning:,.1f} reasoning"
    expected = _tokens(e.output_tokens_expected)
    if e.output_interval_95 is not None:
        low, high = e.output_interval_95
        expected += f" (95%: {low:,} - {high:,})"
    worst_label = "max_tokens" if e.max_tokens is not None else "model's longest answer"
    return [
        ("output tokens expected", f"{expected}  [{source}]"),
        ("output tokens worst case", f"{_tokens(e.output_tokens_worst)} ({worst_label} per row)"),
    ]


def _cost_lines(e: Estimate) -> list[tuple[str, str]]:
    if e.price is None:
        return [("cost", money(None))]
    done = e.rows_done_ok + e.rows_done_failed
    expected, worst = _costs(e.cost)
    lines = []
    if done:
        lines.append(("already spent", money(e.spent_usd)))
    lines += [("cost expected", expected), ("cost worst case", worst)]
    if e.cost is not None:
        with_cache = money(e.cost.expected)
        without = money(e.cost.expected_without_cache)
        lines.append(("prefix-cache hits", f"{with_cache} with, {without} without"))
    window = e.price.off_peak
    if window is not None and e.cost is not None and e.cost_off_peak is not None:
        _, off_worst = _costs(e.cost_off_peak)
        lines.append(
            (
                "peak / off-peak",
                f"expected {money(e.cost.expected)} at peak, "
                f"{money(e.cost_off_peak.expected)} off-peak ({window.describe()}); "
                f"worst {worst} / {off_worst}",
            )
        )
    if done and e.total_expected_usd is not None:
        lines.append(("job total expected", money(e.total_expected_usd)))
    return lines


def _batch_lines(e: Estimate, discount: Decimal | None) -> list[tuple[str, str]]:
    """Online and batch mode side by side, for an endpoint with a Batch API."""
    figures = _batch_figures(e, discount)
    if figures is None or e.cost is None or discount is None:
        return []
    worst = money(e.cost.worst_case)
    batch_worst = money(
        None if figures["worst_case_usd"] is None else Decimal(figures["worst_case_usd"])
    )
    return [
        (
            "online / batch mode",
            f"expected {money(e.cost.expected)} online, "
            f"{money(Decimal(str(figures['expected_usd'])))} in batch mode "
            f"({discount * 100:.0f}% of the price, answers within 24 h); worst {worst} / "
            f"{batch_worst}",
        )
    ]


def print_estimate(
    e: Estimate,
    console: Console,
    *,
    per_row: Path | None = None,
    local: bool = False,
    batch: Decimal | None = None,
) -> None:
    """The estimate for a person: a table, then one warning line per thing to check."""
    table = Table(title=f"{e.job}: estimate", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    d = e.duration
    latency = "observed" if d.latency_observed else "assumed"
    lines = [
        *_row_lines(e, local=local),
        *_output_lines(e),
        *_cost_lines(e),
        *_batch_lines(e, batch),
        (
            "duration",
            f"{clock(d.seconds)} at {d.requests_per_s:,.1f} req/s "
            f"(bound by {d.binding}; {latency} latency {d.latency_s:.2f} s)",
        ),
    ]
    if per_row is not None:
        lines.append(("per-row estimates", str(per_row)))
    for label, value in lines:
        table.add_row(label, escape(value))
    console.print(table)
    if e.sampled:
        console.print(f"{e.sampled:,} rows sampled; they will not be sent again.")
    for line in e.warnings:
        console.print(f"warning: {line}", style="yellow", markup=False)


if __name__ == "__main__":
    estimate()
