"""``--local`` runs keep their own side: results, spend, history and output never summed with
the real endpoint's; and ``--model`` overrides a job file's model with results kept apart."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from click.testing import CliRunner

from pipeline.cli.commands import cli
from pipeline.server.process import server_stats

KEY_ENV = {"WAVESPEED_API_KEY": "sk-test"}


def invoke(*args: str | Path) -> tuple[int, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args], env=KEY_ENV, catch_exceptions=False)
    return result.exit_code, result.output


def as_json(*args: str | Path) -> dict[str, Any]:
    code, output = invoke(*args, "--json")
    assert code == 0, output
    data: dict[str, Any] = json.loads(output[output.index("{") :])
    return data


def test_local_spend_history_and_output_stay_apart_from_the_real_endpoint(
    sample_jobs: Path, local_server: Callable[..., str]
) -> None:
    job = sample_jobs / "label_reviews.toml"
    out = sample_jobs.parent / "out"
    code, output = invoke("run", job, "--local")
    assert code == 0, output
    local_out = pl.read_parquet(out / "label-reviews.local.parquet")
    assert local_out.height == 300
    assert not (out / "label-reviews.parquet").exists()  # the real output is not touched
    local_spent = sum(local_out["cost_usd"].to_list())
    assert local_spent > 0

    real = as_json("status", job)
    assert real["endpoint"] == "https://llm.wavespeed.ai/v1"
    assert real["rows"]["ok"] == 0
    assert real["spent"]["cost_usd"] in (None, "0")
    local = as_json("status", job, "--local")
    assert local["endpoint"] == "local"
    assert local["rows"]["ok"] == 300
    assert float(local["spent"]["cost_usd"]) == pytest.approx(local_spent)
    _, text = invoke("status", job)
    assert "add --local to see them" in text

    # The real estimate knows nothing of the local answers; the local one learns from them.
    assert as_json("estimate", job)["output_tokens"]["source"] == "max_tokens"
    assert as_json("estimate", job, "--local")["output_tokens"]["source"] == "history"

    # A budget below local + real spend, above the real spend alone: the run is not stopped
    # by what the built-in server "spent".
    base = local_server(latency_ms=1)
    cap = f"{local_spent * 1.2:.6f}"
    code, output = invoke("run", job, "--base-url", base, "--max-cost", cap)
    assert code == 0, output
    assert server_stats(base)["requests_total"] == 300
    real_out = pl.read_parquet(out / "label-reviews.parquet")
    assert set(real_out["status"]) == {"ok"}
    assert pl.read_parquet(out / "label-reviews.local.parquet").equals(local_out)


def test_export_takes_local(sample_jobs: Path) -> None:
    job = sample_jobs / "label_reviews.toml"
    code, output = invoke("run", job, "--local", "--limit", "5")
    assert code == 0, output
    code, output = invoke("export", job)
    assert code == 2
    assert "no output" in output
    assert "--local" in output
    target = sample_jobs.parent / "local.jsonl"
    code, output = invoke("export", job, "--local", "--to", target)
    assert code == 0, output
    assert "the built-in server's (--local)" in output
    assert len(target.read_text().splitlines()) == 5


def test_model_overrides_a_job_files_model_and_its_results_stay_apart(
    sample_jobs: Path, local_server: Callable[..., str]
) -> None:
    job = sample_jobs / "label_reviews.toml"
    base = local_server(latency_ms=1)
    out = sample_jobs.parent / "out" / "label-reviews.parquet"
    code, output = invoke("run", job, "--base-url", base, "--limit", "5", "--model", "gpt-4o-mini")
    assert code == 0, output
    assert pl.read_parquet(out)["model"].to_list() == ["gpt-4o-mini"] * 5
    assert server_stats(base)["requests_total"] == 5

    # The job's own model: the other model's answers are not taken for its own.
    code, output = invoke("run", job, "--base-url", base, "--limit", "5")
    assert code == 0, output
    assert server_stats(base)["requests_total"] == 10
    assert set(pl.read_parquet(out)["model"]) == {"deepseek/deepseek-v4-flash"}
    mini = as_json("status", job, "--base-url", base, "--limit", "5", "--model", "gpt-4o-mini")
    assert mini["rows"]["ok"] == 5
