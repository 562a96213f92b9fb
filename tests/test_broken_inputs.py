"""Every command, fed broken inputs: one clear line, exit 1 or 2, no traceback, nothing sent.

Each case is a command line run in-process against a job folder of its own, with the built-in
server as the endpoint; the server's counters prove that nothing was sent. The message must
name what is wrong: the file, and the key, line, column or flag.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipeline.cli.commands import cli
from pipeline.server.process import reset_server_stats, server_stats
from pipeline.testing import local_server


@dataclass(frozen=True)
class Folder:
    path: Path
    url: str

    def job(
        self,
        request: str = "",
        *,
        input_: str = "",
        output: str = "",
        top: str = "",
        limits: str = "",
    ) -> str:
        """A job file (job.toml) that is good unless the given lines break it."""
        text = f"""name = "broken"
{top}
[input]
path = "{self.path / "in.parquet"}"
{input_}
[request]
base_url = "{self.url}"
model = "deepseek-v4-flash"
prompt = "Label: {{text}}"
max_tokens = 16
thinking = "disabled"
{request}
[limits]
{limits}
[output]
path = "{self.path / "out" / "result.parquet"}"
{output}
"""
        (self.path / "job.toml").write_text(text)
        return str(self.path / "job.toml")

    def write(self, name: str, text: str) -> str:
        (self.path / name).write_text(text)
        return str(self.path / name)


Case = Callable[[Folder], list[str]]


def _batch(folder: Folder, lines: list[str]) -> list[str]:
    path = folder.write("requests.jsonl", "\n".join(lines) + "\n")
    return ["run", path, "--base-url", folder.url]


def _line(custom_id: str = "a", **body: object) -> str:
    payload = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **body}
    request = {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions"}
    return json.dumps({**request, "body": payload})


CASES: dict[str, tuple[Case, str]] = {
    # -- job files ---------------------------------------------------------------------
    "no job file": (lambda f: ["run", str(f.path / "nope.toml")], "nope.toml"),
    "toml syntax": (lambda f: ["run", f.write("job.toml", "name = \n[input")], "job.toml"),
    "unknown section": (lambda f: ["run", f.job(top="[outptu]\npath = 'x'")], "outptu"),
    "typo temprature": (lambda f: ["run", f.job("temprature = 0")], "temperature"),
    "typo max_token": (lambda f: ["run", f.job("max_token = 150")], "max_tokens"),
    "secret in request": (lambda f: ["run", f.job('api_key = "sk-abc123"')], "api_key_env"),
    "no input path": (
        lambda f: ["run", f.write("job.toml", 'name = "x"\n[request]\nprompt = "{text}"\n')],
        "[input]",
    ),
    "input missing": (lambda f: ["run", f.job(), "--input", "none.parquet"], "none.parquet"),
    "missing column": (
        lambda f: ["run", f.job(), "--input", f.write("other.jsonl", '{"body": "x"}\n')],
        "text",
    ),
    "keep unknown column": (
        lambda f: ["run", f.job(output='keep_columns = ["nope"]')],
        "keep_columns",
    ),
    "schema property status": (
        lambda f: [
            "run",
            f.job(output='schema = {type = "object", properties = {status = {type = "string"}}}'),
        ],
        "status",
    ),
    "max_in_flight 0": (lambda f: ["run", f.job(limits="max_in_flight = 0")], "max_in_flight"),
    "temperature wrong type": (lambda f: ["run", f.job('temperature = "hot"')], "temperature"),
    "schema file missing": (
        lambda f: ["run", f.job(output='schema = "missing-schema.json"')],
        "missing-schema.json",
    ),
    "schema invalid": (
        lambda f: [
            "run",
            f.job(output='schema = {type = "object", properties = {a = {type = "strnig"}}}'),
        ],
        "[output] schema",
    ),
    "bad endpoint": (lambda f: ["run", f.job('endpoint = "embeddings"')], "endpoint"),
    "budget without price": (
        lambda f: [
            "run",
            f.job(),
            "--base-url",
            "https://models.example.invalid/v1",
            "--max-cost",
            "1",
        ],
        "[budget] max_cost_usd",
    ),
    "output on the hub": (
        lambda f: ["run", f.job(), "--output", "hf://datasets/u/r/x.parquet"],
        "hf:// is read only",
    ),
    "output is a folder": (lambda f: ["run", f.job(), "--output", str(f.path)], "is a folder"),
    "state_dir is a file": (
        lambda f: ["run", f.job(output=f'state_dir = "{f.write("state", "x")}"')],
        "state_dir",
    ),
    # -- inputs ------------------------------------------------------------------------
    "jsonl broken line": (
        lambda f: ["run", f.job(), "--input", f.write("in.jsonl", '{"text": "a"}\n{"text": \n')],
        "line 2",
    ),
    "jsonl mixed types": (
        lambda f: [
            "run",
            f.job(),
            "--input",
            f.write("in.jsonl", '{"text": "a"}\n{"text": 5}\n'),
        ],
        "text",
    ),
    "not parquet": (
        lambda f: ["run", f.job(), "--input", f.write("bad.parquet", "not parquet at all")],
        "bad.parquet",
    ),
    "glob matches nothing": (
        lambda f: ["run", f.job(), "--input", str(f.path / "nothing-*.parquet")],
        "nothing-*.parquet",
    ),
    "id column missing": (lambda f: ["run", f.job(input_='id_column = "rid"')], "rid"),
    "duplicate ids": (
        lambda f: [
            "run",
            f.job(input_='id_column = "text"'),
            "--input",
            f.write("dup.jsonl", '{"text": "same"}\n{"text": "same"}\n'),
        ],
        "same",
    ),
    # -- OpenAI batch files --------------------------------------------------------------
    "batch not json": (lambda f: _batch(f, [_line("a"), "{nope"]), "line 2"),
    "batch no custom_id": (
        lambda f: _batch(f, [_line("a"), json.dumps({"method": "POST"})]),
        "line 2",
    ),
    "batch duplicate id": (lambda f: _batch(f, [_line("a"), _line("a")]), "line 2"),
    "batch stream": (lambda f: _batch(f, [_line("a", stream=True)]), "stream"),
    "batch without endpoint": (
        lambda f: ["run", f.write("requests.jsonl", _line("a") + "\n")],
        "--base-url",
    ),
    # -- flags ---------------------------------------------------------------------------
    "limit 0": (lambda f: ["run", f.job(), "--limit", "0"], "--limit"),
    "local and base-url": (lambda f: ["run", f.job(), "--local", "--base-url", f.url], "--local"),
    "verbose and quiet": (lambda f: ["run", f.job(), "-v", "-q"], "--quiet"),
    "log file unwritable": (
        lambda f: ["run", f.job(), "--log-file", f"{f.write('afile', 'x')}/run.log"],
        "--log-file",
    ),
    "estimate rows-to csv": (lambda f: ["estimate", f.job(), "--rows-to", "x.csv"], "--rows-to"),
    "estimate sample 0": (lambda f: ["estimate", f.job(), "--sample", "0"], "--sample"),
    "export before any run": (lambda f: ["export", f.job()], "[output] path"),
    "export bad format": (lambda f: ["export", f.job(), "--format", "csv"], "--format"),
    "status no job file": (lambda f: ["status", str(f.path / "gone.toml")], "gone.toml"),
    "status typo in job": (lambda f: ["status", f.job("temprature = 0")], "temperature"),
}


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    with local_server(latency_ms=1) as url:
        yield url


def test_the_corpus_is_large() -> None:
    assert len(CASES) >= 30


@pytest.mark.parametrize("name", sorted(CASES))
def test_broken_input_gives_one_clear_line(
    name: str, server_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    pq.write_table(pa.table({"text": ["a", "b", "c"]}), tmp_path / "in.parquet")
    folder = Folder(tmp_path, server_url)
    args, words = CASES[name]
    argv = args(folder)
    reset_server_stats(server_url)
    result = CliRunner().invoke(cli, argv, env={"WAVESPEED_API_KEY": None})
    output = result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{name}: {result.exception!r}\n{output}"
    )
    assert "Traceback" not in output, output
    assert result.exit_code in (1, 2), f"{name}: exit {result.exit_code}\n{output}"
    assert words in output, f"{name}: {words!r} not in:\n{output}"
    assert server_stats(server_url)["requests_total"] == 0
