"""The output written as the run goes: in input order, bounded, identical to the journal's."""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path

import anyio
import httpx
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from polars.testing import assert_frame_equal

from pipeline.engine.context import JobContext
from pipeline.engine.runner import Runner, RunOptions
from pipeline.io.ordered import OrderedOutput, Waiting
from pipeline.job.load import parse_job
from pipeline.job.spec import JobSpec
from pipeline.results import RowResult
from pipeline.state.resume import Track


def _batch(rows: int) -> pa.RecordBatch:
    return pa.record_batch({"x": list(range(rows))})


def _track(start: int, rows: int) -> Track:
    return Track(start=start, rows=rows, digest="d", remaining=rows, ok=0, failed=0)


def _result(row: int) -> RowResult:
    return RowResult(key=f"k{row}", row=row, status="ok", response=f"r{row}")


def _finish(output: OrderedOutput, track: Track, rows: list[int]) -> None:
    assert track.results is not None  # the output asked for them
    track.results.extend(_result(row) for row in rows)
    output.finish([track])


def test_batches_are_written_in_order_whatever_order_they_finish_in() -> None:
    written: list[tuple[int, list[int]]] = []

    def write(done: list[Waiting]) -> None:
        for waiting in done:
            assert waiting.results is not None
            written.append((waiting.start, [r.row for r in waiting.results]))

    async def main() -> None:
        output = OrderedOutput(max_waiting_rows=100)
        tracks = [_track(0, 3), _track(3, 3), _track(6, 2)]
        async with anyio.create_task_group() as tg:
            tg.start_soon(output.run, write)
            for track in tracks:
                assert output.admit(_batch(track.rows), sent_whole=True)
                output.add(_batch(track.rows), track)
            _finish(output, tracks[1], [5, 3, 4])  # the second batch first, out of order
            await anyio.sleep(0.05)
            assert written == []  # it waits for the first
            _finish(output, tracks[2], [7, 6])
            _finish(output, tracks[0], [2, 0, 1])
            output.end()
        assert output.next_row == 8

    anyio.run(main)
    assert written == [(0, [0, 1, 2]), (3, [3, 4, 5]), (6, [6, 7])]


def test_past_its_limit_the_output_stops_taking_batches() -> None:
    async def main() -> None:
        output = OrderedOutput(max_waiting_rows=6)
        async with anyio.create_task_group() as tg:
            tg.start_soon(output.run, lambda done: None)
            stuck, second, third = _track(0, 3), _track(3, 3), _track(6, 3)
            for track in (stuck, second):
                assert output.admit(_batch(3), sent_whole=True)
                output.add(_batch(3), track)
            assert not output.admit(_batch(3), sent_whole=True)  # 9 rows would wait for the first
            assert output.closed
            assert third.results is None  # not collected: the journal has them
            assert not output.admit(_batch(1), sent_whole=True)  # and it stays closed
            _finish(output, stuck, [0, 1, 2])
            output.end()
        assert output.next_row == 3  # the end of the run writes the rest from the journal

    anyio.run(main)


def test_a_batch_earlier_runs_finished_in_part_ends_the_stream() -> None:
    output = OrderedOutput(max_waiting_rows=100)
    assert output.admit(_batch(3), sent_whole=True)
    assert not output.admit(
        _batch(3), sent_whole=False
    )  # resuming: its other rows are in the journal
    assert not output.admit(_batch(3), sent_whole=True)


def test_the_limit_counts_rows_until_they_are_written() -> None:
    release = threading.Event()

    def slow_write(done: list[Waiting]) -> None:
        release.wait(5)

    async def main() -> None:
        output = OrderedOutput(max_waiting_rows=4)
        async with anyio.create_task_group() as tg:
            tg.start_soon(output.run, slow_write)
            first, second = _track(0, 4), _track(4, 4)
            assert output.admit(_batch(4), sent_whole=True)
            output.add(_batch(4), first)
            _finish(output, first, [0, 1, 2, 3])
            await anyio.sleep(0.05)
            release.set()
            while output.next_row < 4:
                await anyio.sleep(0.01)
            assert output.admit(_batch(4), sent_whole=True)  # written: room again
            output.add(_batch(4), second)
            _finish(output, second, [4, 5, 6, 7])
            output.end()
        assert output.next_row == 8

    anyio.run(main)


# -- through the runner --------------------------------------------------------------------


def _job(folder: Path, rows: int) -> JobSpec:
    pq.write_table(
        pa.table(
            {
                "rid": [f"r{i}" for i in range(rows)],
                "text": [f"t{i}" for i in range(rows)],
                "extra": [i * 10 for i in range(rows)],
            }
        ),
        folder / "in.parquet",
    )
    return parse_job(
        f"""
name = "asm"
[input]
path = "{folder / "in.parquet"}"
id_column = "rid"
[request]
base_url = "http://127.0.0.1:9/v1"
model = "deepseek-v4-flash"
prompt = "{{text}}"
max_tokens = 8
[limits]
max_in_flight = 8
[output]
path = "{folder / "out.parquet"}"
keep_columns = ["extra"]
""",
        "asm.toml",
    )


