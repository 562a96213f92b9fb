"""What the display prints when it is not a terminal (CI logs, files): square brackets in
the text are text, never rich markup."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from pipeline.cli import display as progress
from pipeline.cli.display import LiveReporter
from pipeline.engine.stats import RunStats
from pipeline.io.sources import InputFile, InputScan
from pipeline.job.load import parse_job

JOB = """
name = "brackets[1]"
[input]
path = "in.parquet"
[request]
base_url = "https://models.example/v1"
model = "custom[v2]"
prompt = "{text}"
[output]
path = "out.parquet"
"""


def test_log_lines_and_notices_keep_their_brackets(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    reporter = LiveReporter(stream, live=False)
    job = parse_job(JOB, "job.toml")
    scan = InputScan(
        files=(InputFile(path=Path("in.parquet"), format="parquet"),),
        rows=10,
        columns=frozenset({"text"}),
    )
    reporter.start(job, scan)
    reporter.notice("run 2 stopped: see [output] state_dir")
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    reporter.update(RunStats(total_rows=10).snapshot())
    reporter.close()
    text = stream.getvalue()
    assert "brackets[1]: 10 rows from 1 file" in text
    assert "(custom[v2])" in text
    assert "Add a [pricing] table" in text
    assert "see [output] state_dir" in text
    assert "[brackets[1]] 0/10 rows" in text
