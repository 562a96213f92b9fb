"""The job one call of the Python API works on: a job file's path, TOML text, a dict or a
:class:`~pipeline.job.spec.JobSpec`, with the keyword overrides of the command line's flags.

Every form is validated by the same model as a job file (:mod:`pipeline.job.load`), so a
mistake is the same :class:`~pipeline.errors.JobFileError`, naming ``<job dict>`` or
``<job text>`` where a file would be named. Two things differ from a file, for TOML text and
dicts only: ``[output] path`` may be left out (the output then goes to
``out/<name>.parquet`` under the current folder, like a batch file's), and relative paths are
read from the current folder. With ``rows=``, ``[input]`` may be left out (or hold only
``id_column``): the rows given stand in for ``[input] path``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import replace
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, TypeAlias

from pipeline.errors import UsageError
from pipeline.job.load import job_from_dict, parse_toml, read_job_file
from pipeline.job.spec import JobSpec, Overrides, apply_overrides
from pipeline.money.pricing import PriceOverride, parse_price

JobLike: TypeAlias = "str | os.PathLike[str] | Mapping[str, Any] | JobSpec"
"""What the API takes as a job: a job file's path, its TOML text, a dict of its tables, or a
validated :class:`~pipeline.job.spec.JobSpec`."""

_Wrong: TypeAlias = Callable[[str, str], UsageError]
"""Makes the error for a keyword's bad value: (keyword, what it must be)."""

DICT_SOURCE = "<job dict>"
TEXT_SOURCE = "<job text>"
DEFAULT_OUTPUT_FOLDER = "out"
"""Where the output of a dict or TOML-text job without ``[output] path`` goes:
``out/<name>.parquet`` under the current folder."""

OVERRIDES = ("input", "output", "base_url", "limit", "max_cost", "model", "price")
"""The keyword overrides, as the command line's flags: ``input``, ``output`` (paths relative
to the current folder), ``base_url``, ``limit`` (rows), ``max_cost`` (USD, over all runs),
``model``, ``price`` (``"input=0.15,output=0.60"`` USD per million tokens, or a
:class:`~pipeline.money.pricing.PriceOverride`)."""


def default_output(name: str) -> str:
    """``out/<name>.parquet``, the name made safe as a file name."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "job"
    return str(Path(DEFAULT_OUTPUT_FOLDER, f"{safe}.parquet"))


def job_for_call(
    job: JobLike,
    *,
    caller: str,
    rows_name: str | None = None,
    local: bool = False,
    overrides: Mapping[str, Any],
) -> JobSpec:
    """The validated job a call runs or estimates, with its overrides applied.

    ``rows_name`` is the name the call's in-memory rows are registered under
    (:mod:`pipeline.io.tables`): it stands for the job's input. ``caller`` names the function
    in errors. An unknown keyword is a :class:`TypeError`; a bad value a
    :class:`~pipeline.errors.UsageError` naming it; a bad job a
    :class:`~pipeline.errors.JobFileError`.
    """
    flags = _overrides(overrides, caller=caller, local=local, rows=rows_name is not None)
    spec = _spec(job, rows=rows_name is not None)
    if rows_name is not None:
        if spec.input.format == "openai-batch":
            raise UsageError(
                f"{caller}(rows=...): an OpenAI batch job reads its requests from its .jsonl "
                "file; rows= is for jobs whose prompt is a template over columns."
            )
        flags = replace(flags, input=rows_name)
    return apply_overrides(spec, flags)


def _spec(job: JobLike, *, rows: bool) -> JobSpec:
    if isinstance(job, JobSpec):
        return job
    if isinstance(job, Mapping):
        return job_from_dict(_with_defaults(_plain(job), rows=rows, output=True), DICT_SOURCE)
    if isinstance(job, str) and "\n" in job:  # a whole job never fits on one line of TOML
        tables = parse_toml(job, TEXT_SOURCE)
        return job_from_dict(_with_defaults(tables, rows=rows, output=True), TEXT_SOURCE)
    if isinstance(job, str | os.PathLike):
        path = Path(job)
        tables = parse_toml(read_job_file(path), path)
        return job_from_dict(_with_defaults(tables, rows=rows, output=False), path)
    raise TypeError(
        "job must be a job file's path, its TOML text, a dict of its tables or a JobSpec, "
        f"not {type(job).__name__}."
    )


def _with_defaults(tables: dict[str, Any], *, rows: bool, output: bool) -> dict[str, Any]:
    """``tables`` with what the call may leave out filled in: ``[input] path`` when rows are
    given (they replace it), ``[output] path`` (``output``) when the job has a usable name.
    A table of the wrong type is left alone, for validation to name."""
    filled = dict(tables)
    if rows and isinstance(filled.get("input", {}), dict):
        filled["input"] = {"path": "<rows>", **filled.get("input", {})}
    name = filled.get("name")
    if output and isinstance(name, str) and name and isinstance(filled.get("output", {}), dict):
        filled["output"] = {"path": default_output(name), **filled.get("output", {})}
    return filled


def _plain(value: Any) -> Any:
    """A dict job as TOML would have given it: mappings as dicts, tuples as lists, paths as
    text, Decimals as floats."""
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Decimal):
        return float(value)
    return value


def _overrides(values: Mapping[str, Any], *, caller: str, local: bool, rows: bool) -> Overrides:
    """The keyword overrides, checked: what the command line's flags would have said."""
    unknown = [name for name in values if name not in OVERRIDES]
    if unknown:
        raise TypeError(
            f"{caller}() got an unexpected keyword argument {unknown[0]!r}; its keyword "
            f"arguments are rows, local and the overrides {', '.join(OVERRIDES)}."
        )
    got = dict(values)

    def wrong(name: str, what: str) -> UsageError:
        return UsageError(f"{caller}({name}={got[name]!r}): {what}.")

    for name in ("input", "output"):
        if got.get(name) is not None:
            if not isinstance(got[name], str | os.PathLike) or not os.fspath(got[name]):
                raise wrong(name, "must be a path")
            got[name] = os.fspath(got[name])
    for name in ("base_url", "model"):
        if got.get(name) is not None and (not isinstance(got[name], str) or not got[name]):
            raise wrong(name, "must be non-empty text")
    limit = got.get("limit")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise wrong("limit", "must be a whole number of rows, 1 or more")
    if rows and got.get("input") is not None:
        raise UsageError(f"{caller}(): give rows= or input=, not both.")
    if local and got.get("base_url") is not None:
        raise UsageError(f"{caller}(): local=True and base_url= cannot be used together.")
    return Overrides(
        input=got.get("input"),
        output=got.get("output"),
        base_url=got.get("base_url"),
        limit=limit,
        max_cost=None if got.get("max_cost") is None else _usd(got["max_cost"], wrong),
        model=got.get("model"),
        price=_price(got.get("price"), wrong),
        local=local,
    )


def _usd(value: Any, wrong: _Wrong) -> Decimal:
    try:
        amount = Decimal(str(value)) if isinstance(value, int | float | str | Decimal) else None
    except InvalidOperation:
        amount = None
    if isinstance(value, bool) or amount is None or not amount.is_finite() or amount <= 0:
        raise wrong("max_cost", "must be an amount of USD above 0, like 2.50")
    return amount


def _price(value: Any, wrong: _Wrong) -> PriceOverride | None:
    if value is None or isinstance(value, PriceOverride):
        return value
    if not isinstance(value, str):
        raise wrong("price", 'must be text like "input=0.15,output=0.60" (USD per million)')
    try:
        return parse_price(value)
    except ValueError as exc:
        raise wrong("price", str(exc)) from None
