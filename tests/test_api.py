"""The Python API: run_job / arun_job / estimate_job with a path, TOML text or a dict, rows
from polars, pandas or pyarrow, in a script and inside a running event loop (the notebook
case), against the built-in server over real HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import (
    Estimate,
    JobFileError,
    OverBudgetError,
    UsageError,
    arun_job,
    estimate_job,
    run_job,
    run_job_report,
)
from pipeline.server.process import reset_server_stats, server_stats

TEXTS = [f"review number {i}" for i in range(6)]


def job_dict(base_url: str, **limits: Any) -> dict[str, Any]:
    return {
        "name": "labels",
        "request": {
            "base_url": base_url,
            "model": "deepseek-v4-flash",
            "prompt": "Label this review: {text}",
            "max_tokens": 16,
            "thinking": "disabled",
        },
        "limits": {"max_in_flight": 4, "max_retry_wait_s": 0.01, **limits},
    }


def job_toml(base_url: str, input_path: Path, output_path: Path) -> str:
    return f"""
name = "labels"
[input]
path = "{input_path}"
[request]
base_url = "{base_url}"
model = "deepseek-v4-flash"
prompt = "Label this review: {{text}}"
max_tokens = 16
thinking = "disabled"
[limits]
max_in_flight = 4
[output]
path = "{output_path}"
"""


def requests_sent(base_url: str) -> int:
    total = server_stats(base_url)["requests_total"]
    assert isinstance(total, int)
    return total


def check_output(frame: pl.DataFrame, texts: list[str] = TEXTS) -> None:
    assert frame.height == len(texts)
    assert frame["status"].to_list() == ["ok"] * len(texts)
    assert frame["id"].to_list() == list(range(len(texts)))  # row numbers, in input order
    assert all(frame["response"].to_list())


# -- the three forms of a job -----------------------------------------------------------------


def test_run_job_with_a_job_file(tmp_path: Path, local_server: Callable[..., str]) -> None:
    base = local_server(latency_ms=1)
    pq.write_table(pa.table({"text": TEXTS}), tmp_path / "in.parquet")
    job_file = tmp_path / "labels.toml"
    job_file.write_text(job_toml(base, tmp_path / "in.parquet", tmp_path / "out.parquet"))
    frame = run_job(job_file)
    check_output(frame)
    assert requests_sent(base) == len(TEXTS)
    assert pl.read_parquet(tmp_path / "out.parquet").equals(frame)  # the written output


def test_run_job_with_toml_text_and_overrides(
    tmp_path: Path, local_server: Callable[..., str]
) -> None:
    base = local_server(latency_ms=1)
    pq.write_table(pa.table({"text": TEXTS}), tmp_path / "in.parquet")
    text = job_toml("http://127.0.0.1:9/v1", tmp_path / "in.parquet", tmp_path / "x.parquet")
    frame = run_job(text, base_url=base, output=tmp_path / "other.parquet", limit=4)
    check_output(frame, TEXTS[:4])
    assert (tmp_path / "other.parquet").is_file()
    assert not (tmp_path / "x.parquet").exists()
    assert requests_sent(base) == 4


def test_a_dict_job_without_output_writes_under_out(
    tmp_path: Path, local_server: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> None:
    base = local_server(latency_ms=1)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in.jsonl").write_text("".join(f'{{"text": "{t}"}}\n' for t in TEXTS))
    job = {**job_dict(base), "name": "my labels", "input": {"path": "in.jsonl"}}
    frame = run_job(job)
    check_output(frame)
    assert pl.read_parquet(tmp_path / "out" / "my_labels.parquet").equals(frame)


# -- rows from DataFrames -----------------------------------------------------------------------


def _polars(data: dict[str, list[Any]]) -> Any:
    return pl.DataFrame(data)


def _pandas(data: dict[str, list[Any]]) -> Any:
    return pd.DataFrame(data, index=[10 + i for i in range(len(TEXTS))])  # the index is dropped


def _arrow(data: dict[str, list[Any]]) -> Any:
    return pa.table(data)


@pytest.mark.parametrize("make", [_polars, _pandas, _arrow], ids=["polars", "pandas", "pyarrow"])
def test_rows_from_a_dataframe(
    make: Callable[[dict[str, list[Any]]], Any],
    tmp_path: Path,
    local_server: Callable[..., str],
) -> None:
    base = local_server(latency_ms=1)
    ids = [f"r{i}" for i in range(len(TEXTS))]
    job = {**job_dict(base), "input": {"id_column": "review_id"}}
    rows = make({"review_id": ids, "text": TEXTS})
    frame = run_job(job, rows=rows, output=tmp_path / "out.parquet")
    assert frame["id"].to_list() == ids
    assert frame["status"].to_list() == ["ok"] * len(TEXTS)
    assert requests_sent(base) == len(TEXTS)
    stats = server_stats(base)
    assert (stats["distinct_requests"], stats["max_sends_per_request"]) == (len(TEXTS), 1)


def test_the_same_rows_resume_in_a_second_call(
    tmp_path: Path, local_server: Callable[..., str]
) -> None:
    base = local_server(latency_ms=1)
    rows = pl.DataFrame({"text": TEXTS})
    out = tmp_path / "out.parquet"
    first = run_job(job_dict(base), rows=rows.head(4), output=out)
    check_output(first, TEXTS[:4])
    reset_server_stats(base)
    second = run_job(job_dict(base), rows=rows.head(4), output=out)
    assert requests_sent(base) == 0  # every row was finished by the first call
    assert second.equals(first)
    third = run_job(job_dict(base), rows=rows, output=out)  # two new rows at the end
    assert requests_sent(base) == 2
    check_output(third)
    assert third.head(4).equals(first)


def test_rows_of_another_kind_are_refused() -> None:
    with pytest.raises(UsageError, match=r"rows= takes a polars or pandas DataFrame or a "):
        run_job(job_dict("http://127.0.0.1:9/v1"), rows=[{"text": "a"}])


# -- inside a running event loop (the notebook case) -------------------------------------------


def test_run_job_inside_a_running_loop(tmp_path: Path, local_server: Callable[..., str]) -> None:
    """A notebook cell calls the blocking run_job while the kernel's loop runs: the run gets
    a thread and a loop of its own (anyio.run here would fail: "Already running asyncio")."""
    base = local_server(latency_ms=1)

    async def cell() -> pl.DataFrame:
        asyncio.get_running_loop()  # a loop runs in this thread
        return run_job(job_dict(base), rows=pl.DataFrame({"text": TEXTS}), output=tmp_path / "o")

    frame = asyncio.run(cell())
    check_output(frame)
    assert requests_sent(base) == len(TEXTS)


def test_arun_job_uses_the_callers_loop(tmp_path: Path, local_server: Callable[..., str]) -> None:
    base = local_server(latency_ms=1)
    seen: list[int] = []

    async def main() -> list[pl.DataFrame]:
        seen.append(threading.get_ident())
        rows = pl.DataFrame({"text": TEXTS})
        # Two jobs at once on one loop, each with its own output (and state).
        return list(
            await asyncio.gather(
                arun_job(job_dict(base), rows=rows, output=tmp_path / "a.parquet"),
                arun_job(job_dict(base), rows=rows.head(3), output=tmp_path / "b.parquet"),
            )
        )

    a, b = asyncio.run(main())
    check_output(a)
    check_output(b, TEXTS[:3])
    assert requests_sent(base) == len(TEXTS) + 3
    assert seen == [threading.get_ident()]


def test_estimate_job_inside_a_running_loop(
    tmp_path: Path, local_server: Callable[..., str]
) -> None:
    base = local_server(latency_ms=1)
    rows = pd.DataFrame({"text": TEXTS})
    out = tmp_path / "out.parquet"

    async def cell() -> Estimate:
        return estimate_job(job_dict(base), rows=rows, output=out)

    before = asyncio.run(cell())
    assert isinstance(before, Estimate)
    assert (before.rows, before.rows_to_send, before.rows_done_ok) == (6, 6, 0)
    assert before.input_tokens > 0
    assert before.exact_tokens
    assert before.cost is not None  # deepseek-v4-flash has a price
    assert requests_sent(base) == 0  # an estimate sends nothing
    run_job(job_dict(base), rows=rows.head(4), output=out)
    after = asyncio.run(cell())
    assert (after.rows_to_send, after.rows_done_ok) == (2, 4)  # it reads the run's state
    assert after.output_source == "history"


def test_a_ctrl_c_in_a_notebook_stops_gracefully_and_the_next_call_resumes(
    tmp_path: Path, local_server: Callable[..., str]
) -> None:
    """The kernel's loop blocks in run_job; Ctrl-C (SIGINT) raises KeyboardInterrupt there:
    the run stops sending, lets the requests in flight finish and record, and raises. The
    next call sends only the rest: no row is sent twice."""
    base = local_server(latency_ms=150)
    rows = pl.DataFrame({"text": [f"row {i}" for i in range(40)]})
    job = job_dict(base, max_in_flight=2)
    out = tmp_path / "out.parquet"

    def interrupt_once_sending() -> None:
        while requests_sent(base) < 2:
            threading.Event().wait(0.02)
        os.kill(os.getpid(), signal.SIGINT)

    async def cell() -> pl.DataFrame:
        return run_job(job, rows=rows, output=out)

    # A loop of the kernel's kind: it leaves SIGINT to Python (asyncio.run would catch it).
    loop = asyncio.new_event_loop()
    killer = threading.Thread(target=interrupt_once_sending)
    killer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            loop.run_until_complete(cell())
    finally:
        killer.join()
        loop.close()
    sent_first = requests_sent(base)
    assert 2 <= sent_first < 40
    frame = run_job(job, rows=rows, output=out)
    assert frame.height == 40
    assert frame["status"].to_list() == ["ok"] * 40
    stats = server_stats(base)  # the rows finished before the stop were not sent again
    assert (stats["requests_total"], stats["max_sends_per_request"]) == (40, 1)


SCRIPT = """
import json, sys
import polars as pl
from pipeline import run_job
rows = pl.DataFrame({"text": [f"row {i}" for i in range(40)]})
run_job(json.loads(sys.argv[1]), rows=rows, output=sys.argv[2])
"""


def test_a_ctrl_c_in_a_script_stops_gracefully_and_the_next_call_resumes(
    tmp_path: Path, local_server: Callable[..., str]
) -> None:
    """No loop runs: run_job uses anyio.run on the main thread, where SIGINT stops the run
    as the command line's first Ctrl-C does."""
    base = local_server(latency_ms=150)
    out = tmp_path / "out.parquet"
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    job = job_dict(base, max_in_flight=2)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    child = subprocess.Popen(
        [sys.executable, str(script), json.dumps(job), str(out)],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        while requests_sent(base) < 2 and child.poll() is None:
            threading.Event().wait(0.02)
        child.send_signal(signal.SIGINT)
        _, stderr = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode != 0
    assert "KeyboardInterrupt: labels: interrupted; finished rows are kept in" in stderr
    assert 2 <= requests_sent(base) < 40
    frame = run_job(job, rows=pl.DataFrame({"text": [f"row {i}" for i in range(40)]}), output=out)
    assert frame["status"].to_list() == ["ok"] * 40
    stats = server_stats(base)  # the rows finished before the stop were not sent again
    assert (stats["requests_total"], stats["max_sends_per_request"]) == (40, 1)


# -- local=True, budget, key check, mistakes -----------------------------------------------------


def test_local_runs_against_the_embedded_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WAVESPEED_API_KEY", raising=False)
    request = {"api_key_env": "WAVESPEED_API_KEY", "prompt": "Label: {text}", "max_tokens": 16}
    job = {"name": "labels", "request": {**request, "thinking": "disabled"}}
    frame = run_job(job, rows=pa.table({"text": TEXTS[:3]}), local=True)
    check_output(frame, TEXTS[:3])
    # --local's side: an output of its own, never the real endpoint's.
    assert (tmp_path / "out" / "labels.local.parquet").is_file()
    assert not (tmp_path / "out" / "labels.parquet").exists()


def test_the_key_is_checked_before_anything_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PIPELINE_TEST_UNSET_KEY", raising=False)
    job = job_dict("https://llm.wavespeed.ai/v1")
    job["request"]["api_key_env"] = "PIPELINE_TEST_UNSET_KEY"
    with pytest.raises(JobFileError, match=r"PIPELINE_TEST_UNSET_KEY is not set.*local=True"):
        run_job(job, rows=pl.DataFrame({"text": ["a"]}))


def test_a_budget_stops_the_run_and_a_higher_one_finishes_it(
    tmp_path: Path, local_server: Callable[..., str]
) -> None:
    base = local_server(latency_ms=1)
    rows = pl.DataFrame({"text": [f"row {i}" for i in range(12)]})
    out = tmp_path / "out.parquet"
    job = job_dict(base, max_in_flight=1)
    price = "input=1000,output=1000"  # USD per million: about $0.03 a row at worst
    with pytest.raises(OverBudgetError, match=r"stopped at the budget: \$[\d.]+ spent of the") as e:
        run_job(job, rows=rows, output=out, max_cost=0.1, price=price)
    report = e.value.report
    assert report.budget is not None
    assert report.budget.spent <= report.budget.cap
    assert e.value.output is not None
    done = e.value.output.height
    assert 1 <= done < 12
    assert requests_sent(base) == done
    assert e.value.exit_code == 4
    frame = run_job(job, rows=rows, output=out, max_cost=10, price=price)
    assert frame.height == 12
    assert requests_sent(base) == 12  # the first call's rows were not sent again


def test_run_job_report_returns_the_figures(
    tmp_path: Path, local_server: Callable[..., str]
) -> None:
    base = local_server(latency_ms=1)
    report = run_job_report(
        job_dict(base), rows=pl.DataFrame({"text": TEXTS}), output=tmp_path / "out.parquet"
    )
    assert (report.final.ok, report.output_rows) == (6, 6)
    assert report.all_ok


def test_a_bad_dict_names_the_key() -> None:
    job = job_dict("http://127.0.0.1:9/v1")
    job["limits"]["max_in_fligt"] = 4
    with pytest.raises(JobFileError, match=r"^<job dict>: \[limits\] max_in_fligt: unknown key"):
        run_job(job, rows=pl.DataFrame({"text": ["a"]}))
    job = job_dict("http://127.0.0.1:9/v1")
    job["request"]["max_tokens"] = "many"
    with pytest.raises(JobFileError, match=r"^<job dict>: \[request\] max_tokens: has the wrong"):
        estimate_job(job, rows=pl.DataFrame({"text": ["a"]}))
    with pytest.raises(JobFileError, match=r"^<job text>: is not valid TOML"):
        run_job('name = "x"\n[input\n')


def test_a_column_the_rows_lack_is_named(tmp_path: Path) -> None:
    with pytest.raises(JobFileError, match=r"placeholder for column 'text', which the input la"):
        run_job(
            job_dict("http://127.0.0.1:9/v1"),
            rows=pl.DataFrame({"body": ["a"]}),
            output=tmp_path / "out.parquet",
        )


def test_keyword_mistakes() -> None:
    job = job_dict("http://127.0.0.1:9/v1")
    rows = pl.DataFrame({"text": ["a"]})
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'max_costs'"):
        run_job(job, rows=rows, max_costs=1)
    with pytest.raises(UsageError, match=r"run_job\(limit=0\): must be a whole number"):
        run_job(job, rows=rows, limit=0)
    with pytest.raises(UsageError, match=r"max_cost='free'\): must be an amount of USD"):
        estimate_job(job, rows=rows, max_cost="free")
    with pytest.raises(UsageError, match=r"local=True and base_url= cannot be used together"):
        run_job(job, rows=rows, local=True, base_url="http://127.0.0.1:9/v1")
    with pytest.raises(UsageError, match=r"give rows= or input=, not both"):
        run_job(job, rows=rows, input="in.parquet")
