from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.errors import JobFileError
from pipeline.job.load import load_job, parse_job
from pipeline.job.spec import Overrides, apply_overrides

GOOD = """
name = "label"
[input]
path = "in.parquet"
id_column = "review_id"
[request]
model = "deepseek/deepseek-v4-flash"
system = "You label."
prompt = "Review: {text}"
max_tokens = 64
temperature = 0
thinking = { type = "disabled" }
[limits]
max_in_flight = 8
[output]
path = "out.parquet"
keep_columns = ["product"]
"""


def test_good_job_parses_to_frozen_values() -> None:
    job = parse_job(GOOD, "x.toml")  # in the current folder: its paths read as they are
    assert job.name == "label"
    assert job.request.params == {
        "max_tokens": 64,
        "temperature": 0,
        "thinking": {"type": "disabled"},
    }
    assert job.request.max_tokens == 64
    assert job.limits.max_in_flight == 8
    assert job.limits.max_attempts == 6
    assert job.output.keep_columns == ("product",)
    assert job.state_path == Path("out.parquet.state")
    with pytest.raises(AttributeError):
        job.name = "other"  # type: ignore[misc]


def _error(text: str) -> JobFileError:
    with pytest.raises(JobFileError) as info:
        parse_job(text, "jobs/x.toml")
    return info.value


def test_unknown_key_names_file_key_and_known_keys() -> None:
    error = _error(GOOD.replace("max_in_flight = 8", "max_in_fligt = 8"))
    assert str(error).startswith("jobs/x.toml: [limits] max_in_fligt: unknown key.")
    assert "max_in_flight" in str(error)


def test_unknown_top_level_table() -> None:
    assert _error(GOOD + "\n[limts]\nx = 1\n").key == "[limts]"


def test_wrong_type_names_the_key_and_the_value() -> None:
    error = _error(GOOD.replace("max_tokens = 64", 'max_tokens = "64"'))
    assert error.key == "[request] max_tokens"
    assert "'64'" in str(error)


def test_missing_required_key() -> None:
    error = _error(GOOD.replace('path = "out.parquet"', ""))
    assert error.key == "[output] path"
    assert "missing" in str(error)


def test_prompt_and_messages_column_are_exclusive() -> None:
    error = _error(GOOD.replace('prompt = "Review: {text}"', 'prompt = "x"\nmessages_column = "m"'))
    assert "exactly one" in str(error)
    assert "exactly one" in str(_error(GOOD.replace('prompt = "Review: {text}"', "")))


def test_malformed_placeholder_is_reported_at_load() -> None:
    error = _error(GOOD.replace("{text}", "{text"))
    assert error.key == "[request] prompt"


def test_invalid_toml() -> None:
    assert "not valid TOML" in str(_error("name = "))


def test_out_of_range_values() -> None:
    assert _error(GOOD.replace("max_in_flight = 8", "max_in_flight = 0")).key == (
        "[limits] max_in_flight"
    )
    assert _error(GOOD.replace("temperature = 0", "temperature = 9")).key == (
        "[request] temperature"
    )


@pytest.mark.parametrize("key", ["messages", "model_", "stream"])
def test_reserved_body_keys_cannot_be_passed_through(key: str) -> None:
    if key == "model_":
        return
    error = _error(GOOD.replace("temperature = 0", f"temperature = 0\n{key} = true"))
    assert error.key == f"[request] {key}"


def test_missing_job_file(tmp_path: Path) -> None:
    with pytest.raises(JobFileError, match="no such job file"):
        load_job(tmp_path / "nope.toml")


def test_overrides() -> None:
    job = apply_overrides(
        parse_job(GOOD, "x.toml"),
        Overrides(input="a.jsonl", output="b.parquet", base_url="http://h/v1/", limit=5),
    )
    assert job.input.path == "a.jsonl"
    assert job.input.limit == 5
    assert job.output.path == "b.parquet"
    assert job.request.base_url == "http://h/v1"


def test_pricing_table() -> None:
    job = parse_job(GOOD + "\n[pricing]\ninput = 0.5\noutput = 1.25\n", "x.toml")
    assert job.pricing is not None
    assert str(job.pricing.output) == "1.25"
    assert job.pricing.cached_input is None
