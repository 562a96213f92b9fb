"""A run's summary: rows, tokens and dollars by kind, recorded in the state folder's
``runs.jsonl`` and written as JSON beside the output (``<output>.summary.json``). An output in
object storage has its summary beside its state folder instead, on this machine
(``.pipeline/state/<job>.summary.json``), as its report has: the run's own records stay local.

Dollars are summed per billed answer from integer token counts at the price in effect when
the request was sent, and written as decimal strings, never as rounded floats.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import StateError
from pipeline.job.urls import is_url, local_state_folder

if TYPE_CHECKING:
    from pipeline.engine.report import RunReport
    from pipeline.job.spec import JobSpec


def summary_path(output: str | Path, state_dir: Path | None = None) -> Path:
    """``out/x.parquet`` -> ``out/x.summary.json``; for an output in object storage,
    ``<state_dir>.summary.json`` beside the state folder (see the module docstring)."""
    if is_url(str(output)):
        state = state_dir or local_state_folder("", str(output))
        return state.with_name(f"{state.name}.summary.json")
    path = Path(output)
    return path.with_name(f"{path.stem}.summary.json")


def run_summary(report: RunReport) -> dict[str, Any]:
    """The figures of one run, JSON-ready."""
    s = report.final
    parts = s.cost_parts
    summary: dict[str, Any] = {
        "rows_ok": s.ok,
        "rows_failed": s.failed,
        "rows_truncated": s.truncated,
        "rows_resumed": s.resumed_rows,
        "requests": s.requests,
        "retries": s.retries,
        "rate_limited": s.rate_limited,
        "reasks": s.reasks,
        "prompt_tokens": s.usage.prompt_tokens,
        "completion_tokens": s.usage.completion_tokens,
        "cached_tokens": s.usage.cached_tokens,
        "reasoning_tokens": s.usage.reasoning_tokens,
        "cost_usd": None if s.cost_usd is None else str(s.cost_usd),
        "cost_by_kind_usd": None if parts is None else parts.to_dict(),
        "output_rows": report.output_rows,
        "wall_s": round(s.elapsed_s, 3),
    }
    budget = report.budget
    if budget is not None:
        summary["budget"] = {
            "cap_usd": str(budget.cap),
            "spent_usd": str(budget.spent),
            "stopped": report.over_budget,
        }
    return summary


def write_summary(job: JobSpec, report: RunReport, summary: dict[str, Any]) -> Path:
    """Write the run's summary beside the output, atomically; returns its path."""
    s = report.final
    document = {
        "job": job.name,
        "run": report.run,
        "ended": report.how,
        "output": str(report.output),
        "state_dir": str(report.state_dir),
        "model": job.request.model,
        "tokens": {
            "input_uncached": s.usage.prompt_tokens - s.usage.cached_tokens,
            "input_cached": s.usage.cached_tokens,
            "output": s.usage.completion_tokens,
            "output_reasoning": s.usage.reasoning_tokens,
        },
        "this_run": summary,
    }
    path = summary_path(job.output.path, job.state_path)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("w", encoding="utf-8") as handle:
            json.dump(document, handle, indent=2)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)
    except OSError as exc:
        raise StateError(f"cannot write the run summary {path} ({exc}).") from None
    return path
