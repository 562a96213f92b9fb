"""Issue 12: paths in a job file are relative to the job file's folder (command-line flags to the
current folder); a job written the old way keeps working, with a notice saying how to write
its paths."""

from __future__ import annotations

import json
import random
from pathlib import Path

import anyio
import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.engine.context import JobContext
from pipeline.engine.runner import Runner, RunOptions
from pipeline.errors import JobFileError
from pipeline.job.load import load_job, parse_job
from pipeline.job.spec import JobSpec, Overrides, apply_overrides


def _write_job(path: Path, *, input_: str, output: str, extra: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"""
name = "paths"
[input]
path = "{input_}"
[request]
base_url = "http://127.0.0.1:9/v1"
model = "deepseek-v4-flash"
prompt = "Label {{text}}."
[output]
path = "{output}"
{extra}
"""
    )
    return path


def _rows(path: Path, count: int = 3) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": [f"t{i}" for i in range(count)]}), path)


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A current folder that is not the job file's."""
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder


def test_paths_are_relative_to_the_job_files_folder(tmp_path: Path, elsewhere: Path) -> None:
    _rows(tmp_path / "data" / "in.parquet")
    job = load_job(
        _write_job(
            tmp_path / "jobs" / "job.toml",
            input_="../data/in.parquet",
            output="../out/result.parquet",
            extra='state_dir = "state"',
        )
    )
    assert job.input.path == str(tmp_path / "data" / "in.parquet")
    assert job.output.path == str(tmp_path / "out" / "result.parquet")
    assert job.state_path == tmp_path / "jobs" / "state"
    assert job.notices == ()
    assert JobContext(job).scan().rows == 3


def test_a_relative_job_path_gives_paths_relative_to_the_current_folder(
    tmp_path: Path, elsewhere: Path
) -> None:
    _write_job(tmp_path / "jobs" / "job.toml", input_="in.parquet", output="out.parquet")
    job = load_job("../jobs/job.toml")
    assert job.input.path == "../jobs/in.parquet"
    assert job.state_path == Path("../jobs/out.parquet.state")
    assert parse_job(Path("../jobs/job.toml").read_text(), "jobs/x.toml").output.path == (
        "jobs/out.parquet"
    )