class Provider:
    """Answers at once, except ``slow`` rows, which answer after every other row has."""

    def __init__(self, rows: int, slow: set[str]) -> None:
        self.slow = slow
        self.others_left = rows - len(slow)
        self.others_done = anyio.Event()

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        text = json.loads(request.content)["messages"][-1]["content"]
        if text in self.slow:
            await self.others_done.wait()
        else:
            self.others_left -= 1
            if self.others_left == 0:
                self.others_done.set()
        return httpx.Response(
            200,
            json={
                "choices": [{"message": {"content": f"re {text}"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 2},
            },
        )


def _run(job: JobSpec, provider: Provider, waiting_rows: int) -> Runner:
    runner = Runner(
        job,
        api_key=None,
        options=RunOptions(batch_rows=5, output_waiting_rows=waiting_rows),
        transport=httpx.MockTransport(provider),
        rng=random.Random(0),
    )
    anyio.run(runner.run, runner.prepare())
    return runner


def _output(job: JobSpec) -> pl.DataFrame:
    return pl.read_parquet(job.output.path).drop("latency_ms")


def _from_journal(job: JobSpec, provider: Provider) -> pl.DataFrame:
    """The output a run that sends nothing writes: every batch matched against the journal."""
    Path(job.output.path).unlink()
    _run(job, provider, waiting_rows=10**6)
    return _output(job)


def test_the_output_written_during_the_run_equals_the_journals(tmp_path: Path) -> None:
    rows = 43
    job = _job(tmp_path, rows)
    provider = Provider(rows, slow={"t2", "t17"})  # two batches finish late
    _run(job, provider, waiting_rows=10**6)
    during = _output(job)
    assert during["id"].to_list() == [f"r{i}" for i in range(rows)]
    assert during["extra"].to_list() == [i * 10 for i in range(rows)]
    assert during["response"].to_list() == [f"re t{i}" for i in range(rows)]
    assert_frame_equal(during, _from_journal(job, provider))


def test_a_stuck_row_leaves_the_rest_to_the_end_of_the_run(tmp_path: Path) -> None:
    rows = 60
    job = _job(tmp_path, rows)
    provider = Provider(rows, slow={"t1"})  # the first batch is done last
    _run(job, provider, waiting_rows=10)  # two batches of 5 may wait
    stuck = _output(job)
    assert stuck["id"].to_list() == [f"r{i}" for i in range(rows)]
    assert stuck["response"].to_list() == [f"re t{i}" for i in range(rows)]
    assert_frame_equal(stuck, _from_journal(job, provider))


def test_a_stop_writes_the_finished_rows_in_order_and_no_partial_file(tmp_path: Path) -> None:
    rows = 60
    job = _job(tmp_path, rows)
    stale = Path(job.output.path).with_name(f".{Path(job.output.path).name}.partial")
    stale.write_bytes(b"left by a killed run")
    answered = 0
    runner: Runner | None = None

    async def provider(request: httpx.Request) -> httpx.Response:
        nonlocal answered
        text = json.loads(request.content)["messages"][-1]["content"]
        if text == "t3":
            await anyio.sleep(0.2)  # the first batch finishes after the stop
        answered += 1
        if answered == 25 and runner is not None:
            runner.stop()
        return httpx.Response(
            200,
            json={
                "choices": [{"message": {"content": f"re {text}"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 2},
            },
        )

    runner = Runner(
        job,
        api_key=None,
        options=RunOptions(batch_rows=5),
        transport=httpx.MockTransport(provider),
        rng=random.Random(0),
    )
    report = anyio.run(runner.run, runner.prepare())
    assert report.interrupted
    out = _output(job)
    ids = [int(i[1:]) for i in out["id"].to_list()]
    assert ids == sorted(ids)
    assert 25 <= len(ids) < rows
    assert 3 in ids
    assert out["response"].to_list() == [f"re t{i}" for i in ids]
    assert not stale.exists()
    done = {r.row for r in runner.context.journal.iter_results() if r.status == "ok"}
    assert set(ids) == done


def test_a_full_disk_while_writing_the_output_is_a_clear_error_and_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    import pyarrow.parquet

    from pipeline.errors import StateError

    rows = 30
    job = _job(tmp_path, rows)
    provider = Provider(rows, slow=set())
    real_writer = pyarrow.parquet.ParquetWriter

    class FullDisk(real_writer):  # type: ignore[misc,valid-type]
        def write_batch(self, *args: object, **kwargs: object) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pyarrow.parquet, "ParquetWriter", FullDisk)
    with pytest.raises(StateError, match=r"No space left on device.*run the job again"):
        _run(job, provider, waiting_rows=10**6)
    assert not Path(job.output.path).exists()
    monkeypatch.setattr(pyarrow.parquet, "ParquetWriter", real_writer)
    done = {r.row for r in JobContext(job).journal.iter_results()}
    sent_again = Provider(rows, slow=set())
    calls = 0

    async def counting(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return await sent_again(request)

    runner = Runner(
        job, api_key=None, options=RunOptions(batch_rows=5), transport=httpx.MockTransport(counting)
    )
    anyio.run(runner.run, runner.prepare())
    assert calls == rows - len(done)  # what the journal kept is not sent again
    assert _output(job)["response"].to_list() == [f"re t{i}" for i in range(rows)]


def test_long_answers_count_against_the_byte_limit() -> None:
    async def main() -> None:
        output = OrderedOutput(max_waiting_rows=100, max_waiting_bytes=10_000)
        async with anyio.create_task_group() as tg:
            tg.start_soon(output.run, lambda done: None)
            stuck, second = _track(0, 2), _track(2, 2)
            for track in (stuck, second):
                assert output.admit(_batch(2), sent_whole=True)
                output.add(_batch(2), track)
            assert second.results is not None
            second.results.extend(
                RowResult(key=f"k{row}", row=row, status="ok", response="x" * 6_000)
                for row in (2, 3)
            )
            output.finish([second])  # 12,000 characters wait for the first batch
            assert not output.admit(_batch(2), sent_whole=True)
            _finish(output, stuck, [0, 1])
            output.end()
        assert output.next_row == 4

    anyio.run(main)
