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


def test_the_header_waits_for_the_first_request_and_rich_loads_with_it() -> None:
    """Nothing is printed (and rich is not loaded, in a fresh process) before the run's
    first request is out; then the header comes, before the first log line."""
    import subprocess
    import sys

    code = f"""
import io, sys
from pathlib import Path
from pipeline.cli import display
from pipeline.engine.stats import RunStats
from pipeline.io.sources import InputFile, InputScan
from pipeline.job.load import parse_job
display.LOG_EVERY_S = 0.0
stream = io.StringIO()
reporter = display.LiveReporter(stream, live=False)
scan = InputScan(files=(InputFile(path=Path("in.parquet"), format="parquet"),), rows=10,
                 columns=frozenset({{"text"}}))
reporter.start(parse_job({JOB!r}, "job.toml"), scan)
stats = RunStats(total_rows=10)
reporter.update(stats.snapshot())
print(repr(stream.getvalue()), "rich" in sys.modules)
stats.requests = 1
reporter.update(stats.snapshot())
print(stream.getvalue().splitlines()[0], "|", stream.getvalue().splitlines()[2][:20])
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out[0] == "'' False"
    assert out[1].startswith("brackets[1]: 10 rows from 1 file")
    assert out[1].endswith("| [brackets[1]] 0/10 r")