def test_absolute_paths_are_kept_and_a_tilde_is_expanded(
    tmp_path: Path, elsewhere: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    job = load_job(
        _write_job(
            tmp_path / "jobs" / "job.toml",
            input_=str(tmp_path / "a" / ".." / "in.parquet"),
            output="~/out/result.parquet",
        )
    )
    assert job.input.path == str(tmp_path / "a" / ".." / "in.parquet")  # as written
    assert job.output.path == str(tmp_path / "home" / "out" / "result.parquet")


def test_a_schema_file_may_start_with_a_tilde(
    tmp_path: Path, elsewhere: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "s.json").write_text(
        json.dumps({"type": "object", "properties": {"label": {"type": "string"}}})
    )
    job = load_job(
        _write_job(
            tmp_path / "jobs" / "job.toml",
            input_="in.parquet",
            output="out.parquet",
            extra='schema = "~/s.json"',
        )
    )
    assert job.output.schema is not None
    assert job.output.schema.columns == ("label",)


@pytest.mark.parametrize("pattern", ["../data/*.parquet", "../data/**/*.parquet", "../data"])
def test_globs_and_folders_are_relative_to_the_job_file_too(
    tmp_path: Path, elsewhere: Path, pattern: str
) -> None:
    _rows(tmp_path / "data" / "a.parquet", 2)
    _rows(tmp_path / "data" / "b.parquet", 3)
    job = load_job(_write_job(tmp_path / "jobs" / "job.toml", input_=pattern, output="o.parquet"))
    assert job.notices == ()
    assert JobContext(job).scan().rows == 5


def test_command_line_paths_stay_relative_to_the_current_folder(
    tmp_path: Path, elsewhere: Path
) -> None:
    _rows(elsewhere / "mine.parquet")
    job = load_job(_write_job(tmp_path / "jobs" / "job.toml", input_="in.parquet", output="o"))
    job = apply_overrides(job, Overrides(input="mine.parquet", output="result.parquet"))
    assert job.input.path == "mine.parquet"
    assert job.state_path == Path("result.parquet.state")
    assert JobContext(job).scan().rows == 3


def test_a_missing_input_names_where_it_was_looked_for(tmp_path: Path, elsewhere: Path) -> None:
    job = load_job(_write_job(tmp_path / "jobs" / "job.toml", input_="in.parquet", output="o"))
    with pytest.raises(JobFileError) as info:
        JobContext(job).scan()
    assert str(tmp_path / "jobs" / "in.parquet") in str(info.value)
    assert "relative to the job file's folder" in str(info.value)


# -- jobs written the old way: relative to the current folder ---------------------------------


def test_an_input_found_only_from_the_current_folder_is_read_with_a_notice(
    tmp_path: Path, elsewhere: Path
) -> None:
    _rows(elsewhere / "data" / "in.parquet")
    job = load_job(
        _write_job(tmp_path / "jobs" / "job.toml", input_="data/in.parquet", output="o.parquet")
    )
    assert job.input.path == "data/in.parquet"
    assert JobContext(job).scan().rows == 3
    (notice,) = job.notices
    assert notice.key == "[input] path"
    source = str(tmp_path / "jobs" / "job.toml")
    assert str(notice) == (
        f"{source}: [input] path: 'data/in.parquet' is not found relative to the job file's "
        f"folder ('{tmp_path / 'jobs' / 'data' / 'in.parquet'}') but is relative to the current "
        "folder, so it is read from there. Paths in a job file are relative to the job file's "
        'folder: write path = "../elsewhere/data/in.parquet" (or an absolute path) so that the '
        "job finds it from any folder."
    )
    # --input makes the notice moot
    assert apply_overrides(job, Overrides(input="x.parquet")).notices == ()


def test_a_glob_found_only_from_the_current_folder_is_read_with_a_notice(
    tmp_path: Path, elsewhere: Path
) -> None:
    _rows(elsewhere / "data" / "a.parquet")
    job = load_job(
        _write_job(tmp_path / "jobs" / "job.toml", input_="data/*.parquet", output="o.parquet")
    )
    assert job.input.path == "data/*.parquet"
    assert [n.key for n in job.notices] == ["[input] path"]


def test_the_job_files_folder_wins_when_both_have_the_input(
    tmp_path: Path, elsewhere: Path
) -> None:
    _rows(elsewhere / "in.parquet")
    _rows(tmp_path / "jobs" / "in.parquet")
    job = load_job(_write_job(tmp_path / "jobs" / "job.toml", input_="in.parquet", output="o"))
    assert job.input.path == str(tmp_path / "jobs" / "in.parquet")
    assert job.notices == ()


def test_an_existing_state_from_the_current_folder_is_kept_with_a_notice(
    tmp_path: Path, elsewhere: Path
) -> None:
    (elsewhere / "out" / "r.parquet.state").mkdir(parents=True)
    path = _write_job(tmp_path / "jobs" / "job.toml", input_="in.parquet", output="out/r.parquet")
    job = load_job(path)
    assert job.output.path == "out/r.parquet"
    assert job.state_path == Path("out/r.parquet.state")
    (notice,) = job.notices
    assert notice.key == "[output] path"
    assert "the job's state (its finished rows) is in 'out/r.parquet.state'" in str(notice)
    assert 'write path = "../elsewhere/out/r.parquet"' in str(notice)
    assert apply_overrides(job, Overrides(output="x.parquet")).notices == ()
    # without that state, the output goes beside the job file
    (elsewhere / "out" / "r.parquet.state").rmdir()
    fresh = load_job(path)
    assert fresh.output.path == str(tmp_path / "jobs" / "out" / "r.parquet")
    assert fresh.notices == ()


def test_an_existing_state_dir_from_the_current_folder_is_kept_with_a_notice(
    tmp_path: Path, elsewhere: Path
) -> None:
    (elsewhere / "state").mkdir()
    job = load_job(
        _write_job(
            tmp_path / "jobs" / "job.toml",
            input_="in.parquet",
            output=str(tmp_path / "r.parquet"),
            extra='state_dir = "state"',
        )
    )
    assert job.state_path == Path("state")
    assert job.output.path == str(tmp_path / "r.parquet")
    assert [n.key for n in job.notices] == ["[output] state_dir"]


def _answer(request: httpx.Request) -> httpx.Response:
    return httpx.Response(
        200,
        json={
            "id": "x",
            "choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1},
        },
    )


def _run(job: JobSpec, sent: list[int]) -> None:
    def provider(request: httpx.Request) -> httpx.Response:
        sent.append(1)
        return _answer(request)

    runner = Runner(
        job,
        api_key=None,
        options=RunOptions(batch_rows=5),
        transport=httpx.MockTransport(provider),
        rng=random.Random(1),
    )
    anyio.run(runner.run, runner.prepare())


def test_an_old_job_run_again_from_its_old_folder_sends_no_row_again(
    tmp_path: Path, elsewhere: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run made before paths followed the job file left its output and state in the
    current folder; the same command now finds them, and sends nothing again."""
    _rows(elsewhere / "data" / "in.parquet")
    path = _write_job(
        tmp_path / "jobs" / "job.toml", input_="data/in.parquet", output="out/r.parquet"
    )
    old = parse_job(path.read_text(), "job.toml")  # as it was read: from the current folder
    sent: list[int] = []
    _run(old, sent)
    assert len(sent) == 3
    assert (elsewhere / "out" / "r.parquet").is_file()
    job = load_job(path)
    assert {n.key for n in job.notices} == {"[input] path", "[output] path"}
    _run(job, sent)
    assert len(sent) == 3
    assert not (tmp_path / "jobs" / "out").exists()


def test_a_job_runs_the_same_from_any_folder(
    tmp_path: Path, elsewhere: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _rows(tmp_path / "data" / "in.parquet")
    path = _write_job(
        tmp_path / "jobs" / "job.toml", input_="../data/in.parquet", output="../out/r.parquet"
    )
    sent: list[int] = []
    _run(load_job(path), sent)
    assert (tmp_path / "out" / "r.parquet").is_file()
    monkeypatch.chdir(tmp_path / "jobs")
    _run(load_job("job.toml"), sent)
    assert len(sent) == 3  # the second run, from another folder, found the first one's state
