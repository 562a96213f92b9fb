"""Issue 12, the engine's side: what a newcomer trips on gives one clear line before any
request, and nothing that never reached a server counts as possibly billed."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import anyio
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipeline.cli.commands import cli
from pipeline.engine.context import JobContext
from pipeline.engine.runner import Runner, RunOptions
from pipeline.errors import JobFileError, ProviderError
from pipeline.job.load import parse_job
from pipeline.job.spec import JobSpec, Overrides, apply_overrides
from pipeline.state.runs import StateFolder
from pipeline.testing import Script


def _text(tmp_path: Path, base_url: str = "http://127.0.0.1:9/v1", request: str = "") -> str:
    return f"""
name = "first-hour"
[input]
path = "{tmp_path / "in.parquet"}"
[request]
base_url = "{base_url}"
model = "deepseek-v4-flash"
prompt = "{{text}}"
{request}
[limits]
max_in_flight = 4
max_retry_wait_s = 0.01
[output]
path = "{tmp_path / "out" / "result.parquet"}"
"""


def _job(tmp_path: Path, *, request: str = "", extra: str = "", rows: int = 20) -> JobSpec:
    pq.write_table(pa.table({"text": [f"t{i}" for i in range(rows)]}), tmp_path / "in.parquet")
    return parse_job(_text(tmp_path, request=request) + extra, tmp_path / "job.toml")


def test_a_refused_connection_is_not_counted_as_possibly_billed(tmp_path: Path) -> None:
    """127.0.0.1:9 refuses connections: the job stops as unreachable, and neither its own
    summary nor the next run reports requests that may have been billed twice."""
    job = _job(tmp_path, request="max_tokens = 8")
    runner = Runner(job, api_key=None, options=RunOptions(batch_rows=8))
    with pytest.raises(ProviderError, match="cannot reach"):
        anyio.run(runner.run, runner.prepare())
    state = StateFolder(job.state_path)
    last = state.history()[-1]
    assert last.summary is not None
    assert last.summary["unanswered"] == 0
    assert state.unanswered() is None


def test_budget_without_price_or_max_tokens_is_one_line_before_sending(tmp_path: Path) -> None:
    """No known price, no max_tokens, a budget: the warning formats (it raised ValueError:
    "Cannot specify ',' with 's'") and the run refuses before any request."""
    job = apply_overrides(
        _job(tmp_path),
        Overrides(base_url="https://models.example.invalid/v1", max_cost=Decimal(1)),
    )
    script = Script()
    runner = Runner(job, api_key=None, transport=script.transport())
    warnings = runner.warnings()
    assert any("max_tokens is not" in w for w in warnings)
    with pytest.raises(
        JobFileError,
        match=r"\[budget\] max_cost_usd \(or --max-cost\): needs a price.*--price input=",
    ):
        runner.prepare()
    assert script.requests == []


@pytest.mark.parametrize(
    ("output", "words"),
    [
        ("s3://bucket/out.parquet", "no S3 credentials were found"),
        ("hf://datasets/u/r/out.parquet", "hf:// is read only here"),
        ("{tmp}/a-folder", "is a folder; the output is one Parquet file"),
        ("{tmp}/a-file/out.parquet", "is a file"),
    ],
)
def test_an_output_that_cannot_be_written_is_refused_before_sending(
    tmp_path: Path, output: str, words: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No AWS credentials anywhere (the object-storage checks are in test_object_storage.py).
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    (tmp_path / "a-folder").mkdir()
    (tmp_path / "a-file").write_text("x")
    job = apply_overrides(_job(tmp_path), Overrides(output=output.format(tmp=tmp_path)))
    script = Script()
    runner = Runner(job, api_key=None, transport=script.transport())
    with pytest.raises(JobFileError, match=r"\[output\] path") as caught:
        runner.prepare()
    assert words in str(caught.value)
    assert script.requests == []
    assert not Path("s3:").exists()
    assert not Path("gs:").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_an_unwritable_output_folder_is_refused(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    job = apply_overrides(_job(tmp_path), Overrides(output=str(locked / "out.parquet")))
    with pytest.raises(JobFileError, match="permission denied"):
        JobContext(job).check_before_sending()


def test_the_state_folder_must_be_a_folder(tmp_path: Path) -> None:
    (tmp_path / "state-file").write_text("x")
    job = _job(tmp_path, extra=f'state_dir = "{tmp_path / "state-file"}"')
    with pytest.raises(JobFileError, match=r"\[output\] state_dir.*is a file, not a folder"):
        JobContext(job).check_before_sending()


def test_a_budget_stop_says_by_how_much_to_raise_the_cap(
    tmp_path: Path, local_server: Callable[..., str]
) -> None:
    """Running the same command again would stop at once: the message gives the cap that
    finishes the job, and that cap does finish it."""
    url = local_server(latency_ms=1, reply_min_fraction=1.0)  # every answer max_tokens long
    _job(tmp_path, rows=40)  # writes the input
    job_file = tmp_path / "job.toml"
    job_file.write_text(_text(tmp_path, url, 'max_tokens = 16\nthinking = "disabled"'))
    first = CliRunner().invoke(cli, ["run", str(job_file), "--max-cost", "0.00002"])
    assert first.exit_code == 4, first.output
    found = re.search(
        r"to at least \$(\d+\.\d+) \(10% to spare\) and run the same command again", first.output
    )
    assert found is not None, first.output
    assert "rows are left, about $" in first.output
    again = CliRunner().invoke(cli, ["run", str(job_file), "--max-cost", found.group(1)])
    assert again.exit_code == 0, again.output


def test_verbose_quiet_and_a_log_file(tmp_path: Path, local_server: Callable[..., str]) -> None:
    """--log-file gets plain lines: the header, each retried and failed row, the summary;
    --verbose prints the rows' events too; --quiet prints no table."""
    url = local_server(latency_ms=1, fault_400=0.3, seed=3)
    _job(tmp_path, rows=30)
    job_file = tmp_path / "job.toml"
    job_file.write_text(_text(tmp_path, url, 'max_tokens = 16\nthinking = "disabled"'))
    log = tmp_path / "logs" / "run.log"
    loud = CliRunner().invoke(cli, ["run", str(job_file), "--verbose", "--log-file", str(log)])
    assert loud.exit_code == 3, loud.output  # fault_400 fails some rows for good
    failed = re.findall(r"row (\d+): failed after 1 attempt\(s\): HTTP 400", loud.output)
    assert failed
    lines = log.read_text().splitlines()
    assert "30 rows ->" in lines[0]
    assert sum("failed after 1 attempt(s): HTTP 400" in line for line in lines) == len(failed)
    assert "ended completed" in lines[-1]
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ", lines[-1])
    quiet = CliRunner().invoke(cli, ["run", str(job_file), "--quiet", "--retry-failed"])
    assert quiet.exit_code == 3
    assert "summary" not in quiet.output
    assert "row " not in quiet.output


def test_row_messages_name_the_rows_id() -> None:
    """-v and --log-file lines name a row by its number and, with an id column, its id."""
    from pipeline.rows.plan import PlannedRow

    assert PlannedRow(17, "k", None, None, id="r-42").describe() == "row 17 (id r-42)"
    assert PlannedRow(17, "k", None, None, id="17").describe() == "row 17"
    assert PlannedRow(17, "k", None, None).describe() == "row 17"
