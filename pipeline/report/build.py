"""Writing a job's report: gather, render, and replace the file atomically."""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.errors import StateError
from pipeline.job.spec import JobSpec
from pipeline.report.gather import gather
from pipeline.report.page import render


def default_path(job: JobSpec) -> Path:
    """Beside the output: ``out/x.parquet`` -> ``out/x.report.html``. An output on object
    storage (a URL) has its report beside the state folder instead, on this machine."""
    output = job.output.path
    if "://" in output:
        state = job.state_path
        return state.with_name(f"{state.name}.report.html")
    path = Path(output)
    return path.with_name(f"{path.stem}.report.html")


def build_report(job: JobSpec, *, to: Path, run: int | None = None) -> Path:
    """Write the report of ``job`` to ``to`` (whole or not at all); returns its path."""
    page = render(gather(job, run=run)).encode("utf-8")
    tmp = to.with_name(f".{to.name}.partial")
    try:
        to.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("wb") as handle:
            handle.write(page)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(to)
    except OSError as exc:
        raise StateError(f"cannot write the report {to} ({exc.strerror or exc}).") from None
    return to
