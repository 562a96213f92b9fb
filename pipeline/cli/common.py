"""What the commands share: loading a job or batch file, ``--price`` and the one-line error
report. The API key, the embedded local server and the event loop's options are in
:mod:`pipeline.api.endpoint`, shared with the Python API."""

from __future__ import annotations

import contextlib
import functools
import gc
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any, TypeVar

import click

from pipeline.errors import PipelineError, UsageError
from pipeline.job.load import load_job
from pipeline.job.spec import JobSpec
from pipeline.money.pricing import PriceOverride, parse_price
from pipeline.provider.redact import redact

F = TypeVar("F", bound=Callable[..., Any])


def report_errors(func: F) -> F:
    """Turn a :class:`PipelineError` into a one-line message and its exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except PipelineError as exc:
            click.echo(f"error: {redact(str(exc), None)}", err=True)
            sys.exit(exc.exit_code)

    return wrapper  # type: ignore[return-value]


PRICE_HELP = (
    "USD per million tokens, like input=0.15,output=0.60[,cached_input=0.075]: overrides "
    "the job's [pricing] and the price tables (a bare batch file can then have --max-cost)."
)


def price_option(text: str | None) -> PriceOverride | None:
    """``--price``'s value, parsed; a mistake is one line (exit code 2)."""
    if text is None:
        return None
    try:
        return parse_price(text)
    except ValueError as exc:
        raise UsageError(f"--price {text!r}: {exc}.") from None


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """No cyclic garbage collection in the block (while modules load: they make no garbage,
    and the collector would scan the growing heap over and over)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def tune_gc() -> None:
    """Collect reference cycles rarely during a run.

    With Python's default thresholds a 60,000-row run made 1,708 cyclic collections that took
    2.55 s of the event loop's time (measured with ``gc.callbacks``); almost every object a run
    makes is freed by reference counting, so a threshold of 10,000 allocations does 47, in
    0.27 s, and the garbage cycles that wait meanwhile are a megabyte or two. The objects made
    at start-up (modules, the tokenizer's wrappers, the job) are frozen out of every scan.
    """
    gc.freeze()
    gc.set_threshold(10_000, 20, 10)


def skip_pandas_probe() -> None:
    """Spare a run's process the import of pandas that pyarrow makes on its own.

    The first ``pa.array()`` of a Python list (the output's result columns) asks whether the
    list is a pandas object, and to know it imports pandas when it is installed: 0.15 s of
    CPU (and ~40 MB) in the middle of a run that hands pyarrow no pandas object. Probing once
    while ``import pandas`` fails records "no pandas" for those checks only: pyarrow imports
    pandas again on the first call that needs it (``to_pandas()``), so nothing is lost. For
    the ``pipeline run`` process only, which runs no code of the user's.
    """
    if "pandas" in sys.modules:
        return
    import pyarrow as pa

    sys.meta_path.insert(0, _NoPandas)
    try:
        pa.array([], type=pa.int64())
    finally:
        sys.meta_path.remove(_NoPandas)


class _NoPandas:
    """An import finder under which ``import pandas`` fails (see :func:`skip_pandas_probe`)."""

    @staticmethod
    def find_spec(name: str, *args: object) -> None:
        if name == "pandas":
            raise ModuleNotFoundError("pandas is not probed in a run", name=name)


def show_notices(job: JobSpec) -> JobSpec:
    """Print what loading the job file found that a person should fix (a path found only
    relative to the current folder), as ``warning:`` lines on stderr; returns the job. Call
    it after the command line's overrides, which make some notices moot."""
    for notice in job.notices:
        click.echo(f"warning: {redact(str(notice), None)}", err=True)
    return job


def load_job_or_batch(
    path: str,
    *,
    model: str | None,
    max_in_flight: int | None,
    api_key_env: str | None,
    base_url: str | None,
    local: bool,
    limit: int | None = None,
) -> JobSpec:
    """A job file, or a job made from an OpenAI batch input file and the flags (a batch file
    is checked up to ``limit`` lines, the run's ``--limit``)."""
    from pathlib import Path

    from pipeline.io.openai_batch import batch_file_job, looks_like_batch_file

    if looks_like_batch_file(Path(path)):
        if base_url is None and not local:
            raise click.UsageError(
                f"{path} is an OpenAI batch file: give --base-url (the endpoint to send it to) "
                "or --local."
            )
        return batch_file_job(
            Path(path),
            model=model,
            max_in_flight=max_in_flight,
            api_key_env=api_key_env,
            limit=limit,
        )
    job = load_job(path)
    if max_in_flight is not None:
        job = replace(job, limits=replace(job.limits, max_in_flight=max_in_flight))
    return job


def load_to_read(path: str, *, limit: int | None = None) -> JobSpec:
    """A job file or batch file for a command that sends nothing (status, export, estimate):
    no flag of ``run`` applies, and a batch file needs no endpoint."""
    return load_job_or_batch(
        path,
        model=None,
        max_in_flight=None,
        api_key_env=None,
        base_url=None,
        local=True,
        limit=limit,
    )
