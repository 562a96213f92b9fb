"""Issue 6 end to end: the CLI against the built-in server over real HTTP on 127.0.0.1 —
structured labels, thinking on and off, tool calls, FIM and OpenAI batch files."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pydantic
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion

from pipeline.server.process import server_stats

ROOT = Path(__file__).resolve().parent.parent


def pipeline_cli(*args: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_sample_labeling_job_gives_typed_columns_and_flags_invalid_answers(
    tmp_path: Path, local_server: Callable[..., str]
) -> None:
    base_url = local_server(latency_ms=5, invalid_json_rate=0.2)
    out = tmp_path / "labels.parquet"
    done = pipeline_cli(
        "run",
        "jobs/label_reviews_structured.toml",
        "--base-url",
        base_url,
        "--output",
        out,
    )
    assert done.returncode == 3, done.stderr  # some answers stayed invalid: rows failed
    frame = pl.read_parquet(out)
    assert frame.schema["label"] == pl.Categorical
    assert frame.schema["confidence"] == pl.Float64
    assert frame.schema["topics"] == pl.List(pl.Categorical)
    assert isinstance(frame.schema["evidence"], pl.Struct)
    ok = frame.filter(pl.col("status") == "ok")
    failed = frame.filter(pl.col("status") == "failed")
    assert ok.height > 200
    assert failed.height > 0
    assert ok["label"].null_count() == 0
    assert ok["confidence"].is_between(0, 1).all()
    assert failed["label"].null_count() == failed.height
    assert failed["response"].null_count() == 0  # the raw text is kept
    assert all(e.startswith("invalid answer after 1 re-ask(s)") for e in failed["error"])
    reasks = int(frame["reasks"].sum())
    assert reasks > failed.height
    stats = server_stats(base_url)
    assert stats["ok"] == 300 + reasks  # each re-ask is a request ...
    assert frame["attempts"].sum() == 300 + reasks  # ... counted on its row ...
    assert frame["prompt_tokens"].sum() == stats["prompt_tokens_total"]  # ... and billed
    summary = json.loads((tmp_path / "labels.summary.json").read_text())
    assert summary["this_run"]["reasks"] == reasks


@pytest.mark.parametrize("thinking", ["enabled", "disabled"])
def test_thinking_on_and_off(
    tmp_path: Path, local_server: Callable[..., str], thinking: str
) -> None:
    base_url = local_server(latency_ms=5)
    job = tmp_path / "job.toml"
    job.write_text(
        (ROOT / "jobs/summarize_articles.toml")
        .read_text()
        .replace('thinking = { type = "enabled" }', f'thinking = "{thinking}"')
        .replace(
            'reasoning_effort = "high"',
            "" if thinking == "disabled" else 'reasoning_effort = "max"',
        )
        .replace("../data/sample/", f"{ROOT}/data/sample/")
    )
    out = tmp_path / "out.parquet"
    done = pipeline_cli("run", job, "--base-url", base_url, "--output", out, "--limit", "10")
    assert done.returncode == 0, done.stderr
    frame = pl.read_parquet(out)
    if thinking == "enabled":
        assert frame["reasoning"].null_count() == 0
        assert (frame["reasoning_tokens"] > 0).all()
    else:
        assert frame["reasoning"].null_count() == 10
        assert (frame["reasoning_tokens"] == 0).all()


def test_small_max_tokens_with_thinking_warns_and_reports_truncated_rows(
    tmp_path: Path, local_server: Callable[..., str]
) -> None:
    base_url = local_server(latency_ms=5)
    job = tmp_path / "job.toml"
    job.write_text(
        (ROOT / "jobs/summarize_articles.toml")
        .read_text()
        .replace("max_tokens = 1024", "max_tokens = 40")
        .replace("../data/sample/", f"{ROOT}/data/sample/")
    )
    out = tmp_path / "out.parquet"
    done = pipeline_cli("run", job, "--base-url", base_url, "--output", out)
    assert done.returncode == 3
    assert "warning: thinking is on and max_tokens is 40" in done.stderr
    frame = pl.read_parquet(out)
    cut = frame.filter(pl.col("finish_reason") == "length")
    assert cut.height > 0
    assert (cut["status"] == "failed").all()
    assert all(error.startswith("truncated: ") for error in cut["error"])


def test_fim_sample_job_runs_against_the_built_in_server(tmp_path: Path) -> None:
    out = tmp_path / "fim.parquet"
    done = pipeline_cli("run", "jobs/complete_code_fim.toml", "--local", "--output", out)
    assert done.returncode == 0, done.stderr
    frame = pl.read_parquet(out)
    assert frame.height > 0
    assert (frame["status"] == "ok").all()
    assert frame["response"].str.len_chars().min() > 0  # type: ignore[operator]


class BatchOutputLine(pydantic.BaseModel):
    """One line of an OpenAI Batch API output file, as documented by OpenAI."""

    model_config = pydantic.ConfigDict(extra="forbid")

    class Response(pydantic.BaseModel):
        status_code: int
        request_id: str
        body: dict[str, object]

    class Error(pydantic.BaseModel):
        code: str
        message: str

    id: str
    custom_id: str
    response: Response | None
    error: Error | None


def test_an_openai_batch_file_runs_as_is_and_exports_to_the_batch_output_format(
    tmp_path: Path, local_server: Callable[..., str]
) -> None:
    base_url = local_server(latency_ms=5, served_models=("meta-llama/Meta-Llama-3-8B-Instruct",))
    batch = tmp_path / "openai_example_batch.jsonl"
    batch.write_text((ROOT / "data/sample/openai_batch.jsonl").read_text())
    done = pipeline_cli("run", batch, "--base-url", base_url, "--max-in-flight", "4", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = pl.read_parquet(tmp_path / "out" / "openai_example_batch.output.parquet")
    assert out["id"].to_list() == ["request-1", "request-2"]
    assert (out["model"] == "meta-llama/Meta-Llama-3-8B-Instruct").all()

    again = pipeline_cli("run", batch, "--base-url", base_url, cwd=tmp_path)
    assert again.returncode == 0
    assert server_stats(base_url)["ok"] == 2  # resumed: nothing sent twice

    exported = pipeline_cli("export", batch, "--to", tmp_path / "results.jsonl", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    lines = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [line["custom_id"] for line in lines] == ["request-1", "request-2"]
    for line in lines:
        parsed = BatchOutputLine.model_validate(line)
        assert parsed.response is not None
        assert parsed.response.status_code == 200
        completion = ChatCompletion.model_validate(parsed.response.body)
        assert completion.choices[0].message.content


def test_a_completions_batch_file_exports_text_completions(
    tmp_path: Path, local_server: Callable[..., str]
) -> None:
    base_url = local_server(latency_ms=5)
    batch = tmp_path / "fim_batch.jsonl"
    lines = [
        {
            "custom_id": f"fim-{i}",
            "method": "POST",
            "url": "/v1/completions",
            "body": {
                "model": "deepseek-v4-flash",
                "prompt": f"def f{i}(x):\n",
                "suffix": "\n    return y\n",
                "max_tokens": 24,
            },
        }
        for i in range(3)
    ]
    batch.write_text("".join(json.dumps(line) + "\n" for line in lines))
    done = pipeline_cli("run", batch, "--base-url", base_url, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    exported = pipeline_cli("export", batch, "--to", tmp_path / "results.jsonl", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    for text in (tmp_path / "results.jsonl").read_text().splitlines():
        line = BatchOutputLine.model_validate_json(text)
        assert line.response is not None
        Completion.model_validate(line.response.body)


def test_a_small_job_file_runs_an_openai_batch_file_with_its_own_settings(
    tmp_path: Path, local_server: Callable[..., str]
) -> None:
    base_url = local_server(latency_ms=5)
    job = tmp_path / "batch.toml"
    job.write_text(
        f"""
name = "batch-job"
[input]
path = "{ROOT / "data/sample/openai_batch.jsonl"}"
format = "openai-batch"
[request]
base_url = "{base_url}"
model = "deepseek-v4-flash"      # replaces every line's model
temperature = 0                   # a default for lines that do not set it
[limits]
max_in_flight = 2
[output]
path = "{tmp_path / "batch.parquet"}"
[budget]
max_cost_usd = 1.0
"""
    )
    done = pipeline_cli("run", job)
    assert done.returncode == 0, done.stderr
    out = pl.read_parquet(tmp_path / "batch.parquet")
    assert out["id"].to_list() == ["request-1", "request-2"]
    assert (out["model"] == "deepseek-v4-flash").all()
    assert out["cost_usd"].null_count() == 0  # a priced model: the budget applies
    bad = tmp_path / "bad.toml"
    bad.write_text(
        job.read_text().replace(
            'format = "openai-batch"', 'id_column = "x"\nformat = "openai-batch"'
        )
    )
    refused = pipeline_cli("run", bad)
    assert refused.returncode == 2
    assert "[input] id_column" in refused.stderr
    assert "Traceback" not in refused.stderr
