"""``pipeline report``: write one self-contained HTML page of how a job's runs went."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.cli.common import load_to_read, report_errors, show_notices
from pipeline.job.spec import Overrides, apply_overrides


@click.command()
@click.argument("job_file", type=click.Path(dir_okay=False, path_type=str))
@click.option(
    "--to",
    "dest",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the page here (default: beside the output, <name>.report.html).",
)
@click.option("--local", is_flag=True, help="Report on the --local runs (the built-in server).")
@click.option("--output", "output_path", help="The run's output, if it used --output.")
@click.option(
    "--run",
    "run_number",
    type=click.IntRange(min=1),
    help="Draw this run over time (default: the last run that sent requests).",
)
@report_errors
def report(
    job_file: str,
    *,
    dest: Path | None,
    local: bool,
    output_path: str | None,
    run_number: int | None,
) -> None:
    """Write a report of JOB_FILE's runs as one HTML file (nothing is sent).

    Charts: requests/s and the in-flight cap over time with the 429s, latency percentiles,
    output tokens and cost per row, cost by kind, failures by reason, and every run of the
    job. The file needs nothing else to open: no network, no script.
    """
    from pipeline.report.build import build_report, default_path

    job = show_notices(
        apply_overrides(load_to_read(job_file), Overrides(output=output_path, local=local))
    )
    target = dest if dest is not None else default_path(job)
    path = build_report(job, to=target, run=run_number)
    size = path.stat().st_size
    click.echo(f"wrote the report of {job.name} to {path} ({size / 1024:,.0f} KiB)")
