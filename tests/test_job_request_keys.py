"""Issue 12: [request] knows its keys. Typos get a "did you mean", provider-specific keys go in
[request.extra_body], credentials are refused without being repeated, and OpenAI batch files
(the user's own requests) are not subjected to any of it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.engine.context import JobContext, request_template
from pipeline.errors import JobFileError
from pipeline.io.openai_batch import batch_file_job
from pipeline.job.load import load_job, parse_job
from pipeline.job.params import OWN_KEYS, REQUEST_PARAMS, SET_BY_PIPELINE
from pipeline.job.spec import JobSpec

ROOT = Path(__file__).resolve().parent.parent

JOB = """
name = "keys"
[input]
path = "in.parquet"
[request]
model = "deepseek-v4-flash"
prompt = "Review: {{text}}"
{request}
[output]
path = "out.parquet"
"""


def _job(request: str) -> JobSpec:
    return parse_job(JOB.format(request=request), "jobs/x.toml")


def _error(request: str) -> JobFileError:
    with pytest.raises(JobFileError) as info:
        _job(request)
    return info.value


@pytest.mark.parametrize(
    ("line", "key", "meant"),
    [
        ("temprature = 0", "temprature", "temperature"),
        ("max_token = 150", "max_token", "max_tokens"),
        ("top-p = 0.9", "top-p", "top_p"),
        ("thinkng = 'disabled'", "thinkng", "thinking"),
        ("response_fromat = { type = 'json_object' }", "response_fromat", "response_format"),
    ],
)
def test_a_typo_is_refused_with_the_key_it_most_likely_meant(
    line: str, key: str, meant: str
) -> None:
    error = _error(line)
    assert error.key == f"[request] {key}"
    assert f"did you mean `{meant}`?" in error.problem
    assert "[request.extra_body]" in error.fix
    assert str(error).startswith(f"jobs/x.toml: [request] {key}: unknown key; did you mean")


def test_an_unknown_key_with_no_close_match_says_where_provider_keys_go() -> None:
    error = _error("frobnicate = 3")
    assert error.key == "[request] frobnicate"
    assert "did you mean" not in str(error)
    assert "unknown key" in error.problem
    assert error.fix == (
        "To pass a provider-specific key on purpose, put it in a [request.extra_body] table."
    )


KNOWN = [
    "frequency_penalty = 0.5",
    "presence_penalty = -0.5",
    "logit_bias = { 50256 = -100 }",
    "logprobs = true",
    "top_logprobs = 3",
    "max_completion_tokens = 100",
    "n = 1",
    "seed = 7",
    'stop = ["\\n"]',
    "top_p = 0.9",
    'user = "u-1"',
    'service_tier = "auto"',
    'reasoning_effort = "high"',
    'modalities = ["text"]',
    'prediction = { type = "content", content = "x" }',
    'metadata = { team = "a" }',
    "store = false",
    'verbosity = "low"',
    "web_search_options = {}",
    "parallel_tool_calls = false",
    'tool_choice = "auto"',
    'tools = [{ type = "function", function = { name = "f" } }]',
    'response_format = { type = "json_object" }',
    'prompt_cache_key = "k"',
    'safety_identifier = "s"',
    'thinking = { type = "enabled" }',
]


@pytest.mark.parametrize("line", KNOWN)
def test_openai_and_deepseek_parameters_are_accepted_and_sent(line: str) -> None:
    job = _job(line)
    key = line.split(" = ", maxsplit=1)[0]
    assert key in job.request.params
    body = request_template(job).body({"text": "good"})
    assert not isinstance(body, str)
    assert key in body  # type: ignore[operator]


def test_completions_parameters_are_accepted_for_the_completions_endpoint() -> None:
    job = parse_job(
        JOB.format(request='endpoint = "completions"\nsuffix = "x"\nbest_of = 2\necho = false'),
        "x.toml",
    )
    assert job.request.params == {"best_of": 2, "echo": False}


@pytest.mark.parametrize(
    ("endpoint", "line", "key"),
    [
        ("chat/completions", "best_of = 2", "best_of"),
        ("completions", 'tools = [{ type = "function", function = { name = "f" } }]', "tools"),
    ],
)
def test_a_parameter_of_the_other_endpoint_is_refused(endpoint: str, line: str, key: str) -> None:
    extra = 'suffix = "x"\n' if endpoint == "completions" else ""
    error = _error(f'endpoint = "{endpoint}"\n{extra}{line}')
    assert error.key == f"[request] {key}"
    assert "is a parameter of endpoint" in error.problem
    assert "[request.extra_body]" in error.fix


@pytest.mark.parametrize("key", ["stream", "stream_options"])
def test_streaming_is_refused(key: str) -> None:
    value = "true" if key == "stream" else "{ include_usage = true }"
    error = _error(f"{key} = {value}")
    assert error.key == f"[request] {key}"
    assert "reads each response whole" in error.problem


def test_extra_body_keys_are_sent_as_they_are_after_the_known_ones() -> None:
    job = _job(
        "temperature = 0.2\n"
        "[request.extra_body]\n"
        "top_k = 40\n"
        "repetition_penalty = 1.1\n"
        'chat_template_kwargs = { enable_thinking = false, "weird-Key" = "x" }'
    )
    assert list(job.request.params) == [
        "temperature",
        "top_k",
        "repetition_penalty",
        "chat_template_kwargs",
    ]
    body = request_template(job).body({"text": "good"})
    assert isinstance(body, dict)
    assert body["top_k"] == 40
    assert body["chat_template_kwargs"] == {"enable_thinking": False, "weird-Key": "x"}
    assert "extra_body" not in body


def test_a_key_in_both_request_and_extra_body_is_refused() -> None:
    error = _error("temperature = 0\nextra_body = { temperature = 1 }")
    assert error.key == "[request] extra_body.temperature"
    assert "also set as [request] temperature" in error.problem


@pytest.mark.parametrize("key", ["messages", "model", "prompt", "suffix", "stream"])
def test_extra_body_cannot_set_what_pipeline_writes(key: str) -> None:
    error = _error(f"extra_body = {{ {key} = 1 }}")
    assert error.key == f"[request] extra_body.{key}"


def test_extra_body_must_be_a_table_of_finite_values() -> None:
    assert _error('extra_body = "top_k=1"').key == "[request] extra_body"
    assert _error("extra_body = { a = { b = inf } }").key == "[request] extra_body.a"
    assert _error("temperature = nan").key == "[request] temperature"


SECRET = "sk-abc123def456ghi789"


@pytest.mark.parametrize(
    ("line", "key"),
    [
        (f'api_key = "{SECRET}"', "[request] api_key"),
        (f'API-Key = "{SECRET}"', "[request] API-Key"),
        ('Authorization = "Basic xyz"', "[request] Authorization"),
        ("token = 12345", "[request] token"),
        ('password = "hunter2"', "[request] password"),
        ('extra_body = { apikey = "x" }', "[request] extra_body.apikey"),
        ('extra_body = { headers = { secret = "x" } }', "[request] extra_body.headers.secret"),
        (f'extra_body = {{ auth = "{SECRET}" }}', "[request] extra_body.auth"),
        ('extra_body = { auth = "Bearer abcdefgh" }', "[request] extra_body.auth"),
        (f'metadata = {{ who = "{SECRET}" }}', "[request] metadata.who"),
        (f'stop = ["x", "{SECRET}"]', "[request] stop[1]"),
        (f'system = "{SECRET}"', "[request] system"),
    ],
)
def test_credentials_are_refused_and_never_repeated(line: str, key: str) -> None:
    error = _error(line)
    assert error.key == key
    assert 'api_key_env = "NAME_OF_VARIABLE"' in error.fix
    for shown in (SECRET, "abcdefgh", "hunter2", "12345", "xyz"):
        assert shown not in str(error)


def test_the_key_itself_in_api_key_env_is_refused_without_repeating_it() -> None:
    error = _error(f'api_key_env = "{SECRET}"')
    assert error.key == "[request] api_key_env"
    assert "names the environment variable" in error.problem
    assert SECRET not in str(error)


def test_a_credential_anywhere_else_in_the_file_is_refused_too() -> None:
    with pytest.raises(JobFileError) as info:
        parse_job(f'api_key = "{SECRET}"\n' + JOB.format(request=""), "x.toml")
    assert info.value.key == "api_key"
    assert SECRET not in str(info.value)


def test_only_request_values_are_taken_for_credentials() -> None:
    text = JOB.format(request="").replace('"in.parquet"', '"sk-learn-rows.parquet"')
    assert parse_job(text, "x.toml").input.path == "sk-learn-rows.parquet"


def test_schema_property_names_in_extra_body_are_data_not_credentials() -> None:
    job = _job(
        "[request.extra_body.guided_json]\n"
        'type = "object"\n'
        'properties = { password = { type = "string" }, token = { type = "integer" } }\n'
    )
    assert "guided_json" in job.request.params


def test_the_table_of_keys_is_frozen_and_disjoint_from_pipelines_own() -> None:
    with pytest.raises(TypeError):
        REQUEST_PARAMS["new"] = frozenset()  # type: ignore[index]
    assert not (set(SET_BY_PIPELINE) - {"stream_options"}) & set(REQUEST_PARAMS)
    assert OWN_KEYS & set(REQUEST_PARAMS) == set()


@pytest.mark.parametrize("path", sorted((ROOT / "jobs").glob("*.toml")), ids=lambda p: p.name)
def test_the_sample_jobs_still_load(path: Path) -> None:
    job = load_job(path)
    assert job.notices == ()
    assert Path(job.input.path).exists()


def test_batch_file_bodies_are_the_users_own_and_not_checked(tmp_path: Path) -> None:
    """A batch file's bodies may hold any key: they are sent as the user wrote them."""
    line = {
        "custom_id": "a",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "top_k": 5,
            "temprature": 0,
        },
    }
    path = tmp_path / "requests.jsonl"
    path.write_text(json.dumps(line) + "\n")
    job = batch_file_job(path, model=None, max_in_flight=None, api_key_env=None)
    context = JobContext(job)
    assert context.scan().rows == 1
    sample = batch_file_job(
        ROOT / "data/sample/openai_batch.jsonl", model=None, max_in_flight=None, api_key_env=None
    )
    assert JobContext(sample).scan().rows > 0
