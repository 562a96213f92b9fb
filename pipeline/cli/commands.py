"""The command line: ``pipeline run``, ``pipeline serve``.

Exit codes: 0 every row ok; 1 the job could not run; 2 usage error (job file, flags, input);
3 finished with failed rows; 4 stopped at the budget's cap; 130 interrupted.
"""

from __future__ import annotations

import sys
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import click

from pipeline.api.endpoint import api_key_for, endpoint, loop_options
from pipeline.cli.common import (
    PRICE_HELP,
    load_job_or_batch,
    load_to_read,
    paused_gc,
    price_option,
    report_errors,
    show_notices,
    skip_pandas_probe,
    tune_gc,
)
from pipeline.errors import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_OVER_BUDGET,
    EXIT_ROWS_FAILED,
    JobFileError,
)
from pipeline.job.spec import JobSpec, Overrides, apply_overrides

if TYPE_CHECKING:
    from pipeline.engine.report import RunReport


class _Cli(click.Group):
    """Loads ``serve``, ``estimate``, ``report`` and ``prices`` lazily so ``pipeline run``
    does not import them."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), "serve", "estimate", "report", "prices"])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name == "serve":
            from pipeline.server.command import serve_command

            return serve_command
        if name == "estimate":
            from pipeline.cli.estimate import estimate

            return estimate
        if name == "report":
            from pipeline.cli.report import report

            return report
        if name == "prices":
            from pipeline.cli.prices import prices

            return prices
        return super().get_command(ctx, name)


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pipeline")
def cli() -> None:
    """Batch LLM jobs against OpenAI-compatible endpoints: resumable, rate-limited, costed."""


@cli.command()
@click.argument("job_file", type=click.Path(dir_okay=False, path_type=str))
@click.option("--local", is_flag=True, help="Run against the built-in server (no API key).")
@click.option("--input", "input_path", help="Read rows from this file, glob or folder.")
@click.option("--output", "output_path", help="Write the output Parquet here.")
@click.option("--base-url", help="Send requests to this OpenAI-compatible base URL.")
@click.option("--limit", type=click.IntRange(min=1), help="Process only the first N rows.")
@click.option("--fresh", is_flag=True, help="Forget earlier results of this job; start over.")
@click.option("--retry-failed", is_flag=True, help="Send rows again that ended failed.")
@click.option(
    "--max-cost",
    type=click.FloatRange(min=0, min_open=True),
    help="Stop before the job's spend (all runs) could pass this many USD (exit code 4).",
)
@click.option("--price", "price_text", metavar="input=USD,output=USD", help=PRICE_HELP)
@click.option(
    "--model",
    help="Send every request to this model (its results are kept apart from other models').",
)
@click.option(
    "--max-in-flight",
    type=click.IntRange(min=1),
    help="Requests in flight at most (default: [limits] max_in_flight, or 64).",
)
@click.option(
    "--api-key-env",
    default="OPENAI_API_KEY",
    show_default=True,
    help="OpenAI batch file: the environment variable holding the API key.",
)
@click.option(
    "--mode",
    type=click.Choice(["online", "batch"]),
    help="online: one request per row now; batch: the provider's Batch API, at its batch "
    "price (default: [request] mode).",
)
@click.option("--detach", is_flag=True, help="Batch mode: submit the batches and return.")
@click.option(
    "--fallback",
    type=click.Choice(["online"]),
    help="Batch mode: send rows of expired or failed batches online instead of again.",
)
@click.option("-v", "--verbose", is_flag=True, help="Also print every retry and failed row.")
@click.option("-q", "--quiet", is_flag=True, help="Print only warnings and errors.")
@click.option(
    "--log-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Append plain log lines here: the figures, every retry and failed row, the summary.",
)
@click.option(
    "--ray",
    "ray_address",
    is_flag=False,
    flag_value="",
    default=None,
    metavar="[ADDRESS]",
    help="Run across a Ray cluster: no ADDRESS starts a local one, 'auto' joins the running one.",
)
@click.option("--workers", type=click.IntRange(min=1), help="Ray workers (default: [cluster]).")
@report_errors
def run(
    job_file: str,
    *,
    local: bool,
    input_path: str | None,
    output_path: str | None,
    base_url: str | None,
    limit: int | None,
    fresh: bool,
    retry_failed: bool,
    max_cost: float | None,
    price_text: str | None,
    model: str | None,
    max_in_flight: int | None,
    api_key_env: str,
    mode: str | None,
    detach: bool,
    fallback: str | None,
    verbose: bool,
    quiet: bool,
    log_file: Path | None,
    ray_address: str | None,
    workers: int | None,
) -> None:
    """Run JOB_FILE: send one request per input row and write the output Parquet.

    JOB_FILE is a job file (.toml), or an OpenAI Batch API input file (.jsonl) to run as it
    is: give --base-url (or --local) and optionally --output, --model, --max-in-flight.
    """
    with paused_gc():
        from pipeline.cli.display import LiveReporter, report_hint
        from pipeline.engine.report import Reporter
        from pipeline.engine.runner import Runner, RunOptions

    if local and base_url:
        raise click.UsageError("--local and --base-url cannot be used together.")
    overrides = Overrides(
        input=input_path,
        output=output_path,
        base_url=base_url,
        limit=limit,
        max_cost=None if max_cost is None else Decimal(str(max_cost)),
        model=model,
        price=price_option(price_text),
        local=local,
        mode=mode,  # type: ignore[arg-type]
    )
    job = apply_overrides(
        load_job_or_batch(
            job_file,
            model=model,
            max_in_flight=max_in_flight,
            api_key_env=api_key_env,
            base_url=base_url,
            local=local,
            limit=limit,
        ),
        overrides,
    )
    show_notices(job)
    api_key = api_key_for(job)
    if verbose and quiet:
        raise click.UsageError("--verbose and --quiet cannot be used together.")
    if ray_address is not None or workers is not None or job.cluster.engine == "ray":
        from pipeline.cli.cluster import run_on_cluster

        run_on_cluster(
            job,
            address=ray_address,
            workers=workers,
            fresh=fresh,
            retry_failed=retry_failed,
            quiet=quiet,
        )
    reporter: Reporter = LiveReporter(verbose=verbose, quiet=quiet)
    if log_file is not None:
        from pipeline.cli.logfile import Fanout, PlainLog

        reporter = Fanout(reporter, PlainLog(log_file))
    options = RunOptions(fresh=fresh, retry_failed=retry_failed, handle_signals=True)
    skip_pandas_probe()
    tune_gc()
    with endpoint(job) as target:
        from pipeline.cli.batch import batch_first

        if batch_first(
            target,
            job_file,
            api_key=api_key,
            fresh=fresh,
            retry_failed=retry_failed,
            detach=detach,
            fallback=fallback is not None,
            quiet=quiet,
        ):
            fresh = False
            options = RunOptions(retry_failed=retry_failed, handle_signals=True)
        runner = Runner(target, api_key=api_key, options=options, reporter=reporter)
        scan = runner.prepare()
        for warning in runner.warnings():
            click.echo(f"warning: {warning}", err=True)
        try:
            report = anyio.run(runner.run, scan, backend_options=loop_options())
        except KeyboardInterrupt:
            reporter.close()
            click.echo(
                f"\ninterrupted: finished rows are saved in {target.state_path}. "
                "Run the same command again to resume.",
                err=True,
            )
            sys.exit(EXIT_INTERRUPTED)
        finally:
            reporter.close()
    if not quiet:
        click.echo(report_hint(job_file, local=local, output=output_path), err=True)
    if report.interrupted:
        click.echo(
            f"interrupted: finished rows are saved in {target.state_path}. "
            "Run the same command again to resume.",
            err=True,
        )
        sys.exit(EXIT_INTERRUPTED)
    if report.over_budget and report.budget is not None:
        click.echo(budget_stop_message(report, target, job_file), err=True)
        sys.exit(EXIT_OVER_BUDGET)
    sys.exit(EXIT_OK if report.all_ok else EXIT_ROWS_FAILED)


def budget_stop_message(report: RunReport, job: JobSpec, job_file: str) -> str:
    """What to do after a stop at the budget: running the same command again would stop
    again at once, so say by how much to raise the cap."""
    budget = report.budget
    assert budget is not None
    head = (
        f"stopped at the budget: ${budget.spent:.6f} spent of the ${budget.cap} cap, and the "
        f"next request could have passed it. Finished rows are kept in "
        f"{job.state_path}."
    )
    rest = report.cost_of_the_rest()
    cap = report.cap_to_finish()
    if rest is None or cap is None:
        advice = (
            f" {report.rows_left:,} rows are left: see what they cost with `pipeline estimate "
            f"{job_file}`, then raise [budget] max_cost_usd (or --max-cost) above "
            f"${budget.spent:.6f} by that much"
        )
    else:
        per_row = report.final.cost_usd or Decimal(0)
        per_row /= max(1, report.final.ok + report.final.failed)
        advice = (
            f" {report.rows_left:,} rows are left, about ${rest:.6f} more at this run's "
            f"${per_row:.6f} a row: raise [budget] max_cost_usd (or --max-cost) to at least "
            f"${cap:.6f} (10% to spare)"
        )
    return head + advice + " and run the same command again; finished rows are not sent again."


@cli.command()
@click.argument("job_file", type=click.Path(dir_okay=False, path_type=str))
@click.option("--input", "input_path", help="The input, if the run used --input.")
@click.option("--output", "output_path", help="The output, if the run used --output.")
@click.option("--limit", type=click.IntRange(min=1), help="The --limit the run used.")
@click.option("--base-url", help="The --base-url the run used.")
@click.option("--model", help="The --model the run used.")
@click.option("--local", is_flag=True, help="Show the --local runs' side (the built-in server).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")
@click.option(
    "--watch", is_flag=True, help="Batch mode: wait for the job's batches and collect them first."
)
@report_errors
def status(
    job_file: str,
    *,
    input_path: str | None,
    output_path: str | None,
    limit: int | None,
    base_url: str | None,
    model: str | None,
    local: bool,
    as_json: bool,
    watch: bool,
) -> None:
    """Show where JOB_FILE stands: rows done / failed / pending, spend, the last run, and
    its provider batches (--watch: wait for them and collect their results first)."""
    import json

    from pipeline.cli.display import print_status
    from pipeline.engine.context import JobContext
    from pipeline.engine.status import job_status

    overrides = Overrides(
        input=input_path,
        output=output_path,
        limit=limit,
        base_url=base_url,
        model=model,
        local=local,
    )
    job = show_notices(apply_overrides(load_to_read(job_file, limit=limit), overrides))
    from rich.console import Console

    from pipeline.cli.batch import batch_pass, print_batches
    from pipeline.cluster.status import cluster_status, shard_plan

    if watch:
        from pipeline.batch.run import BatchOptions

        batch_pass(job, job_file, api_key=api_key_for(job), options=BatchOptions(submit=False))
    plan = shard_plan(job)
    if plan is not None:  # the job ran on a cluster: its shards, added up
        report = cluster_status(job, plan)
    else:
        context = JobContext(job)
        report = job_status(context, context.scan())
    if job.request.mode == "batch":  # what the tokens cost by kind, at the batch price
        from pipeline.cli.batch import at_batch_price

        report = at_batch_price(report, job)
    if as_json:
        click.echo(json.dumps({**report.to_dict(), "batches": print_batches(job)}, indent=2))
    else:
        print_status(report)
        print_batches(job, Console(highlight=False))


@cli.command()
@click.argument("job_file", type=click.Path(dir_okay=False, path_type=str))
@click.option("--output", "output_path", help="The run's output, if it used --output.")
@click.option("--base-url", help="The --base-url the run used.")
@click.option("--model", help="The --model the run used.")
@report_errors
def cancel(
    job_file: str, *, output_path: str | None, base_url: str | None, model: str | None
) -> None:
    """Cancel JOB_FILE's open provider batches (batch mode). The next run collects what
    they answered and submits their other rows again (or --mode online sends them)."""
    from pipeline.cli.batch import cancel_batches

    overrides = Overrides(output=output_path, base_url=base_url, model=model)
    job = show_notices(apply_overrides(load_to_read(job_file), overrides))
    batches, rows = cancel_batches(job, api_key=api_key_for(job))
    click.echo(
        f"asked the provider to cancel {batches} batch(es) holding {rows:,} rows; run the job "
        "again to collect what they answered."
    )


@cli.command()
@click.argument("job_file", type=click.Path(dir_okay=False, path_type=str))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["openai-batch"]),
    default="openai-batch",
    show_default=True,
    help="openai-batch: the OpenAI Batch API's output file format (also vLLM run-batch's).",
)
@click.option("--output", "output_path", help="The run's output, if it used --output.")
@click.option("--local", is_flag=True, help="Export the --local runs' output.")
@click.option("--to", "dest", help="Write here (default: beside the output, .jsonl).")
@report_errors
def export(
    job_file: str, *, fmt: str, output_path: str | None, local: bool, dest: str | None
) -> None:
    """Write JOB_FILE's results in another tool's format (nothing is sent)."""
    from pipeline.io.openai_export import export_openai_batch, export_path, output_exists

    job = show_notices(
        apply_overrides(load_to_read(job_file), Overrides(output=output_path, local=local))
    )
    source = job.output.path
    if not output_exists(source):
        raise JobFileError(
            job.source,
            "[output] path",
            f"there is no{' --local' if local else ''} output at {source} yet.",
            "Run the job first (or pass --output if the run used it"
            f"{'' if local else ', or --local if it ran against the built-in server'}).",
        )
    target = dest or export_path(source, fmt)
    rows = export_openai_batch(source, target, endpoint=job.request.endpoint)
    side = "the built-in server's (--local)" if local else job.request.base_url
    click.echo(f"wrote {rows:,} results of {side} to {target} ({fmt})")


def main() -> None:
    cli()
